"""Whether compressor owns the process it runs in: the `compress` command does (``compressor.cli.console`` says so
before it runs a command); a program that imports compressor as a library does not, and keeps every library it
imports as that library would be on its own."""

from __future__ import annotations

__all__ = ["claim", "owned"]

_OWNED = [False]


def claim() -> None:
    """Record that compressor owns this process (the `compress` command)."""
    _OWNED[0] = True


def owned() -> bool:
    """Whether compressor owns this process."""
    return _OWNED[0]
