"""int8 ONNX, steps 2 and 3: calibration statistics of the float model, and smoothing (SmoothQuant) with the
strength chosen per input by the smallest emulated output error; plus the int8 weight rewrites that need no
quantizer (per-row embeddings, weight-only products). See onnx_quant.py for the whole procedure."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CompressorError
from ..ort import ort_session
from .int8_search import row_cosines
from .int8_select import Calibration

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["ALPHAS", "SAMPLE_BATCHES", "SAMPLE_ROWS", "calibrate", "fit_feed", "pool_rows", "quantize_int8",
           "safe_int8", "smooth", "check_rewrite", "embeddings_per_row", "weight_only"]


ALPHAS = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)  # 0: no smoothing


SAMPLE_BATCHES = 4  # whole calibration batches kept per input for the smoothing search


SAMPLE_ROWS = 512  # rows (tokens) of each whose output error is measured


def calibrate(path: Path, calib: Calibration, groups: dict[str, list[str]]) -> tuple[list[np.ndarray], dict[str, Any]]:
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
        outs = dict(zip(names, session.run(None, fit_feed(session, feed))))
        reference.append(pool_rows(outs[first], feed, calib.pooled))
        for g, st in stats.items():
            x = outs[g].reshape(-1, outs[g].shape[-1]).astype(np.float32)
            m = np.abs(x).max(axis=0)
            st["absmax"] = m if st["absmax"] is None else np.maximum(st["absmax"], m)
            if len(st["batches"]) < SAMPLE_BATCHES:
                st["batches"].append(x)
    del session
    probe.unlink()
    return reference, stats


def fit_feed(session: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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


def pool_rows(out: np.ndarray, feed: dict[str, np.ndarray], pooled: bool) -> np.ndarray:
    """Rows to compare outputs by: mean-pooled over real tokens for a text encoder (``pooled``), else flattened
    per example."""
    out = np.asarray(out, dtype=np.float32)
    if pooled and out.ndim == 3 and "attention_mask" in feed:
        mask = feed["attention_mask"].astype(np.float32)[..., None]
        return (out * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    return out.reshape(out.shape[0], -1)


def _fake_act(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """uint8 asymmetric quantize-dequantize over the whole tensor, as ONNX Runtime does it (the range always
    holds 0); dynamic: range of this tensor, static: the calibrated range."""
    lo = min(float(x.min()), 0.0) if lo is None else lo
    hi = max(float(x.max()), 0.0) if hi is None else hi
    scale = max((hi - lo) / 255.0, 1e-12)
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def quantize_int8(x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 values and float32 scales (kept dimensions), one scale per slice reduced over ``axis``
    (None: one for the whole tensor)."""
    scale = np.maximum(np.abs(x).max(axis=axis, keepdims=True) / 127.0, 1e-12).astype(np.float32)
    return np.clip(np.round(x / scale), -127, 127).astype(np.int8), scale


def _fake_weight(w: np.ndarray, per_channel: bool, importance: np.ndarray | None = None) -> np.ndarray:
    """int8 symmetric quantize-dequantize of a (in, out) MatMul weight: per output column or per tensor. With
    ``importance`` (mean squared activation per input row), the pair-safe weights the x86-avx2 target needs."""
    if importance is not None:
        q, scale = safe_int8(w, per_channel, importance)
        return q * scale
    q, scale = quantize_int8(w, 0 if per_channel else None)
    return q * scale


def safe_int8(w: np.ndarray, per_channel: bool, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and scales of a (in, out) MatMul weight in which no adjacent pair can saturate (int8_arith)."""
    from .int8_arith import pair_safe, safe_any_order

    if per_channel:
        return pair_safe(w, importance)
    q, scale = quantize_int8(w, None)
    return safe_any_order(q, scale, axis=1)


def smooth(model: onnx.ModelProto, config: Any, stats: dict[str, Any], names: list[str],
            pair_safe: bool = False) -> dict[str, float]:
    """Choose and apply a smoothing strength per MatMul input; record each node's local output error and each
    input's mean squared activation per channel (``importance``, after smoothing). ``pair_safe``: score every
    strength with the pair-safe weights the x86-avx2 target gets, so the choice holds there too."""
    from onnx import numpy_helper

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


def check_rewrite(path: Path, calib: Calibration, reference: list[np.ndarray]) -> None:
    """Smoothing is an exact rewrite of the float model (up to float rounding); make sure this one was, on the
    first calibration batch, before anything is built on it."""
    session = ort_session(path)
    feed = calib.feeds[0]
    got = pool_rows(session.run(None, fit_feed(session, feed))[0], feed, calib.pooled)
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


def _to_int8(init: Any, axis: int) -> np.ndarray:
    """Replace the float initializer ``init`` by its symmetric int8 form, renamed ``<name>quantize_int8``; returns the
    scales (reduced over ``axis``, dims kept)."""
    from onnx import numpy_helper

    q, scale = quantize_int8(numpy_helper.to_array(init).astype(np.float32), axis)
    init.CopyFrom(numpy_helper.from_array(q, init.name + "_int8"))
    return scale


def embeddings_per_row(model: onnx.ModelProto, names: list[str]) -> None:
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


def weight_only(model: onnx.ModelProto, names: dict[str, str]) -> None:
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
