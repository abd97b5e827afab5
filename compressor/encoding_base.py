"""The contract every tensor encoding keeps (compressor.encodings lists them all), and the registry of kinds."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Encoding", "ENCODINGS", "dtype_from_name", "dtype_name"]

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
    # Whether decoding reads positions out of a bit stream (numpy, one core a call, most of a sparse decode): the
    # loader decodes such tensors on several threads at once (compressor.loading.rebuild.decode).
    positions: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ENCODINGS[cls.kind] = cls

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors to store for ``tensor`` (its effective value), by name suffix."""

    @abstractmethod
    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        """The effective tensor from its stored tensors; exact."""

    def reproduces(self, stored: dict[str, torch.Tensor]) -> bool:
        """Whether encoding the effective value of ``stored`` (``encode(decode(stored))``) is known to give
        ``stored`` back bit for bit, without decoding it. A streamed tensor whose last pass's encoding is also its
        stored one then writes the parts as they are (compressor/stream.py). Default: not known."""
        return False

    def stored_nbytes(self, tensor: torch.Tensor) -> int:
        """Bytes stored for ``tensor``. Default: encode it and count; encodings whose size follows from the shape
        say so without encoding (a pass's report counts every tensor before and after it)."""
        return sum(t.numel() * t.element_size() for t in self.encode(tensor).values())

    def to_json(self) -> dict[str, Any]:
        """JSON form, as written to the manifest."""
        return {"kind": self.kind}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_json() == self.to_json()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_json()})"
