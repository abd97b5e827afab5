"""How each tensor is stored compactly, and its exact decoder.

The module in a ``Model`` always holds the *effective* values: exactly what the stored form decodes to. An
``Encoding`` turns an effective tensor into the tensors written to disk (``encode``) and back (``decode``).
Invariant, tested for every encoding: ``decode(encode(t))`` equals ``t`` bit for bit.

Stored tensors are named ``<tensor name><suffix>``; the suffix ``""`` keeps the tensor's own (Hugging Face) name,
so dense and cast tensors stay readable by any safetensors loader.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Encoding", "Dense", "Cast", "Int8", "IntGroup", "Sparse", "Codebook", "encoding_from_json", "ENCODINGS",
           "dtype_from_name", "dtype_name", "pack_bits", "unpack_bits", "encode_positions", "decode_positions",
           "pack_int32", "unpack_int32", "stored_base"]

ENCODINGS: dict[str, type[Encoding]] = {}


def dtype_from_name(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16``; ValueError for anything that is not a torch dtype."""
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


class Encoding(ABC):
    """A storage form for one tensor. Subclasses are registered by ``kind`` and round-trip through JSON."""

    kind: ClassVar[str]
    # Suffixes of stored parts that do not follow the ``<name>.__<part>`` convention (compressed-tensors names).
    plain_suffixes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ENCODINGS[cls.kind] = cls

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors to store for ``tensor`` (its effective value), by name suffix."""

    @abstractmethod
    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        """The effective tensor from its stored tensors; exact."""

    def to_json(self) -> dict[str, Any]:
        """JSON form, as written to the manifest."""
        return {"kind": self.kind}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_json() == self.to_json()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_json()})"


class Dense(Encoding):
    """Stored as is."""

    kind = "dense"

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"": tensor}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        return stored[""]


class Cast(Encoding):
    """Stored in a narrower float dtype (float16/bfloat16); the effective tensor is in that dtype too."""

    kind = "cast"

    def __init__(self, dtype: str) -> None:
        dtype_from_name(dtype)  # validates
        self.dtype = dtype

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"": tensor.to(dtype_from_name(self.dtype))}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        return stored[""]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "dtype": self.dtype}


class Int8(Encoding):
    """Symmetric int8 with float32 scales, per output channel (dim 0) or per tensor: ``q * scale``.

    Stored as ``<name>.__q`` (int8) and ``<name>.__scale`` (float32, one per row, or one). The effective tensor is
    ``q.float() * scale`` in float32. Encoding an effective tensor finds its exact ``q`` and ``scale`` again: the
    scale is recomputed from the row's largest magnitude and, where float rounding moved it by a few ulps, the
    neighbouring float32 values are tried until ``q * scale`` reproduces every value.
    """

    kind = "int8"

    def __init__(self, per_channel: bool = True) -> None:
        self.per_channel = bool(per_channel)

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(tensor.shape[0], -1) if self.per_channel and tensor.dim() >= 1 else tensor.reshape(1, -1)

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        rows = self._rows(tensor.detach().float())
        amax = rows.abs().amax(dim=1, keepdim=True)
        base = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        best = base
        exact = torch.zeros_like(amax, dtype=torch.bool)
        # Candidates around the recomputed scale; the first that reproduces a whole row exactly wins.
        for ulps in (0, -1, 1, -2, 2, -3, 3):
            cand = base
            step = torch.full_like(base, float("inf") if ulps > 0 else float("-inf"))
            for _ in range(abs(ulps)):
                cand = torch.nextafter(cand, step)
            q = torch.round(rows / cand).clamp(-127, 127)
            ok = ((q * cand) == rows).all(dim=1, keepdim=True) & ~exact
            best = torch.where(ok, cand, best)
            exact |= ok
        q = torch.round(rows / best).clamp(-127, 127).to(torch.int8)
        scale = best.reshape(-1) if self.per_channel and tensor.dim() >= 1 else best.reshape(())
        return {".__q": q.reshape(tensor.shape), ".__scale": scale.contiguous()}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        q, scale = stored[".__q"], stored[".__scale"]
        if self.per_channel and q.dim() >= 1:
            return (self._rows(q).float() * scale.float().reshape(-1, 1)).reshape(q.shape)
        return q.float() * scale.float()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "per_channel": self.per_channel}


# ------------------------------------------------------------------------------------------ bit-level helpers


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers below 2**bits into bytes, ``bits`` each, least significant bit first."""
    import torch

    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    v = values.reshape(-1).to(torch.int32)
    shifts = torch.arange(bits, dtype=torch.int32)
    flat = ((v[:, None] >> shifts) & 1).reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (flat.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` integers (int64)."""
    import torch

    if packed.numel() * 8 < count * bits:
        raise ValueError(f"{packed.numel()} bytes cannot hold {count} values of {bits} bits")
    shifts = torch.arange(8, dtype=torch.int32)
    flat = ((packed.reshape(-1).to(torch.int32)[:, None] >> shifts) & 1)[: count * bits // 8 + 1].reshape(-1)
    flat = flat[: count * bits].reshape(count, bits).to(torch.int64)
    return (flat << torch.arange(bits, dtype=torch.int64)).sum(dim=1)


# Positions of the non-zero elements of a flat tensor, as a byte stream whose first byte names its form:
# 0: a bitmask, one bit per element; b in 1..8: relative indices, one b-bit symbol per step. A symbol s below
# M = 2**b - 1 skips s zeros and marks the next element non-zero; s == M skips M zeros (a filler, Deep Compression's
# padding zero). The last byte is padded with one bits. The smaller form is chosen per tensor.
_BITMASK = 0


def encode_positions(mask: torch.Tensor) -> torch.Tensor:
    """Byte stream of the positions of the true elements of ``mask`` (flattened), in the smaller of both forms."""
    import torch

    flat = mask.reshape(-1).bool()
    where = flat.nonzero().reshape(-1)
    gaps = torch.diff(where, prepend=where.new_full((1,), -1)) - 1
    best_bits, best_size = _BITMASK, flat.numel()
    for bits in range(1, 9):
        m = (1 << bits) - 1
        size = (where.numel() + int((gaps // m).sum())) * bits
        if size < best_size:
            best_bits, best_size = bits, size
    if best_bits == _BITMASK:
        body = pack_bits(flat.to(torch.int32), 1)
    else:
        m = (1 << best_bits) - 1
        fillers = gaps // m
        symbols = torch.full((int(fillers.sum()) + where.numel(),), m, dtype=torch.int64)
        symbols[torch.cumsum(fillers + 1, 0) - 1] = gaps - fillers * m
        body = pack_bits(symbols, best_bits)
        tail = symbols.numel() * best_bits % 8
        if tail:  # pad with one bits: they read as fillers, never as positions (zero bits would)
            body[-1] |= (0xFF << tail) & 0xFF
    return torch.cat([torch.tensor([best_bits], dtype=torch.uint8), body])


def decode_positions(stream: torch.Tensor, numel: int, nnz: int) -> torch.Tensor:
    """Flat boolean mask of ``numel`` elements with ``nnz`` true ones from an ``encode_positions`` stream."""
    import torch

    stream = stream.reshape(-1)
    if stream.numel() < 1:
        raise ValueError("empty position stream")
    form, body = int(stream[0]), stream[1:]
    if form == _BITMASK:
        mask = unpack_bits(body, 1, numel).bool()
    elif 1 <= form <= 8:
        m = (1 << form) - 1
        symbols = unpack_bits(body, form, body.numel() * 8 // form)
        is_nz = symbols < m
        # Each non-zero symbol ends a step; trailing padding bits may decode as extra symbols after the last one.
        ends = torch.cumsum(symbols + is_nz.to(torch.int64), 0) - 1
        marks = is_nz.nonzero().reshape(-1)
        where = ends[marks[:nnz]]
        if where.numel() != nnz or (nnz and int(where[-1]) >= numel):
            raise ValueError(f"position stream holds {where.numel()} positions, expected {nnz} within {numel}")
        # What follows the last position is the final byte's padding: one bits (fillers), less than a byte.
        used = int(marks[nnz - 1]) + 1 if nnz else 0
        if (used * form + 7) // 8 != body.numel() or bool((symbols[used:] != m).any()):
            raise ValueError(f"position stream of {body.numel()} bytes does not end after its {nnz} positions")
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[where] = True
    else:
        raise ValueError(f"unknown position form {form}")
    if int(mask.sum()) != nnz:
        raise ValueError(f"position stream marks {int(mask.sum())} elements, expected {nnz}")
    return mask


class Sparse(Encoding):
    """Pruned tensor: the non-zero values in order (``<name>.__values``, the tensor's dtype) and their positions
    (``<name>.__positions``, bytes from ``encode_positions``: a bitmask or relative indices, whichever is smaller).
    Zeros are exact; the effective tensor has ``shape``."""

    kind = "sparse"

    def __init__(self, shape: list[int]) -> None:
        self.shape = [int(d) for d in shape]

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if list(tensor.shape) != self.shape:
            raise ValueError(f"sparse encoding of shape {self.shape} given a tensor of shape {list(tensor.shape)}")
        flat = tensor.detach().reshape(-1)
        mask = _stored(flat)
        return {".__values": flat[mask].contiguous(), ".__positions": encode_positions(mask)}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        import math

        values = stored[".__values"].reshape(-1)
        numel = math.prod(self.shape)
        mask = decode_positions(stored[".__positions"], numel, values.numel())
        out = values.new_zeros(numel)
        out[mask] = values
        return out.reshape(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": self.shape}


class Codebook(Encoding):
    """Shared weights (k-means): every value (every non-zero one when ``sparse``) is one of at most 2**bits
    centroids. Stored as one byte tensor ``<name>.__shared``: a 6-byte header (centroid count as uint16, non-zero
    count as uint32, little-endian), the centroids sorted in ``codebook_dtype``, then for sparse tensors the
    ``encode_positions`` stream, then the centroid index of each value packed to ``bits`` bits. The effective
    tensor is in ``dtype``; a pruned zero takes no centroid."""

    kind = "codebook"

    def __init__(self, shape: list[int], bits: int, dtype: str = "float32", codebook_dtype: str = "float16",
                 sparse: bool = False) -> None:
        if not 1 <= int(bits) <= 8:
            raise ValueError(f"codebook bits must be in 1..8, got {bits}")
        dtype_from_name(dtype)
        dtype_from_name(codebook_dtype)
        self.shape, self.bits, self.dtype = [int(d) for d in shape], int(bits), dtype
        self.codebook_dtype, self.sparse = codebook_dtype, bool(sparse)

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        if list(tensor.shape) != self.shape:
            raise ValueError(f"codebook encoding of shape {self.shape} given a tensor of shape {list(tensor.shape)}")
        flat = tensor.detach().reshape(-1)
        mask = _stored(flat) if self.sparse else torch.ones_like(flat, dtype=torch.bool)
        values = flat[mask]
        # Distinct values by bit pattern, so -0.0 and +0.0 (equal as numbers) stay apart and decode as written.
        keys, index = torch.unique(_bit_pattern(values), sorted=True, return_inverse=True)
        distinct = _from_bit_pattern(keys, flat.dtype)
        if distinct.numel() > 1 << self.bits:
            raise ValueError(f"{distinct.numel()} distinct values do not fit a {self.bits}-bit codebook")
        book = distinct.to(dtype_from_name(self.codebook_dtype))
        if not torch.equal(_bit_pattern(book.to(flat.dtype)), keys):
            raise ValueError(f"values are not all representable in {self.codebook_dtype}; the share pass rounds "
                             "centroids to the codebook dtype")
        parts = [_le_bytes(book.numel(), 2), _le_bytes(values.numel(), 4), book.contiguous().view(torch.uint8)]
        if self.sparse:
            parts.append(encode_positions(mask))
        parts.append(pack_bits(index, self.bits))
        return {".__shared": torch.cat([p.reshape(-1) for p in parts])}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        import math

        import torch

        blob = stored[".__shared"].reshape(-1)
        k, nnz = _from_le(blob[0:2]), _from_le(blob[2:6])
        book_dtype = dtype_from_name(self.codebook_dtype)
        size = torch.empty((), dtype=book_dtype).element_size()
        at = 6 + k * size
        book = blob[6:at].clone().view(book_dtype).to(dtype_from_name(self.dtype))  # clone: the mmap may be unaligned
        numel = math.prod(self.shape)
        index_bytes = (nnz * self.bits + 7) // 8
        if (self.sparse and at > blob.numel() - index_bytes) or (not self.sparse and blob.numel() != at + index_bytes):
            raise ValueError(f"codebook tensor of {blob.numel()} bytes cannot hold {k} centroids and {nnz} "
                             f"{self.bits}-bit indices; the file is truncated or corrupt")
        if self.sparse:
            mask = decode_positions(blob[at: blob.numel() - index_bytes], numel, nnz)
        elif nnz != numel:
            raise ValueError(f"dense codebook tensor holds {nnz} values, its shape {self.shape} needs {numel}")
        index = unpack_bits(blob[blob.numel() - index_bytes:], self.bits, nnz)
        if nnz and int(index.max()) >= k:
            raise ValueError(f"centroid index {int(index.max())} beyond the {k} centroids")
        values = book[index] if k else book.new_zeros(0)
        if not self.sparse:
            return values.reshape(self.shape)
        out = book.new_zeros(numel)
        out[mask] = values
        return out.reshape(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": self.shape, "bits": self.bits, "dtype": self.dtype,
                "codebook_dtype": self.codebook_dtype, "sparse": self.sparse}


def _stored(flat: torch.Tensor) -> torch.Tensor:
    """Which elements a sparse form stores: all but +0.0 (a -0.0 is stored, so it decodes with its sign)."""
    import torch

    return (flat != 0) | torch.signbit(flat)


_INT_OF_WIDTH = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def _bit_pattern(values: torch.Tensor) -> torch.Tensor:
    """Each float's bits as an int64 (equal exactly when the floats are bit-identical)."""
    import torch

    return values.contiguous().view(getattr(torch, _INT_OF_WIDTH[values.element_size()])).to(torch.int64)


def _from_bit_pattern(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    import torch

    width = torch.empty((), dtype=dtype).element_size()
    return keys.to(getattr(torch, _INT_OF_WIDTH[width])).view(dtype)


def _le_bytes(value: int, width: int) -> torch.Tensor:
    import torch

    return torch.tensor(list(int(value).to_bytes(width, "little")), dtype=torch.uint8)


def _from_le(raw: torch.Tensor) -> int:
    return int.from_bytes(bytes(raw.tolist()), "little")


from .intgroup import IntGroup, pack_int32, unpack_int32  # noqa: E402 - registers the kind; needs Encoding above


def stored_base(stored_name: str, encodings: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """(tensor name, part suffix) of a stored tensor's name, given the manifest's encodings by tensor name."""
    for suffix in IntGroup.plain_suffixes:
        base = stored_name[: -len(suffix)]
        if stored_name.endswith(suffix) and (encodings.get(base) or {}).get("kind") == IntGroup.kind:
            return base, suffix
    name, sep, suffix = stored_name.partition(".__")
    return name, sep + suffix


def encoding_from_json(data: dict[str, Any]) -> Encoding:
    """Rebuild an encoding from its JSON form; ValueError naming the known kinds otherwise."""
    kind = data.get("kind")
    cls = ENCODINGS.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown tensor encoding {kind!r}; this compressor knows {', '.join(ENCODINGS)}")
    args = {k: v for k, v in data.items() if k != "kind"}
    return cls(**args)
