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

__all__ = ["Encoding", "Dense", "Cast", "encoding_from_json", "ENCODINGS", "dtype_from_name", "dtype_name"]

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


def encoding_from_json(data: dict[str, Any]) -> Encoding:
    """Rebuild an encoding from its JSON form; ValueError naming the known kinds otherwise."""
    kind = data.get("kind")
    cls = ENCODINGS.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown tensor encoding {kind!r}; this compressor knows {', '.join(ENCODINGS)}")
    args = {k: v for k, v in data.items() if k != "kind"}
    return cls(**args)
