"""The safetensors format by position: the strict header reader, the aligned layout of a file, and reading or
writing one tensor at its offset.

The layout of a file depends on its tensors' names, shapes and dtypes only, never on their values, so it can be
decided before any value exists: a model larger than memory is written tensor by tensor into files whose headers
are already final (``Layout.create`` then ``Layout.write``), and the bytes equal those of a file written whole.

Layout of every file written here (the format itself forbids gaps between tensors, so order does the aligning):
- the JSON header is padded with spaces so the data section starts at a multiple of 4096 (a page), or of 64 when
  the tensors hold less than 1 MiB (page padding would dwarf a small compressed file);
- tensors whose byte size is a multiple of 64 come first, so each starts on a 64-byte boundary;
- the rest follow, largest element size first, so each still starts on a multiple of its element size and a
  zero-copy view of it is always legal.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ArtifactError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DTYPE_CODES", "ITEMSIZE", "PAGE", "Layout", "dtype_code", "header_alignment", "read_header",
           "read_tensor", "map_file"]

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
_CHUNK = 1 << 30  # bytes per read/write system call (Linux moves at most about 2 GiB per call)


def dtype_code(dtype: torch.dtype, name: str = "") -> str:
    """The safetensors dtype code of a torch dtype; ArtifactError for one safetensors cannot store."""
    code = DTYPE_CODES.get(str(dtype).removeprefix("torch."))
    if code is None:
        raise ArtifactError(f"tensor {name} has dtype {dtype}, which safetensors cannot store")
    return code


def header_alignment(data_bytes: int) -> int:
    """Where the data section starts: on a page boundary when the tensors hold 1 MiB or more, so large tensors map
    page-aligned; on a 64-byte line otherwise, where a page of padding would be most of a small compressed file
    (the digits MLP after Deep Compression is 4 KiB)."""
    return PAGE if data_bytes >= PAGE_ALIGN_FROM else LINE


class Layout:
    """One file: its header bytes and where each tensor's bytes go, from ``{name: (dtype code, shape)}``."""

    def __init__(self, specs: Mapping[str, tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, use_order: Sequence[str] | None = None) -> None:
        """``use_order``: names in the order a forward pass reads them; the tensors whose sizes are multiples of 64
        bytes (nearly every weight) are then laid out in that order, so that reading a model as it computes reads
        its file from start to end, and the others follow by element size, largest first, then in that order.
        Without one, both groups go by element size, then by name. Either way the bytes do not depend on the order
        of ``specs``."""
        if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata maps strings to strings")
        sizes = {name: _numel(shape) * ITEMSIZE[code] for name, (code, shape) in specs.items()}
        rank = {n: i for i, n in enumerate(use_order or ())}
        unranked = len(rank)

        def key(n: str) -> tuple[int, int, int, str]:
            if sizes[n] % LINE == 0:  # aligned wherever they go: in use order where there is one
                return 0, rank.get(n, unranked), -ITEMSIZE[specs[n][0]], n
            return 1, -ITEMSIZE[specs[n][0]], rank.get(n, unranked), n  # element size first keeps them aligned

        order = sorted(specs, key=key)
        header: dict[str, Any] = {"__metadata__": dict(sorted((metadata or {"format": "pt"}).items()))}
        offset = 0
        for name in order:
            code, shape = specs[name]
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + sizes[name]]}
            offset += sizes[name]
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
        raw += b" " * ((-(8 + len(raw))) % header_alignment(offset))
        self.header = struct.pack("<Q", len(raw)) + raw
        start = len(self.header)
        #: name -> (first byte, end) in the file, in file order
        self.spans = {n: (start + header[n]["data_offsets"][0], start + header[n]["data_offsets"][1]) for n in order}
        self.size = start + offset

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None,
           use_order: Sequence[str] | None = None) -> Layout:
        """The layout of these tensors (real or on the meta device: only names, shapes and dtypes are read)."""
        return cls({n: (dtype_code(t.dtype, n), tuple(t.shape)) for n, t in tensors.items()}, metadata, use_order)

    def create(self, path: Path) -> None:
        """Write the header and size the file; the tensors' bytes are written by ``write``."""
        with open(path, "wb") as f:
            f.write(self.header)
            f.truncate(self.size)

    def write(self, fd: int, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor``'s bytes at its place in the open file ``fd``; its shape and dtype must be the layout's."""
        import torch

        lo, hi = self.spans[name]
        t = tensor.detach().cpu().contiguous()
        if hi - lo != t.numel() * t.element_size():
            raise ValueError(f"tensor {name} has {t.numel() * t.element_size()} bytes; the layout holds {hi - lo}")
        if t.numel():
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            for at in range(0, len(view), _CHUNK):
                piece = view[at:at + _CHUNK]
                done = 0
                while done < len(piece):
                    done += os.pwrite(fd, piece[done:], lo + at + done)


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
            expected = _numel(shape) * ITEMSIZE[code]
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


def read_tensor(fd: int, entry: dict[str, Any], start: int, what: str = "a tensor",
                into: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor of a file whose header ``read_header`` checked (``entry`` its header entry, ``start`` where the
    data begins), read into fresh memory with positional reads. Unlike a memory map, nothing of the file stays
    resident once the tensor is dropped: what streaming a model larger than memory needs. ``what`` names it in
    errors. ``into``: a uint8 buffer of at least the tensor's bytes to read into instead (the tensor is then a view
    on it): a reader that reuses one is spared a fresh allocation's page faults per tensor (the 1.1B Llama's 4.5 GB
    read in 0.8 s instead of 2.1-2.7 s on a virtual machine)."""
    import torch

    dtypes = {code: getattr(torch, name) for name, code in DTYPE_CODES.items()}
    lo, hi = entry["data_offsets"]
    if into is not None and into.dtype == torch.uint8 and into.dim() == 1 and into.numel() >= hi - lo:
        buf = into[:hi - lo]
    else:
        buf = torch.empty(hi - lo, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:done + _CHUNK]], start + lo + done)
        if got <= 0:
            raise ArtifactError(f"the file ended inside {what} ({done} of {len(view)} bytes read): truncated while "
                                "being read?")
        done += got
    return buf.view(dtypes[entry["dtype"]]).reshape(entry["shape"])


def map_file(path: Path) -> tuple[dict[str, torch.Tensor], tuple[int, int] | None]:
    """Every tensor of a safetensors file as a view on one private (copy-on-write) memory map of it: nothing is read
    until used, and writing to a tensor never reaches the file. Also the map's address and length (None when the
    file holds no data): a view's offset in the file is its data_ptr minus that address. The header is checked
    first (``read_header``). A tensor whose offset is not a multiple of its element size (files written elsewhere,
    unaligned) is copied out instead, since a view of it would be illegal; a copy does not lie in the map.

    Each tensor gets a storage of its own bytes, a slice of the map's (which it keeps alive): pickling a tensor
    writes its storage whole, so views of one storage spanning the file made ``pickle.dumps`` of one BERT layer
    1.45 GB (the 90 MB file once per tensor), where transformers' models pickle to their own size."""
    import torch

    header, start = read_header(path)
    dtypes = {code: getattr(torch, name) for name, code in DTYPE_CODES.items()}
    size = start + max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    tensors: dict[str, torch.Tensor] = {}
    if size > start:
        try:
            storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
        except RuntimeError as exc:
            raise ArtifactError(f"{path.name}: cannot be memory-mapped: {exc}") from None
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        lo, hi = start + entry["data_offsets"][0], start + entry["data_offsets"][1]
        if hi == lo:
            part = torch.empty(0, dtype=torch.uint8)
        else:
            part = torch.empty(0, dtype=torch.uint8).set_(storage[lo:hi])
            if lo % ITEMSIZE[entry["dtype"]]:
                part = part.clone()
        tensors[name] = part.view(dtypes[entry["dtype"]]).reshape(entry["shape"])
    return tensors, ((storage.data_ptr(), size) if size > start else None)


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
