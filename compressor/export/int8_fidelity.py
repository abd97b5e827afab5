"""int8 ONNX, step 7: fidelity on every CPU family the model ships to (compressor.cpu), pair-safe weights for
saturating arithmetic, and the search that moves the most harmful matrix products to float compute until
`target_fidelity` holds on all of them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cpu import ARITHMETIC
from ..errors import CompressorError
from ..ort import ort_session, save_with_external_data
from .int8_search import row_cosines
from .int8_select import Calibration, Plan
from .int8_smooth import fit_feed, pool_rows, quantize_int8, safe_int8

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["target_fidelity", "local_arithmetic", "per_target", "worst_target", "arithmetic_note", "float_products",
           "guard_weights", "search_float", "first_line"]


def target_fidelity(model: onnx.ModelProto, config: Any, calib: Calibration, reference: list[np.ndarray],
              work: Path, local: list[np.ndarray]) -> dict[str, Any]:
    """Min and mean cosine to the float model on the calibration data under each target's arithmetic, and the
    worst of them. ``local``: the outputs of the real model on this machine.

    An arithmetic equal to this CPU's is what ``local`` measured. Any other runs the model with its MatMulInteger
    nodes emulating it (int8_emulate). Saturating pairs that cannot occur (pair-safe weights: no risky pair) make
    the saturating arithmetic the exact one, so a pair-safe model is measured once for all targets. Static QDQ
    models run unfused (DequantizeLinear, then float products: exact integer arithmetic, rounded once more),
    which is every target's when their weights are safe in any pairing."""
    from .int8_arith import risky_pairs
    from .int8_emulate import emulate, products

    risky = 0
    if config.mode == "dynamic":
        from onnx import numpy_helper

        inits = {i.name: i for i in model.graph.initializer}
        for prod in products(model):
            weight = numpy_helper.to_array(inits[prod.weight])
            if weight.dtype == np.int8:
                risky += len(risky_pairs(weight)[0])
    here = local_arithmetic()
    saturating = any(ARITHMETIC[t] == "saturating-pairs" for t in config.targets)
    outputs: dict[str, list[np.ndarray]] = {}
    if here is not None:
        outputs[here] = local
        # No pair can saturate: the saturating arithmetic is the exact one. Dynamic: counted above. QDQ: weights are
        # made safe in any pairing whenever a saturating target is declared.
        if (config.mode == "dynamic" and risky == 0) or (config.mode != "dynamic" and saturating):
            outputs["exact" if here != "exact" else "saturating-pairs"] = local
    scored: dict[str, dict[str, float]] = {}
    by_target: dict[str, dict[str, float]] = {}
    for target in config.targets:
        arithmetic = ARITHMETIC[target]
        if config.mode != "dynamic":
            arithmetic = "exact"  # QDQ weights are made safe in any pairing for saturating targets
        if arithmetic not in outputs:
            path = work / f"fidelity-{arithmetic}.onnx"
            try:
                if config.mode == "dynamic":
                    save_with_external_data(emulate(model, arithmetic), path)
                    session = ort_session(path)
                else:
                    save_with_external_data(model, path)
                    session = ort_session(path, unfused=True)
                outputs[arithmetic] = [pool_rows(session.run(None, fit_feed(session, feed))[0], feed, calib.pooled)
                                       for feed in calib.feeds]
            except CompressorError:
                raise
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
                raise CompressorError(f"the int8 model cannot be run under {target}'s arithmetic (emulated): "
                                      f"{type(exc).__name__}: {first_line(str(exc))}") from exc
            del session
        if arithmetic not in scored:
            cos = row_cosines(reference, outputs[arithmetic])
            if not np.isfinite(cos).all():
                raise CompressorError("the int8 model produces non-finite outputs on the calibration data")
            scored[arithmetic] = {"min": float(cos.min()), "mean": float(cos.mean())}
        by_target[target] = scored[arithmetic]
    worst = min(by_target.values(), key=lambda f: f["min"])
    return {"min": worst["min"], "mean": min(f["mean"] for f in by_target.values()), "targets": by_target,
            "risky_pairs": risky}


def local_arithmetic() -> str | None:
    """How this CPU's ONNX Runtime int8 kernels sum (compressor.cpu); None on a CPU no target family covers."""
    from ..cpu import local_target

    target = local_target()
    return ARITHMETIC.get(target) if target else None


def per_target(fidelity: dict[str, Any]) -> str:
    """The fidelity per target for a message: one figure when all targets agree."""
    values = {round(f["min"], 5) for f in fidelity["targets"].values()}
    if len(values) == 1:
        return f" (the same on {', '.join(fidelity['targets'])})"
    return " (" + ", ".join(f"{t} {f['min']:.5f}" for t, f in fidelity["targets"].items()) + ")"


def worst_target(fidelity: dict[str, Any]) -> str:
    """The target whose minimum cosine is lowest."""
    return min(fidelity["targets"], key=lambda t: fidelity["targets"][t]["min"])


def arithmetic_note(targets: list[str], saturating: bool) -> str:
    """What the report says about the integer arithmetic of ``targets``."""
    if saturating:
        return ("identical on every target: no pair of int8 weights can carry a 16-bit sum past its limit, so "
                "x86 without VNNI computes the same integers as VNNI and ARM64")
    return "exact 32-bit integer sums on every target (" + ", ".join(targets) + ")"


def float_products(model: onnx.ModelProto, stats: dict[str, Any]) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """Output name -> (node, smoothed float weight, importance per input row) of every quantizable MatMul."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    out = {}
    for st in stats.values():
        for name in st["nodes"]:
            node = nodes[name]
            out[node.output[0]] = (name, numpy_helper.to_array(inits[node.input[1]]).astype(np.float32),
                                   st.get("importance"))
    return out


def guard_weights(model: onnx.ModelProto, safe: dict[str, tuple[str, np.ndarray, np.ndarray]],
                   per_channel: bool) -> None:
    """Give every int8 product weight values no kernel can saturate: MatMulInteger weights pair-safe from their
    float weights (int8_arith.pair_safe), ConvInteger and QDQ weights safe in any pairing (their kernels pack K
    in their own order), with their scales (and a QDQ bias's, which must stay input scale x weight scale)
    following."""
    from onnx import helper, numpy_helper

    from .int8_emulate import products

    inits = {i.name: i for i in model.graph.initializer}

    def put(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value, name))

    for prod in products(model):
        if prod.weight_scale is None:
            continue
        old = numpy_helper.to_array(inits[prod.weight_scale])
        if prod.op == "ConvInteger":
            q = numpy_helper.to_array(inits[prod.weight])
            if q.dtype == np.int8:
                new_q, scale = _safe_channels(q, old)
                put(prod.weight, new_q)
                put(prod.weight_scale, scale)
            continue
        if prod.output not in safe:
            continue
        _, w, importance = safe[prod.output]
        q, scale = safe_int8(w, per_channel, importance)
        put(prod.weight, q)
        put(prod.weight_scale, scale.reshape(old.shape).astype(np.float32))
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in list(model.graph.node):
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or len(node.input) < 2 \
                or node.input[1] not in inits:
            continue
        q = numpy_helper.to_array(inits[node.input[0]])
        consumer = next((n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")
                         and len(n.input) > 1 and n.input[1] == node.output[0]), None)
        if q.dtype != np.int8 or q.ndim < 2 or consumer is None:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        # Output channels: a Conv weight's first axis, a (K, N) MatMul weight's columns.
        axis = (0 if consumer.op_type == "Conv" else q.ndim - 1) if scale.size == 1 else int(attrs.get("axis", 1)) % q.ndim
        new_q, new_scale = _safe_channels(q, scale, axis)
        if np.array_equal(new_q, q):
            continue
        put(node.input[0], new_q)
        put(node.input[1], new_scale)
        bias = producer.get(consumer.input[2]) if len(consumer.input) > 2 and consumer.input[2] else None
        if bias is not None and bias.op_type == "DequantizeLinear" and bias.input[0] in inits \
                and len(bias.input) > 1 and bias.input[1] in inits:
            # ONNX Runtime's fused QLinearConv reads the int32 bias at input scale x weight scale.
            factor = (np.asarray(new_scale, np.float64) / np.maximum(np.asarray(scale, np.float64), 1e-30))
            b_q = numpy_helper.to_array(inits[bias.input[0]]).astype(np.float64)
            b_scale = numpy_helper.to_array(inits[bias.input[1]])
            put(bias.input[0], np.rint(b_q / factor.reshape(-1)).astype(np.int32))
            put(bias.input[1], (b_scale.astype(np.float64) * factor.reshape(b_scale.shape)).astype(np.float32)
                if b_scale.size == factor.size else (b_scale * factor.max()).astype(np.float32))


def _safe_channels(q: np.ndarray, scale: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """safe_any_order for a weight whose scale is stored in any shape (one, or one per channel along ``axis``)."""
    from .int8_arith import safe_any_order

    flat = scale.reshape(-1) if scale.size > 1 else scale.reshape(())
    new_q, new_scale = safe_any_order(q, flat, axis)
    return new_q, np.asarray(new_scale, np.float32).reshape(scale.shape)


def search_float(out_path: Path, plan: Plan, floats: dict[str, tuple[str, np.ndarray, np.ndarray]],
            fidelity: dict[str, Any], config: Any, calib: Calibration, reference: list[np.ndarray], work: Path,
            budget: int, say: Any) -> list[str]:
    """Move matrix products to float compute until ``config.target_fidelity`` holds on the worst target
    (int8_search). Returns the products moved, in order; ``plan`` records them."""
    import onnx

    from .int8_search import Scorer, search

    model = onnx.load(str(out_path), load_external_data=True)
    worst = ARITHMETIC[worst_target(fidelity)]
    quantized = set(plan.dynamic)
    weights = {}
    for node, w, _ in floats.values():
        if node in quantized:
            q, scale = quantize_int8(w, 0)  # what float compute will use: plain int8 per column (weight_only)
            weights[node] = (q * scale).astype(np.float32)
    # The scorer's product names are the quantized nodes'; float compute is keyed by the original node.
    by_quant = {}
    from .int8_emulate import products

    for prod in products(model):
        if prod.output in floats and floats[prod.output][0] in weights:
            by_quant[prod.node] = floats[prod.output][0]
    # The real kernels score the worst target when they compute its arithmetic: always for pair-safe weights.
    native = fidelity.get("risky_pairs", 1) == 0 or local_arithmetic() == worst
    scorer = Scorer(model, {q: weights[o] for q, o in by_quant.items()}, None if native else worst, calib.feeds,
                    reference,
                    lambda session, feed: pool_rows(session.run(None, fit_feed(session, feed))[0], feed,
                                                calib.pooled), work)
    cost = {q: int(weights[o].size) for q, o in by_quant.items()}
    chosen, reached = search(scorer, list(by_quant), cost, config.target_fidelity, budget, say)
    del scorer
    moved = [by_quant[q] for q in chosen]
    for name in moved:
        plan.dynamic.remove(name)
        plan.weight_only[name] = "target_fidelity: moving it to float raised the worst target's fidelity most"
    return moved


def first_line(text: str) -> str:
    """The first line of an error message, at most 300 characters."""
    line = text.strip().splitlines()[0] if text.strip() else text
    return line[:300]
