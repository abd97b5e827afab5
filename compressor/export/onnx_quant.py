"""int8 quantization of an exported ONNX model, for ONNX Runtime: dynamic or static, with outlier smoothing,
per-row int8 embeddings, automatic fallback of nodes ONNX Runtime cannot run, and a fidelity-driven fallback of
the most harmful matrix products to float compute.

The heavy lifting (MatMulInteger / DynamicQuantizeLinear for dynamic, QDQ and calibration for static) is ONNX
Runtime's own quantizer; this module prepares the graph for it and checks what comes out:

1. Gemm nodes with a constant weight become MatMul + Add (ONNX Runtime quantizes MatMul dynamically, not Gemm).
2. Calibration batches run through the float model, recording the reference output and, for every input that
   feeds int8 matrix products, per-channel maxima plus a few whole batches.
3. Smoothing (SmoothQuant, Xiao et al. 2023): ``x @ W == (x / s) @ (s * W)``. Transformers have a few hidden
   channels a hundred times larger than the rest, and one per-tensor activation scale must cover them, leaving
   the others a handful of int8 levels. Dividing those channels by ``s`` (an explicit Mul: the input is also the
   residual, so it cannot be folded into the LayerNorm) and multiplying the weight rows by ``s`` flattens the
   activation at the cost of a rougher weight, which per-channel weight scales absorb. The strength ``a`` in
   ``s = max|x|^a / max|w|^(1-a)`` is chosen per input by the smallest output error on the calibration batches,
   emulating exactly the quantization ONNX Runtime will do.
4. ONNX Runtime's quantizer rewrites the chosen MatMul / Conv nodes.
5. Embedding tables (Gather on a constant matrix) are stored int8 with one scale per row and dequantized after
   the lookup, so only the rows looked up are ever converted.
6. The result must load and run in a plain session: a node ONNX Runtime rejects is put back in float (listed in
   the report) and the model rebuilt, never a crash.
7. With ``target_fidelity``, the matrix products with the largest output error move to float compute one at a
   time (their weights stay int8 on disk and are converted once when the session loads) until the model's
   outputs are within the target cosine of the float model's on every calibration example.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cpu import ARITHMETIC
from ..errors import CompressorError
from ..ort import ort_session, save_with_external_data
from .int8_fidelity import (arithmetic_note, first_line, float_products, guard_weights, per_target, search_float,
                            target_fidelity, worst_target)
from .int8_select import Calibration, Plan, gemm_to_matmul, matmul_groups, name_nodes, reasons_summary, select_nodes
from .int8_smooth import calibrate, check_rewrite, embeddings_per_row, fit_feed, pool_rows, smooth, weight_only

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["quantize_onnx", "quiet"]


def quantize_onnx(src: Path, work: Path, config: Any, calib: Calibration, *, where: str = "quantize",
                  log: Any = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize the float ONNX model at ``src`` as ``config`` (a QuantizeConfig, mode dynamic or static) asks.

    ``work`` is an empty scratch directory. Returns the quantized model (external data loaded) and the report
    that goes into the manifest. Raises RecipeError for patterns that match nothing, CompressorError when the
    model cannot be quantized at all."""
    import onnx

    say = log.info if log is not None else (lambda _msg: None)
    model = onnx.load(str(src), load_external_data=True)
    name_nodes(model)
    gemms = gemm_to_matmul(model)
    candidates, plan = select_nodes(model, config, where)
    if not candidates["matmul"] and not candidates["conv"] and not candidates["gather"]:
        raise CompressorError(f"{where}: no node of the ONNX model can be quantized (no MatMul/Gemm/Conv with a "
                              "constant weight and no embedding table); " + reasons_summary(plan.left_in_float))
    float_path = work / "float.onnx"
    save_with_external_data(model, float_path)
    try:
        reference, stats = calibrate(float_path, calib, matmul_groups(model, candidates["matmul"]))
    except CompressorError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own exception types
        raise CompressorError(f"{where}: the float ONNX model fails on the calibration data ({calib.name}): "
                              f"{type(exc).__name__}: {first_line(str(exc))}") from exc
    targets = list(config.targets)
    saturating = any(ARITHMETIC[t] == "saturating-pairs" for t in targets)
    alphas = smooth(model, config, stats, candidates["matmul"], pair_safe=saturating)
    smoothed = sum(1 for a in alphas.values() if a > 0)
    if smoothed:
        say(f"smoothing {smoothed} of {len(alphas)} matrix-product inputs (strength "
            f"{min(a for a in alphas.values() if a > 0):g}-{max(alphas.values()):g})")
    smooth_path = work / "smoothed.onnx"
    save_with_external_data(model, smooth_path)
    if smoothed:
        check_rewrite(smooth_path, calib, reference)
    local_error = {n: e for g in stats.values() for n, e in g.get("error", {}).items()}
    relative_error = {n: e for g in stats.values() for n, e in g.get("relative", {}).items()}
    plan.dynamic = candidates["matmul"] + candidates["conv"]
    plan.embeddings = candidates["gather"]
    floats = float_products(model, stats)  # output name -> (node, smoothed float weight, importance)

    out_path = work / "quantized.onnx"
    build = _builder(smooth_path, out_path, config, calib, work, reference, floats if saturating else None)
    fidelity = build(plan)
    say(f"int8 {config.mode}: {len(plan.dynamic)} nodes quantized; min cosine to float {fidelity['min']:.5f} on "
        f"{calib.name}" + per_target(fidelity))
    moved: list[str] = []
    if config.target_fidelity is not None and fidelity["min"] < config.target_fidelity:
        budget = int(config.max_float * (len(plan.dynamic) + len(plan.weight_only)))
        if config.mode == "dynamic":
            moved = search_float(out_path, plan, floats, fidelity, config, calib, reference, work, budget, say)
        else:
            _fallback(plan, build, fidelity, (local_error, relative_error), _weight_sizes(model), config, moved, say)
        fidelity = build(plan)  # the chosen plan's model in out_path, measured on every target
    reached = config.target_fidelity is None or fidelity["min"] >= config.target_fidelity
    if not reached:
        say(f"target_fidelity {config.target_fidelity} not reached with {len(moved)} matrix products in float "
            f"(max_float {config.max_float}); min cosine {fidelity['min']:.5f} on the worst target"
            + per_target(fidelity))
        if config.strict:
            raise CompressorError(
                f"{where}.target_fidelity: {config.target_fidelity} not reached on {calib.name}: min cosine "
                f"{fidelity['min']:.5f} on the worst target ({worst_target(fidelity)}) with {len(moved)} matrix products "
                f"in float (max_float {config.max_float}); strict is set, so nothing was written. Raise max_float, "
                "lower target_fidelity, or drop strict to ship the closest model")
    result = onnx.load(str(out_path), load_external_data=True)
    return result, _report(config, calib, plan, gemms, alphas, fidelity, reached, moved, saturating)


def _report(config: Any, calib: Calibration, plan: Plan, gemms: list[str], alphas: dict[str, float],
            fidelity: dict[str, Any], reached: bool, moved: list[str], saturating: bool) -> dict[str, Any]:
    """What the manifest records of the quantization (`onnx.quantization`)."""
    targets = list(config.targets)
    report = {
        "mode": config.mode,
        "per_channel": config.per_channel,
        "weights": "int8 symmetric" + (" per channel" if config.per_channel else " per tensor")
        + (", pair-safe (no adjacent pair of products can saturate 16 bits)" if saturating else ""),
        "activations": ("uint8 per tensor, range measured at run time" if config.mode == "dynamic"
                        else f"uint8 per tensor, range from calibration ({config.static_method})"),
        "targets": targets,
        "arithmetic": arithmetic_note(targets, saturating),
        "calibration": {"data": calib.name, "batches": len(calib.feeds)},
        "nodes_quantized": sorted(plan.dynamic),
        "embeddings_int8_per_row": sorted(plan.embeddings),
        "float_compute_int8_weights": dict(sorted(plan.weight_only.items())),
        "left_in_float": dict(sorted(plan.left_in_float.items())),
        "gemm_rewritten": gemms,
        "smoothing": {k: v for k, v in sorted(alphas.items()) if v > 0},
        "fidelity_on_calibration": {"min_cosine": round(fidelity["min"], 6), "mean_cosine": round(fidelity["mean"], 6),
                                    "target": config.target_fidelity, "reached": reached, "moved_to_float": moved,
                                    "by_target": {t: {k: round(v, 6) for k, v in f.items()}
                                                  for t, f in fidelity["targets"].items()}},
    }
    return report


PROBE = 4  # fallback candidates tried per step from each of the two local-error rankings


def _fallback(plan: Plan, build: Any, fidelity: dict[str, float], errors: tuple[dict[str, float], dict[str, float]],
              cost: dict[str, int], config: Any, moved: list[str], say: Any) -> dict[str, float]:
    """Move matrix products to float compute until ``config.target_fidelity`` is met on the calibration data.

    Local output errors alone rank poorly (a large relative error on a small attention output matters less than
    a small one on a large FFN output), so each step measures: the few worst nodes by absolute and by relative
    local error are each tried, and the one that raises the minimum cosine most per weight element (multiplies
    per token) is moved."""
    budget = int(config.max_float * (len(plan.dynamic) + len(plan.weight_only)))
    absolute, relative = errors
    while len(moved) < budget and fidelity["min"] < config.target_fidelity:
        remaining = [n for n in plan.dynamic if n in absolute]
        pool = list(dict.fromkeys(sorted(remaining, key=lambda n: -absolute[n])[:PROBE]
                                  + sorted(remaining, key=lambda n: -relative[n])[:PROBE]))
        if not pool:
            break
        tried = {}
        for name in pool:
            plan.dynamic.remove(name)
            plan.weight_only[name] = "target_fidelity"
            try:
                tried[name] = build(plan)
            except CompressorError as exc:  # this candidate cannot be built: try the others
                say(f"  {name} in float: {exc}")
            plan.weight_only.pop(name)
            plan.dynamic.append(name)
        if not tried:
            break
        # Fidelity gained per multiply moved to float: an attention projection costs a quarter of an FFN one.
        name = max(tried, key=lambda n: (tried[n]["min"] - fidelity["min"]) / cost.get(n, 1))
        if tried[name]["min"] <= fidelity["min"]:
            say(f"  no single matrix product in float raises the minimum cosine above {fidelity['min']:.5f}; stop")
            break
        plan.dynamic.remove(name)
        plan.weight_only[name] = "target_fidelity: moving it to float raised the calibration fidelity most"
        moved.append(name)
        fidelity = tried[name]
        say(f"  {name}: float compute (int8 weights) -> min cosine {fidelity['min']:.5f}")
    if fidelity["min"] < config.target_fidelity:
        say(f"target_fidelity {config.target_fidelity} not reached with {len(moved)} of at most {budget} matrix "
            f"products in float (max_float {config.max_float}); min cosine {fidelity['min']:.5f}")
    return fidelity


def _weight_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Weight elements of every MatMul/Conv node: its multiplies per output position."""
    dims = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    return {n.name: dims[n.input[1]] for n in model.graph.node
            if n.op_type in ("MatMul", "Conv") and len(n.input) > 1 and n.input[1] in dims}


# ------------------------------------------------------------------------------------------------ selection


# ------------------------------------------------------------------------------------------------ calibration


# ------------------------------------------------------------------------------------------------ smoothing


# ------------------------------------------------------------------------------------------------ building


def _builder(src: Path, out: Path, config: Any, calib: Calibration, work: Path, reference: list[np.ndarray],
             safe: dict[str, tuple[str, np.ndarray, np.ndarray]] | None) -> Any:
    """A function plan -> fidelity: quantize ``src`` as the plan says into ``out``, make sure ONNX Runtime loads
    and runs it (moving nodes it rejects to float), give it pair-safe weights when ``safe`` (output -> smoothed
    float weight and importance, see float_products) is given, and measure cosine similarity to the float
    model's outputs (``reference``) under every target's arithmetic (``target_fidelity``)."""

    def build(plan: Plan) -> dict[str, Any]:
        import onnx

        for _attempt in range(len(plan.dynamic) + len(plan.embeddings) + 2):
            try:
                _run_ort_quantizer(src, out, config, plan, calib, work)
            except Exception as exc:  # noqa: BLE001 - the quantizer raises whatever its graph code raises
                raise CompressorError(f"ONNX Runtime's quantizer failed on this model: {type(exc).__name__}: "
                                      f"{first_line(str(exc))}; exclude the node it names (`exclude`) or use "
                                      "mode weight-only") from exc
            model = onnx.load(str(out), load_external_data=True)
            embeddings_per_row(model, plan.embeddings)
            weight_only(model, plan.weight_only)
            if safe is not None:
                guard_weights(model, safe, config.per_channel)
            save_with_external_data(model, out)
            try:  # the real model must load and run here
                session = ort_session(out)
                local = [pool_rows(session.run(None, fit_feed(session, feed))[0], feed, calib.pooled) for feed in calib.feeds]
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
                culprit = _culprit(str(exc), plan)
                if culprit is None:
                    raise CompressorError(f"ONNX Runtime cannot run the int8 model and the error names no node "
                                          f"that could be put back in float: {type(exc).__name__}: {exc}") from exc
                for bucket in (plan.dynamic, plan.embeddings):
                    if culprit in bucket:
                        bucket.remove(culprit)
                plan.weight_only.pop(culprit, None)
                plan.left_in_float[culprit] = f"ONNX Runtime cannot run it quantized: {first_line(str(exc))}"
                continue
            del session
            return target_fidelity(model, config, calib, reference, work, local)
        raise CompressorError("ONNX Runtime keeps rejecting the int8 model")

    return build


def _culprit(message: str, plan: Plan) -> str | None:
    """The quantized node an ONNX Runtime error is about (ONNX Runtime names nodes in its messages)."""
    for name in sorted(plan.dynamic + plan.embeddings + list(plan.weight_only), key=len, reverse=True):
        if re.search(re.escape(name) + r"(_quant|\b|$)", message):
            return name
    return None


@contextlib.contextmanager
def quiet(name: str | None = None) -> Any:
    """Errors only from the logger ``name`` (default: the root logger, through which ONNX Runtime's quantizer logs
    advice such as "run pre-processing first") while the block runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _run_ort_quantizer(src: Path, out: Path, config: Any, plan: Plan, calib: Calibration, work: Path) -> None:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)

    for stale in (out, out.with_name(out.name + ".data")):
        stale.unlink(missing_ok=True)
    if not plan.dynamic:
        onnx.save(onnx.load(str(src), load_external_data=True), str(out), save_as_external_data=True,
                  location=out.name + ".data")
        return
    common = dict(per_channel=config.per_channel, nodes_to_quantize=list(plan.dynamic), op_types_to_quantize=["MatMul", "Conv"],
                  use_external_data_format=True)
    with quiet():
        if config.mode == "dynamic":
            quantize_dynamic(src, out, weight_type=QuantType.QInt8,
                             extra_options={"MatMulConstBOnly": True}, **common)
        else:
            feeds = calib.feeds
            names = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.it = iter([{n: f[n] for n in names if n in f} for f in feeds])  # already numpy, typed

                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(self.it, None)

            method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                      "entropy": CalibrationMethod.Entropy}[config.static_method]
            extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": False}
            if config.static_method == "percentile":
                extra["CalibPercentile"] = config.percentile
            quantize_static(src, out, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=method, extra_options=extra, **common)


