"""Bit-level packing shared by the stored encodings: integers packed into bytes or into int32 words, and the
positions of a sparse tensor's non-zero elements as a compact byte stream. Pure tensor arithmetic, no formats."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["pack_bits", "unpack_bits", "encode_positions", "decode_positions", "position_indices", "pack_int32", "unpack_int32",
           "bit_pattern", "from_bit_pattern", "le_bytes", "from_le"]


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


def unpack_bits(packed: torch.Tensor, bits: int, count: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` integers (int64, or ``dtype``).

    Works a byte or a group of bytes at a time, never a bit at a time: 1, 2, 4 and 8 bits fill whole bytes and are
    shifted out of each byte in place; any other width packs 8 values into exactly ``bits`` bytes, each value
    read from the (at most three) bytes it spans. Loading a codebook-encoded model is mostly this."""
    import torch

    if packed.numel() * 8 < count * bits:
        raise ValueError(f"{packed.numel()} bytes cannot hold {count} values of {bits} bits")
    out_dtype = dtype or torch.int64
    flat = packed.reshape(-1)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        fields = (flat[: -(-count // per)].unsqueeze(1) >> shifts) & mask
        return fields.reshape(-1)[:count].to(out_dtype)
    groups = -(-count // 8)
    raw = flat[: groups * bits].to(torch.int32)
    # Every group's bytes, and two zero bytes beyond the stream's end: a value spans at most three bytes.
    raw = torch.cat([raw, raw.new_zeros(groups * bits + 2 - raw.numel())])
    base = torch.arange(groups, dtype=torch.int64) * bits
    fields = torch.empty(groups, 8, dtype=torch.int32)
    for k in range(8):
        at, shift = divmod(k * bits, 8)
        word = raw[base + at] | (raw[base + at + 1] << 8) | (raw[base + at + 2] << 16)
        fields[:, k] = (word >> shift) & mask
    return fields.reshape(-1)[:count].to(out_dtype)


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

    mask = torch.zeros(numel, dtype=torch.bool)
    mask[position_indices(stream, numel, nnz)] = True
    return mask


def position_indices(stream: torch.Tensor, numel: int, nnz: int) -> torch.Tensor:
    """The ``nnz`` positions (int64, increasing, below ``numel``) an ``encode_positions`` stream marks: what a
    decoder scatters the stored values to (faster than assigning through a boolean mask)."""
    import torch

    stream = stream.reshape(-1)
    if stream.numel() < 1:
        raise ValueError("empty position stream")
    if stream.dtype != torch.uint8:
        raise ValueError(f"position stream of {stream.dtype}, not bytes (uint8)")
    if nnz < 0:
        raise ValueError(f"position stream asked for {nnz} positions")
    form, body = int(stream[0]), stream[1:]
    if form == _BITMASK:
        if body.numel() * 8 < numel:
            raise ValueError(f"{body.numel()} bytes cannot hold {numel} values of 1 bits")
        where = _bit_positions(body, numel, True)
        if where.numel() != nnz:
            raise ValueError(f"position stream marks {where.numel()} elements, expected {nnz}")
        return where
    if not 1 <= form <= 8:
        raise ValueError(f"unknown position form {form}")
    if form == 1:
        return _one_bit_positions(body, numel, nnz)
    return _relative_positions(form, body, numel, nnz)


def _relative_positions(form: int, body: torch.Tensor, numel: int, nnz: int) -> torch.Tensor:
    """``position_indices`` of a relative stream of ``form``-bit symbols, by the general steps."""
    import torch

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
    return where  # strictly increasing: every step advances by its skip plus one


def _one_bit_positions(body: torch.Tensor, numel: int, nnz: int) -> torch.Tensor:
    """``position_indices`` of a 1-bit relative stream, what a tensor about half pruned is stored as: each symbol is
    one element (0: non-zero, 1: a filler, one zero), so the positions are those of the zero bits, found in one
    pass (the general steps' prefix sum and gather took 2.4x as long). The same checks, the same positions."""
    where = _bit_positions(body, body.numel() * 8, False)
    if where.numel() < nnz or (nnz and int(where[nnz - 1]) >= numel):
        raise ValueError(f"position stream holds {min(where.numel(), nnz)} positions, expected {nnz} within {numel}")
    used = int(where[nnz - 1]) + 1 if nnz else 0
    if (used + 7) // 8 != body.numel() or where.numel() != nnz:
        raise ValueError(f"position stream of {body.numel()} bytes does not end after its {nnz} positions")
    return where


def _bit_positions(body: torch.Tensor, count: int, value: bool) -> torch.Tensor:
    """The positions (int64, increasing) of the bits equal to ``value`` among the first ``count`` bits of ``body``
    (bit i of byte j is bit 8j + i, ``pack_bits``' order). On CPU by numpy, whose ``flatnonzero`` is several times
    faster than torch's ``nonzero`` (a 1536 x 384 mask: 0.5 ms against 2.3 ms on 2 cores), the half of a pruned
    model's load that is not I/O."""
    import torch

    if body.device.type == "cpu":
        import numpy as np

        bits = np.unpackbits(body.contiguous().numpy(), count=count, bitorder="little")
        return torch.from_numpy(np.flatnonzero(bits if value else bits == 0)).to(torch.int64)
    flags = unpack_bits(body, 1, count, torch.bool)
    return (flags if value else ~flags).nonzero().reshape(-1)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``bits``-bit integers (rows x columns) packed along each row into int32 words, compressed-tensors'
    layout: each value offset by 2**(bits-1) to unsigned, value i of a row at bits ``bits * i`` of the row's bit
    stream, the last word zero-padded. ``bits`` must divide 32."""
    import torch

    if 32 % bits:
        raise ValueError(f"bits must divide 32, got {bits}")
    per = 32 // bits
    rows, cols = values.shape
    if bits in (4, 8) and sys.byteorder == "little":
        # Bytes, then the words they make: a value's bits land where the int64 arithmetic below puts them, in a
        # tenth of its memory (a large table's words are otherwise built from 8-byte copies of every value).
        unsigned = values.to(torch.int8).view(torch.uint8) ^ 0x80 if bits == 8 else (values.to(torch.int8) + 8).view(
            torch.uint8)
        unsigned = torch.nn.functional.pad(unsigned, (0, -cols % per))
        if bits == 4:
            unsigned = unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)
        # Flat first: a one-row tensor may count as contiguous with any row stride, which view() refuses.
        return unsigned.contiguous().reshape(-1).view(torch.int32).reshape(rows, -1)
    unsigned = values.to(torch.int64) + (1 << (bits - 1))
    unsigned = torch.nn.functional.pad(unsigned, (0, -cols % per)).reshape(rows, -1, per)
    words = (unsigned << (torch.arange(per, dtype=torch.int64, device=values.device) * bits)).sum(dim=2)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: the signed integers (int8), ``cols`` per row."""
    import torch

    per = 32 // bits
    if bits in (4, 8) and sys.byteorder == "little":  # from the bytes, as pack_int32 writes them
        raw = packed.contiguous().reshape(-1).view(torch.uint8).reshape(packed.shape[0], -1)
        if bits == 8:
            return (raw[:, :cols] ^ 0x80).view(torch.int8)
        fields = torch.empty(raw.shape[0], raw.shape[1] * 2, dtype=torch.uint8, device=packed.device)
        fields[:, 0::2], fields[:, 1::2] = raw & 15, raw >> 4
        return fields[:, :cols].view(torch.int8) - 8
    words = packed.to(torch.int64) & 0xFFFFFFFF
    fields = (words.unsqueeze(2) >> (torch.arange(per, dtype=torch.int64, device=packed.device) * bits)) & ((1 << bits) - 1)
    return (fields.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


_INT_OF_WIDTH = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def bit_pattern(values: torch.Tensor) -> torch.Tensor:
    """Each float's bits as an int64 (equal exactly when the floats are bit-identical)."""
    import torch

    return values.contiguous().view(getattr(torch, _INT_OF_WIDTH[values.element_size()])).to(torch.int64)


def from_bit_pattern(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The floats of ``dtype`` whose bits ``bit_pattern`` gave."""
    import torch

    width = torch.empty((), dtype=dtype).element_size()
    return keys.to(getattr(torch, _INT_OF_WIDTH[width])).view(dtype)


def le_bytes(value: int, width: int) -> torch.Tensor:
    """``value`` as ``width`` little-endian bytes (uint8)."""
    import torch

    return torch.tensor(list(int(value).to_bytes(width, "little")), dtype=torch.uint8)


def from_le(raw: torch.Tensor) -> int:
    """The integer of little-endian bytes (uint8)."""
    return int.from_bytes(bytes(raw.tolist()), "little")
