"""Weight-only int8 in the ONNX artifact: the weights the `quantize` pass put on an int8 grid (mode weight-only)
are stored in the graph as int8 with their float32 scales, so the ONNX files are as small as the safetensors ones.

Each such initializer ``W`` becomes ``W_int8`` and ``W_scale`` plus two nodes at the top of the graph,
``W = Cast(W_int8, float) * W_scale``, so that every consumer (MatMul, Gemm, Gather, a tied LM head) reads ``W`` as
before. ONNX Runtime folds these constant nodes once when the session loads and then computes in float32 exactly
what torch computes: the pass's effective weight is ``q.float() * scale`` in float32, the same product. The graph
is found by value: an initializer holding exactly the bytes of a quantized weight, or of its transpose (the
exporters store a Linear's weight transposed for MatMul).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from ..model import Model

__all__ = ["int8_weights"]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _quantized(model: Model) -> dict[tuple[tuple[int, ...], str], tuple[str, int, dict[str, Any]]]:
    """{(shape, sha256 of the float32 bytes): (tensor name, axis of the scales, stored int8 form)} of every
    weight-only int8 tensor, as stored (axis 0) and transposed (axis 1). The shape is part of the key: a constant
    (e.g. all-zero) matrix has the same bytes as its transpose, and as any matrix of that many equal values."""
    from ..encodings import Int8

    state = model.module.state_dict()
    out: dict[tuple[tuple[int, ...], str], tuple[str, int, dict[str, Any]]] = {}
    for name, encoding in model.encodings.items():
        if not isinstance(encoding, Int8) or name not in state or state[name].dim() != 2:
            continue
        tensor = state[name].detach().float().cpu().contiguous()
        stored = encoding.encode(tensor)
        transposed = tensor.t().contiguous()
        out[(tuple(transposed.shape), _digest(transposed.numpy().tobytes()))] = (name, 1, stored)
        out[(tuple(tensor.shape), _digest(tensor.numpy().tobytes()))] = (name, 0, stored)  # a square one: as stored
    return out


def int8_weights(proto: onnx.ModelProto, model: Model) -> dict[str, Any]:
    """Store every weight-only int8 tensor of ``model`` found among ``proto``'s float32 initializers as int8 with
    scales (in place); returns the manifest's report: which initializers, and the bytes saved."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    wanted = _quantized(model)
    if not wanted:
        return {"initializers": {}, "bytes_saved": 0}
    nodes, found, saved = [], {}, 0
    graph = proto.graph
    taken = ({i.name for i in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
             | {v.name for v in graph.value_info} | {n.name for n in graph.node}
             | {t for n in graph.node for t in (*n.input, *n.output)})

    def fresh(name: str) -> str:
        """``name``, or ``name_2``, ``name_3``... where the graph already has it (a parameter `weight_scale`)."""
        out, k = name, 1
        while out in taken:
            k += 1
            out = f"{name}_{k}"
        taken.add(out)
        return out

    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or len(init.dims) != 2:
            continue
        array = numpy_helper.to_array(init)
        hit = wanted.get((tuple(array.shape), _digest(np.ascontiguousarray(array, dtype=np.float32).tobytes())))
        if hit is None:
            continue
        name, axis, stored = hit
        q, scale = stored[".__q"].numpy(), stored[".__scale"].float().numpy()
        if axis == 1:
            q = np.ascontiguousarray(q.T)
        # Per channel: one scale per row of the torch weight, a column of the transposed initializer.
        shape = (1, 1) if scale.ndim == 0 else ((-1, 1) if axis == 0 else (1, -1))
        base = init.name
        q_name, scale_name, float_name = fresh(base + "_int8"), fresh(base + "_scale"), fresh(base + "_int8_float")
        init.CopyFrom(numpy_helper.from_array(q, q_name))
        graph.initializer.append(numpy_helper.from_array(scale.reshape(shape), scale_name))
        nodes += [helper.make_node("Cast", [q_name], [float_name], name=fresh(base + "/int8_cast"),
                                   to=TensorProto.FLOAT),
                  helper.make_node("Mul", [float_name, scale_name], [base], name=fresh(base + "/int8_dequantize"))]
        found[base] = name
        saved += array.nbytes - q.nbytes - scale.nbytes
    for node in reversed(nodes):  # before every consumer: the graph's nodes must stay in topological order
        graph.node.insert(0, node)
    return {"initializers": dict(sorted(found.items())), "bytes_saved": int(saved)}
