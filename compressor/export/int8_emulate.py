"""Make ONNX Runtime compute another CPU's int8 arithmetic: a dynamic int8 ONNX model rewritten so that every
``MatMulInteger`` yields the int32 result that a given arithmetic ("exact" or "saturating-pairs", see
``compressor.cpu``) produces, on whatever CPU runs the rewritten model.

Each ``MatMulInteger(a, b, a_zero, b_zero)`` with a constant int8/uint8 ``b`` becomes, in float64 (which holds
every such sum exactly, whatever the summation order; the exact part runs in float32 over chunks of K
small enough that it is exact too):

    y = (a - a_zero) @ (b - b_zero)                                   exact int32 sum
      + sum over risky pairs r in column n of clip(p_r) - p_r         saturating-pairs only
    p_r = a[2j_r] * b[2j_r, n] + a[2j_r + 1] * b[2j_r + 1, n]         raw uint8 activations, as MLAS pairs them

cast back to int32 for the graph's own Cast and scale Mul. Only the pairs that can leave int16 for some input
(``int8_arith.risky_pairs``) are visited; a weight without any gets no correction at all. The correction is summed
per column with a cumulative sum over pairs sorted by column, then spread to the N columns with one Gather.
``DynamicQuantizeLinear`` and everything else run as ONNX Runtime runs them on the machine at hand, which every
target shares. ``tests/export/test_int8_arith.py`` checks the rewrite against the numpy emulator and against ONNX
Runtime's own kernels.

``products`` finds the dynamic int8 products of a model (for the quantizer's search and the evaluator), and
``switchable`` adds a boolean input per product that replaces its int8 result with float compute on the same
int8 weights, so that one session can score any choice of products in float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .int8_arith import risky_pairs

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["Product", "products", "emulate", "switchable", "SWITCH_PREFIX"]

SWITCH_PREFIX = "float_compute/"
EXACT_CHUNK = 512


@dataclass
class Product:
    """One dynamic int8 matrix product: DynamicQuantizeLinear(x) -> MatMulInteger -> Cast -> Mul(scales)."""

    node: str  # the MatMulInteger / ConvInteger node (its name, or its output where it has none)
    x: str  # the float activation DynamicQuantizeLinear reads
    weight: str  # the int8 weight initializer
    weight_scale: str | None  # its scales initializer (per column or one)
    output: str  # the float result (the scale Mul's output)
    op: str = "MatMulInteger"


def products(model: onnx.ModelProto) -> list[Product]:
    """Every MatMulInteger and ConvInteger of ``model`` with a constant weight, traced back to its float input and
    forward to its float result (the graph ONNX Runtime's quantize_dynamic writes)."""
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = []
    for node in model.graph.node:
        if node.op_type not in ("MatMulInteger", "ConvInteger") or node.input[1] not in inits:
            continue
        dql = producer.get(node.input[0])
        if dql is None or dql.op_type != "DynamicQuantizeLinear":
            continue
        cast = _only(consumers.get(node.output[0], []), "Cast")
        mul = _only(consumers.get(cast.output[0], []), "Mul") if cast is not None else None
        if mul is None:
            continue
        scales = producer.get(next((i for i in mul.input if i != cast.output[0]), ""))
        weight_scale = None
        if scales is not None and scales.op_type == "Mul":
            weight_scale = next((i for i in scales.input if i in inits), None)
        found.append(Product(node=node.name or node.output[0], x=dql.input[0], weight=node.input[1],
                             weight_scale=weight_scale, output=mul.output[0], op=node.op_type))
    return found


def _only(nodes: list, op: str):  # noqa: ANN202 - an onnx NodeProto or None
    return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op else None


def emulate(model: onnx.ModelProto, arithmetic: str) -> onnx.ModelProto:
    """A copy of ``model`` whose MatMulInteger nodes compute ``arithmetic`` exactly on any CPU.

    ConvInteger nodes become a float Conv of the same integers (exact sums) when the arithmetic is exact, or when
    their weights cannot saturate in any pairing (what the quantizer gives every x86-avx2 artifact); a saturating
    ConvInteger with unsafe weights keeps this CPU's kernel, since its K order is the kernel's own."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if arithmetic not in ("exact", "saturating-pairs"):
        raise ValueError(f"unknown arithmetic {arithmetic!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    new_inits: list = []
    nodes = []
    for node in out.graph.node:
        if node.op_type == "ConvInteger" and node.input[1] in inits:
            nodes += _conv_nodes(node, numpy_helper.to_array(inits[node.input[1]]), arithmetic)
            continue
        if node.op_type != "MatMulInteger" or node.input[1] not in inits:
            nodes.append(node)
            continue
        p = node.output[0]  # outputs are unique in a graph; names need not be
        a, b = node.input[0], node.input[1]
        a_zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
        b_zero = node.input[3] if len(node.input) > 3 and node.input[3] else None

        def cast(src: str, dst: str, to: int = TensorProto.FLOAT) -> str:
            nodes.append(helper.make_node("Cast", [src], [dst], name=dst, to=to))
            return dst

        def shifted(src: str, zero: str | None, tag: str) -> str:
            value = cast(src, f"{p}/emu/{tag}")
            if not zero:
                return value
            nodes.append(helper.make_node("Sub", [value, cast(zero, f"{p}/emu/{tag}_zero")], [f"{p}/emu/{tag}0"],
                                          name=f"{p}/emu/{tag}0"))
            return f"{p}/emu/{tag}0"

        left, right = shifted(a, a_zero, "a"), shifted(b, b_zero, "b")
        weight = numpy_helper.to_array(inits[b])
        parts = []
        # float32 sums integers exactly while every partial sum stays under 2**24: |a - a_zero| <= 255 and, for
        # symmetric int8 weights, |b| <= 128, so 512 * 255 * 128 < 2**24; other weights take chunks of 256. K is
        # cut into such chunks, each summed by the float32 GEMM, and the chunks added in int32.
        chunk = EXACT_CHUNK if weight.dtype == np.int8 and not b_zero else EXACT_CHUNK // 2
        for c, start in enumerate(range(0, weight.shape[0], chunk)):
            stop = min(start + chunk, weight.shape[0])
            lhs, rhs = left, right
            if weight.shape[0] > chunk:
                bounds = [numpy_helper.from_array(np.array([v], np.int64), f"{p}/emu/k{c}_{t}")
                          for t, v in (("start", start), ("stop", stop))]
                axis_last = numpy_helper.from_array(np.array([-1], np.int64), f"{p}/emu/k{c}_axis_last")
                axis_first = numpy_helper.from_array(np.array([0], np.int64), f"{p}/emu/k{c}_axis_first")
                new_inits.extend(bounds + [axis_last, axis_first])
                lhs, rhs = f"{p}/emu/k{c}_a", f"{p}/emu/k{c}_b"
                nodes.append(helper.make_node("Slice", [left, bounds[0].name, bounds[1].name, axis_last.name],
                                              [lhs], name=lhs))
                nodes.append(helper.make_node("Slice", [right, bounds[0].name, bounds[1].name, axis_first.name],
                                              [rhs], name=rhs))
            nodes.append(helper.make_node("MatMul", [lhs, rhs], [f"{p}/emu/k{c}"], name=f"{p}/emu/k{c}"))
            parts.append(cast(f"{p}/emu/k{c}", f"{p}/emu/k{c}_int32", TensorProto.INT32))
        if arithmetic == "saturating-pairs" and weight.dtype == np.int8:
            correction = _saturation_nodes(p, cast(a, f"{p}/emu/a_raw", TensorProto.DOUBLE), weight, nodes,
                                           new_inits)
            if correction is not None:
                parts.append(cast(correction, f"{p}/emu/correction_int32", TensorProto.INT32))
        total = parts[0]
        for i, part in enumerate(parts[1:]):
            last = node.output[0] if i == len(parts) - 2 else f"{p}/emu/sum{i}"
            nodes.append(helper.make_node("Add", [total, part], [last], name=f"{p}/emu/sum{i}"))
            total = last
        if total != node.output[0]:
            nodes.append(helper.make_node("Identity", [total], [node.output[0]], name=f"{p}/emu/out"))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(new_inits)
    return out


def _conv_nodes(node: onnx.NodeProto, weight: np.ndarray, arithmetic: str) -> list:
    """ConvInteger(x, w, x_zero, w_zero) as Cast -> Sub -> float Conv -> Cast int32, or the node itself where the
    arithmetic is saturating and the weights could saturate (see ``emulate``)."""
    from onnx import TensorProto, helper

    from .int8_arith import PAIR_LIMIT

    if arithmetic == "saturating-pairs" and weight.dtype == np.int8:
        flat = np.abs(weight.reshape(weight.shape[0], -1).astype(np.int32))
        signed = weight.reshape(weight.shape[0], -1).astype(np.int32)
        top = [np.sort(np.where(sign * signed > 0, flat, 0), axis=1)[:, -2:].sum(axis=1) for sign in (1, -1)]
        if max(int(t.max()) for t in top) > PAIR_LIMIT:
            return [node]
    p = node.output[0]
    out = []

    def shifted(src: str, zero: str, tag: str) -> str:
        out.append(helper.make_node("Cast", [src], [f"{p}/emu/{tag}"], name=f"{p}/emu/{tag}", to=TensorProto.FLOAT))
        if not zero:
            return f"{p}/emu/{tag}"
        out.append(helper.make_node("Cast", [zero], [f"{p}/emu/{tag}_zero"], name=f"{p}/emu/{tag}_zero",
                                    to=TensorProto.FLOAT))
        if tag == "w":  # a per-channel zero point applies along the output-channel axis
            out.append(helper.make_node("Reshape", [f"{p}/emu/{tag}_zero", f"{p}/emu/w_zero_shape"],
                                        [f"{p}/emu/{tag}_zero_r"], name=f"{p}/emu/{tag}_zero_r"))
            zero_name = f"{p}/emu/{tag}_zero_r"
        else:
            zero_name = f"{p}/emu/{tag}_zero"
        out.append(helper.make_node("Sub", [f"{p}/emu/{tag}", zero_name], [f"{p}/emu/{tag}0"], name=f"{p}/emu/{tag}0"))
        return f"{p}/emu/{tag}0"

    x = shifted(node.input[0], node.input[2] if len(node.input) > 2 else "", "x")
    w_zero = node.input[3] if len(node.input) > 3 else ""
    if w_zero:
        shape = np.array([-1] + [1] * (weight.ndim - 1), np.int64)
        out.append(helper.make_node("Constant", [], [f"{p}/emu/w_zero_shape"], name=f"{p}/emu/w_zero_shape",
                                    value=helper.make_tensor(f"{p}/emu/w_zero_shape_value", TensorProto.INT64,
                                                             [len(shape)], shape.tolist())))
    w = shifted(node.input[1], w_zero, "w")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    out.append(helper.make_node("Conv", [x, w], [f"{p}/emu/conv"], name=f"{p}/emu/conv", **attrs))
    out.append(helper.make_node("Cast", [f"{p}/emu/conv"], [node.output[0]], name=f"{p}/emu/int32",
                                to=TensorProto.INT32))
    return out


def _saturation_nodes(p: str, a: str, weight: np.ndarray, nodes: list, inits: list) -> str | None:
    """Nodes adding clip(p) - p of every risky pair to its column; None when the weight has no risky pair."""
    from onnx import helper, numpy_helper

    j, n = risky_pairs(weight)
    if not len(j):
        return None
    k, cols = weight.shape
    padded = np.concatenate([weight, np.zeros((1, cols), np.int8)]) if k % 2 else weight
    order = np.lexsort((j, n))  # by column, so that each column's pairs are contiguous
    j, n = j[order], n[order]
    w = padded.astype(np.float64)
    columns, starts = np.unique(n, return_index=True)
    ends = np.append(starts[1:], len(n)) - 1
    where = np.zeros(cols, np.int64)  # output column -> position in [0, corrections...]; 0: no correction
    where[columns] = np.arange(1, len(columns) + 1)

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, f"{p}/emu/{name}"))
        return f"{p}/emu/{name}"

    def node(op: str, ins: list[str], name: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, ins, [f"{p}/emu/{name}"], name=f"{p}/emu/{name}", **attrs))
        return f"{p}/emu/{name}"

    # An odd K: the padding position is always zero, which Gather reads as a clamp of index K to K-1 would not,
    # so the last pair's second index points at a zero column appended to a.
    source = a
    if k % 2:
        zero = node("Mul", [node("Gather", [a, const("first", np.array([0], np.int64))], "a_first", axis=-1),
                            const("zero", np.array(0.0))], "a_zero_col")
        source = node("Concat", [a, zero], "a_padded", axis=-1)
    first = node("Gather", [source, const("i0", (2 * j).astype(np.int64))], "g0", axis=-1)
    second = node("Gather", [source, const("i1", (2 * j + 1).astype(np.int64))], "g1", axis=-1)
    pair = node("Add", [node("Mul", [first, const("w_even", w[2 * j, n])], "p0"),
                        node("Mul", [second, const("w_odd", w[2 * j + 1, n])], "p1")], "pair")
    clipped = node("Max", [node("Min", [pair, const("hi", np.array(32767.0))], "min"),
                           const("lo", np.array(-32768.0))], "clip")
    excess = node("Sub", [clipped, pair], "excess")
    running = node("CumSum", [excess, const("axis", np.array(-1, np.int64))], "cumsum")
    # column total = cumsum[end] - cumsum[start] + excess[start]
    per_column = node("Add", [node("Sub", [node("Gather", [running, const("ends", ends.astype(np.int64))], "at_end",
                                                axis=-1),
                                           node("Gather", [running, const("starts", starts.astype(np.int64))],
                                                "at_start", axis=-1)], "span"),
                              node("Gather", [excess, const("starts2", starts.astype(np.int64))], "first_excess",
                                   axis=-1)], "per_column")
    zero_col = node("Mul", [node("Gather", [per_column, const("c0", np.array([0], np.int64))], "pc_first", axis=-1),
                            const("zero2", np.array(0.0))], "pc_zero")
    table = node("Concat", [zero_col, per_column], "table", axis=-1)
    return node("Gather", [table, const("where", where)], "correction", axis=-1)


def switchable(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` with a boolean scalar input per product in ``weights`` (product node -> the float32
    (K, N) weight its float compute would use): true replaces the product's int8 result with ``x @ weight``.

    Returns the model and product node -> input name."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    by_node = {p.node: p for p in products(out) if p.op == "MatMulInteger"}
    renamed: dict[str, str] = {}
    switches: dict[str, str] = {}
    extra = []
    for name, weight in weights.items():
        prod = by_node[name]
        switch = SWITCH_PREFIX + name
        switches[name] = switch
        out.graph.input.append(helper.make_tensor_value_info(switch, TensorProto.BOOL, []))
        w = numpy_helper.from_array(np.asarray(weight, np.float32), f"{name}/float_weight")
        out.graph.initializer.append(w)
        int8_out = f"{prod.output}/int8"
        renamed[prod.output] = int8_out
        # An If, not a Where: only the branch taken runs, so the float product costs nothing while it is off.
        then = helper.make_graph(
            [helper.make_node("MatMul", [prod.x, w.name], [f"{name}/float_out"], name=f"{name}/float")],
            f"{name}/float_branch", [], [helper.make_tensor_value_info(f"{name}/float_out", TensorProto.FLOAT, None)])
        other = helper.make_graph(
            [helper.make_node("Identity", [int8_out], [f"{name}/int8_out"], name=f"{name}/int8")],
            f"{name}/int8_branch", [], [helper.make_tensor_value_info(f"{name}/int8_out", TensorProto.FLOAT, None)])
        extra.append(helper.make_node("If", [switch], [prod.output], name=f"{name}/switch", then_branch=then,
                                      else_branch=other))
    for node in out.graph.node:
        for i, o in enumerate(node.output):
            if o in renamed:
                node.output[i] = renamed[o]
    out.graph.node.extend(extra)  # appended: topological order is restored below
    _sort(out)
    return out, switches


def _captured(node: onnx.NodeProto) -> list[str]:
    """Outer-scope names an If node's branches read (they must exist before the If runs)."""
    names = []
    for attr in node.attribute:
        if attr.g is not None and attr.g.node:
            inner = {o for n in attr.g.node for o in n.output} | {i.name for i in attr.g.initializer}
            names += [i for n in attr.g.node for i in n.input if i and i not in inner]
    return names


def _sort(model: onnx.ModelProto) -> None:
    """Order nodes topologically (ONNX requires it; the switch nodes were appended at the end)."""
    known = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending = list(model.graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in known for i in [*node.input, *_captured(node)]):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError("the graph has a cycle or an undefined input: " + ", ".join(n.name for n in rest[:3]))
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)
