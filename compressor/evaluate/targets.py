"""An int8 ONNX artifact on every CPU family it was quantized for: each target's numbers, measured where this CPU
is that target and emulated where it is not (compressor.export.int8_emulate), so that a gate passed here holds
on the others.

The row measured on this machine carries this CPU's target. Each other target gets a row of its own: the model
with its MatMulInteger nodes computing that target's integer arithmetic exactly, run on the evaluation data. Static
QDQ models run unfused (DequantizeLinear, then float products), which is exact integer arithmetic; their weights
are made safe in any pairing for saturating targets, so that is every target's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..cpu import ARITHMETIC, TARGETS, machine_cpu
from ..errors import CompressorError
from ..manifest import Manifest

__all__ = ["int8_targets", "target_outputs"]


def int8_targets(manifest: Manifest) -> list[str] | None:
    """The targets an int8 ONNX artifact was quantized for; every family for an artifact that predates targets
    (it made no promise, so all are shown); None for an artifact without int8 ONNX compute."""
    quant = manifest.quantization
    if quant.get("mode") not in ("dynamic", "static"):
        return None
    targets = quant.get("targets")
    return [t for t in targets if t in TARGETS] if isinstance(targets, list) else list(TARGETS)


def target_outputs(onnx_path: Path, mode: str, targets: list[str], data: Any, task: str | None,
                   measured: list[Any], log: Any) -> dict[str, dict[str, Any]]:
    """target -> {"outputs", "emulated", "arithmetic"}: the measured outputs for this CPU's target, emulated ones
    for the others (one run per distinct arithmetic)."""
    import onnx

    from ..export.int8_emulate import emulate
    from ..export.onnx import save_aligned
    from .accuracy import run_outputs
    from .subjects import OrtModule

    here = machine_cpu()["target"]
    out: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[Any]] = {}
    model = None
    for target in targets:
        arithmetic = ARITHMETIC[target]
        if target == here:
            out[target] = {"outputs": measured, "emulated": False, "arithmetic": arithmetic}
            continue
        key = arithmetic if mode == "dynamic" else "exact (unfused QDQ)"
        if key not in runs:
            with tempfile.TemporaryDirectory(prefix="compress-emulate-") as tmp:
                if model is None:
                    model = onnx.load(str(onnx_path), load_external_data=True)
                graph = emulate(model, arithmetic) if mode == "dynamic" else model
                save_aligned(graph, Path(tmp))
                with log.step(f"cpu: {target} arithmetic ({arithmetic}), emulated on {data.name}"):
                    try:
                        module = OrtModule(Path(tmp) / "model.onnx", "cpu", unfused=mode != "dynamic")
                        runs[key] = run_outputs(module, data, "cpu", task)
                    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
                        raise CompressorError(f"the artifact's int8 ONNX model cannot be run under {target}'s "
                                              f"arithmetic (emulated): {type(exc).__name__}: "
                                              f"{str(exc).strip()[:300]}") from exc
                    del module
        out[target] = {"outputs": runs[key], "emulated": True, "arithmetic": arithmetic}
    return out
