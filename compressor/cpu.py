"""CPU families an int8 artifact can be built for, and which one this machine is.

ONNX Runtime's int8 matrix products (MLAS) multiply uint8 activations by int8 weights with the fastest instruction
the CPU has, and the instructions do not compute the same sums:

- ``x86-avx2``: x86 without VNNI (AVX2, or AVX-512BW without VNNI). VPMADDUBSW adds the products of two adjacent
  K positions into a *saturating* int16 before they reach the int32 accumulator: a pair whose sum leaves
  [-32768, 32767] is clipped.
- ``x86-vnni``: AVX-512 VNNI, AVX-VNNI or AMX. VPDPBUSD(S) accumulates four products straight into int32: exact.
- ``arm64``: SDOT/UDOT/I8MM (or the widening NEON path): exact int32.

No runtime switch picks the kernel: the arithmetic is the CPU's. A recipe names the families an artifact must be
accurate on (``quantize.targets``); the quantizer keeps them identical (see ``export/int8_arith.py``) and the
evaluator emulates each of them (``export/int8_emulate.py``). This module is stdlib only: recipes validate
target names without importing numpy or ONNX Runtime.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Literal

__all__ = ["TARGETS", "Target", "ARITHMETIC", "KERNEL_FLAGS", "machine_cpu", "local_target", "target_of"]

Target = Literal["x86-avx2", "x86-vnni", "arm64"]
TARGETS: tuple[str, ...] = ("x86-avx2", "x86-vnni", "arm64")

# How each family sums uint8 x int8 products: "saturating-pairs" (adjacent K pairs clipped to int16) or "exact".
ARITHMETIC: dict[str, str] = {"x86-avx2": "saturating-pairs", "x86-vnni": "exact", "arm64": "exact"}

DESCRIPTION: dict[str, str] = {
    "x86-avx2": "x86 without VNNI (AVX2 or AVX-512BW): VPMADDUBSW, adjacent products summed in saturating int16",
    "x86-vnni": "x86 with AVX-512 VNNI, AVX-VNNI or AMX: VPDPBUSD, exact int32 sums",
    "arm64": "ARM64 (SDOT/UDOT/I8MM or NEON): exact int32 sums",
}

# /proc/cpuinfo flags that decide which MLAS int8 kernel runs (x86), or the ARM features that do.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
_VNNI = {"avx512_vnni", "avx_vnni", "amx_int8"}


def machine_cpu(cpuinfo: str | None = None) -> dict[str, Any]:
    """This CPU: model name, architecture, the kernel-deciding flags it has, and its target family.

    ``cpuinfo`` is the text of /proc/cpuinfo (read when None; elsewhere the model name falls back to
    platform.processor() and no flags are known)."""
    arch = platform.machine().lower()
    name = platform.processor() or arch
    flags: set[str] = set()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    known = False  # whether the flags were read at all: without them, an x86 CPU's family cannot be told
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and name in (arch, platform.processor(), ""):
            name = value.strip() or name
        elif key in ("flags", "features"):
            flags.update(value.split())
            known = True
    target = target_of(arch, flags) if known or arch in ("aarch64", "arm64") else None
    return {"model": name, "arch": arch, "flags": sorted(f for f in KERNEL_FLAGS if f in flags), "target": target}


def target_of(arch: str, flags: set[str] | list[str]) -> str | None:
    """The target family of a CPU with this architecture and these flags; None for one no family covers."""
    arch = arch.lower()
    if arch in ("aarch64", "arm64"):
        return "arm64"
    if arch in ("x86_64", "amd64", "i686", "x86"):
        return "x86-vnni" if _VNNI & set(flags) else "x86-avx2"
    return None


def local_target() -> str | None:
    """The target family of the CPU this process runs on."""
    return machine_cpu()["target"]
