"""Weight-only int8 stored as int8 in the ONNX graph (compressor.export.onnx_weights): the rewrite keeps every value
and every name of the graph it is given."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compressor.encodings import Int8
from compressor.export.onnx_weights import int8_weights
from compressor.model import Model


def _model() -> Model:
    """a: 64 -> 32 (random), b: 32 -> 10 (every weight 0.25: the same bytes as its transpose), both on the int8
    grid."""
    torch.manual_seed(0)
    module = nn.Sequential()
    module.a, module.b = nn.Linear(64, 32, bias=False), nn.Linear(32, 10, bias=False)
    encodings = {"a.weight": Int8(), "b.weight": Int8()}
    with torch.no_grad():
        module.b.weight.fill_(0.25)
        for name, enc in encodings.items():
            param = module.get_parameter(name)
            param.copy_(enc.decode(enc.encode(param)))
    return Model(module=module, source={}, example_inputs={"x": torch.ones(2, 64)}, encodings=encodings)


def _graph(model: Model) -> onnx.ModelProto:
    """y = ((x a^T) @ a.weight_scale) b^T: a Gemm with the weight as stored, a user initializer whose name is the
    rewrite's natural choice for a's scales, and b's constant weight as stored."""
    a = model.module.a.weight.detach().numpy()
    b = model.module.b.weight.detach().numpy()
    extra = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "a.weight"], ["h"], transB=1, name="ga"),
             helper.make_node("MatMul", ["h", "a.weight_scale"], ["m"], name="mm"),
             helper.make_node("Gemm", ["m", "b.weight"], ["y"], transB=1, name="gb")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])],
                              [numpy_helper.from_array(a, "a.weight"), numpy_helper.from_array(extra, "a.weight_scale"),
                               numpy_helper.from_array(b, "b.weight")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_a_constant_weight_and_a_name_already_in_the_graph_keep_the_graph_exact():
    model = _model()
    proto = _graph(model)
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    expected = _run(proto, x)
    report = int8_weights(proto, model)
    assert report["initializers"] == {"a.weight": "a.weight", "b.weight": "b.weight"}
    onnx.checker.check_model(proto, full_check=True)
    names = [i.name for i in proto.graph.initializer]
    assert len(names) == len(set(names)) and "a.weight_scale" in names  # the user's tensor kept its name
    types = {i.name: i.data_type for i in proto.graph.initializer}
    assert types["a.weight_int8"] == types["b.weight_int8"] == TensorProto.INT8
    np.testing.assert_array_equal(_run(proto, x), expected)
