"""int8 ONNX, step 1: which nodes are quantized and how (the plan), with the reason for every node left in
float; the calibration data the later steps share; Gemm with a constant weight rewritten as MatMul + Add, which
ONNX Runtime quantizes dynamically."""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import Problem, RecipeError

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["KIND_OF_OP", "Calibration", "Plan", "name_nodes", "gemm_to_matmul", "module_name", "select_nodes",
           "matmul_groups", "reasons_summary"]


KIND_OF_OP = {"MatMul": "Linear", "Gemm": "Linear", "Gather": "Embedding", "Conv": "Conv"}


@dataclass
class Calibration:
    """Calibration batches (numpy feeds keyed by graph input name) and how outputs are compared."""

    feeds: list[dict[str, np.ndarray]]
    name: str
    pooled: bool = False  # text encoder: compare attention-mask mean-pooled first outputs


@dataclass
class Plan:
    """What gets quantized how."""

    dynamic: list[str] = field(default_factory=list)  # MatMul / Conv nodes for ONNX Runtime's quantizer
    embeddings: list[str] = field(default_factory=list)  # Gather nodes: per-row int8 table
    weight_only: dict[str, str] = field(default_factory=dict)  # MatMul nodes: int8 on disk, float compute
    left_in_float: dict[str, str] = field(default_factory=dict)  # node -> why


def name_nodes(model: onnx.ModelProto) -> None:
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


def gemm_to_matmul(model: onnx.ModelProto) -> list[str]:
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


def select_nodes(model: onnx.ModelProto, config: Any, where: str) -> tuple[dict[str, list[str]], Plan]:
    """The plan: which nodes are quantized how (dynamic/static products, int8 embeddings, weight-only), the
    reason for every node left in float, and the MatMul groups sharing an input; RecipeError for patterns that
    match nothing."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    plan = Plan()
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


def matmul_groups(model: onnx.ModelProto, names: list[str]) -> dict[str, list[str]]:
    """Quantizable MatMul nodes grouped by their activation input (Q, K and V share one)."""
    wanted = set(names)
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.name in wanted:
            groups.setdefault(node.input[0], []).append(node.name)
    return groups


def reasons_summary(reasons: dict[str, str]) -> str:
    """Why nodes were left in float, counted by reason, for a message."""
    if not reasons:
        return "the graph has no such node"
    items = list(reasons.items())
    return "; ".join(f"{k}: {v}" for k, v in items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
