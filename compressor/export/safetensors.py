"""safetensors export laid out for memory-mapped loading, and a strict header reader.

Layout of every file written here (the format itself forbids gaps between tensors, so order does the aligning):
- the JSON header is padded with spaces so the data section starts at a multiple of 4096 (a page), or of 64 when
  the tensors hold less than 1 MiB (page padding would dwarf a small compressed file);
- tensors whose byte size is a multiple of 64 come first, so each starts on a 64-byte boundary;
- the rest follow, largest element size first, so each still starts on a multiple of its element size and a
  zero-copy view of it is always legal.
Files are byte-identical for identical tensors: the order and the header depend on names, shapes and dtypes only.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ArtifactError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DTYPE_CODES",
    "PAGE",
    "header_alignment",
    "layout_order",
    "write_safetensors",
    "read_header",
    "shard_names",
    "plan_shards",
    "export_safetensors",
]

PAGE = 4096
PAGE_ALIGN_FROM = 1 << 20
LINE = 64
DTYPE_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def layout_order(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names in file order: 64-byte-multiple tensors first, then by element size, largest first; ties by name."""
    def key(name: str) -> tuple[int, int, str]:
        t = tensors[name]
        return (0 if _nbytes(t) % LINE == 0 else 1, -t.element_size(), name)

    return sorted(tensors, key=key)


def header_alignment(data_bytes: int) -> int:
    """Where the data section starts: on a page boundary when the tensors hold 1 MiB or more, so large tensors map
    page-aligned; on a 64-byte line otherwise, where a page of padding would be most of a small compressed file
    (the digits MLP after Deep Compression is 4 KiB)."""
    return PAGE if data_bytes >= PAGE_ALIGN_FROM else LINE


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` in the aligned layout described above."""
    import torch

    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata maps strings to strings")
    order = layout_order(tensors)
    header: dict[str, Any] = {"__metadata__": dict(sorted((metadata or {"format": "pt"}).items()))}
    offset = 0
    for name in order:
        t = tensors[name]
        code = DTYPE_CODES.get(str(t.dtype).removeprefix("torch."))
        if code is None:
            raise ArtifactError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
        size = _nbytes(t)
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * ((-(8 + len(raw))) % header_alignment(offset))
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            t = tensors[name].detach().cpu().contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header: (header dict, data start offset).

    Checks what can be checked without reading tensor data: header length, JSON, dtypes, shapes matching byte
    ranges, ranges contiguous and inside the file. Raises ArtifactError naming the file and the problem.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{path.name}: {size} bytes is too short for a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise ArtifactError(f"{path.name}: header length {n} does not fit in the file's {size} bytes (truncated or not safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path.name}: the safetensors header is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path.name}: the safetensors header is not a JSON object; the file is corrupt")
    meta = header.get("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise ArtifactError(f"{path.name}: __metadata__ must map strings to strings; the file is corrupt")
    start = 8 + n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (lo, hi) = info["dtype"], info["shape"], info["data_offsets"]
            if not all(type(v) is int and v >= 0 for v in (*shape, lo, hi)):
                raise TypeError("offsets and dims must be non-negative integers")
            numel = 1
            for dim in shape:
                numel *= dim
            expected = numel * ITEMSIZE[code]
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{path.name}: tensor {name} has a malformed header entry: {info}") from None
        if hi - lo != expected:
            raise ArtifactError(f"{path.name}: tensor {name} spans {hi - lo} bytes but {code}{shape} needs {expected}")
        spans.append((lo, hi, name))
    spans.sort()
    end = 0
    for lo, hi, name in spans:
        if lo != end:
            raise ArtifactError(f"{path.name}: tensor {name} starts at {lo}, expected {end} (overlap or gap)")
        end = hi
    if start + end != size:
        raise ArtifactError(
            f"{path.name}: the header describes {start + end} bytes but the file has {size} (truncated or padded)"
        )
    return header, start


def shard_names(count: int) -> list[str]:
    """File names for ``count`` shards, Hugging Face convention."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Split names into shards of at most ``max_bytes`` each, in name order; a larger tensor gets its own shard."""
    shards: list[list[str]] = [[]]
    used = 0
    for name in sorted(tensors):
        size = _nbytes(tensors[name])
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def export_safetensors(stored: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int,
                       metadata: dict[str, str] | None = None) -> list[str]:
    """Write stored tensors as one file or as shards plus ``model.safetensors.index.json``; returns file names."""
    shards = plan_shards(stored, max_shard_size)
    names = shard_names(len(shards))
    meta = {"format": "pt", **(metadata or {})}
    for file, members in zip(names, shards):
        write_safetensors(out_dir / file, {n: stored[n] for n in members}, meta)
    if len(names) == 1:
        return names
    index = {
        "metadata": {"total_size": sum(_nbytes(t) for t in stored.values())},
        "weight_map": {n: file for file, members in zip(names, shards) for n in sorted(members)},
    }
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]
