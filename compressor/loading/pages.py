"""The page cache seen through a memory map: whether a mapped range's pages are resident (``mincore``), sampled
or page by page, and advice to the kernel about them (``madvise``). The read-ahead (``loading.readahead``) and
its warm-load check use them."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

__all__ = ["PAGE", "MADV_WILLNEED", "Span", "Missing", "advise", "looks_cached", "page_flags", "libc_function"]

PAGE = mmap.PAGESIZE  # the kernel's page (not the file format's 4096 alignment): madvise and mincore want it
MADV_WILLNEED = 3  # queue the reads of a mapped range, without waiting

Span = tuple[Path, int, int, int]  # (file, start, end, address of start)


_LIBC: list[Any] = []


def libc_function(name: str) -> Any:
    """The C library's ``name`` (loaded once), or None where it has none."""
    import ctypes

    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return getattr(_LIBC[0], name, None)


def advise(address: int, length: int, advice: int) -> bool:
    """madvise over the whole pages of [address, address + length); False where the kernel refused it."""
    import ctypes

    madvise = libc_function("madvise")
    page = address & ~(PAGE - 1)
    return madvise is not None and madvise(ctypes.c_void_p(page), ctypes.c_size_t(address + length - page),
                                           ctypes.c_int(advice)) == 0


SAMPLED_PAGES = 32


def looks_cached(spans: list[Span]) -> bool:
    """The page cache holds ``SAMPLED_PAGES`` pages spread evenly over the spans' bytes, the first and the last
    included (``mincore`` on those pages alone: over every page it took 12 ms for 492 MB, a third of a warm load;
    on both ends of each of MiniLM's 100 tensors, 0.6 ms of its 11). Spread by bytes, not by span: in a file laid
    out in use order the spans merge into one. False where it cannot tell, and for no bytes at all."""
    import ctypes

    vec = (ctypes.c_ubyte * 1)()
    total = sum(hi - lo for _, lo, hi, _ in spans)
    if total <= 0:
        return False
    wanted = sorted({round(k * (total - 1) / (SAMPLED_PAGES - 1)) for k in range(SAMPLED_PAGES)})
    passed = 0
    for _, lo, hi, address in spans:
        while wanted and wanted[0] < passed + hi - lo:
            flags = page_flags(address + wanted.pop(0) - passed, 1, vec)
            if flags is None or not flags[0] & 1:
                return False
        passed += hi - lo
    return True


def page_flags(address: int, length: int, vec: Any) -> bytes | None:
    """``mincore``'s flags (bit 0: in the page cache) for the pages of the mapped range [address, address +
    length), through ``vec`` (a ctypes byte array of at least that many pages); None where it cannot tell."""
    import ctypes

    mincore = libc_function("mincore")
    first = address & ~(PAGE - 1)
    pages = (address + length - first + PAGE - 1) // PAGE
    if mincore is None or pages > len(vec) or mincore(
            ctypes.c_void_p(first), ctypes.c_size_t(address + length - first), vec) != 0:
        return None
    return bytes(vec[:pages])


class Missing:
    """The pages of a mapped range that the page cache lacks (``mincore``), and their reading through one buffer,
    made the first time it is needed; ``most``: the most bytes asked about at once."""

    def __init__(self, most: int) -> None:
        import ctypes

        self.most = most
        self.vec = (ctypes.c_ubyte * (most // PAGE + 2))()
        self.buf: memoryview | None = None

    def ranges(self, address: int, length: int) -> list[tuple[int, int]]:
        """[start, end) offsets from ``address`` of the bytes of [address, address + length) on pages not in the
        page cache (none where mincore cannot tell)."""
        resident = page_flags(address, length, self.vec)
        if resident is None or b"\x00" not in resident:  # nearly always: the advice brought everything
            return []
        first = address & ~(PAGE - 1)
        out: list[tuple[int, int]] = []
        for k, flag in enumerate(resident):
            if not flag & 1:
                lo, hi = max(0, first + k * PAGE - address), min(length, first + (k + 1) * PAGE - address)
                if out and out[-1][1] == lo:
                    out[-1] = (out[-1][0], hi)
                else:
                    out.append((lo, hi))
        return out

    def read(self, fd: int, start: int, end: int) -> None:
        """Read the file's bytes [start, end) into the page cache."""
        if self.buf is None:
            self.buf = memoryview(bytearray(self.most))
        while start < end:
            got = os.preadv(fd, [self.buf[:min(len(self.buf), end - start)]], start)
            if got <= 0:
                return
            start += got
