"""A run's memory, estimated before it starts: a model that will not fit is refused (exit 2) with what it needs and
what would fit, instead of being killed by the kernel after minutes of work.

compressor holds the whole model in memory while it works. The estimate adds, phase by phase, the model's bytes
(from the source's weight files before loading, from the loaded model after), what each pass adds while it runs
and leaves behind (``Pass.memory``), and the ONNX export, on top of a fixed cost for the libraries. The factors were
measured on a 0.25B-parameter Llama (docs/decisions.md); `benchmarks/streaming.py` prints the estimate beside the
measured peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError
from .memory import LIMIT_ENV, available_memory, human_bytes

__all__ = ["FIXED_BYTES", "LOAD_FACTOR", "ONNX_FACTORS", "EVAL_FACTOR", "EVAL_APART_FACTOR", "MARGIN", "STREAM_FACTOR",
           "LAYER_EXTRA_BYTES", "Estimate", "estimate_run", "estimate_stream", "fits", "check_fits"]

FIXED_BYTES = 500_000_000  # torch, transformers and compressor imported: about 0.45 GB measured
LOAD_FACTOR = 1.1  # the model itself, plus what loading and writing the safetensors files hold beside it
# The ONNX export, beside the model, as a multiple of the model's bytes as loaded (float32): the exporter's graph
# with its weights, the file's copy and the checking session (3x); rewriting weights to integers loads the graph
# again (4.5x, after `quantize`); a float16/bfloat16 export converts a float32 graph (6.7x, after `cast`). Measured
# on a 0.25B Llama: 3.97x, 5.69x and 7.06x the model's bytes at the peak, everything included.
ONNX_FACTORS = {"": 3.0, "quantize": 4.5, "cast": 6.7}
# Evaluation: the baseline loaded again from the source, the artifact loaded (dequantized to float32: the model's
# bytes again), and about one more copy still held from the run (3.16x the model's bytes measured with weight-only
# int8 on a 0.25B Llama); with ONNX, its session holds the ONNX weights too.
EVAL_FACTOR = 3.3
# Evaluation one model at a time: one model loaded, its outputs, and what the run still holds (about the model's bytes)
EVAL_APART_FACTOR = 2.3
# Streaming (compressor/stream.py) holds each tensor in flight as read, its value after each pass, its stored parts
# and, under `shard`, the per-rank slices: at most 3x its bytes as read (2.5x measured, int8 then shard, 1.1B Llama).
STREAM_FACTOR = 3.0
# Running decoder layers through NNCF (compressor/passes/layerwise.py): its modules and a traced graph, beside the
# bytes the pass names itself (a layer three times, the embeddings, the activations).
LAYER_EXTRA_BYTES = 300_000_000
MARGIN = 1.1  # the estimate is a floor of what is needed: 10 % on top


@dataclass
class Estimate:
    """A run's estimated peak memory and the phases it is made of (name, bytes at that phase's peak)."""

    model_bytes: int
    phases: list[tuple[str, int]] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(b for _, b in self.phases)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: p[1])[0]

    def to_json(self) -> dict[str, Any]:
        return {"model_bytes": self.model_bytes, "peak_bytes": self.peak, "peak_phase": self.peak_phase,
                "phases": {name: b for name, b in self.phases}}


def estimate_run(model_bytes: int, passes: list[Any], onnx: bool, evaluate: bool = False) -> Estimate:
    """The peak memory of running ``passes`` (Pass instances, in order) over a model of ``model_bytes`` in memory,
    then writing it (and exporting ONNX when ``onnx``, evaluating when ``evaluate``)."""
    est = Estimate(model_bytes)
    size = float(model_bytes)

    def at(factor: float) -> int:
        return int((FIXED_BYTES + factor) * MARGIN)

    est.phases.append(("loading the model", at(LOAD_FACTOR * size)))
    for pass_ in passes:
        working, after = pass_.memory()
        est.phases.append((f"pass {pass_.index + 1} ({pass_.name})", at(LOAD_FACTOR * size + working * size)))
        size *= after
    est.phases.append(("writing the artifact", at(LOAD_FACTOR * size)))
    if onnx:
        factor = max([ONNX_FACTORS[""], *(ONNX_FACTORS.get(p.name, 0.0) for p in passes)])
        est.phases.append(("exporting ONNX", at(LOAD_FACTOR * size + factor * model_bytes)))
    if evaluate:  # together, or one model at a time when that will not fit (compressor/evaluate/apart.py)
        onnx_bytes = LOAD_FACTOR * size if onnx else 0.0
        est.phases.append(("evaluating", at(min(EVAL_FACTOR * model_bytes + onnx_bytes,
                                                EVAL_APART_FACTOR * model_bytes + onnx_bytes / 2))))
    return est


def estimate_stream(model_bytes: int, sizes: list[int], workers: int = 1, evaluate: bool = False,
                    processes: int = 1, by_layer: int = 0) -> Estimate:
    """The peak memory of streaming a model of ``model_bytes`` tensor by tensor (``sizes``: each tensor's bytes as
    read), ``workers`` tensors at a time (the largest ones may be in flight together), in each of ``processes``
    processes on this machine (torchrun's ``--nproc-per-node``); before that, ``by_layer`` bytes for passes that
    run the model a decoder layer at a time (``Pass.stream_memory``); then evaluating it when ``evaluate`` (the
    evaluator loads the baseline and the artifact whole)."""
    est = Estimate(model_bytes)
    held = sum(sorted(sizes, reverse=True)[:workers])
    on = f" ({processes} processes on this machine)" if processes > 1 else ""
    if by_layer:
        est.phases.append((f"passes one decoder layer at a time{on}",
                           int(processes * (FIXED_BYTES + LAYER_EXTRA_BYTES + by_layer) * MARGIN)))
    # After a layer-by-layer pass its libraries stay imported and the heap it grew is not all returned: measured
    # 1.49 GB at 0.25B (AWQ + scale estimation), where streaming alone peaks at 0.9 GB.
    after = LAYER_EXTRA_BYTES if by_layer else 0
    est.phases.append((f"streaming tensor by tensor{on}",
                       int(processes * (FIXED_BYTES + after + STREAM_FACTOR * held) * MARGIN)))
    if evaluate:
        est.phases.append(("evaluating", int((FIXED_BYTES + EVAL_APART_FACTOR * model_bytes) * MARGIN)))
    return est


def fits(est: Estimate) -> bool:
    """Whether the estimate fits in what this process may still allocate."""
    room, _ = available_memory()
    return room is None or est.peak <= room


def check_fits(est: Estimate, where: str, hint: str = "") -> None:
    """Refuse (UsageError, exit 2) a run whose estimate exceeds what this process may still allocate, naming the
    phases, the figure it was compared with and what would fit."""
    room, source = available_memory()
    if room is None or est.peak <= room:
        return
    phases = ", ".join(f"{name} {human_bytes(b)}" for name, b in est.phases)
    fitting = [name for name, b in est.phases if b <= room]
    hint = f" {hint}" if hint else ""
    if est.peak_phase == "exporting ONNX" and len(fitting) == len(est.phases) - 1:
        hint += " Without `export.onnx` the run fits: export ONNX on a larger machine from the artifact's safetensors."
    elif est.peak_phase == "evaluating" and len(fitting) == len(est.phases) - 1:
        hint += " Without `evaluate` the run fits: evaluate the artifact with `compress eval` on a larger machine."
    how = ("streams the model one tensor at a time" if any(n.startswith("streaming") for n, _ in est.phases)
           else f"holds the whole model ({human_bytes(est.model_bytes)}) in memory while it works")
    raise UsageError(
        f"{where}: this run would need about {human_bytes(est.peak)} of memory at its peak ({est.peak_phase}), and "
        f"this process may hold {human_bytes(room)} ({source}). compressor {how}; by phase: {phases}.{hint} Run it on a "
        f"machine with at least {human_bytes(est.peak)} free, or set {LIMIT_ENV} to a size (or off) if this estimate is "
        "wrong for your model."
    )
