"""Speed: latency and throughput (baseline and artifact alternating in one process), and load times (each run a
fresh process, cold after evicting the files from the page cache, or warm)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import CompressorError
from .subjects import Subject

__all__ = ["percentile", "latency_inputs", "measure_latency", "summarize", "load_timings", "PROBE_TIMEOUT_S"]

PROBE_TIMEOUT_S = 900


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict[str, float]:
    """Median with its spread (interquartile range, min, max) and the count."""
    return {"median": percentile(values, 50), "iqr": percentile(values, 75) - percentile(values, 25),
            "min": min(values), "max": max(values), "runs": len(values)}


def latency_inputs(example_inputs: dict[str, torch.Tensor], batch_size: int, seq_len: int | None,
                   tokenizer: Any | None, texts: list[str], seed: int) -> dict[str, torch.Tensor]:
    """Inputs of one speed configuration: text padded/truncated to ``seq_len``, or the example inputs tiled."""
    if seq_len is not None and "input_ids" in example_inputs:
        if tokenizer is not None:
            from ..sources.hf import EXAMPLE_SENTENCES

            pool = texts or list(EXAMPLE_SENTENCES)
            batch = [pool[i % len(pool)] for i in range(batch_size)]
            enc = tokenizer(batch, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
            return {k: v for k, v in enc.items() if k in example_inputs}
        gen = torch.Generator().manual_seed(seed)
        high = int(example_inputs["input_ids"].max()) + 1
        ids = torch.randint(0, max(high, 2), (batch_size, seq_len), generator=gen)
        out = {"input_ids": ids}
        for name, t in example_inputs.items():
            if name != "input_ids":
                out[name] = torch.ones_like(ids) if name == "attention_mask" else torch.zeros_like(ids)
        return out
    out = {}
    for name, t in example_inputs.items():
        reps = -(-batch_size // t.shape[0])
        out[name] = t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size].contiguous()
    return out


@torch.inference_mode()
def measure_latency(models: dict[str, Any], inputs: dict[str, torch.Tensor], device: str, *, warmup: int,
                    rounds: int, calls: int) -> dict[str, dict[str, Any]]:
    """Per-call latencies (ms) of each model on the same inputs, alternating A B, B A, ... between rounds so that
    drifts in machine load hit every model alike. Returns percentiles, throughput and per-round medians."""
    moved = {k: v.to(device) for k, v in inputs.items()}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for module in models.values():
        for _ in range(warmup):
            module(**moved)
    sync()
    times: dict[str, list[float]] = {name: [] for name in models}
    per_round: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    for r in range(rounds):
        for name in order if r % 2 == 0 else reversed(order):
            module = models[name]
            this_round = []
            for _ in range(calls):
                start = time.perf_counter()
                module(**moved)
                sync()
                this_round.append((time.perf_counter() - start) * 1000)
            times[name] += this_round
            per_round[name].append(percentile(this_round, 50))
    batch = next(iter(inputs.values())).shape[0]
    out = {}
    for name, values in times.items():
        p50 = percentile(values, 50)
        out[name] = {"p50_ms": p50, "p90_ms": percentile(values, 90),
                     "p99_ms": percentile(values, 99), "iqr_ms": percentile(values, 75) - percentile(values, 25),
                     "min_ms": min(values), "mean_ms": sum(values) / len(values), "calls": len(values),
                     # From the median call, like every other figure: one stalled call must not move it.
                     "throughput_per_s": batch * 1000 / p50 if p50 > 0 else math.inf,
                     "_rounds": per_round[name]}
    return out


def _probe(subject: Subject, *, device: str, cold: bool, inputs: Path, threads: int | None,
           extra_path: list[str]) -> dict[str, Any]:
    args = {"spec": subject.spec, "device": device, "cold": cold, "files": [str(p) for p in subject.files],
            "inputs": str(inputs), "threads": threads}
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(extra_path + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else extra_path)
    try:
        proc = subprocess.run([sys.executable, "-m", "compressor.evaluate.probe", json.dumps(args)],
                              capture_output=True, text=True, env=env, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CompressorError(f"loading {subject.label} on {device} took over {PROBE_TIMEOUT_S} s in a fresh "
                              "process; gave up") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n  ".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise CompressorError(f"loading {subject.label} on {device} in a fresh process failed "
                              f"(exit {proc.returncode}):\n  {tail}")
    return json.loads(lines[-1])


def load_timings(subjects: list[Subject], example_inputs: dict[str, torch.Tensor], *, device: str, runs: int,
                 threads: int | None, extra_path: list[str], log: Any) -> dict[str, dict[str, Any]]:
    """Cold and warm load and first-inference times of each subject, each run in a fresh process.

    Cold runs evict the subject's files from the page cache just before loading and record how much of them was
    still resident afterwards (pages other processes map cannot be evicted). Subjects alternate (A B, B A, ...).
    """
    from safetensors.torch import save_file

    from . import pagecache

    results: dict[str, dict[str, list[dict[str, Any]]]] = {s.key: {"cold": [], "warm": []} for s in subjects}
    with tempfile.TemporaryDirectory(prefix="compress-eval-") as tmp:
        inputs = Path(tmp) / "inputs.safetensors"
        save_file({k: v.contiguous() for k, v in example_inputs.items()}, str(inputs))
        modes = ["cold", "warm"] if pagecache.can_evict() else ["warm"]
        for mode in modes:
            for i in range(runs):
                for subject in subjects if i % 2 == 0 else list(reversed(subjects)):
                    if mode == "warm":
                        pagecache.warm(subject.files)
                    log.info(f"{device}: {mode} load {i + 1}/{runs} of {subject.label}")
                    results[subject.key][mode].append(
                        _probe(subject, device=device, cold=mode == "cold", inputs=inputs, threads=threads,
                               extra_path=extra_path))
    out: dict[str, dict[str, Any]] = {}
    for role, modes_done in results.items():
        entry: dict[str, Any] = {}
        for mode, probes in modes_done.items():
            if not probes:
                entry[mode] = None
                continue
            entry[mode] = {
                "load_ms": summarize([p["load_ms"] for p in probes]),
                "first_inference_ms": summarize([p["first_inference_ms"] for p in probes]),
                "peak_rss_mb": summarize([p["peak_rss_mb"] for p in probes])["median"],
                "rss_added_mb": summarize([p["rss_added_mb"] for p in probes])["median"],
                "anon_rss_mb": summarize([p["anon_rss_mb"] for p in probes])["median"],
                "pids": [p["pid"] for p in probes],  # one fresh process per run
                "peak_gpu_mb": (summarize([p["peak_gpu_mb"] for p in probes])["median"]
                                if probes[0].get("peak_gpu_mb") is not None else None),
            }
            if mode == "cold":
                resident = [p["resident_after_evict"] for p in probes if p.get("resident_after_evict") is not None]
                entry[mode]["resident_after_evict"] = max(resident) if resident else None
        out[role] = entry
    return out
