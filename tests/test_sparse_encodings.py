"""Sparse and Codebook encodings (Deep Compression storage): decode(encode(t)) is t bit for bit, the bit-level
helpers round-trip, the position stream picks its smaller form, and damaged streams are refused, not misread."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from compressor.bitpack import decode_positions, encode_positions, pack_bits, unpack_bits
from compressor.encodings import Codebook, Sparse, encoding_from_json
from compressor.export.safetensors import write_safetensors

# Deterministic and light: no example database written into the repository, a fixed example sequence.
PROPERTY = settings(derandomize=True, database=None, max_examples=50, deadline=None)

# Same-width integer dtype, for bitwise views (NaN payloads and -0.0 must survive too).
BITS = {torch.float16: torch.int16, torch.float32: torch.int32}

shapes = st.lists(st.integers(min_value=0, max_value=9), min_size=0, max_size=4).map(tuple)
# 0 and 1 explicitly: all kept, all pruned.
sparsities = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0), st.sampled_from([0.9, 0.99, 0.999]))
seeds = st.integers(0, 2**31 - 1)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Uniformly random bit patterns of ``dtype``: NaNs (several payloads), infinities and subnormals occur."""
    ints = BITS[dtype]
    info = torch.iinfo(ints)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=ints).view(dtype)


def sparse_tensor(shape: tuple[int, ...], dtype: torch.dtype, sparsity: float, seed: int) -> torch.Tensor:
    """Random bit patterns with about ``sparsity`` of the elements set to +0.0 (and no -0.0; see the xfail test)."""
    t = random_bits(shape, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    t[torch.rand(shape, generator=gen) < sparsity] = 0
    t[t == 0] = 0.0  # -0.0 patterns become +0.0
    return t


def positions_cost_bits(mask: torch.Tensor) -> int:
    """The smallest size, in bits, of the two documented position forms, computed independently of the encoder:
    a bitmask (one bit per element) or b-bit relative indices (one symbol per non-zero, plus one filler symbol
    per full run of 2**b - 1 zeros skipped)."""
    flat = mask.reshape(-1).tolist()
    gaps, run = [], 0
    for bit in flat:
        if bit:
            gaps.append(run)
            run = 0
        else:
            run += 1
    best = len(flat)
    for b in range(1, 9):
        m = (1 << b) - 1
        best = min(best, sum(g // m + 1 for g in gaps) * b)
    return best


# ------------------------------------------------------------------------------------------ pack_bits


@PROPERTY
@given(bits=st.integers(1, 16), count=st.integers(0, 300), seed=seeds)
def test_pack_bits_round_trip(bits, count, seed):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 1 << bits, (count,), generator=gen, dtype=torch.int64)
    if count:
        values[0] = (1 << bits) - 1  # the largest value uses every bit
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (count * bits + 7) // 8  # no byte wasted
    out = unpack_bits(packed, bits, count)
    assert out.dtype == torch.int64
    assert torch.equal(out, values)


def test_pack_bits_is_least_significant_bit_first():
    # 3-bit values 1, 2, 7: bits (lsb first) 100 010 111 -> byte 0b11010001, then 0b00000001.
    packed = pack_bits(torch.tensor([1, 2, 7]), 3)
    assert packed.tolist() == [0b11010001, 0b00000001]


@pytest.mark.parametrize("bits", [0, 17, -1])
def test_pack_bits_refuses_widths_outside_1_to_16(bits):
    with pytest.raises(ValueError, match="bits must be in 1..16"):
        pack_bits(torch.tensor([0, 1]), bits)


@PROPERTY
@given(bits=st.integers(1, 16), count=st.integers(1, 100))
def test_unpack_bits_refuses_too_few_bytes(bits, count):
    packed = pack_bits(torch.zeros(count, dtype=torch.int64), bits)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(packed[:-1], bits, count)


# ------------------------------------------------------------------------------------------ positions


@PROPERTY
@given(shape=shapes, density=st.floats(0.0, 1.0), seed=seeds)
def test_positions_round_trip_in_the_smaller_form(shape, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < density
    numel = mask.numel()
    stream = encode_positions(mask)
    assert stream.dtype == torch.uint8 and stream.dim() == 1
    form = int(stream[0])
    assert 0 <= form <= 8
    # Never larger than the bitmask, and exactly the smaller of the documented forms.
    assert stream.numel() - 1 <= (numel + 7) // 8
    assert stream.numel() - 1 == (positions_cost_bits(mask) + 7) // 8
    out = decode_positions(stream, numel, int(mask.sum()))
    assert out.dtype == torch.bool and out.shape == (numel,)
    assert torch.equal(out, mask.reshape(-1))


@pytest.mark.parametrize("numel", [1, 8, 13, 64, 1000])
def test_all_true_mask_is_a_bitmask(numel):
    stream = encode_positions(torch.ones(numel, dtype=torch.bool))
    assert int(stream[0]) == 0
    assert stream.numel() == 1 + (numel + 7) // 8


@PROPERTY
@given(numel=st.integers(16, 4000), seed=seeds)
def test_dense_masks_use_the_bitmask(numel, seed):
    # At least half the elements set, the last one too: 1-bit relative indices cost exactly the bitmask (nothing
    # trailing to skip) and wider ones at least 2 bits per set element, so the bitmask must win.
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(numel, generator=gen) < 0.85
    mask[-1] = True
    assume(2 * int(mask.sum()) >= numel)
    stream = encode_positions(mask)
    assert int(stream[0]) == 0
    assert torch.equal(decode_positions(stream, numel, int(mask.sum())), mask)


@pytest.mark.parametrize("numel,where", [
    (1000, [3, 100, 500, 900]),
    (4096, [0]),
    (4096, [4095]),  # one long run of zeros: fillers only, then the last element
    (100_000, [7, 70_000, 99_999]),
    (5000, list(range(0, 5000, 97))),
])
def test_very_sparse_masks_use_relative_indices(numel, where):
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[where] = True
    stream = encode_positions(mask)
    assert 1 <= int(stream[0]) <= 8
    assert stream.numel() - 1 < (numel + 7) // 8 / 4  # far smaller than the bitmask
    out = decode_positions(stream, numel, len(where))
    assert out.nonzero().reshape(-1).tolist() == where


def test_positions_of_an_empty_mask_and_of_no_true_element():
    for numel in (0, 1, 10, 1000):
        mask = torch.zeros(numel, dtype=torch.bool)
        stream = encode_positions(mask)
        assert stream.numel() <= 1 + (numel + 7) // 8
        assert torch.equal(decode_positions(stream, numel, 0), mask)


# ------------------------------------------------------------------------------------------ Sparse


@PROPERTY
@given(shape=shapes, dtype=st.sampled_from([torch.float32, torch.float16]), sparsity=sparsities, seed=seeds)
def test_sparse_round_trip_is_bit_exact(shape, dtype, sparsity, seed):
    t = sparse_tensor(shape, dtype, sparsity, seed)
    original = t.clone()
    enc = Sparse(list(shape))
    stored = enc.encode(t)
    assert set(stored) == {".__values", ".__positions"}
    nnz = int((t != 0).sum())
    assert stored[".__values"].dtype == dtype and stored[".__values"].shape == (nnz,)
    assert stored[".__positions"].dtype == torch.uint8
    assert stored[".__positions"].numel() <= 1 + (t.numel() + 7) // 8
    out = enc.decode(stored)
    assert bitwise_equal(out, original)
    assert bitwise_equal(t, original)  # encode left its input alone


def test_sparse_scalar_and_single_element_tensors():
    for t in (torch.tensor(2.5), torch.tensor(0.0), torch.tensor([3.0]), torch.tensor([0.0]),
              torch.tensor([[float("nan")]]), torch.tensor([float("-inf")], dtype=torch.float16)):
        enc = Sparse(list(t.shape))
        assert bitwise_equal(enc.decode(enc.encode(t)), t)


def test_sparse_refuses_a_tensor_of_another_shape():
    with pytest.raises(ValueError, match="shape"):
        Sparse([2, 3]).encode(torch.ones(3, 2))


def test_sparse_keeps_negative_zero():
    t = torch.tensor([1.0, -0.0, 0.0, -2.0])
    enc = Sparse([4])
    assert bitwise_equal(enc.decode(enc.encode(t)), t)


# ------------------------------------------------------------------------------------------ Codebook


def codebook_tensor(shape: tuple[int, ...], bits: int, book_dtype: torch.dtype, sparse: bool, sparsity: float,
                    fill: float, seed: int) -> torch.Tensor:
    """A float32 tensor of at most 2**bits distinct values, each exactly representable in ``book_dtype``
    (infinities and subnormals included, NaN and -0.0 not); about ``sparsity`` of it +0.0."""
    gen = torch.Generator().manual_seed(seed)
    pool = random_bits((4 << bits,), book_dtype, seed)
    pool = torch.unique(pool[~torch.isnan(pool) & (pool != 0)])
    pool = pool[torch.randperm(pool.numel(), generator=gen)]
    k = max(1, round(fill * (1 << bits)))
    values = pool[:k].float()
    if not sparse and sparsity > 0:
        values[0] = 0.0  # a dense codebook stores zero as one of its values
    t = values[torch.randint(0, values.numel(), shape, generator=gen)]
    t[torch.rand(shape, generator=gen) < sparsity] = 0.0
    return t


@PROPERTY
@given(shape=shapes, bits=st.integers(1, 8), book=st.sampled_from(["float16", "float32"]), sparse=st.booleans(),
       sparsity=sparsities, fill=st.floats(0.0, 1.0), seed=seeds)
def test_codebook_round_trip_is_bit_exact(shape, bits, book, sparse, sparsity, fill, seed):
    book_dtype = getattr(torch, book)
    t = codebook_tensor(shape, bits, book_dtype, sparse, sparsity, fill, seed)
    original = t.clone()
    enc = Codebook(list(shape), bits, "float32", book, sparse=sparse)
    stored = enc.encode(t)
    assert set(stored) == {".__shared"}
    blob = stored[".__shared"]
    assert blob.dtype == torch.uint8 and blob.dim() == 1
    # Header: centroid count (uint16) and value count (uint32), little-endian.
    members = t != 0 if sparse else torch.ones_like(t, dtype=torch.bool)
    k = torch.unique(t[members]).numel()
    nnz = int(members.sum())
    assert int.from_bytes(bytes(blob[0:2].tolist()), "little") == k <= 1 << bits
    assert int.from_bytes(bytes(blob[2:6].tolist()), "little") == nnz
    # Then the centroids, the positions (sparse only) and nothing but the packed indices.
    size = 6 + k * book_dtype.itemsize + (nnz * bits + 7) // 8
    if sparse:
        size += encode_positions(members).numel()
    assert blob.numel() == size
    out = enc.decode(stored)
    assert bitwise_equal(out, original)


@PROPERTY
@given(shape=shapes, bits=st.integers(1, 8), sparse=st.booleans(), sparsity=sparsities, seed=seeds)
def test_codebook_with_float16_effective_dtype_round_trips(shape, bits, sparse, sparsity, seed):
    t = codebook_tensor(shape, bits, torch.float16, sparse, sparsity, 1.0, seed).half()
    enc = Codebook(list(shape), bits, "float16", "float16", sparse=sparse)
    assert bitwise_equal(enc.decode(enc.encode(t)), t)


def test_codebook_scalar_and_single_element_tensors():
    for sparse in (False, True):
        for t in (torch.tensor(0.5), torch.tensor([-3.0]), torch.tensor([[0.0]]), torch.zeros(0, 4)):
            enc = Codebook(list(t.shape), 1, sparse=sparse)
            out = enc.decode(enc.encode(t))
            assert bitwise_equal(out, t), (sparse, t)


@PROPERTY
@given(bits=st.integers(1, 7), extra=st.integers(1, 20), sparse=st.booleans(), seed=seeds)
def test_codebook_refuses_more_distinct_values_than_fit(bits, extra, sparse, seed):
    n = (1 << bits) + extra
    gen = torch.Generator().manual_seed(seed)
    values = torch.arange(1, n + 1, dtype=torch.float32)  # small integers: exact in float16
    t = values[torch.randperm(n, generator=gen)]
    with pytest.raises(ValueError, match=f"{n} distinct values do not fit a {bits}-bit codebook"):
        Codebook([n], bits, sparse=sparse).encode(t)


def test_codebook_with_exactly_2_to_the_bits_values_fits():
    t = torch.arange(1, 17, dtype=torch.float32).flip(0)
    enc = Codebook([16], 4)
    assert torch.equal(enc.decode(enc.encode(t)), t)


@pytest.mark.parametrize("value", [0.1, 1e6, 1.0 + 2**-12, 1e-9])
def test_codebook_refuses_values_float16_cannot_hold(value):
    t = torch.tensor([1.0, value, 0.0])
    with pytest.raises(ValueError, match="not all representable in float16"):
        Codebook([3], 2, codebook_dtype="float16", sparse=True).encode(t)
    # A float32 codebook holds them exactly.
    enc = Codebook([3], 2, codebook_dtype="float32", sparse=True)
    assert bitwise_equal(enc.decode(enc.encode(t)), t)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_codebook_refuses_index_widths_outside_1_to_8(bits):
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        Codebook([4], bits)
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        encoding_from_json({"kind": "codebook", "shape": [4], "bits": bits})


def test_codebook_refuses_a_tensor_of_another_shape():
    with pytest.raises(ValueError, match="shape"):
        Codebook([4], 2).encode(torch.ones(5))


@pytest.mark.parametrize("sparse", [False, True])
def test_codebook_keeps_negative_zero(sparse):
    t = torch.tensor([1.0, -0.0, 0.0, 2.0])
    enc = Codebook([4], 2, sparse=sparse)
    assert bitwise_equal(enc.decode(enc.encode(t)), t)


# ------------------------------------------------------------------------------------------ JSON


@PROPERTY
@given(shape=st.lists(st.integers(0, 5000), max_size=4), bits=st.integers(1, 8),
       dtype=st.sampled_from(["float32", "float16", "bfloat16"]), book=st.sampled_from(["float16", "float32"]),
       sparse=st.booleans())
def test_json_round_trip(shape, bits, dtype, book, sparse):
    for enc in (Sparse(shape), Codebook(shape, bits, dtype, book, sparse=sparse)):
        data = enc.to_json()
        assert data["kind"] == enc.kind and data["shape"] == shape
        again = encoding_from_json(json.loads(json.dumps(data)))  # through JSON text, as the manifest stores it
        assert type(again) is type(enc) and again == enc and again.to_json() == data
    cb = encoding_from_json(Codebook(shape, bits, dtype, book, sparse=sparse).to_json())
    assert (cb.bits, cb.dtype, cb.codebook_dtype, cb.sparse) == (bits, dtype, book, sparse)
    assert cb != Codebook(shape, bits, dtype, book, sparse=not sparse)
    assert Sparse(shape) != Sparse([*shape, 1])


def test_codebook_json_defaults():
    enc = encoding_from_json({"kind": "codebook", "shape": [3, 4], "bits": 4})
    assert enc == Codebook([3, 4], 4, "float32", "float16", sparse=False)


# ------------------------------------------------------------------------------------------ damaged streams


@PROPERTY
@given(numel=st.integers(1, 3000), density=st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.5, 0.9, 1.0]), seed=seeds)
def test_a_truncated_position_stream_is_refused(numel, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(numel, generator=gen) < density
    stream = encode_positions(mask)
    with pytest.raises(ValueError):
        decode_positions(stream[:-1], numel, int(mask.sum()))


def test_unknown_position_forms_and_an_empty_stream_are_refused():
    with pytest.raises(ValueError, match="empty position stream"):
        decode_positions(torch.zeros(0, dtype=torch.uint8), 10, 0)
    for form in (9, 200, 255):
        with pytest.raises(ValueError, match=f"unknown position form {form}"):
            decode_positions(torch.tensor([form, 0xFF], dtype=torch.uint8), 8, 8)


def test_a_position_stream_with_other_counts_is_refused():
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[[3, 100, 500, 900]] = True
    stream = encode_positions(mask)
    assert int(stream[0]) == 8  # one byte per symbol: no padding
    with pytest.raises(ValueError, match="expected 5"):
        decode_positions(stream, 1000, 5)  # more values than positions
    with pytest.raises(ValueError, match="within 500"):
        decode_positions(stream, 500, 4)  # positions beyond the tensor


def test_a_bitmask_with_more_values_than_marks_is_refused():
    t = torch.tensor([1.0, 0.0, 2.0, 3.0] * 4)
    enc = Sparse([16])
    stored = enc.encode(t)
    assert int(stored[".__positions"][0]) == 0
    for values in (stored[".__values"][:-1], torch.cat([stored[".__values"], stored[".__values"][:1]])):
        with pytest.raises(ValueError, match="marks"):
            enc.decode({".__values": values, ".__positions": stored[".__positions"]})


def test_sparse_with_a_truncated_position_stream_is_refused():
    t = torch.zeros(1000)
    t[[3, 100, 500, 900]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    enc = Sparse([1000])
    stored = enc.encode(t)
    with pytest.raises(ValueError):
        enc.decode({".__values": stored[".__values"], ".__positions": stored[".__positions"][:-1]})


@pytest.mark.parametrize("where,change", [([3, 100, 500, 900], -1), ([0, 1, 2, 3], -1), ([0, 1, 2, 3], +1),
                                          ([10, 20, 30], +1)])
def test_sparse_with_other_value_counts_than_positions_is_refused(where, change):
    t = torch.zeros(1000)
    t[where] = torch.arange(1.0, len(where) + 1)
    enc = Sparse([1000])
    stored = enc.encode(t)
    assert int(stored[".__positions"][0]) != 0  # relative indices
    values = stored[".__values"]
    values = values[:change] if change < 0 else torch.cat([values, torch.ones(change)])
    with pytest.raises(ValueError):
        enc.decode({".__values": values, ".__positions": stored[".__positions"]})


@PROPERTY
@given(numel=st.integers(1, 2000), bits=st.integers(1, 8), sparsity=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
       seed=seeds)
def test_a_truncated_sparse_codebook_is_refused(numel, bits, sparsity, seed):
    t = codebook_tensor((numel,), bits, torch.float16, True, sparsity, 1.0, seed)
    enc = Codebook([numel], bits, sparse=True)
    blob = enc.encode(t)[".__shared"]
    with pytest.raises(ValueError):
        enc.decode({".__shared": blob[:-1]})


def test_a_dense_codebook_with_an_index_beyond_its_centroids_is_refused():
    t = torch.tensor([1.0, 2.0, 3.0, 1.0])
    enc = Codebook([4], 2)
    blob = enc.encode(t)[".__shared"].clone()
    blob[-1] = 0xFF  # every index 3, with 3 centroids
    with pytest.raises(ValueError, match="beyond the 3 centroids"):
        enc.decode({".__shared": blob})


@pytest.mark.parametrize("cut", [1, 2])
def test_a_truncated_dense_codebook_is_refused(cut):
    gen = torch.Generator().manual_seed(0)
    values = torch.tensor([-1.5, -0.25, 0.125, 0.5, 0.75, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0])
    t = values[torch.randint(0, 16, (40,), generator=gen)]
    enc = Codebook([40], 4)
    blob = enc.encode(t)[".__shared"]
    with pytest.raises(ValueError):
        enc.decode({".__shared": blob[:-cut]})


# ------------------------------------------------------------------------------------------ through a file


def _file_cases() -> list[tuple[str, object, torch.Tensor]]:
    cases: list[tuple[str, object, torch.Tensor]] = []
    shapes_ = [(), (0,), (1,), (1, 1), (3, 0, 2), (7,), (64, 300), (10, 100), (16, 1, 3, 3), (2, 3, 4, 5)]
    for i, shape in enumerate(shapes_):
        for j, sparsity in enumerate((0.0, 0.5, 0.95, 1.0)):
            seed = 100 * i + j
            for dtype in (torch.float32, torch.float16):
                cases.append((f"s{i}.{j}.{dtype.itemsize}", Sparse(list(shape)),
                              sparse_tensor(shape, dtype, sparsity, seed)))
            for bits, book in ((1, "float16"), (4, "float16"), (8, "float32")):
                for sparse in (False, True):
                    t = codebook_tensor(shape, bits, getattr(torch, book), sparse, sparsity, 1.0, seed)
                    cases.append((f"c{i}.{j}.{bits}.{int(sparse)}", Codebook(list(shape), bits, "float32", book,
                                                                             sparse=sparse), t))
    return cases


def test_stored_parts_round_trip_through_a_safetensors_file(tmp_path):
    cases = _file_cases()
    tensors = {}
    for name, enc, t in cases:
        for suffix, part in enc.encode(t).items():
            tensors[name + suffix] = part
    path = tmp_path / "model.safetensors"
    write_safetensors(path, tensors)
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, enc, t in cases:
        parts = {k[len(name):]: v for k, v in loaded.items() if k.startswith(name + ".__")}
        assert parts, name
        assert bitwise_equal(enc.decode(parts), t), name
        # And from the JSON form the manifest keeps.
        assert bitwise_equal(encoding_from_json(json.loads(json.dumps(enc.to_json()))).decode(parts), t), name


def test_a_very_sparse_layer_is_far_smaller_on_disk(tmp_path):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 64, generator=gen).half().float()
    w[torch.rand(w.shape, generator=gen) < 0.95] = 0
    sparse, shared = Sparse([300, 64]), Codebook([300, 64], 4, sparse=True)
    book = torch.linspace(-2, 2, 16).half().float()
    q = torch.where(w != 0, book[torch.bucketize(w, book).clamp(max=15)], w)
    write_safetensors(tmp_path / "a.safetensors", {f"w{k}": v for k, v in sparse.encode(w).items()})
    write_safetensors(tmp_path / "b.safetensors", {f"w{k}": v for k, v in shared.encode(q).items()})
    dense_bytes = w.numel() * 4
    nnz = int((w != 0).sum())
    sparse_bytes = sum(v.numel() * v.element_size() for v in sparse.encode(w).values())
    assert sparse_bytes <= nnz * 4 + 1 + math.ceil(w.numel() / 8)
    assert dense_bytes / sparse_bytes > 10
    shared_bytes = shared.encode(q)[".__shared"].numel()
    assert dense_bytes / shared_bytes > 40
    a = load_file(tmp_path / "a.safetensors")
    b = load_file(tmp_path / "b.safetensors")
    assert torch.equal(sparse.decode({k[1:]: v for k, v in a.items()}), w)
    assert torch.equal(shared.decode({k[1:]: v for k, v in b.items()}), q)


@PROPERTY
@given(numel=st.integers(1, 300), density=st.floats(0.2, 0.8), seed=st.integers(0, 2**31 - 1),
       flip=st.integers(-1, 2400), cut=st.integers(0, 2))
def test_one_bit_position_streams_decode_as_the_general_steps_do(numel, density, seed, flip, cut):
    """The 1-bit relative form (about half pruned) has its own decoder: the same positions, and for a damaged
    stream (a bit flipped, bytes cut, a wrong count) the same refusal, as the general relative steps give."""
    from compressor import bitpack

    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(numel, generator=gen) < density
    stream = encode_positions(mask)
    body = stream[1:].clone()
    if 0 <= flip < body.numel() * 8:
        body[flip // 8] ^= 1 << (flip % 8)
    body = body[:max(0, body.numel() - cut)] if cut < 2 else body
    nnz = int(mask.sum()) + (1 if cut == 2 else 0)

    def general() -> torch.Tensor:  # what position_indices computes for forms 2-8, run on form 1
        return bitpack._relative_positions(1, body, numel, nnz)

    results = []
    for decoder in (general, lambda: bitpack._one_bit_positions(body, numel, nnz)):
        try:
            results.append(decoder())
        except ValueError:
            results.append(None)
    assert (results[0] is None) == (results[1] is None)
    if results[0] is not None:
        assert torch.equal(results[0], results[1])


@PROPERTY
@given(bits=st.integers(1, 8), nnz=st.integers(0, 70), seed=st.integers(0, 2**31 - 1), short=st.booleans())
def test_centroids_are_looked_up_by_whole_bytes_as_unpacking_the_indices_gives(bits, nnz, seed, short):
    """A codebook's values come from a table of what each byte decodes to (widths 1, 2, 4, 8): the values unpacking
    every index gives, and the same refusal, naming the same largest index, for an index beyond the book (a
    book shorter than the indices need); the padding after the last index is never read as one."""
    from compressor.encodings import _centroids

    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(0, 1 << bits, (nnz,), generator=gen)
    k = max(1, int(index.max()) + 1 if nnz else 1) - (1 if short and nnz and int(index.max()) > 0 else 0)
    book = torch.randn(k, generator=gen)
    packed = pack_bits(index, bits)
    if nnz * bits % 8:  # padding bits set: never an index
        packed[-1] |= (0xFF << (nnz * bits % 8)) & 0xFF
    try:
        want = book.index_select(0, unpack_bits(packed, bits, nnz, torch.int32))
        if nnz and int(index.max()) >= k:
            raise ValueError(f"centroid index {int(index.max())} beyond the {k} centroids")
    except (ValueError, IndexError, RuntimeError) as exc:
        with pytest.raises(ValueError, match=f"centroid index {int(index.max())} beyond the {k} centroids"):
            _centroids(book, packed, bits, nnz)
        assert nnz and short, exc
        return
    assert torch.equal(_centroids(book, packed, bits, nnz), want)


def test_position_and_codebook_parts_that_are_not_bytes_are_refused_as_corrupt():
    """A hostile file may store a part in another dtype: a ValueError (an ArtifactError when loading), never another
    exception type or a misread."""
    from compressor.encodings import Codebook, _centroids

    mask = torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.5
    stream = encode_positions(mask)
    for dtype in (torch.int8, torch.int16, torch.float32):
        with pytest.raises(ValueError, match="not bytes"):
            decode_positions(stream.to(dtype), 64, int(mask.sum()))
    with pytest.raises(ValueError, match="asked for -1 positions"):
        decode_positions(stream, 64, -1)
    enc = Codebook([8, 8], bits=4)
    blob = enc.encode(torch.randint(-8, 8, (8, 8)).float())[".__shared"]
    with pytest.raises(ValueError, match="not bytes"):
        enc.decode({".__shared": blob.to(torch.int16)})
    with pytest.raises(ValueError, match="1 bytes cannot hold 8 values of 2 bits"):
        _centroids(torch.arange(4.0), torch.tensor([0xE4], dtype=torch.uint8), 2, 8)


def test_the_loader_decodes_sparse_tensors_on_threads_as_one_at_a_time_and_names_the_first_bad_one(monkeypatch):
    """Tensors whose positions numpy reads decode on several threads while the loader's thread decodes the rest:
    the same values, in the manifest's order, and of two broken tensors the error names the first."""
    from compressor.errors import ArtifactError
    from compressor.loading import rebuild

    gen = torch.Generator().manual_seed(7)
    encodings, stored, want = {}, {}, {}
    for i in range(6):
        value = torch.randn(40, 33, generator=gen) * (torch.rand(40, 33, generator=gen) < 0.4)
        if i % 3 == 2:  # a dense codebook, decoded on the loader's own thread
            value = torch.randint(-4, 4, (40, 33), generator=gen).float()
            enc = Codebook([40, 33], bits=4)
        else:
            enc = Sparse([40, 33]) if i % 2 else Codebook([40, 33], bits=8, sparse=True)
            value = torch.round(value * 4) / 4
        name = f"layer{i}.weight"
        encodings[name] = enc.to_json()
        stored.update({name + suffix: part for suffix, part in enc.encode(value).items()})
        want[name] = value
    stored["layer0.bias"] = torch.ones(3)  # dense: as is
    monkeypatch.setattr(rebuild, "DECODE_THREADS", 1)
    alone = rebuild.decode(stored, encodings)
    monkeypatch.setattr(rebuild, "DECODE_THREADS", 3)
    spread = rebuild.decode(stored, encodings)
    assert list(spread) == list(alone) == [*encodings, "layer0.bias"]
    for name, value in want.items():
        assert torch.equal(spread[name], value) and torch.equal(alone[name], value), name
    broken = dict(stored)
    broken["layer3.weight.__positions"] = stored["layer3.weight.__positions"][:2]
    broken["layer4.weight.__shared"] = stored["layer4.weight.__shared"][:9]
    for threads in (1, 3):
        monkeypatch.setattr(rebuild, "DECODE_THREADS", threads)
        with pytest.raises(ArtifactError, match=r"^tensor layer3\.weight \(sparse\) cannot be decoded"):
            rebuild.decode(broken, encodings)
    # A shape torch cannot allocate, from a hostile manifest (two values at positions any size admits: torch's
    # new_zeros raises TypeError), is an ArtifactError naming the tensor; on a thread after an earlier broken
    # tensor, it comes after that one's
    few = torch.zeros(1000)
    few[3], few[10] = 1.0, 2.0
    stored.update({"late.weight" + k: v for k, v in Sparse([1000]).encode(few).items()})
    huge = dict(encodings, **{"late.weight": {"kind": "sparse", "shape": [2**32, 2**32]}})
    with pytest.raises(ArtifactError, match=r"^tensor late\.weight \(sparse\) cannot be decoded"):
        rebuild.decode(stored, huge)
    broken = dict(stored, **{"layer3.weight.__positions": stored["layer3.weight.__positions"][:2]})
    for threads in (1, 3):
        monkeypatch.setattr(rebuild, "DECODE_THREADS", threads)
        with pytest.raises(ArtifactError, match=r"^tensor layer3\.weight \(sparse\) cannot be decoded"):
            rebuild.decode(broken, huge)
