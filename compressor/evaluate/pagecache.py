"""Page-cache control for cold-load measurements: evict files, and check how much of them is still resident.

Eviction uses ``posix_fadvise(POSIX_FADV_DONTNEED)``, which drops a file's clean cached pages without root. Pages
another process still maps stay resident, so residency is measured afterwards with ``mincore(2)`` and reported:
a "cold" figure whose files were still cached is labelled as such instead of passing for cold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["evict", "resident_fraction", "warm", "can_evict"]

_PAGE = mmap.PAGESIZE


def can_evict() -> bool:
    """Whether this platform has posix_fadvise (Linux and most Unixes; not macOS or Windows)."""
    return hasattr(os, "posix_fadvise")


def evict(paths: Iterable[Path]) -> None:
    """Ask the kernel to drop the files' pages from the page cache (dirty pages are written back first)."""
    if not can_evict():
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # DONTNEED skips dirty pages; a just-written artifact would otherwise stay cached
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: Iterable[Path]) -> None:
    """Read the files once so their pages are in the page cache."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 22):
                pass


_libc = None


def _mincore() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name, use_errno=True) if name else False
    if not _libc or not hasattr(_libc, "mincore"):
        return None
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return _libc.mincore


def resident_fraction(paths: Iterable[Path], byte_range: tuple[int, int] | None = None) -> float | None:
    """Fraction (0..1) of the files' pages currently in the page cache, or None where mincore is unavailable;
    with ``byte_range`` (start, end), of the pages holding those bytes of each file only."""
    mincore = _mincore()
    if mincore is None:
        return None
    total = resident = 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        pages = (size + _PAGE - 1) // _PAGE
        fd = os.open(path, os.O_RDONLY)
        try:
            # Mapping a file reads nothing; mincore then reports which of its pages are cached.
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = (ctypes.c_ubyte * pages)()
                if mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                lo, hi = (0, size) if byte_range is None else byte_range
                counted = vec[lo // _PAGE:(min(hi, size) + _PAGE - 1) // _PAGE]
                resident += sum(b & 1 for b in counted)
                total += len(counted)
            finally:
                _libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0
