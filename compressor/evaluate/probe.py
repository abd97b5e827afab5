"""One load-timing run in a fresh process: ``python -m compressor.evaluate.probe '<json>'``.

Prints one JSON line: load time (open -> ready to run), first-inference time, peak and anonymous RSS, peak GPU
memory, and (cold runs) how much of the files was still in the page cache after eviction. Library imports
happen before the clock starts, so both models are timed on loading alone.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def _status_mb() -> dict[str, float]:
    """VmRSS, VmHWM (peak RSS) and RssAnon from /proc/self/status, in MB (empty where unavailable)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(value.split()[0]) / 1024
    except (OSError, ValueError):
        pass
    return out


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so the peak measured is the load's, not the imports'."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    args = json.loads(argv[1])
    import torch

    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    from safetensors.torch import load_file

    from . import pagecache
    from .subjects import load_module, preimport

    spec, device = args["spec"], args["device"]
    # Every library either loader needs is imported before the clock starts: load time is the model's alone.
    preimport(spec)

    cuda = device.startswith("cuda")
    inputs = {k: v.to(device) for k, v in load_file(args["inputs"]).items()}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    files = [Path(p) for p in args["files"]]
    resident = None
    if args["cold"]:
        pagecache.evict(files)
        resident = pagecache.resident_fraction(files)
    reset = _reset_peak_rss()
    rss_before = _status_mb().get("VmRSS", 0.0)

    start = time.perf_counter()
    module = load_module(spec, device, args.get("threads"))
    if cuda:
        torch.cuda.synchronize()
    loaded = time.perf_counter()
    with torch.inference_mode():
        module(**inputs)
    if cuda:
        torch.cuda.synchronize()
    done = time.perf_counter()

    status = _status_mb()
    # Peak since the reset above; where it cannot be reset, the process's lifetime peak (imports included).
    peak_rss = status["VmHWM"] if reset and "VmHWM" in status else (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
    anon = status.get("RssAnon", 0.0)
    result = {
        "load_ms": (loaded - start) * 1000,
        "first_inference_ms": (done - loaded) * 1000,
        "peak_rss_mb": peak_rss,
        "rss_added_mb": max(0.0, peak_rss - rss_before),
        "anon_rss_mb": anon,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "resident_after_evict": resident,
        "pid": os.getpid(),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
