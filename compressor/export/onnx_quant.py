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
import fnmatch
from collections import Counter
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cpu import ARITHMETIC
from ..errors import CompressorError, Problem, RecipeError
from ..ort import ort_session, save_with_external_data
from .int8_search import row_cosines

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["Calibration", "quantize_onnx", "ALPHAS"]

ALPHAS = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)  # 0: no smoothing
SAMPLE_BATCHES = 4  # whole calibration batches kept per input for the smoothing search
SAMPLE_ROWS = 512  # rows (tokens) of each whose output error is measured
KIND_OF_OP = {"MatMul": "Linear", "Gemm": "Linear", "Gather": "Embedding", "Conv": "Conv"}


@dataclass
class Calibration:
    """Calibration batches (numpy feeds keyed by graph input name) and how outputs are compared."""

    feeds: list[dict[str, np.ndarray]]
    name: str
    pooled: bool = False  # text encoder: compare attention-mask mean-pooled first outputs


@dataclass
class _Plan:
    """What gets quantized how."""

    dynamic: list[str] = field(default_factory=list)  # MatMul / Conv nodes for ONNX Runtime's quantizer
    embeddings: list[str] = field(default_factory=list)  # Gather nodes: per-row int8 table
    weight_only: dict[str, str] = field(default_factory=dict)  # MatMul nodes: int8 on disk, float compute
    left_in_float: dict[str, str] = field(default_factory=dict)  # node -> why


def quantize_onnx(src: Path, work: Path, config: Any, calib: Calibration, *, where: str = "quantize",
                  log: Any = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize the float ONNX model at ``src`` as ``config`` (a QuantizeConfig, mode dynamic or static) asks.

    ``work`` is an empty scratch directory. Returns the quantized model (external data loaded) and the report
    that goes into the manifest. Raises RecipeError for patterns that match nothing, CompressorError when the
    model cannot be quantized at all."""
    import onnx

    say = log.info if log is not None else (lambda _msg: None)
    model = onnx.load(str(src), load_external_data=True)
    _name_nodes(model)
    gemms = _gemm_to_matmul(model)
    candidates, plan = _select(model, config, where)
    if not candidates["matmul"] and not candidates["conv"] and not candidates["gather"]:
        raise CompressorError(f"{where}: no node of the ONNX model can be quantized (no MatMul/Gemm/Conv with a "
                              "constant weight and no embedding table); " + _summary(plan.left_in_float))
    float_path = work / "float.onnx"
    save_with_external_data(model, float_path)
    try:
        reference, stats = _calibrate(float_path, calib, _matmul_groups(model, candidates["matmul"]))
    except CompressorError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own exception types
        raise CompressorError(f"{where}: the float ONNX model fails on the calibration data ({calib.name}): "
                              f"{type(exc).__name__}: {_first_line(str(exc))}") from exc
    targets = list(config.targets)
    saturating = any(ARITHMETIC[t] == "saturating-pairs" for t in targets)
    alphas = _smooth(model, config, stats, candidates["matmul"], pair_safe=saturating)
    smoothed = sum(1 for a in alphas.values() if a > 0)
    if smoothed:
        say(f"smoothing {smoothed} of {len(alphas)} matrix-product inputs (strength "
            f"{min(a for a in alphas.values() if a > 0):g}-{max(alphas.values()):g})")
    smooth_path = work / "smoothed.onnx"
    save_with_external_data(model, smooth_path)
    if smoothed:
        _check_rewrite(smooth_path, calib, reference)
    local_error = {n: e for g in stats.values() for n, e in g.get("error", {}).items()}
    relative_error = {n: e for g in stats.values() for n, e in g.get("relative", {}).items()}
    plan.dynamic = candidates["matmul"] + candidates["conv"]
    plan.embeddings = candidates["gather"]
    floats = _float_products(model, stats)  # output name -> (node, smoothed float weight, importance)

    out_path = work / "quantized.onnx"
    build = _builder(smooth_path, out_path, config, calib, work, reference, floats if saturating else None)
    fidelity = build(plan)
    say(f"int8 {config.mode}: {len(plan.dynamic)} nodes quantized; min cosine to float {fidelity['min']:.5f} on "
        f"{calib.name}" + _per_target(fidelity))
    moved: list[str] = []
    if config.target_fidelity is not None and fidelity["min"] < config.target_fidelity:
        budget = int(config.max_float * (len(plan.dynamic) + len(plan.weight_only)))
        if config.mode == "dynamic":
            moved = _search(out_path, plan, floats, fidelity, config, calib, reference, work, budget, say)
        else:
            _fallback(plan, build, fidelity, (local_error, relative_error), _weight_sizes(model), config, moved, say)
        fidelity = build(plan)  # the chosen plan's model in out_path, measured on every target
    reached = config.target_fidelity is None or fidelity["min"] >= config.target_fidelity
    if not reached:
        say(f"target_fidelity {config.target_fidelity} not reached with {len(moved)} matrix products in float "
            f"(max_float {config.max_float}); min cosine {fidelity['min']:.5f} on the worst target"
            + _per_target(fidelity))
        if config.strict:
            raise CompressorError(
                f"{where}.target_fidelity: {config.target_fidelity} not reached on {calib.name}: min cosine "
                f"{fidelity['min']:.5f} on the worst target ({_worst(fidelity)}) with {len(moved)} matrix products "
                f"in float (max_float {config.max_float}); strict is set, so nothing was written. Raise max_float, "
                "lower target_fidelity, or drop strict to ship the closest model")
    result = onnx.load(str(out_path), load_external_data=True)
    report = {
        "mode": config.mode,
        "per_channel": config.per_channel,
        "weights": "int8 symmetric" + (" per channel" if config.per_channel else " per tensor")
        + (", pair-safe (no adjacent pair of products can saturate 16 bits)" if saturating else ""),
        "activations": ("uint8 per tensor, range measured at run time" if config.mode == "dynamic"
                        else f"uint8 per tensor, range from calibration ({config.method})"),
        "targets": targets,
        "arithmetic": _arithmetic_note(targets, saturating),
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
    return result, report


PROBE = 4  # fallback candidates tried per step from each of the two local-error rankings


def _fallback(plan: _Plan, build: Any, fidelity: dict[str, float], errors: tuple[dict[str, float], dict[str, float]],
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


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name: plans, reports and exclusions refer to nodes by name."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _users(model: onnx.ModelProto) -> Counter:
    """How many node inputs read each tensor: a weight read more than once is shared (tied embeddings, ALBERT
    layers) and must not be rewritten for one of its readers."""
    return Counter(i for n in model.graph.node for i in n.input)


def _gemm_to_matmul(model: onnx.ModelProto) -> list[str]:
    """Gemm(A, B, C) with constant B (alpha = beta = 1, no transA) -> MatMul(A, B') + Add(C)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    users = _users(model)
    out, done = [], []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or users[node.input[1]] > 1 or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            out.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weight), node.input[1]))
        name = node.name
        if len(node.input) > 2 and node.input[2]:
            mid = f"{name}/matmul_output"
            out.append(helper.make_node("MatMul", [node.input[0], node.input[1]], [mid], name=name))
            out.append(helper.make_node("Add", [mid, node.input[2]], list(node.output), name=f"{name}/bias"))
        else:
            out.append(helper.make_node("MatMul", [node.input[0], node.input[1]], list(node.output), name=name))
        done.append(name)
    if done:
        del model.graph.node[:]
        model.graph.node.extend(out)
    return done


def module_name(node_name: str) -> str:
    """The torch module a node came from: '/encoder/layer.0/output/dense/MatMul' -> 'encoder.layer.0.output.dense'."""
    parts = node_name.strip("/").split("/")
    return ".".join(parts[:-1]) if len(parts) > 1 else node_name


def _select(model: onnx.ModelProto, config: Any, where: str) -> tuple[dict[str, list[str]], _Plan]:
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    plan = _Plan()
    found: dict[str, list[str]] = {"matmul": [], "conv": [], "gather": []}
    hit = {p: False for p in config.exclude}

    users = _users(model)

    def chosen(node: Any, weight: Any) -> bool:
        kind = KIND_OF_OP[node.op_type]
        kinds = [kind] + ([f"Conv{len(weight.dims) - 2}d"] if kind == "Conv" else [])
        names = (node.name, module_name(node.name))
        if not any(fnmatch.fnmatchcase(k, p) for k in kinds for p in config.modules) and \
                not any(fnmatch.fnmatchcase(n, p) for n in names for p in config.modules):
            return False
        for pattern in config.exclude:
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                hit[pattern] = True
                plan.left_in_float[node.name] = f"excluded by {pattern!r}"
                return False
        return True

    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Conv", "Gather"):
            continue
        weight_input = 0 if node.op_type == "Gather" else 1
        weight = inits.get(node.input[weight_input])
        if weight is None or not chosen(node, weight):
            continue
        numel = int(np.prod(weight.dims))
        if weight.data_type != TensorProto.FLOAT:
            plan.left_in_float[node.name] = f"weight {TensorProto.DataType.Name(weight.data_type).lower()}, not float32"
        elif numel < config.min_elements:
            plan.left_in_float[node.name] = f"{numel} weight elements (< min_elements {config.min_elements})"
        elif users[weight.name] > 1 and node.op_type != "Conv":
            plan.left_in_float[node.name] = "its weight is shared with other nodes (tied), left as it is"
        elif node.op_type == "MatMul" and len(weight.dims) == 2:
            found["matmul"].append(node.name)
        elif node.op_type == "Conv":
            found["conv"].append(node.name)
        elif node.op_type == "Gather" and len(weight.dims) == 2 and _gather_axis(node) == 0:
            found["gather"].append(node.name)
        else:
            plan.left_in_float[node.name] = f"{node.op_type} with a {len(weight.dims)}-D weight is not quantized"
    missed = [p for p, ok in hit.items() if not ok]
    if missed:
        sample = ", ".join(module_name(n) for n in (found["matmul"] + found["conv"])[:6])
        raise RecipeError(Problem(f"exclude pattern(s) {', '.join(repr(p) for p in missed)} match no node of the "
                                  "ONNX model that would be quantized", path=f"{where}.exclude",
                                  hint=f"patterns match ONNX node names or their module names, e.g. {sample}"))
    return found, plan


def _gather_axis(node: Any) -> int:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == "axis":
            return int(helper.get_attribute_value(attr))
    return 0


def _matmul_groups(model: onnx.ModelProto, names: list[str]) -> dict[str, list[str]]:
    """Quantizable MatMul nodes grouped by their activation input (Q, K and V share one)."""
    wanted = set(names)
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.name in wanted:
            groups.setdefault(node.input[0], []).append(node.name)
    return groups


def _summary(reasons: dict[str, str]) -> str:
    if not reasons:
        return "the graph has no such node"
    items = list(reasons.items())
    return "; ".join(f"{k}: {v}" for k, v in items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")


# ------------------------------------------------------------------------------------------------ calibration


def _calibrate(path: Path, calib: Calibration, groups: dict[str, list[str]]) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Reference outputs of the float model, and for each MatMul input: per-channel max |x| and sample batches."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    present = {o.name for o in model.graph.output}
    for name in groups:
        if name not in present:
            model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe = path.with_name("probe.onnx")
    onnx.save(model, str(probe))  # same directory: the external data file is shared, not copied
    session = ort_session(probe)
    names = [o.name for o in session.get_outputs()]
    first = names[0]
    reference: list[np.ndarray] = []
    stats: dict[str, Any] = {g: {"absmax": None, "batches": [], "nodes": members} for g, members in groups.items()}
    for feed in calib.feeds:
        outs = dict(zip(names, session.run(None, _fit(session, feed))))
        reference.append(_pool(outs[first], feed, calib.pooled))
        for g, st in stats.items():
            x = outs[g].reshape(-1, outs[g].shape[-1]).astype(np.float32)
            m = np.abs(x).max(axis=0)
            st["absmax"] = m if st["absmax"] is None else np.maximum(st["absmax"], m)
            if len(st["batches"]) < SAMPLE_BATCHES:
                st["batches"].append(x)
    del session
    probe.unlink()
    return reference, stats


def _fit(session: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feed restricted to the session's inputs, in their integer/float types."""
    out = {}
    for spec in session.get_inputs():
        if spec.name not in feed:
            raise CompressorError(f"the calibration data has no input {spec.name!r} (it has {', '.join(feed)})")
        value = feed[spec.name]
        if spec.type == "tensor(int64)":
            value = value.astype(np.int64)
        elif spec.type == "tensor(float)":
            value = value.astype(np.float32)
        out[spec.name] = value
    return out


def _pool(out: np.ndarray, feed: dict[str, np.ndarray], pooled: bool) -> np.ndarray:
    out = np.asarray(out, dtype=np.float32)
    if pooled and out.ndim == 3 and "attention_mask" in feed:
        mask = feed["attention_mask"].astype(np.float32)[..., None]
        return (out * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    return out.reshape(out.shape[0], -1)


# ------------------------------------------------------------------------------------------------ smoothing


def _fake_act(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """uint8 asymmetric quantize-dequantize over the whole tensor, as ONNX Runtime does it (the range always
    holds 0); dynamic: range of this tensor, static: the calibrated range."""
    lo = min(float(x.min()), 0.0) if lo is None else lo
    hi = max(float(x.max()), 0.0) if hi is None else hi
    scale = max((hi - lo) / 255.0, 1e-12)
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _int8(x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 values and float32 scales (kept dimensions), one scale per slice reduced over ``axis``
    (None: one for the whole tensor)."""
    scale = np.maximum(np.abs(x).max(axis=axis, keepdims=True) / 127.0, 1e-12).astype(np.float32)
    return np.clip(np.round(x / scale), -127, 127).astype(np.int8), scale


def _fake_weight(w: np.ndarray, per_channel: bool, importance: np.ndarray | None = None) -> np.ndarray:
    """int8 symmetric quantize-dequantize of a (in, out) MatMul weight: per output column or per tensor. With
    ``importance`` (mean squared activation per input row), the pair-safe weights the x86-avx2 target needs."""
    if importance is not None:
        q, scale = _safe_int8(w, per_channel, importance)
        return q * scale
    q, scale = _int8(w, 0 if per_channel else None)
    return q * scale


def _safe_int8(w: np.ndarray, per_channel: bool, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and scales of a (in, out) MatMul weight in which no adjacent pair can saturate (int8_arith)."""
    from .int8_arith import pair_safe, safe_any_order

    if per_channel:
        return pair_safe(w, importance)
    q, scale = _int8(w, None)
    return safe_any_order(q, scale, axis=1)


def _smooth(model: onnx.ModelProto, config: Any, stats: dict[str, Any], names: list[str],
            pair_safe: bool = False) -> dict[str, float]:
    """Choose and apply a smoothing strength per MatMul input; record each node's local output error and each
    input's mean squared activation per channel (``importance``, after smoothing). ``pair_safe``: score every
    strength with the pair-safe weights the x86-avx2 target gets, so the choice holds there too."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}
    chosen: dict[str, float] = {}
    new_nodes: dict[str, Any] = {}
    for x_name, st in stats.items():
        members = [nodes[n] for n in st["nodes"]]
        rng = np.random.default_rng(0)
        st["rows"] = [np.sort(rng.choice(len(b), size=min(len(b), SAMPLE_ROWS), replace=False)) for b in st["batches"]]
        weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in members]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        amax = st["absmax"]
        if config.smooth == "off":
            grid: tuple[float, ...] = (0.0,)
        elif config.smooth == "auto":
            grid = ALPHAS
        else:
            grid = (float(config.smooth),)
        best: tuple[float, float, dict[str, float], dict[str, float]] | None = None
        for alpha in grid:
            s = _scales(amax, wmax, alpha)
            errs: dict[str, float] = {}
            rel: dict[str, float] = {}
            total_err = total_ref = 0.0
            energy = _energy(st["batches"], s) if pair_safe and config.mode == "dynamic" else None
            qws = [_fake_weight(w * s[:, None], config.per_channel, energy) for w in weights]
            # static: one range for all batches, as calibration would set it; dynamic: each batch its own.
            fixed = (min(min(float((b / s).min()) for b in st["batches"]), 0.0),
                     max(max(float((b / s).max()) for b in st["batches"]), 0.0)) if config.mode == "static" else (None, None)
            for batch, rows in zip(st["batches"], st["rows"]):
                xs = batch / s
                # The range comes from the whole batch, as at run time; the error from a fixed sample of rows.
                lo, hi = fixed if fixed[0] is not None else (min(float(xs.min()), 0.0), max(float(xs.max()), 0.0))
                xq = _fake_act(xs[rows], lo, hi)
                for node, w, qw in zip(members, weights, qws):
                    y = batch[rows] @ w
                    e = float(((y - xq @ qw) ** 2).sum())
                    r = float((y ** 2).sum())
                    # Absolute, not relative: what the residual stream receives. A small output with a large
                    # relative error (attention projections) harms less than a large one (early FFN outputs).
                    errs[node.name] = errs.get(node.name, 0.0) + e / len(rows)
                    rel[node.name] = rel.get(node.name, 0.0) + e / max(r, 1e-30)
                    total_err += e
                    total_ref += r
            score = total_err / max(total_ref, 1e-30)
            if best is None or score < best[0] - 1e-12:
                best = (score, alpha, errs, rel)
        assert best is not None
        _, alpha, st["error"], st["relative"] = best
        chosen[x_name] = alpha
        st["importance"] = _energy(st["batches"], _scales(amax, wmax, alpha))
        if alpha == 0.0:
            continue
        s = _scales(amax, wmax, alpha)
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), name=f"{x_name}/smooth_inv")
        y_name = f"{x_name}/smoothed"
        for node, w in zip(members, weights):
            inits[node.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), node.input[1]))
        if _fold_into_values(x_name, s, producers, inits):
            continue  # x / s computed by the value projection itself: no node, the products read x as they are
        new_nodes[st["nodes"][0]] = _divider(x_name, inv, y_name, producers.get(x_name), inits, model)
        for node in members:
            node.input[0] = y_name
    if new_nodes:
        order = []
        for node in model.graph.node:
            if node.name in new_nodes:
                order.append(new_nodes[node.name])  # just before its first consumer: still topologically sorted
            order.append(node)
        del model.graph.node[:]
        model.graph.node.extend(order)
    return chosen


_SHAPE_OPS = ("Reshape", "Transpose")


def _fold_into_values(x_name: str, s: np.ndarray, producers: dict[str, Any], inits: dict[str, Any]) -> bool:
    """Divide ``x`` by ``s`` inside the attention that produces it, when ``x`` is an attention context
    (Reshape/Transpose of probabilities @ V, V = x' @ Wv + bv reshaped into heads): each context channel is a
    mix over tokens of one V channel, so dividing Wv's columns and bv by ``s`` divides the context exactly, and
    the smoothing costs no node at all. Returns whether it was folded."""
    from onnx import numpy_helper

    def back(name: str) -> Any:
        node = producers.get(name)
        while node is not None and node.op_type in _SHAPE_OPS:
            node = producers.get(node.input[0])
        return node

    mix = back(x_name)
    if mix is None or mix.op_type != "MatMul" or any(i in inits for i in mix.input):
        return False
    v = back(mix.input[1])
    bias = None
    if v is not None and v.op_type == "Add":
        const = [i for i in v.input if i in inits]
        other = [i for i in v.input if i not in inits]
        if len(const) != 1 or len(other) != 1:
            return False
        bias, v = const[0], producers.get(other[0])
    if v is None or v.op_type != "MatMul" or v.input[1] not in inits:
        return False
    weight = numpy_helper.to_array(inits[v.input[1]])
    if weight.ndim != 2 or weight.shape[1] != s.shape[0] or \
            (bias is not None and numpy_helper.to_array(inits[bias]).shape != s.shape):
        return False
    inits[v.input[1]].CopyFrom(numpy_helper.from_array((weight / s[None, :]).astype(np.float32), v.input[1]))
    if bias is not None:
        inits[bias].CopyFrom(numpy_helper.from_array((numpy_helper.to_array(inits[bias]) / s).astype(np.float32),
                                                     bias))
    return True


def _check_rewrite(path: Path, calib: Calibration, reference: list[np.ndarray]) -> None:
    """Smoothing is an exact rewrite of the float model (up to float rounding); make sure this one was, on the
    first calibration batch, before anything is built on it."""
    session = ort_session(path)
    feed = calib.feeds[0]
    got = _pool(session.run(None, _fit(session, feed))[0], feed, calib.pooled)
    cos = row_cosines([reference[0]], [got])
    if not np.isfinite(cos).all() or float(cos.min()) < 0.9999:
        raise CompressorError(f"smoothing changed what the float model computes (min cosine {float(cos.min()):.6f} "
                              "on the first calibration batch); this is a bug in compressor: set `smooth: off` to "
                              "quantize without it, and please report it")


def _divider(x_name: str, inv: Any, y_name: str, producer: Any, inits: dict[str, Any],
             model: onnx.ModelProto) -> Any:
    """The node computing ``x / s``: a second LayerNormalization with its scale and bias divided by ``s`` when
    ``x`` is a LayerNormalization's output (the first stays for the residual path), else a Mul. ONNX Runtime runs
    a per-channel Mul through its broadcasting path, and on MiniLM the twelve Muls after LayerNorms cost more time
    than the twelve extra LayerNorms (about 3% of the model's latency on 2 AVX2 cores)."""
    from onnx import helper, numpy_helper

    if producer is not None and producer.op_type == "LayerNormalization" and len(producer.input) >= 2 \
            and all(i in inits for i in producer.input[1:3] if i) and producer.output[0] == x_name:
        scale = numpy_helper.to_array(inv)
        inputs = [producer.input[0]]
        for i, tag in zip(producer.input[1:3], ("scale", "bias")):
            if not i:
                continue
            folded = numpy_helper.from_array((numpy_helper.to_array(inits[i]) * scale).astype(np.float32),
                                             f"{x_name}/smooth_{tag}")
            model.graph.initializer.append(folded)
            inits[folded.name] = folded
            inputs.append(folded.name)
        attrs = {a.name: helper.get_attribute_value(a) for a in producer.attribute}
        return helper.make_node("LayerNormalization", inputs, [y_name], name=f"{x_name}/smooth", **attrs)
    model.graph.initializer.append(inv)
    return helper.make_node("Mul", [x_name, inv.name], [y_name], name=f"{x_name}/smooth")


def _energy(batches: list[np.ndarray], s: np.ndarray) -> np.ndarray:
    """Mean squared activation per input channel after dividing by the smoothing scales ``s``: how much a weight
    row's rounding error reaches the output."""
    return np.mean([((b / s) ** 2).mean(axis=0) for b in batches], axis=0)


def _scales(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    if alpha == 0.0:
        return np.ones_like(amax, dtype=np.float32)
    # A channel (nearly) always zero in calibration would get s -> 0: one unseen non-zero value at run time,
    # divided by that s, would then set the range of the whole tensor. Floor both maxima at 1% of the largest.
    a = np.maximum(amax, max(float(amax.max()) * 0.01, 1e-5))
    w = np.maximum(wmax, max(float(wmax.max()) * 0.01, 1e-5))
    return (a ** alpha / w ** (1 - alpha)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ building


def _builder(src: Path, out: Path, config: Any, calib: Calibration, work: Path, reference: list[np.ndarray],
             safe: dict[str, tuple[str, np.ndarray, np.ndarray]] | None) -> Any:
    """A function plan -> fidelity: quantize ``src`` as the plan says into ``out``, make sure ONNX Runtime loads
    and runs it (moving nodes it rejects to float), give it pair-safe weights when ``safe`` (output -> smoothed
    float weight and importance, see _float_products) is given, and measure cosine similarity to the float
    model's outputs (``reference``) under every target's arithmetic (``_fidelity``)."""

    def build(plan: _Plan) -> dict[str, Any]:
        import onnx

        for _attempt in range(len(plan.dynamic) + len(plan.embeddings) + 2):
            try:
                _run_ort_quantizer(src, out, config, plan, calib, work)
            except Exception as exc:  # noqa: BLE001 - the quantizer raises whatever its graph code raises
                raise CompressorError(f"ONNX Runtime's quantizer failed on this model: {type(exc).__name__}: "
                                      f"{_first_line(str(exc))}; exclude the node it names (`exclude`) or use "
                                      "mode weight-only") from exc
            model = onnx.load(str(out), load_external_data=True)
            _embeddings_per_row(model, plan.embeddings)
            _weight_only(model, plan.weight_only)
            if safe is not None:
                _guard_weights(model, safe, config.per_channel)
            save_with_external_data(model, out)
            try:  # the real model must load and run here
                session = ort_session(out)
                local = [_pool(session.run(None, _fit(session, feed))[0], feed, calib.pooled) for feed in calib.feeds]
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
                culprit = _culprit(str(exc), plan)
                if culprit is None:
                    raise CompressorError(f"ONNX Runtime cannot run the int8 model and the error names no node "
                                          f"that could be put back in float: {type(exc).__name__}: {exc}") from exc
                for bucket in (plan.dynamic, plan.embeddings):
                    if culprit in bucket:
                        bucket.remove(culprit)
                plan.weight_only.pop(culprit, None)
                plan.left_in_float[culprit] = f"ONNX Runtime cannot run it quantized: {_first_line(str(exc))}"
                continue
            del session
            return _fidelity(model, config, calib, reference, work, local)
        raise CompressorError("ONNX Runtime keeps rejecting the int8 model")

    return build


def _fidelity(model: onnx.ModelProto, config: Any, calib: Calibration, reference: list[np.ndarray],
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
                outputs[arithmetic] = [_pool(session.run(None, _fit(session, feed))[0], feed, calib.pooled)
                                       for feed in calib.feeds]
            except CompressorError:
                raise
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
                raise CompressorError(f"the int8 model cannot be run under {target}'s arithmetic (emulated): "
                                      f"{type(exc).__name__}: {_first_line(str(exc))}") from exc
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


def _per_target(fidelity: dict[str, Any]) -> str:
    values = {round(f["min"], 5) for f in fidelity["targets"].values()}
    if len(values) == 1:
        return f" (the same on {', '.join(fidelity['targets'])})"
    return " (" + ", ".join(f"{t} {f['min']:.5f}" for t, f in fidelity["targets"].items()) + ")"


def _worst(fidelity: dict[str, Any]) -> str:
    return min(fidelity["targets"], key=lambda t: fidelity["targets"][t]["min"])


def _arithmetic_note(targets: list[str], saturating: bool) -> str:
    if saturating:
        return ("identical on every target: no pair of int8 weights can carry a 16-bit sum past its limit, so "
                "x86 without VNNI computes the same integers as VNNI and ARM64")
    return "exact 32-bit integer sums on every target (" + ", ".join(targets) + ")"


def _float_products(model: onnx.ModelProto, stats: dict[str, Any]) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
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


def _guard_weights(model: onnx.ModelProto, safe: dict[str, tuple[str, np.ndarray, np.ndarray]],
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
        q, scale = _safe_int8(w, per_channel, importance)
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


def _search(out_path: Path, plan: _Plan, floats: dict[str, tuple[str, np.ndarray, np.ndarray]],
            fidelity: dict[str, Any], config: Any, calib: Calibration, reference: list[np.ndarray], work: Path,
            budget: int, say: Any) -> list[str]:
    """Move matrix products to float compute until ``config.target_fidelity`` holds on the worst target
    (int8_search). Returns the products moved, in order; ``plan`` records them."""
    import onnx

    from .int8_search import Scorer, search

    model = onnx.load(str(out_path), load_external_data=True)
    worst = ARITHMETIC[_worst(fidelity)]
    quantized = set(plan.dynamic)
    weights = {}
    for node, w, _ in floats.values():
        if node in quantized:
            q, scale = _int8(w, 0)  # what float compute will use: plain int8 per column (_weight_only)
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
                    lambda session, feed: _pool(session.run(None, _fit(session, feed))[0], feed,
                                                calib.pooled), work)
    cost = {q: int(weights[o].size) for q, o in by_quant.items()}
    chosen, reached = search(scorer, list(by_quant), cost, config.target_fidelity, budget, say)
    del scorer
    moved = [by_quant[q] for q in chosen]
    for name in moved:
        plan.dynamic.remove(name)
        plan.weight_only[name] = "target_fidelity: moving it to float raised the worst target's fidelity most"
    return moved


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line[:300]


def _culprit(message: str, plan: _Plan) -> str | None:
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


def _run_ort_quantizer(src: Path, out: Path, config: Any, plan: _Plan, calib: Calibration, work: Path) -> None:
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
                      "entropy": CalibrationMethod.Entropy}[config.method]
            extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": False}
            if config.method == "percentile":
                extra["CalibPercentile"] = config.percentile
            quantize_static(src, out, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=method, extra_options=extra, **common)


def _to_int8(init: Any, axis: int) -> np.ndarray:
    """Replace the float initializer ``init`` by its symmetric int8 form, renamed ``<name>_int8``; returns the
    scales (reduced over ``axis``, dims kept)."""
    from onnx import numpy_helper

    q, scale = _int8(numpy_helper.to_array(init).astype(np.float32), axis)
    init.CopyFrom(numpy_helper.from_array(q, init.name + "_int8"))
    return scale


def _embeddings_per_row(model: onnx.ModelProto, names: list[str]) -> None:
    """Gather(table, ids) -> Gather(int8 table, ids) * Gather(row scales, ids): int8 on disk and in memory, only
    the looked-up rows converted."""
    from onnx import TensorProto, helper, numpy_helper

    if not names:
        return
    inits = {i.name: i for i in model.graph.initializer}
    wanted = set(names)
    order = []
    for node in model.graph.node:
        if node.name not in wanted or node.input[0] not in inits:
            order.append(node)
            continue
        base = node.input[0]
        scale = _to_int8(inits[base], axis=1)[:, 0]
        scale_init = numpy_helper.from_array(scale, base + "_row_scale")
        model.graph.initializer.append(scale_init)
        axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), base + "_unsqueeze_axes")
        model.graph.initializer.append(axes)
        n = node.name
        order += [
            helper.make_node("Gather", [base + "_int8", node.input[1]], [n + "/q"], name=n + "/q", axis=0),
            helper.make_node("Cast", [n + "/q"], [n + "/qf"], name=n + "/cast", to=TensorProto.FLOAT),
            helper.make_node("Gather", [scale_init.name, node.input[1]], [n + "/s"], name=n + "/scale", axis=0),
            helper.make_node("Unsqueeze", [n + "/s", axes.name], [n + "/s1"], name=n + "/unsqueeze"),
            helper.make_node("Mul", [n + "/qf", n + "/s1"], list(node.output), name=n),
        ]
    del model.graph.node[:]
    model.graph.node.extend(order)


def _weight_only(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """MatMul(x, W) -> MatMul(x, Cast(W_int8) * scales): int8 on disk; ONNX Runtime folds the constant Cast and
    Mul once when the session loads and computes in float. (DequantizeLinear would be fused into an int8 kernel
    that quantizes the activations again, which is what these nodes must avoid.)"""
    from onnx import TensorProto, helper, numpy_helper

    if not names:
        return
    inits = {i.name: i for i in model.graph.initializer}
    order = []
    for node in model.graph.node:
        if node.name not in names or node.input[1] not in inits:
            order.append(node)
            continue
        base = node.input[1]
        scale = _to_int8(inits[base], axis=0)[0]
        model.graph.initializer.append(numpy_helper.from_array(scale, base + "_col_scale"))
        n = node.name
        order += [
            helper.make_node("Cast", [base + "_int8"], [n + "/wf"], name=n + "/cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [n + "/wf", base + "_col_scale"], [n + "/w"], name=n + "/dequantize"),
        ]
        node.input[1] = n + "/w"
        order.append(node)
    del model.graph.node[:]
    model.graph.node.extend(order)
