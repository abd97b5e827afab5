"""The aligned safetensors writer, the strict header reader and sharded export, checked on real files."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from compressor.errors import ArtifactError
from compressor.export.safetensors import export_safetensors, plan_shards, shard_names, write_safetensors
from compressor.safetensors_io import PAGE, Layout, read_header

PROPERTY = settings(
    derandomize=True,
    database=None,
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
]
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bits of ``dtype`` (every byte pattern may occur; bool is kept to 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8).bool()
    size = torch.empty((), dtype=dtype).element_size()
    ints = INT_VIEW[size]
    info = torch.iinfo(ints)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=ints).view(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


# Odd sizes on purpose: few tensors are multiples of 64 bytes, so the ordering has work to do.
odd_shapes = st.lists(st.integers(min_value=0, max_value=13), min_size=0, max_size=3).map(tuple)
tensor_specs = st.dictionaries(
    keys=st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True).filter(lambda n: n != "__metadata__"),
    values=st.tuples(odd_shapes, st.sampled_from(DTYPES), st.integers(0, 2**31 - 1)),
    min_size=1,
    max_size=10,
)


def build(specs) -> dict[str, torch.Tensor]:
    return {name: make_tensor(shape, dtype, seed) for name, (shape, dtype, seed) in specs.items()}


def parse(path: Path) -> tuple[dict, int]:
    """Independent parse of a safetensors header: (header, data start)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), 8 + n


def check_layout(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    header, start = parse(path)
    data = path.stat().st_size - start
    align = PAGE if data >= 1 << 20 else 64
    assert start % align == 0, f"data section ({data} bytes) starts at {start}, not a multiple of {align}"
    assert set(header) - {"__metadata__"} == set(tensors)
    end = 0
    for name, info in sorted(((n, i) for n, i in header.items() if n != "__metadata__"),
                             key=lambda item: item[1]["data_offsets"]):
        lo, hi = info["data_offsets"]
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        assert lo == end and hi - lo == nbytes  # contiguous, as the format demands
        end = hi
        assert info["shape"] == list(t.shape)
        assert lo % t.element_size() == 0, f"{name} ({t.dtype}) at data offset {lo}"
        assert (start + lo) % t.element_size() == 0
        if nbytes % 64 == 0:
            assert lo % 64 == 0, f"{name} ({nbytes} bytes) at data offset {lo}"
            assert (start + lo) % 64 == 0, f"{name} ({nbytes} bytes) at file offset {start + lo}"
    assert start + end == path.stat().st_size


def check_reads_back(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert same_bits(got, t), name


@PROPERTY
@given(specs=tensor_specs)
def test_written_file_is_aligned_readable_and_reproducible(specs, tmp_path):
    tensors = build(specs)
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        a, b = Path(d) / "a.safetensors", Path(d) / "b.safetensors"
        write_safetensors(a, tensors)
        check_layout(a, tensors)
        check_reads_back(a, tensors)
        # Same tensors again, built afresh and given in another dict order: same bytes.
        write_safetensors(b, dict(reversed(list(build(specs).items()))))
        assert a.read_bytes() == b.read_bytes()
        header, start = read_header(a)  # our own strict reader accepts what we write
        assert start % 64 == 0 and set(header) - {"__metadata__"} == set(tensors)


@PROPERTY
@given(specs=tensor_specs, data=st.data())
def test_a_use_order_keeps_the_layout_aligned_readable_and_independent_of_the_dict_order(specs, data, tmp_path):
    tensors = build(specs)
    order = data.draw(st.permutations(sorted(tensors)))
    order = order[:data.draw(st.integers(0, len(order)))]  # possibly naming only some of them
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        out_a, out_b = Path(d) / "a", Path(d) / "b"
        out_a.mkdir()
        out_b.mkdir()
        export_safetensors(tensors, out_a, 1 << 30, use_order=order)
        path = out_a / "model.safetensors"
        check_layout(path, tensors)
        check_reads_back(path, tensors)
        export_safetensors(dict(reversed(list(build(specs).items()))), out_b, 1 << 30, use_order=order)
        assert path.read_bytes() == (out_b / "model.safetensors").read_bytes()
        header, _ = parse(path)
        # the header lists the tensors in file order (offsets alone cannot order empty tensors)
        aligned = [n for n in header if n != "__metadata__"
                   and tensors[n].numel() * tensors[n].element_size() % 64 == 0]
        named = [n for n in aligned if n in order]
        assert named == [n for n in order if n in named] and aligned[:len(named)] == named  # in use order, first


def test_mixed_layout_example(tmp_path):
    """A fixed mix where naive name order would misalign: 1-byte tensors before 64-multiples and wider types."""
    tensors = {
        "a_bool": make_tensor((3,), torch.bool, 0),
        "b_int8": make_tensor((5, 1), torch.int8, 1),
        "c_f16_64": make_tensor((32,), torch.float16, 2),  # 64 bytes
        "d_f64": make_tensor((3,), torch.float64, 3),
        "e_bf16": make_tensor((7,), torch.bfloat16, 4),
        "f_f32_odd": make_tensor((5,), torch.float32, 5),
        "g_i64_128": make_tensor((4, 4), torch.int64, 6),  # 128 bytes
        "h_empty": torch.empty((0, 4), dtype=torch.float32),
        "i_scalar": make_tensor((), torch.float32, 7),
    }
    path = tmp_path / "mixed.safetensors"
    write_safetensors(path, tensors, {"format": "pt", "note": "x"})
    check_layout(path, tensors)
    check_reads_back(path, tensors)
    header, _ = parse(path)
    assert header["__metadata__"] == {"format": "pt", "note": "x"}
    # The 64-byte multiples come first.
    first = sorted((i["data_offsets"][0], n) for n, i in header.items() if n != "__metadata__")
    assert {n for _, n in first[:3]} == {"c_f16_64", "g_i64_128", "h_empty"}


def test_a_use_order_lays_the_aligned_tensors_out_in_it_and_splits_shards_by_it(tmp_path):
    """With the order a forward pass reads them, the 64-byte multiples follow it (reading ahead then reads the
    file from start to end); the others keep their element-size order after them; the dict's order still does
    not matter."""
    tensors = {
        "z.weight": make_tensor((32,), torch.float16, 0),  # 64 bytes
        "a.bias": make_tensor((5,), torch.float32, 1),  # 20 bytes
        "m.weight": make_tensor((4, 4), torch.int64, 2),  # 128 bytes
        "b.weight": make_tensor((64,), torch.int8, 3),  # 64 bytes
        "c.q": make_tensor((3,), torch.int8, 4),  # 3 bytes
        "extra": make_tensor((16,), torch.float32, 5),  # 64 bytes, in no use order
    }
    order = ["z.weight", "a.bias", "b.weight", "c.q", "m.weight"]
    path = tmp_path / "ordered.safetensors"
    export_safetensors(tensors, tmp_path, 1 << 30, use_order=order)
    (tmp_path / "model.safetensors").rename(path)
    check_layout(path, tensors)
    check_reads_back(path, tensors)
    header, _ = parse(path)
    by_offset = [n for _, n in sorted((i["data_offsets"][0], n) for n, i in header.items() if n != "__metadata__")]
    assert by_offset == ["z.weight", "b.weight", "m.weight", "extra", "a.bias", "c.q"]
    again = Layout.of(dict(reversed(list(tensors.items()))), {"format": "pt"}, order)
    assert again.header == path.read_bytes()[:len(again.header)]
    assert list(Layout.of(tensors).spans) == ["m.weight", "extra", "z.weight", "b.weight", "a.bias", "c.q"]
    # Shards split in the same order: the first shard holds the first tensors a forward pass reads.
    assert plan_shards(tensors, 150, order) == [["z.weight", "a.bias", "b.weight"], ["c.q", "m.weight"], ["extra"]]
    assert plan_shards(tensors, 150) == [["a.bias", "b.weight", "c.q"], ["extra"], ["m.weight"], ["z.weight"]]


def test_non_contiguous_and_grad_tensors_are_written_by_value(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    p = torch.nn.Parameter(torch.randn(3, 5, generator=torch.Generator().manual_seed(0)))
    tensors = {"t": base.t(), "s": base[:, 1::2], "p": p}
    path = tmp_path / "views.safetensors"
    write_safetensors(path, tensors)
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("t"), base.t())
        assert torch.equal(f.get_tensor("s"), base[:, 1::2])
        assert torch.equal(f.get_tensor("p"), p.detach())


def test_unsupported_dtype_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="complex64"):
        write_safetensors(tmp_path / "c.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})


# ------------------------------------------------------------------------------------------------ read_header


@pytest.fixture
def good_file(tmp_path) -> tuple[Path, int]:
    tensors = {"w": make_tensor((7, 3), torch.float32, 0), "b": make_tensor((5,), torch.float16, 1)}
    path = tmp_path / "weights-under-test.safetensors"
    write_safetensors(path, tensors)
    _, start = read_header(path)
    return path, start


def damaged(path: Path, data: bytes) -> Path:
    out = path.with_name("damaged-" + path.name)
    out.write_bytes(data)
    return out


def assert_refused(path: Path, *words: str) -> None:
    with pytest.raises(ArtifactError) as info:
        read_header(path)
    message = str(info.value)
    assert path.name in message
    for word in words:
        assert word in message


@PROPERTY
@given(keep=st.integers(min_value=0, max_value=1 << 30))
def test_truncated_file_is_refused(good_file, keep):
    path, _ = good_file
    data = path.read_bytes()
    keep = keep % len(data)  # every proper prefix, from empty to one byte short
    assert_refused(damaged(path, data[:keep]))


@PROPERTY
@given(length=st.integers(min_value=0, max_value=2**64 - 1))
def test_corrupted_header_length_is_refused(good_file, length):
    path, start = good_file
    data = path.read_bytes()
    if length == start - 8:
        length += 1
    assert_refused(damaged(path, struct.pack("<Q", length) + data[8:]))


@pytest.mark.parametrize(
    "garbage",
    [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'"a string"', b'{"w": {"dtype": "F32"}}'],
    ids=["syntax", "binary", "array", "string", "malformed-entry"],
)
def test_garbage_header_is_refused(good_file, garbage):
    path, start = good_file
    data = path.read_bytes()
    n = start - 8
    body = garbage + b" " * (n - len(garbage))
    assert len(body) == n
    assert_refused(damaged(path, data[:8] + body + data[start:]))


def test_appended_bytes_are_refused(good_file):
    path, _ = good_file
    assert_refused(damaged(path, path.read_bytes() + b"\0" * 16), "padded")


def test_a_file_from_safetensors_itself_is_accepted(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.arange(10, dtype=torch.int32), "y": torch.ones(3, 3)}, str(path))
    header, start = read_header(path)
    assert header["x"]["dtype"] == "I32" and header["y"]["shape"] == [3, 3]
    assert start == 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


# -------------------------------------------------------------------------------------------------- sharding


def test_shard_names_follow_the_hugging_face_convention():
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


@pytest.mark.parametrize("max_shard", [4096, 10_000, 30_000])
def test_sharded_export_writes_an_index_covering_every_tensor(tmp_path, max_shard):
    shapes = {f"layer{i}.weight": (37, 11 + i) for i in range(8)}
    tensors = {n: make_tensor(s, torch.float16 if i % 2 else torch.float32, i)
               for i, (n, s) in enumerate(sorted(shapes.items()))}
    tensors["big"] = make_tensor((6000,), torch.float32, 99)  # 24000 bytes: bigger than the smallest limit
    tensors["flag"] = make_tensor((3,), torch.bool, 100)
    total = sum(t.numel() * t.element_size() for t in tensors.values())

    files = export_safetensors(tensors, tmp_path, max_shard)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 2
    assert shards == shard_names(len(shards))
    assert files[-1] == "model.safetensors.index.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == set(shards)

    seen = {}
    for shard in shards:
        path = tmp_path / shard
        read_header(path)
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            assert names == {n for n, s in index["weight_map"].items() if s == shard}
            sizes = 0
            for name in names:
                t = f.get_tensor(name)
                assert same_bits(t, tensors[name]), name
                seen[name] = shard
                sizes += t.numel() * t.element_size()
        assert sizes <= max_shard or len(names) == 1, f"{shard} holds {sizes} bytes in {len(names)} tensors"
        check_layout(path, {n: tensors[n] for n in names})
    assert set(seen) == set(tensors)


def test_small_model_is_one_file_without_index(tmp_path):
    tensors = {"a": make_tensor((3, 3), torch.float32, 0)}
    assert export_safetensors(tensors, tmp_path, 1 << 20) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    check_reads_back(tmp_path / "model.safetensors", tensors)


def test_files_are_hashed_while_their_tensors_are_written_in_any_order_by_several_threads(tmp_path):
    """``opened(digest=True)``: the sha256 of every shard, computed as its tensors arrive out of order from four
    threads (empty tensors and a file's last tensor written first included), is the written file's; a block that
    fails hands out no digests."""
    import hashlib
    import random
    from concurrent.futures import ThreadPoolExecutor

    from compressor.export.safetensors import WeightFiles

    gen = torch.Generator().manual_seed(0)
    stored = {f"t{i}": torch.randn(int(torch.randint(0, 40_000, (1,), generator=gen)), generator=gen)
              for i in range(40)}
    stored["empty"] = torch.empty(0, 3)
    files = WeightFiles(stored, max_shard_size=300_000)
    assert len(files.layouts) > 3
    files.create(tmp_path)
    names = list(stored)
    random.Random(0).shuffle(names)
    with files.opened(tmp_path, digest=True) as fds, ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(lambda n: files.write(fds, n, stored[n]), names)) == sum(
            t.numel() * 4 for t in stored.values())
    assert set(files.digests) == set(files.layouts)
    for file, (sha, size) in files.digests.items():
        data = (tmp_path / file).read_bytes()
        assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data)), file

    with pytest.raises(RuntimeError, match="stop"):
        with files.opened(tmp_path, digest=True) as fds:
            files.write(fds, names[0], stored[names[0]])
            raise RuntimeError("stop")
    assert files.digests == {}
