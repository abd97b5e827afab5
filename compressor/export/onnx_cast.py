"""float16 / bfloat16 ONNX: the float32 export of a `cast` model, narrowed after it has been checked against torch.

The cast pass rounds the torch weights to float16/bfloat16. The exporter traces a float32 view of that model (the
rounded weights widened, which is exact), so the float ONNX graph is checked against torch at the usual tight
tolerance; only then is the graph narrowed here:

float16: the whole graph computes in float16 through ONNX Runtime's own converter
(``onnxruntime.transformers.float16``), except the nodes of modules the cast pass kept in float32 (norms, ``keep``)
and the ops ONNX Runtime has no float16 kernel for, which get Casts around them. Float inputs and outputs stay
float32 unless ``float32_io`` is false.

bfloat16: ONNX Runtime's CPU provider has no bfloat16 kernel for Add, MatMul, Gemm, Conv or LayerNormalization, so a
bfloat16 graph would not load on a CPU. The weights are stored in bfloat16 (half the bytes on disk, the same
rounded values as the torch artifact) and each is widened by a Cast to float32 in front of its users: the graph
computes in float32 and exactly reproduces the cast torch weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import CompressorError
from .int8_select import module_name
from .onnx_quant import quiet

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["narrow_onnx", "MIN_NARROWED"]

# Initializers with fewer elements stay float32: a Cast node per scalar constant would cost more than it saves.
MIN_NARROWED = 256


def narrow_onnx(model: onnx.ModelProto, dtype: str, *, float32_io: bool, kept_modules: list[str]) -> tuple[
        onnx.ModelProto, dict[str, Any]]:
    """Narrow the float32 ``model`` (exported from a cast model) to ``dtype``; returns it with a report.

    ``kept_modules``: torch module names the cast pass kept in float32; their nodes stay float32 in the graph."""
    if dtype == "float16":
        return _float16(model, float32_io, kept_modules)
    if dtype == "bfloat16":
        return _bfloat16_storage(model)
    raise CompressorError(f"cannot narrow an ONNX model to {dtype!r}; float16 or bfloat16")


def _under(name: str, roots: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _float16(model: onnx.ModelProto, float32_io: bool, kept_modules: list[str]) -> tuple[onnx.ModelProto, dict]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = [n.name for n in model.graph.node if n.name and _under(module_name(n.name), kept_modules)]
    before = _float_bytes(model)
    # The converter warns per clamped value through its own logger; the report says what matters.
    with quiet("onnxruntime.transformers.float16"):
        try:
            narrowed = convert_float_to_float16(model, keep_io_types=float32_io, node_block_list=blocked,
                                                disable_shape_infer=False)
        except Exception as exc:  # noqa: BLE001 - any converter failure is this run's error, with its cause
            raise CompressorError(f"ONNX Runtime's float16 converter failed on this graph: "
                                  f"{type(exc).__name__}: {exc}") from exc
    _unique_node_names(narrowed.graph)
    round_trips = _drop_round_trips(narrowed.graph, set(blocked))
    ops = {n.op_type for n in model.graph.node}
    report = {
        "dtype": "float16",
        "compute": "float16",
        "io": "float32" if float32_io else "float16",
        "converter": "onnxruntime.transformers.float16",
        "nodes_kept_float32": len(blocked),
        "ops_without_float16_kernels": sorted(ops & set(DEFAULT_OP_BLOCK_LIST)),
        "float_bytes": {"before": before, "after": _float_bytes(narrowed)},
    }
    if round_trips:  # recorded where it happened (graphs without any stay byte-identical to earlier versions')
        report["float16_round_trips_removed"] = round_trips
    return narrowed, report


def _drop_round_trips(graph: Any, blocked: set[str]) -> int:
    """Repair what the converter does between two nodes kept in float32: it casts the first one's output to float16
    and back before the second reads it, so every intermediate of a kept module passes through float16 anyway. A
    Llama RMSNorm's mean of squares (the residual stream squared, over 65,504 once it exceeds 256) becomes inf there,
    and the model's output garbage. Each float32 -> float16 -> float32 round trip whose source a kept node computed
    is bypassed (its consumers read the float32 tensor itself) and casts nobody reads are removed. Returns how many
    round trips were bypassed."""
    from onnx import TensorProto

    def to(node: Any) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None)

    float32 = {o for n in graph.node if n.name in blocked for o in n.output}
    float32 |= {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    bypass = {}
    for node in graph.node:
        src = producer.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if src is not None and src.op_type == "Cast" and to(node) == TensorProto.FLOAT and \
                to(src) == TensorProto.FLOAT16 and src.input[0] in float32 and node.output[0] not in outputs:
            bypass[node.output[0]] = src.input[0]
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in bypass:
                node.input[k] = bypass[name]
    while True:  # casts whose output nobody reads any more
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in read for o in n.output)]
        if not dead:
            return len(bypass)
        for node in dead:
            graph.node.remove(node)


def _unique_node_names(graph: Any) -> None:
    """Repair what the converter does to a tensor with two float32 consumers (a Llama RMSNorm's input): it inserts
    one Cast per consumer, both named after the tensor and both defining the same output, which ONNX Runtime
    refuses. The copies compute the same thing: keep the first. Then give every node a name of its own (names carry
    no meaning in the computation)."""
    defined: dict[str, bytes] = {}
    keep = []
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        if any(out in defined for out in node.output):
            if all(defined.get(out) == key for out in node.output):
                continue  # an exact copy of a node already there
            raise CompressorError(f"the float16 converter made two different nodes define {list(node.output)}")
        defined.update((out, key) for out in node.output)
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    taken = {node.name for node in graph.node}
    seen: set[str] = set()
    for node in graph.node:
        if node.name and node.name in seen:  # unnamed nodes are valid ONNX and stay unnamed
            base, k = node.name, 1
            while f"{base}_{k}" in taken:
                k += 1
            node.name = f"{base}_{k}"
            taken.add(node.name)
        seen.add(node.name)


def _bfloat16_storage(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    import ml_dtypes
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    before = _float_bytes(model)
    narrowed = 0
    widen: list[Any] = []
    for index, init in enumerate(graph.initializer):
        if init.data_type != TensorProto.FLOAT or _numel(init) < MIN_NARROWED:
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(ml_dtypes.bfloat16)
        # Only tensors the cast pass rounded are exactly representable; the ones it kept in float32 (norms, `keep`)
        # and constants the exporter made are not, and stay as they are.
        if not np.array_equal(half.astype(np.float32), values, equal_nan=True):
            continue
        name = init.name  # `init` is the message CopyFrom overwrites
        stored = f"{name}.bf16"
        graph.initializer[index].CopyFrom(numpy_helper.from_array(half, stored))
        widen.append(helper.make_node("Cast", [stored], [name], name=f"/widen/{name}", to=TensorProto.FLOAT))
        narrowed += 1
    # Topological order: the Casts read only initializers, so they go first.
    nodes = widen + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    report = {
        "dtype": "bfloat16",
        "compute": "float32",
        "io": "float32",
        "why_float32_compute": "ONNX Runtime's CPU provider has no bfloat16 Add/MatMul/Gemm/Conv/LayerNormalization "
                               "kernels; weights are stored in bfloat16 and widened by a Cast on load",
        "initializers_narrowed": narrowed,
        "float_bytes": {"before": before, "after": _float_bytes(model)},
    }
    return model, report


def _numel(init: Any) -> int:
    n = 1
    for d in init.dims:
        n *= d
    return n


def _float_bytes(model: onnx.ModelProto) -> int:
    from onnx import TensorProto

    size = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8}
    return sum(_numel(i) * size[i.data_type] for i in model.graph.initializer if i.data_type in size)
