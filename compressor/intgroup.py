"""Low-bit integer groups: 4- or 8-bit weights with a scale (and zero point) per group of inputs, stored in the
compressed-tensors ``pack-quantized`` layout. An encoding like those of compressor.encodings, registered with them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .bitpack import pack_int32, unpack_int32
from .encoding_base import Encoding

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["IntGroup"]


class IntGroup(Encoding):
    """Low-bit integers (4 or 8 bits) with one scale per group of ``group_size`` consecutive inputs of each row
    (one per row when ``group_size`` is None), symmetric or with zero points: the effective tensor is
    ``(q - zero_point) * scale`` computed in float32 (exact: a float16 scale times a small integer).

    Stored in the compressed-tensors ``pack-quantized`` layout, which transformers and vLLM read directly:
    ``<name>_packed`` (int32, the signed values offset by 2**(bits-1) and packed densely along each row from the
    least significant bit), ``<name>_scale`` (float16, rows x groups), ``<name>_zero_point`` (asymmetric only: the
    same offset signed values, packed along dim 0) and ``<name>_shape`` (int64, the tensor's shape). For a
    Linear's ``weight`` these are its module's ``weight_packed``, ``weight_scale``... as compressed-tensors names them.

    The integers come from the quantizer (NNCF's scales are chosen by data, not recomputable from the values), so the
    pass hands them over with ``with_parts``; ``encode`` returns them after checking they decode to the tensor. A
    streamed model has no values when the pass runs: there the pass names a quantizer instead (``computed_by``),
    and ``encode`` asks it for the integers of the value it is given.
    """

    kind = "intgroup"
    plain_suffixes = ("_packed", "_scale", "_zero_point", "_shape")

    def __init__(self, shape: list[int], bits: int, group_size: int | None = None, symmetric: bool = True) -> None:
        if int(bits) not in (4, 8):
            raise ValueError(f"intgroup bits must be 4 or 8, got {bits}")
        if len(shape) != 2:
            raise ValueError(f"intgroup encodes matrices; shape {list(shape)}")
        self.shape, self.bits = [int(d) for d in shape], int(bits)
        self.group_size = None if group_size is None else int(group_size)
        if self.group_size is not None and (self.group_size < 1 or self.shape[1] % self.group_size):
            raise ValueError(f"group_size {group_size} does not divide the {self.shape[1]} columns")
        self.symmetric = bool(symmetric)
        self._parts: dict[str, torch.Tensor] | None = None
        self._quantizer: Callable[[torch.Tensor], IntGroup] | None = None
        self._decoded: Any = None  # computed parts: a weak reference to the tensor decode made of them

    def computed_by(self, quantizer: Callable[[torch.Tensor], IntGroup]) -> IntGroup:
        """Let ``encode`` find the integers of a value itself: ``quantizer(value)`` returns an IntGroup of this form
        holding them. For a model streamed tensor by tensor (compressor/stream.py), whose values do not exist when
        the pass runs; the parts of a value are kept only until its effective value is encoded, one tensor at a
        time. Returns self."""
        self._quantizer = quantizer
        return self

    def _part_layout(self) -> dict[str, tuple[list[int], Any]]:
        """{suffix: (shape, dtype)} of the stored parts, from the shape alone."""
        import torch

        rows, cols, groups = self.shape[0], self.shape[1], self.groups
        layout = {"_packed": ([rows, -(-cols * self.bits // 32)], torch.int32),
                  "_scale": ([rows, groups], torch.float16), "_shape": ([2], torch.int64)}
        if not self.symmetric:
            layout["_zero_point"] = ([-(-rows * self.bits // 32), groups], torch.int32)
        return layout

    @property
    def groups(self) -> int:
        """Scales per row."""
        return 1 if self.group_size is None else self.shape[1] // self.group_size

    def with_parts(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> IntGroup:
        """Attach the quantizer's signed integers ``q`` (rows x columns), float16 ``scale`` (rows x groups) and, for
        asymmetric ones, signed ``zero_point`` (rows x groups); returns self."""
        import torch

        low, high = -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        rows, groups = self.shape[0], self.groups
        if list(q.shape) != self.shape or list(scale.reshape(rows, -1).shape) != [rows, groups]:
            raise ValueError(f"integers {list(q.shape)} / scales {list(scale.shape)} do not fit shape {self.shape} "
                             f"in {groups} groups per row")
        for what, t in (("values", q), ("zero points", zero_point)):
            if t is not None and (int(t.min()) < low or int(t.max()) > high):
                raise ValueError(f"{what} outside the {self.bits}-bit range [{low}, {high}]")
        if (zero_point is None) != self.symmetric:
            raise ValueError("zero points are given exactly when the encoding is asymmetric")
        parts = {"_packed": pack_int32(q, self.bits), "_scale": scale.reshape(rows, groups).to(torch.float16),
                 "_shape": torch.tensor(self.shape, dtype=torch.int64)}
        if zero_point is not None:
            parts["_zero_point"] = pack_int32(zero_point.reshape(rows, groups).t(), self.bits).t().contiguous()
        self._parts = parts
        return self

    def stored_suffixes(self) -> list[str]:
        """The suffixes of the stored parts (``_packed``, ``_scale``...), as written."""
        return list(self._part_layout())

    def with_stored(self, stored: dict[str, torch.Tensor]) -> IntGroup:
        """Attach parts as ``encode_parts`` gave them (read back from a file); ValueError where one does not fit
        this encoding. Returns self."""
        layout = self._part_layout()
        if set(stored) != set(layout):
            raise ValueError(f"parts {sorted(stored)}, expected {sorted(layout)}")
        for suffix, (shape, dtype) in layout.items():
            if list(stored[suffix].shape) != shape or stored[suffix].dtype != dtype:
                raise ValueError(f"part {suffix} is {stored[suffix].dtype} {list(stored[suffix].shape)}, expected "
                                 f"{dtype} {shape}")
        self._parts = dict(stored)
        return self

    def integers(self, stored: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q, scale, zero_point) from the stored tensors: signed int8 rows x columns, float16 rows x groups, and
        signed int8 rows x groups or None; ValueError where a part does not fit this encoding."""
        import torch

        rows, cols = self.shape
        layout = self._part_layout()
        packed, scale = stored["_packed"], stored["_scale"]
        if packed.dtype != torch.int32 or list(packed.shape) != layout["_packed"][0]:
            raise ValueError(f"packed values {packed.dtype} {list(packed.shape)}, expected int32 "
                             f"{layout['_packed'][0]}")
        if list(scale.shape) != layout["_scale"][0]:
            raise ValueError(f"scales of shape {list(scale.shape)}, expected {layout['_scale'][0]}")
        shape = stored.get("_shape")
        if shape is not None and shape.reshape(-1).tolist() != self.shape:
            raise ValueError(f"stored shape {shape.reshape(-1).tolist()} differs from the manifest's {self.shape}")
        q = unpack_int32(packed, self.bits, cols)
        zero = None
        if not self.symmetric:
            zp = stored["_zero_point"]
            if zp.dtype != torch.int32 or list(zp.shape) != layout["_zero_point"][0]:
                raise ValueError(f"zero points {zp.dtype} {list(zp.shape)}, expected int32 "
                                 f"{layout['_zero_point'][0]}")
            zero = unpack_int32(zp.t().contiguous(), self.bits, rows).t()
        return q, scale, zero

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch

        if stored["_packed"].is_meta:  # a layout planned before values
            return torch.empty(self.shape, dtype=torch.float32, device="meta")
        q, scale, zero = self.integers(stored)
        rows, groups = self.shape[0], self.groups
        values = q.to(torch.float32).reshape(rows, groups, -1)
        if zero is not None:
            values = values - zero.to(torch.float32).reshape(rows, groups, 1)
        out = (values * scale.to(torch.float32).reshape(rows, groups, 1)).reshape(self.shape)
        if self._quantizer is not None and self._parts is not None and stored.get("_packed") is self._parts["_packed"]:
            import weakref

            # A streamed tensor's effective value is encoded next: knowing it is this very tensor saves decoding
            # the parts a second time (a float32 copy of the largest table) only to compare.
            self._decoded = weakref.ref(out)
        return out

    def stored_nbytes(self, tensor: torch.Tensor) -> int:
        if self._parts is None and self._quantizer is None:
            return super().stored_nbytes(tensor)  # refuses, as encode does
        import math

        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self._part_layout().values())

    def encode_parts(self) -> dict[str, torch.Tensor]:
        """The attached stored tensors (``with_parts``), as written to disk."""
        if self._parts is None:
            raise ValueError("no integers attached to this intgroup encoding")
        return dict(self._parts)

    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        if tensor.is_meta:
            return {k: torch.empty(shape, dtype=dtype, device="meta")
                    for k, (shape, dtype) in self._part_layout().items()}
        if self._parts is None and self._quantizer is None:
            raise ValueError("an intgroup tensor is encoded from the quantizer's integers (with_parts), and none "
                             "were attached")
        decoded = self._decoded() if self._decoded is not None else None
        self._decoded = None
        parts = self._parts
        exact = parts is not None and tensor.dtype == torch.float32 and (
            tensor is decoded or torch.equal(self.decode(parts), tensor.detach()))
        if self._quantizer is not None:
            self._parts = None  # computed parts live from a value's encoding until its effective value's
            if parts is None:  # a value: its integers, kept for the effective value that follows
                found = self._quantizer(tensor.detach())
                if found.to_json() != self.to_json():
                    raise ValueError(f"the quantizer gave {found.to_json()} for a tensor planned as "
                                     f"{self.to_json()}; please report this bug")
                self._parts = found.encode_parts()
                return dict(self._parts)
        if not exact:
            raise ValueError("the tensor no longer equals its 4-bit integers times their scales; a pass changed a "
                             "quantized weight after quantize")
        return dict(parts)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": self.shape, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric}
