"""How much memory this process may still use, and sizes in words: the facts a run checks before it loads a model
that would not fit, so that it is refused with a clear message instead of being killed by the kernel.

Stdlib only (no torch): `compress run` checks before anything heavy is imported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["LIMIT_ENV", "available_memory", "process_rss", "parse_size", "human_bytes"]

LIMIT_ENV = "COMPRESS_MEMORY_LIMIT"
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_NO_LIMIT = 1 << 60  # cgroup v1 writes a huge number for "no limit"


def parse_size(text: str) -> int:
    """Bytes from ``"24GiB"``, ``"1.5GB"``, ``"500M"`` or ``"1000000"``; ValueError naming what works."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write a number of bytes with an optional unit, e.g. 24GiB, "
                         "1.5GB or 500M")
    return int(float(match.group(1)) * _UNITS[unit])


def human_bytes(n: float) -> str:
    """``n`` bytes as GB or MB with one or two significant decimals (decimal units, as `free -h --si`)."""
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:.0f} MB"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _cgroup_room(root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, else v1); None where there is no limit. Usage
    counts the page cache, of which the inactive file pages are reclaimed before anything is killed: they are not
    counted as used (the working set, as container runtimes compute it)."""
    for limit_file, usage_file, stat_file, inactive in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",
             "total_inactive_file")):
        limit, usage = _read(f"{root}/{limit_file}"), _read(f"{root}/{usage_file}")
        if limit is None or usage is None or limit.strip() == "max":
            continue
        try:
            cap, used = int(limit), int(usage)
        except ValueError:
            continue
        match = re.search(rf"^{inactive} (\d+)$", _read(f"{root}/{stat_file}") or "", re.M)
        if match:
            used -= min(int(match.group(1)), used)
        if cap < _NO_LIMIT:
            return max(cap - used, 0)
    return None


def available_memory() -> tuple[int | None, str]:
    """(bytes this process may hold at its peak, what that figure comes from). ``COMPRESS_MEMORY_LIMIT`` (a size;
    ``off`` disables the check: None) wins; otherwise what the process holds now plus the smaller of the kernel's
    MemAvailable and the room left under the cgroup's limit. (None, reason) where neither can be read."""
    env = os.environ.get(LIMIT_ENV)
    if env is not None and env.strip():
        if env.strip().lower() in ("off", "none", "0"):
            return None, f"{LIMIT_ENV}={env.strip()}"
        try:
            return parse_size(env), f"{LIMIT_ENV}={env.strip()}"
        except ValueError as exc:
            raise ValueError(f"{LIMIT_ENV}: {exc}, or off") from None
    found: list[tuple[int, str]] = []
    meminfo = _read("/proc/meminfo") or ""
    match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", meminfo, re.M)
    if match:
        found.append((int(match.group(1)) * 1024, "MemAvailable in /proc/meminfo"))
    room = _cgroup_room()
    if room is not None:
        found.append((room, "the room left under this cgroup's memory limit"))
    if not found:
        return None, "this system reports no available memory"
    room, source = min(found)
    held = process_rss()
    return room + held, f"{human_bytes(held)} held now + {human_bytes(room)} {source}"


def process_rss() -> int:
    """This process's resident set now, in bytes (0 where /proc is not there)."""
    status = _read("/proc/self/status") or ""
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.M)
    return int(match.group(1)) * 1024 if match else 0
