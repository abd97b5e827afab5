"""Encodings: decode(encode(t)) is t bit for bit, and every encoding round-trips through its JSON form."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor.encodings import (ENCODINGS, Cast, Dense, Encoding, Int8, NonFiniteWeight, dtype_from_name, dtype_name,
                                  encoding_from_json)

# Deterministic and light: no example database written into the repository, a fixed example sequence.
PROPERTY = settings(derandomize=True, database=None, max_examples=60, deadline=None)

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Same-width integer dtype, for bitwise views (NaN payloads, -0.0 and infinities must survive too).
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}

shapes = st.lists(st.integers(min_value=0, max_value=7), min_size=0, max_size=4).map(tuple)


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A tensor of ``dtype`` whose bit patterns are uniformly random: NaNs, infinities, subnormals, -0.0 all occur."""
    ints = BITS[dtype]
    info = torch.iinfo(ints)
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(info.min, info.max, shape, generator=gen, dtype=ints)
    flat = raw.view(-1)
    specials = torch.tensor([float("inf"), float("-inf"), -0.0, float("nan")], dtype=dtype).view(ints)
    specials = torch.cat([specials, specials[-1:] ^ 1])  # and a NaN with another payload
    n = min(len(specials), flat.numel())
    flat[:n] = specials[:n]
    t = raw.view(dtype)
    assert t.shape == shape and t.dtype == dtype
    return t


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def test_random_bits_really_contains_special_values():
    """Guard for the property tests below: the generator does produce NaN, inf and -0.0 patterns."""
    t = random_bits((4096,), torch.float16, 0)
    assert torch.isnan(t).any() and torch.isinf(t).any()
    assert torch.signbit(t[(t == 0)]).any()  # a -0.0
    nans = t[torch.isnan(t)].view(torch.int16)
    assert len(set(nans.tolist())) > 1  # several NaN payloads, which a value comparison could not tell apart
    assert not bitwise_equal(t, t.clone().nan_to_num())


@PROPERTY
@given(shape=shapes, dtype=st.sampled_from(FLOAT_DTYPES), seed=st.integers(0, 2**31 - 1))
def test_dense_round_trip_is_bit_exact(shape, dtype, seed):
    t = random_bits(shape, dtype, seed)
    original = t.clone()
    enc = Dense()
    stored = enc.encode(t)
    assert set(stored) == {""}  # the tensor keeps its own name on disk
    out = enc.decode(stored)
    assert bitwise_equal(out, original)


@PROPERTY
@given(
    shape=shapes,
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
    through_bytes=st.booleans(),
)
def test_cast_round_trip_is_bit_exact_for_tensors_already_in_the_cast_dtype(shape, dtype, seed, through_bytes):
    t = random_bits(shape, dtype, seed)
    original = t.clone()
    enc = Cast(dtype_name(dtype))
    stored = enc.encode(t)
    assert set(stored) == {""}
    assert stored[""].dtype == dtype
    if through_bytes:
        # What the loader does: the stored tensor comes back from raw bytes, not as the same object.
        raw = stored[""].contiguous().view(BITS[dtype]).numpy().tobytes()
        back = torch.frombuffer(bytearray(raw), dtype=BITS[dtype]) if raw else torch.empty(0, dtype=BITS[dtype])
        stored = {"": back.reshape(shape).view(dtype)}
    out = enc.decode(stored)
    assert bitwise_equal(out, original)


@PROPERTY
@given(shape=shapes, target=st.sampled_from(["float16", "bfloat16"]), seed=st.integers(0, 2**31 - 1))
def test_cast_of_float32_stores_the_rounded_value_and_decodes_to_it(shape, target, seed):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen) * 100
    enc = Cast(target)
    stored = enc.encode(t)
    dtype = dtype_from_name(target)
    assert stored[""].dtype == dtype
    assert bitwise_equal(enc.decode(stored), t.to(dtype))


ENCODING_EXAMPLES = [Dense(), Cast("float16"), Cast("bfloat16"), Int8(), Int8(per_channel=False)]


@pytest.mark.parametrize("enc", ENCODING_EXAMPLES, ids=repr)
def test_json_round_trip(enc: Encoding):
    data = enc.to_json()
    assert data["kind"] == enc.kind
    assert encoding_from_json(data) == enc
    # And through actual JSON text, as the manifest stores it.
    again = encoding_from_json(json.loads(json.dumps(data)))
    assert again == enc and type(again) is type(enc) and again.to_json() == data


@PROPERTY
@given(target=st.sampled_from(["float16", "bfloat16"]))
def test_cast_json_keeps_the_dtype(target):
    enc = encoding_from_json({"kind": "cast", "dtype": target})
    assert isinstance(enc, Cast) and enc.dtype == target
    other = "bfloat16" if target == "float16" else "float16"
    assert enc != Cast(other)
    assert enc != Dense()


def test_every_registered_encoding_is_reachable_from_json():
    assert {"dense", "cast"} <= set(ENCODINGS)
    for kind, cls in ENCODINGS.items():
        assert cls.kind == kind


@PROPERTY
@given(kind=st.one_of(st.none(), st.text(max_size=20)).filter(lambda k: k not in ENCODINGS))
def test_unknown_kind_is_a_value_error_naming_the_known_kinds(kind):
    data = {} if kind is None else {"kind": kind}
    with pytest.raises(ValueError) as info:
        encoding_from_json(data)
    message = str(info.value)
    assert repr(kind) in message
    for known in ENCODINGS:
        assert known in message


@pytest.mark.parametrize("name", ["float17", "Tensor", "nn", ""])
def test_cast_rejects_a_name_that_is_not_a_dtype(name):
    with pytest.raises(ValueError, match="unknown dtype"):
        Cast(name)
    with pytest.raises(ValueError, match="unknown dtype"):
        encoding_from_json({"kind": "cast", "dtype": name})


def _int8_effective(shape: tuple[int, ...], seed: int, per_channel: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) if shape else torch.randn((), generator=gen)
    return Int8(per_channel).decode(Int8(per_channel).encode(w))  # an effective int8 tensor, as the pass leaves it


@PROPERTY
@given(shape=st.lists(st.integers(min_value=1, max_value=9), min_size=0, max_size=3).map(tuple),
       seed=st.integers(0, 2**31 - 1), per_channel=st.booleans(), target=st.sampled_from(["float16", "bfloat16"]))
def test_stored_nbytes_counts_what_encode_stores_without_encoding(shape, seed, per_channel, target):
    t = _int8_effective(shape, seed, per_channel)
    for enc in (Dense(), Cast(target), Int8(per_channel)):
        parts = enc.encode(t)
        assert enc.stored_nbytes(t) == sum(p.numel() * p.element_size() for p in parts.values())


@PROPERTY
@given(rows=st.integers(1, 6), cols=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_int8_encode_finds_each_rows_exact_scale_when_rows_need_different_neighbours(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (rows, cols), generator=gen).float()
    q[:, 0] = 127  # every row reaches the range
    scale = torch.rand(rows, 1, generator=gen) + 0.01
    # Nudge some rows' scales by an ulp: the recomputed amax / 127 then misses them, and a neighbour must be found.
    nudged = torch.where(torch.rand(rows, 1, generator=gen) < 0.5, torch.nextafter(scale, scale + 1), scale)
    effective = q * nudged
    stored = Int8(True).encode(effective)
    assert torch.equal(Int8(True).decode(stored), effective)


@PROPERTY
@given(rows=st.integers(1, 6), cols=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       exponent=st.integers(-120, 120), per_channel=st.booleans())
def test_int8_parts_it_says_it_reproduces_come_back_bit_for_bit(rows, cols, seed, exponent, per_channel):
    # What a stream writes without decoding (Int8.reproduces) must be what encoding the effective value gives.
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(rows, cols, generator=gen) * 2.0 ** exponent
    raw[0] = 0.0  # a zero row
    if rows > 3:
        raw[2] = torch.round(raw[2] * 7) / 7  # a row on a coarse grid, which a neighbouring scale may reproduce
    enc = Int8(per_channel)
    parts = enc.encode(raw)
    if enc.reproduces(parts):
        again = enc.encode(enc.decode(parts))
        assert all(torch.equal(again[k], parts[k]) for k in parts)
    else:  # left to the computation: rows whose scale leaves float32's normal range
        assert not bool((parts[".__scale"] >= torch.finfo(torch.float32).tiny).all())


def test_int8_does_not_vouch_for_vanishing_rows_and_refuses_non_finite_ones():
    enc = Int8(True)
    tiny = torch.full((2, 8), 1e-38)  # its scale, 1e-38 / 127, is subnormal
    assert not enc.reproduces(enc.encode(tiny))
    assert enc.reproduces(enc.encode(torch.tensor([[0.0, 0.0], [1.0, -3.5]])))
    # a NaN row was stored as zeros at scale 1, an infinite one saturated: garbage, silently
    for bad in ([[1.0, float("inf")], [1.0, 2.0]], [[float("nan"), 0.5, -2.0], [float("-inf"), 2.0, 3.0]]):
        with pytest.raises(NonFiniteWeight, match=r"a weight holds \d NaN or infinite values \(of \d\)"):
            enc.encode(torch.tensor(bad))
        with pytest.raises(NonFiniteWeight, match="^w.q holds"):
            try:
                Int8(False).encode(torch.tensor(bad))
            except NonFiniteWeight as exc:
                raise exc.named("w.q") from None


def test_int8_encodes_the_same_in_blocks_of_any_size_and_finds_a_non_finite_value_in_any_block():
    class Small(Int8):
        _BLOCK = 7  # a row or two at a time: every block boundary is crossed

    gen = torch.Generator().manual_seed(3)
    t = torch.randn(50, 6, generator=gen)
    t[4] = 0.0
    t[9] = torch.round(t[9] * 5) / 5  # on a coarse grid
    t[20] = Int8(True).decode(Int8(True).encode(t[20:21]))[0]  # an effective row, its exact scale found again
    for per_channel in (True, False):
        whole, blocked = Int8(per_channel).encode(t), Small(per_channel).encode(t)
        assert all(torch.equal(whole[k], blocked[k]) for k in whole)
    t[47, 5] = float("nan")
    with pytest.raises(NonFiniteWeight, match=r"holds 1 NaN or infinite values \(of 300\)"):
        Small(True).encode(t)


@PROPERTY
@given(rows=st.integers(1, 12), cols=st.integers(1, 300), seed=st.integers(0, 2**31 - 1), per_channel=st.booleans(),
       share=st.sampled_from([0.0, 0.5, 1.0]))
def test_int8_compares_first_columns_first_and_finds_what_comparing_whole_rows_finds(rows, cols, seed, per_channel,
                                                                                   share):
    # Rows that are exact (some at a neighbouring scale), raw ones, and ones exact in their first columns but not
    # after: comparing the first columns first must not change a single byte against comparing whole rows.
    import compressor.encodings as encodings

    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (rows, cols), generator=gen).float()
    q[:, 0] = 127
    scale = torch.rand(rows, 1, generator=gen) + 0.01
    scale = torch.where(torch.rand(rows, 1, generator=gen) < 0.5, torch.nextafter(scale, scale + 1), scale)
    raw = torch.rand(rows, generator=gen) >= share
    if cols > encodings._HEAD and rows > 2:
        # zeros first: their first columns are exact at any scale, the whole row only at its own
        q[2, :encodings._HEAD], q[2, encodings._HEAD] = 0, 127
        raw[2] = False
    t = q * scale
    t[raw] = torch.randn(int(raw.sum()), cols, generator=gen)
    if cols > encodings._HEAD and rows > 1:
        t[1, -1] = torch.nextafter(t[1, -1], t[1, -1] + 1)  # exact up to its last value
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(encodings, "_HEAD", 10**9)  # every row compared whole at once
        whole = Int8(per_channel).encode(t)
    first = Int8(per_channel).encode(t)
    assert all(torch.equal(first[k], whole[k]) for k in whole)
