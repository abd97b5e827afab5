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

__all__ = ["Encoding", "Dense", "Cast", "Int8", "encoding_from_json", "ENCODINGS", "dtype_from_name", "dtype_name"]

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


def encoding_from_json(data: dict[str, Any]) -> Encoding:
    """Rebuild an encoding from its JSON form; ValueError naming the known kinds otherwise."""
    kind = data.get("kind")
    cls = ENCODINGS.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown tensor encoding {kind!r}; this compressor knows {', '.join(ENCODINGS)}")
    args = {k: v for k, v in data.items() if k != "kind"}
    return cls(**args)
