"""How each tensor is stored compactly, and its exact decoder.

The module in a ``Model`` always holds the *effective* values: exactly what the stored form decodes to. An
``Encoding`` turns an effective tensor into the tensors written to disk (``encode``) and back (``decode``).
Invariant, tested for every encoding: ``decode(encode(t))`` equals ``t`` bit for bit.

Stored tensors are named ``<tensor name><suffix>``; the suffix ``""`` keeps the tensor's own (Hugging Face) name,
so dense and cast tensors stay readable by any safetensors loader. Every kind is imported from here: the base class
is compressor.encoding_base's, low-bit integer groups (compressed-tensors' layout) compressor.intgroup's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .bitpack import (bit_pattern, encode_positions, from_bit_pattern, from_le, le_bytes, pack_bits,
                      position_indices, unpack_bits)
from .encoding_base import ENCODINGS, Encoding, dtype_from_name, dtype_name
from .errors import CompressorError
from .intgroup import IntGroup

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Encoding", "Dense", "Cast", "Int8", "IntGroup", "Sparse", "Codebook", "encoding_from_json", "ENCODINGS",
           "dtype_from_name", "dtype_name", "stored_base", "NonFiniteWeight", "encode_named"]


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

    def stored_nbytes(self, tensor: torch.Tensor) -> int:
        return tensor.numel() * dtype_from_name(self.dtype).itemsize

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        return stored[""]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "dtype": self.dtype}


class NonFiniteWeight(CompressorError):
    """A weight holding NaN or infinite values, which int8 cannot encode: a row with a NaN would be stored as zeros
    at scale 1 and a row with an infinity saturated, silently. ``named`` gives the same error with the tensor's
    name, which the encoding does not know."""

    def __init__(self, count: int, total: int, name: str | None = None) -> None:
        self.count, self.total, self.name = count, total, name
        super().__init__(f"{name or 'a weight'} holds {count:,} NaN or infinite values (of {total:,}), which int8 "
                         "cannot represent; the model is damaged there. Repair the weights, or leave this module in "
                         "float with the quantize pass's `exclude`")

    def named(self, name: str) -> NonFiniteWeight:
        return NonFiniteWeight(self.count, self.total, name)


def encode_named(encoding: Encoding, tensor: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """``encoding.encode(tensor)``, a weight it refuses named in the error (the pass and the stream both call
    this)."""
    try:
        return encoding.encode(tensor)
    except NonFiniteWeight as exc:
        raise exc.named(name) from None


_TINY_ROW = 127 * 2.0 ** -126  # a row's largest magnitude below which its int8 scale is a subnormal float32
_HEAD = 64  # columns of a row compared before the whole row is (Int8._reproduced)


class Int8(Encoding):
    """Symmetric int8 with float32 scales, per output channel (dim 0) or per tensor: ``q * scale``.

    Stored as ``<name>.__q`` (int8) and ``<name>.__scale`` (float32, one per row, or one). The effective tensor is
    ``q.float() * scale`` in float32. Encoding an effective tensor finds its exact ``q`` and ``scale`` again: the
    scale is recomputed from the row's largest magnitude and, where float rounding moved it by a few ulps, the
    neighbouring float32 values are tried until ``q * scale`` reproduces every value.
    """

    kind = "int8"
    _BLOCK = 1 << 22  # values encoded at a time

    def __init__(self, per_channel: bool = True) -> None:
        self.per_channel = bool(per_channel)

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(tensor.shape[0], -1) if self.per_channel and tensor.dim() >= 1 else tensor.reshape(1, -1)

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        rows = self._rows(tensor.detach().float())
        q = torch.empty_like(rows, dtype=torch.int8)
        best = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
        # Rows are independent: blocks of about _BLOCK values bound the temporaries
        step = max(1, self._BLOCK // max(1, rows.shape[1]))
        for i in range(0, rows.shape[0] if not rows.is_meta else 0, step):  # meta: a layout planned before values
            block = rows[i:i + step]
            amax = block.abs().amax(dim=1, keepdim=True)
            # A NaN or an infinity anywhere in a row reaches its amax: one small check instead of torch.isfinite over
            # the block, which took longer than the whole encoding (10 ms per 16 MB, several passes)
            if not bool(torch.isfinite(amax).all()):
                raise NonFiniteWeight(int(rows.numel() - torch.isfinite(rows).sum()), rows.numel())
            q[i:i + step], best[i:i + step] = self._encode_rows(block, amax)
        scale = best.reshape(-1) if self.per_channel and tensor.dim() >= 1 else best.reshape(())
        return {".__q": q.reshape(tensor.shape), ".__scale": scale.contiguous()}

    @staticmethod
    def _encode_rows(rows: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        base = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        best = base
        exact = torch.zeros_like(amax, dtype=torch.bool)
        moved = torch.zeros_like(exact)  # rows exact at a neighbouring scale: their q is rounded again at the end
        # Candidates around the recomputed scale; the first that reproduces a whole row exactly wins (usually the first).
        for ulps in (0, -1, 1, -2, 2, -3, 3):
            cand = base
            step = torch.full_like(base, float("inf") if ulps > 0 else float("-inf"))
            for _ in range(abs(ulps)):
                cand = torch.nextafter(cand, step)
            if ulps == 0:
                q = torch.div(rows, cand).round_().clamp_(-127, 127)  # in place: one block-sized temporary
                ok = Int8._reproduced(rows, cand, q)
            else:  # a row's largest value has q = +-127, so 127 * cand must give it back: only those rows are tried
                # (and rows so small that amax / 127 is subnormal, where that does not hold)
                maybe = (~exact & ((cand * 127 == amax) | (amax < _TINY_ROW))).reshape(-1).nonzero().reshape(-1)
                head = rows[maybe, :_HEAD]  # their first columns first: raw weights already fail there
                c = cand[maybe]
                maybe = maybe[((torch.round(head / c).clamp(-127, 127) * c) == head).all(dim=1)]
                if not maybe.numel():
                    continue
                sub, c = rows[maybe], cand[maybe]
                ok = torch.zeros_like(exact)
                ok[maybe] = ((torch.round(sub / c).clamp(-127, 127) * c) == sub).all(dim=1, keepdim=True)
                moved |= ok
            best = torch.where(ok, cand, best)
            exact |= ok
            if bool(exact.all()):
                break
        if bool(moved.any()):  # the rows whose winning scale is a neighbour: round them again with it
            rows_moved = moved.reshape(-1).nonzero().reshape(-1)
            q[rows_moved] = torch.round(rows[rows_moved] / best[rows_moved]).clamp(-127, 127)
        return q.to(torch.int8), best

    @staticmethod
    def _reproduced(rows: torch.Tensor, scale: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Which rows ``q * scale`` gives back exactly (a bool column). The first columns are compared first and the
        rest only for rows that pass there: a row of raw weights (the first encoding of a model) fails in its first
        few values, and comparing whole rows that cannot pass took half of the encoding's time."""
        import torch

        ok = torch.eq(q[:, :_HEAD] * scale, rows[:, :_HEAD]).all(dim=1, keepdim=True)
        if rows.shape[1] <= _HEAD or not bool(ok.any()):
            return ok
        if bool(ok.all()):  # an effective tensor: every row, without gathering them
            return torch.eq(q * scale, rows).all(dim=1, keepdim=True)
        idx = ok.reshape(-1).nonzero().reshape(-1)
        ok[idx] = torch.eq(q[idx] * scale[idx], rows[idx]).all(dim=1, keepdim=True)
        return ok

    def reproduces(self, stored: dict[str, torch.Tensor]) -> bool:
        """For parts ``encode`` gave: True when every row either reaches +-127 with a finite, normal float32 scale
        or is all zero with scale 1 (a row whose scale is subnormal is not vouched for; ``encode`` refuses
        non-finite values). ``encode`` then finds each row's very scale again from its effective value:
        the scale it computed, ``amax / 127`` rounded, is among the candidates it tries first and gives the row back
        exactly, and ``round(q * scale / scale)`` is ``q`` for ``|q| <= 127``. tests/test_encodings.py holds it to
        the computation over random rows, scales and edge rows."""
        import torch

        q, scale = stored[".__q"], stored[".__scale"]
        if scale.dtype != torch.float32 or q.dtype != torch.int8 or not q.numel():
            return False
        rows = self._rows(q)
        reach = rows.abs().amax(dim=1)  # int8: |q| <= 127, so abs cannot overflow
        scale = scale.reshape(-1).expand(reach.shape[0]) if scale.numel() == 1 else scale.reshape(-1)
        normal = torch.isfinite(scale) & (scale >= torch.finfo(torch.float32).tiny)
        return bool((((reach == 127) & normal) | ((reach == 0) & (scale == 1))).all())

    def stored_nbytes(self, tensor: torch.Tensor) -> int:
        rows = tensor.shape[0] if self.per_channel and tensor.dim() >= 1 else 1
        return tensor.numel() + 4 * rows

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        q, scale = stored[".__q"], stored[".__scale"]
        if self.per_channel and q.dim() >= 1:  # in place: one float copy of a large table, not two
            return self._rows(q).float().mul_(scale.float().reshape(-1, 1)).reshape(q.shape)
        return q.float().mul_(scale.float())

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "per_channel": self.per_channel}


class Sparse(Encoding):
    """Pruned tensor: the non-zero values in order (``<name>.__values``, the tensor's dtype) and their positions
    (``<name>.__positions``, bytes from ``encode_positions``: a bitmask or relative indices, whichever is smaller).
    Zeros are exact; the effective tensor has ``shape``."""

    kind = "sparse"
    positions = True

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
        where = position_indices(stored[".__positions"], numel, values.numel())
        return values.new_zeros(numel).index_copy_(0, where, values).reshape(self.shape)

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
        self.positions = self.sparse

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        if list(tensor.shape) != self.shape:
            raise ValueError(f"codebook encoding of shape {self.shape} given a tensor of shape {list(tensor.shape)}")
        flat = tensor.detach().reshape(-1)
        mask = _stored(flat) if self.sparse else torch.ones_like(flat, dtype=torch.bool)
        values = flat[mask]
        # Distinct values by bit pattern, so -0.0 and +0.0 (equal as numbers) stay apart and decode as written.
        keys, index = torch.unique(bit_pattern(values), sorted=True, return_inverse=True)
        distinct = from_bit_pattern(keys, flat.dtype)
        if distinct.numel() > 1 << self.bits:
            raise ValueError(f"{distinct.numel()} distinct values do not fit a {self.bits}-bit codebook")
        book = distinct.to(dtype_from_name(self.codebook_dtype))
        if not torch.equal(bit_pattern(book.to(flat.dtype)), keys):
            raise ValueError(f"values are not all representable in {self.codebook_dtype}; the share pass rounds "
                             "centroids to the codebook dtype")
        parts = [le_bytes(book.numel(), 2), le_bytes(values.numel(), 4), book.contiguous().view(torch.uint8)]
        if self.sparse:
            parts.append(encode_positions(mask))
        parts.append(pack_bits(index, self.bits))
        return {".__shared": torch.cat([p.reshape(-1) for p in parts])}

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        import math

        import torch

        blob = stored[".__shared"].reshape(-1)
        if blob.dtype != torch.uint8:
            raise ValueError(f"codebook tensor of {blob.dtype}, not bytes (uint8)")
        k, nnz = from_le(blob[0:2]), from_le(blob[2:6])
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
            where = position_indices(blob[at: blob.numel() - index_bytes], numel, nnz)
        elif nnz != numel:
            raise ValueError(f"dense codebook tensor holds {nnz} values, its shape {self.shape} needs {numel}")
        values = _centroids(book, blob[blob.numel() - index_bytes:], self.bits, nnz)
        if not self.sparse:
            return values.reshape(self.shape)
        return book.new_zeros(numel).index_copy_(0, where, values).reshape(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": self.shape, "bits": self.bits, "dtype": self.dtype,
                "codebook_dtype": self.codebook_dtype, "sparse": self.sparse}


def _centroids(book: torch.Tensor, packed: torch.Tensor, bits: int, nnz: int) -> torch.Tensor:
    """The first ``nnz`` values whose ``bits``-bit centroid indices ``packed`` holds (``pack_bits``' order); a
    ValueError for an index beyond the ``book``. Widths that fill whole bytes (1, 2, 4, 8) look every byte up at
    once in a table of what each of its 256 values decodes to (a 4-bit byte: two centroids), without unpacking the
    indices first; int32 and index_select: several times faster than int64 advanced indexing, and loading a
    codebook-encoded model is mostly this."""
    import torch

    k = book.shape[0]
    if packed.numel() * 8 < nnz * bits:
        raise ValueError(f"{packed.numel()} bytes cannot hold {nnz} values of {bits} bits")
    if not nnz:
        return book.new_zeros(0)
    if 8 % bits or not k:
        index = unpack_bits(packed, bits, nnz, torch.int32)
        if int(index.max()) >= k:
            raise ValueError(f"centroid index {int(index.max())} beyond the {k} centroids")
        return book.index_select(0, index)
    per, mask = 8 // bits, (1 << bits) - 1
    full = nnz // per  # bytes whose every field is an index; the last one may hold padding after them
    raw = packed.reshape(-1)[: -(-nnz // per)]
    if k <= mask:  # fewer centroids than the width can name: every index is checked, on the bytes themselves
        top = _top_field(raw, full, bits, nnz % per)
        if top >= k:
            raise ValueError(f"centroid index {top} beyond the {k} centroids")
    fields = (torch.arange(256, dtype=torch.int32, device=book.device).unsqueeze(1)
              >> torch.arange(0, 8, bits, dtype=torch.int32, device=book.device)) & mask  # [256, per]
    table = book.index_select(0, fields.clamp(max=k - 1).reshape(-1)).reshape(256, per)  # padding: any centroid
    return table.index_select(0, raw.to(torch.int32)).reshape(-1)[:nnz]


def _top_field(raw: torch.Tensor, full: int, bits: int, rest: int) -> int:
    """The largest ``bits``-bit field of the bytes ``raw`` (uint8): every field of the first ``full`` bytes, the
    first ``rest`` of the next. One shift and mask a field position, on the bytes: looking each byte's largest field
    up as int32 took as long as decoding the values themselves (a third of loading a codebook-encoded MiniLM)."""
    mask, top = (1 << bits) - 1, 0
    if full:
        body = raw[:full]
        top = int(body.max()) if bits == 8 else max(int(((body >> shift) & mask).max()) for shift in range(0, 8, bits))
    if rest:
        last = int(raw[full])
        top = max(top, *((last >> (i * bits)) & mask for i in range(rest)))
    return top


def _stored(flat: torch.Tensor) -> torch.Tensor:
    """Which elements a sparse form stores: all but +0.0 (a -0.0 is stored, so it decodes with its sign)."""
    import torch

    return (flat != 0) | torch.signbit(flat)


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
