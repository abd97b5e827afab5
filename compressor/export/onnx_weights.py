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

__all__ = ["int8_weights", "lowbit_weights"]


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
    fresh = _Names(graph)

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


def _lowbit(model: Model) -> dict[tuple[tuple[int, ...], str], tuple[str, bool, Any]]:
    """{(shape, sha256 of the float32 bytes): (tensor name, transposed?, IntGroup)} of every 4-/8-bit group
    tensor, as stored and transposed (a Linear's weight is a MatMul's transposed initializer)."""
    from ..encodings import IntGroup

    state = model.module.state_dict()
    out: dict[tuple[tuple[int, ...], str], tuple[str, bool, Any]] = {}
    for name, encoding in model.encodings.items():
        if not isinstance(encoding, IntGroup) or name not in state:
            continue
        tensor = state[name].detach().float().cpu().contiguous()
        transposed = tensor.t().contiguous()
        out[(tuple(transposed.shape), _digest(transposed.numpy().tobytes()))] = (name, True, encoding)
        out[(tuple(tensor.shape), _digest(tensor.numpy().tobytes()))] = (name, False, encoding)
    return out


def _block(encoding: Any) -> int:
    """MatMulNBits' block size for ``encoding``: its group size, or for one scale per row the largest power of two
    from 16 to 256 that divides the row (the row's scale is repeated per block: the same values)."""
    if encoding.group_size is not None:
        return int(encoding.group_size)
    cols = encoding.shape[1]
    for size in (256, 128, 64, 32, 16):
        if cols % size == 0:
            return size
    return 0


class _Names:
    """Fresh names in one graph: ``name``, or ``name_2``, ``name_3``... where the graph already has it (a parameter
    called ``weight_scale``), so that nothing added shadows or collides with what is there."""

    def __init__(self, graph: Any) -> None:
        self.taken = ({i.name for i in graph.initializer} | {i.name for i in graph.input}
                      | {o.name for o in graph.output} | {v.name for v in graph.value_info}
                      | {n.name for n in graph.node} | {t for n in graph.node for t in (*n.input, *n.output)})

    def __call__(self, name: str) -> str:
        out, k = name, 1
        while out in self.taken:
            k += 1
            out = f"{name}_{k}"
        self.taken.add(out)
        return out


def lowbit_weights(proto: onnx.ModelProto, model: Model, accuracy_level: int = 0) -> dict[str, Any]:
    """Store every 4-/8-bit group tensor of ``model`` (IntGroup encodings) found among ``proto``'s float32
    initializers as integers (in place): each MatMul that multiplies by it becomes ONNX Runtime's ``MatMulNBits``
    (com.microsoft), which computes from the packed integers; any other consumer (an embedding's Gather) reads it
    through dequantizing nodes from int8 values. Returns the manifest's report."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    wanted = _lowbit(model)
    if not wanted:
        return {}
    graph = proto.graph
    fresh = _Names(graph)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    replaced: dict[str, str] = {}
    matmuls: dict[str, int] = {}
    dequantized: dict[str, str] = {}
    new_inits: list[Any] = []
    head_nodes: list[Any] = []
    drop: set[str] = set()
    saved = 0
    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT or len(init.dims) != 2:
            continue
        array = numpy_helper.to_array(init)
        hit = wanted.get((tuple(array.shape), _digest(np.ascontiguousarray(array, dtype=np.float32).tobytes())))
        if hit is None:
            continue
        name, transposed, encoding = hit
        users = consumers.get(init.name, [])
        nbits = [(n, i) for n, i in users if transposed and _block(encoding) and n.op_type == "MatMul" and i == 1
                 and n.domain in ("", "ai.onnx")]
        others = [(n, i) for n, i in users if (n, i) not in nbits]
        if nbits:
            size = _as_matmul_nbits(init.name, encoding, [n for n, _ in nbits], accuracy_level, fresh, new_inits)
            matmuls[init.name] = len(nbits)
            saved += array.nbytes - size
        if others:
            size = _as_dequantized(init.name, encoding, transposed, fresh, new_inits, head_nodes)
            dequantized[init.name] = "dequantized from int8 (" + ", ".join(sorted({n.op_type for n, _ in others})) + ")"
            saved += array.nbytes - size
        drop.add(init.name)
        replaced[init.name] = name
    kept = [i for i in graph.initializer if i.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    for node in reversed(head_nodes):  # before every consumer: the graph's nodes stay in topological order
        graph.node.insert(0, node)
    if matmuls and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"initializers": dict(sorted(replaced.items())), "matmul_nbits": dict(sorted(matmuls.items())),
            "dequantized": dict(sorted(dequantized.items())), "accuracy_level": accuracy_level,
            "bytes_saved": int(saved)}


def _numpy_integers(encoding: Any) -> tuple[Any, Any, Any]:
    """(q int16, scale float32, zero int16 or None) of an IntGroup encoding, rows x columns / rows x groups."""
    import numpy as np

    q, scale, zero = encoding.integers(encoding.encode_parts())
    return (q.numpy().astype(np.int16), scale.float().numpy(),
            None if zero is None else zero.numpy().astype(np.int16))


def _nibbles(u: Any) -> Any:
    """Unsigned 4-bit values (rows x even columns) packed two per byte, the first in the low nibble."""
    import numpy as np

    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def _as_matmul_nbits(init: str, encoding: Any, nodes: list[Any], accuracy_level: int, fresh: _Names,
                     new_inits: list[Any]) -> int:
    """Turn each MatMul in ``nodes`` (multiplying by initializer ``init``, W^T) into MatMulNBits over the packed
    integers of ``encoding``; the new initializers go to ``new_inits``. Returns their size in bytes."""
    import numpy as np
    from onnx import helper, numpy_helper

    q, scale, zero = _numpy_integers(encoding)
    rows, cols = encoding.shape
    bits, block = encoding.bits, _block(encoding)
    blocks = cols // block
    # One scale per block: a per-row scale (or a group smaller than the block, never made here) repeats.
    block_scale = scale if scale.shape[1] == blocks else np.repeat(scale, blocks // scale.shape[1], axis=1)
    offset = 1 << (bits - 1)
    u = (q + offset).astype(np.uint8)
    packed = _nibbles(u) if bits == 4 else u
    b_name, s_name = fresh(init + f"_q{bits}"), fresh(init + "_scales")
    new_inits += [numpy_helper.from_array(packed.reshape(rows, blocks, block * bits // 8), b_name),
                  numpy_helper.from_array(block_scale.astype(np.float32).reshape(-1), s_name)]
    inputs = ["", b_name, s_name]
    size = packed.nbytes + block_scale.size * 4
    if zero is not None:
        zb = np.repeat(zero, blocks // zero.shape[1], axis=1) if zero.shape[1] != blocks else zero
        zu = (zb + offset).astype(np.uint8)
        if bits == 4:
            zu = _nibbles(np.pad(zu, ((0, 0), (0, zu.shape[1] % 2))))
        z_name = fresh(init + "_zero_points")
        new_inits.append(numpy_helper.from_array(zu.reshape(-1), z_name))
        inputs.append(z_name)
        size += zu.nbytes
    for node in nodes:
        attrs = {"K": cols, "N": rows, "bits": bits, "block_size": block, "accuracy_level": accuracy_level}
        inputs[0] = node.input[0]
        replacement = helper.make_node("MatMulNBits", list(inputs), list(node.output),
                                       name=node.name or fresh(init + "/matmul_nbits"), domain="com.microsoft",
                                       **attrs)
        node.CopyFrom(replacement)
    return int(size)


def _as_dequantized(init: str, encoding: Any, transposed: bool, fresh: _Names, new_inits: list[Any],
                    head_nodes: list[Any]) -> int:
    """Make ``init`` the output of nodes that dequantize ``encoding``'s int8 values (for consumers other than a
    MatMul, an embedding's Gather). ONNX Runtime folds these constants when the session loads: W = (q - zero) *
    scale per group, transposed back where the graph stores W^T. Returns the stored bytes."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    q, scale, zero = _numpy_integers(encoding)
    rows, cols = encoding.shape
    groups = scale.shape[1]
    q_name, s_name = fresh(init + "_int8"), fresh(init + "_group_scales")
    new_inits += [numpy_helper.from_array(q.astype(np.int8).reshape(rows, groups, -1), q_name),
                  numpy_helper.from_array(scale.reshape(rows, groups, 1).astype(np.float32), s_name)]
    cast, shape_name = fresh(init + "_int8_float"), fresh(init + "_shape")
    new_inits.append(numpy_helper.from_array(np.array([rows, cols], dtype=np.int64), shape_name))
    head_nodes.append(helper.make_node("Cast", [q_name], [cast], name=fresh(init + "/cast"), to=TensorProto.FLOAT))
    value = cast
    if zero is not None:
        z_name, centred = fresh(init + "_group_zeros"), fresh(init + "_centred")
        new_inits.append(numpy_helper.from_array(zero.reshape(rows, groups, 1).astype(np.float32), z_name))
        head_nodes.append(helper.make_node("Sub", [value, z_name], [centred], name=fresh(init + "/sub")))
        value = centred
    scaled, flat = fresh(init + "_scaled"), fresh(init + "_rows") if transposed else init
    head_nodes += [helper.make_node("Mul", [value, s_name], [scaled], name=fresh(init + "/mul")),
                   helper.make_node("Reshape", [scaled, shape_name], [flat], name=fresh(init + "/reshape"))]
    if transposed:
        head_nodes.append(helper.make_node("Transpose", [flat], [init], name=fresh(init + "/t"), perm=[1, 0]))
    return int(q.size + scale.size * 4 + (0 if zero is None else zero.size * 4))
