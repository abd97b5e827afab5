"""int8 ONNX quantization (issue #4): `quantize` modes dynamic and static on real models in real ONNX Runtime
sessions, the graph rewrites it relies on, the fallbacks, and recipe validation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.errors import RecipeError
from compressor.export.int8_select import Plan, gemm_to_matmul, module_name
from compressor.export.int8_smooth import embeddings_per_row, weight_only
from compressor.export.onnx_quant import _culprit
from compressor.recipe import load_recipe
from compressor.zoo import digits_split

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _run(tmp_path: Path, text: str, name: str = "r") -> tuple[Path, dict]:
    (tmp_path / f"{name}.yaml").write_text(text)
    out = tmp_path / name
    proc = run_cli("run", str(tmp_path / f"{name}.yaml"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, json.loads((out / "manifest.json").read_text())


def _digits_accuracy(path: Path, model: str) -> tuple[float, np.ndarray]:
    _, x_test, _, y_test = digits_split(model)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x_test})[0]
    return float((logits.argmax(1) == y_test).mean() * 100), logits


# ------------------------------------------------------------------------------------------- graph rewrites


def _graph(nodes, inputs, outputs, inits):
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                             opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_gemm_becomes_matmul_plus_add_with_the_same_outputs():
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    model = _graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 7])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    x = rng.standard_normal((3, 7)).astype(np.float32)
    before = _session(model).run(None, {"x": x})[0]
    assert gemm_to_matmul(model) == ["fc"]
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add"]
    np.testing.assert_allclose(_session(model).run(None, {"x": x})[0], before, rtol=1e-5, atol=1e-5)


def test_embedding_table_is_int8_per_row_and_decodes_to_its_grid():
    rng = np.random.default_rng(1)
    # Rows of very different magnitude: one scale per row keeps the small rows exact to 1/127 of themselves.
    table = (rng.standard_normal((50, 16)) * np.logspace(-3, 1, 50)[:, None]).astype(np.float32)
    model = _graph([helper.make_node("Gather", ["table", "ids"], ["y"], name="emb")],
                   [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [numpy_helper.from_array(table, "table")])
    embeddings_per_row(model, ["emb"])
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert stored["table_int8"].dtype == np.int8 and stored["table_row_scale"].shape == (50,)
    ids = np.array([[0, 3, 49, 7], [12, 0, 25, 49]], dtype=np.int64)
    got = _session(model).run(None, {"ids": ids})[0]
    expected = stored["table_int8"][ids].astype(np.float32) * stored["table_row_scale"][ids][..., None]
    np.testing.assert_array_equal(got, expected)
    rel = np.abs(got - table[ids]).max(axis=-1) / np.abs(table[ids]).max(axis=-1)
    assert rel.max() <= 0.5 / 127 + 1e-6


def test_weight_only_node_keeps_int8_on_disk_and_computes_in_float():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    model = _graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [numpy_helper.from_array(w, "w")])
    weight_only(model, {"mm": "test"})
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert set(stored) == {"w_int8", "w_col_scale"} and stored["w_int8"].dtype == np.int8
    x = rng.standard_normal((4, 8)).astype(np.float32)
    dequantized = stored["w_int8"].astype(np.float32) * stored["w_col_scale"]
    # Float compute: the product with the dequantized weight, not an int8 product of requantized activations.
    np.testing.assert_allclose(_session(model).run(None, {"x": x})[0], x @ dequantized, rtol=1e-5, atol=1e-5)


def test_an_onnxruntime_error_is_traced_to_the_node_it_names():
    plan = Plan(dynamic=["/layer.1/fc/MatMul", "/layer.10/fc/MatMul"], embeddings=["/emb/Gather"])
    msg = "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for " \
          "MatMulInteger(10) node with name '/layer.10/fc/MatMul_quant'"
    assert _culprit(msg, plan) == "/layer.10/fc/MatMul"
    assert _culprit("out of memory", plan) is None


def test_module_names_of_nodes():
    assert module_name("/encoder/layer.0/output/dense/MatMul") == "encoder.layer.0.output.dense"
    assert module_name("fc1") == "fc1"


# ------------------------------------------------------------------------------------------- real models


MLP_DYNAMIC = """\
name: mlp-int8
model: {source: zoo, name: digits-mlp}
passes:
  - quantize: {mode: dynamic, min_elements: 64}
export:
  onnx: {}
"""


def test_digits_mlp_dynamic_int8_runs_in_onnxruntime_and_keeps_accuracy(tmp_path):
    out, manifest = _run(tmp_path, MLP_DYNAMIC)
    q = manifest["onnx"]["quantization"]
    assert q["mode"] == "dynamic" and q["gemm_rewritten"], q  # torch.onnx writes Linear as Gemm
    assert len(q["nodes_quantized"]) == 3, q
    ops = _ops(out / "model.onnx")
    assert ops["MatMulInteger"] == 3 and ops["DynamicQuantizeLinear"] >= 1, ops
    # The safetensors artifact stays float: int8 compute exists only in ONNX Runtime.
    assert manifest["passes"][0]["tensors_touched"] == 0
    assert manifest["passes"][0]["details"]["applies_to"] == "onnx"
    acc, logits = _digits_accuracy(out / "model.onnx", "digits-mlp")
    fp_out, _ = _run(tmp_path, MLP_DYNAMIC.replace("passes:\n  - quantize: {mode: dynamic, min_elements: 64}\n", ""),
                     name="fp32")
    fp_acc, fp_logits = _digits_accuracy(fp_out / "model.onnx", "digits-mlp")
    assert abs(acc - fp_acc) <= 1.0
    assert (logits.argmax(1) == fp_logits.argmax(1)).mean() >= 0.98
    onnx_bytes = sum((out / f).stat().st_size for f in manifest["onnx"]["files"])
    fp_bytes = sum((fp_out / f).stat().st_size for f in json.loads((fp_out / "manifest.json").read_text())["onnx"]["files"])
    assert fp_bytes / onnx_bytes > 3.0


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_digits_cnn_static_qdq_calibrates_on_the_training_split(tmp_path, method):
    text = f"""\
name: cnn-static
model: {{source: zoo, name: digits-cnn}}
passes:
  - quantize: {{mode: static, method: {method}, min_elements: 64, calibration: {{limit: 96}}}}
export:
  onnx: {{}}
"""
    out, manifest = _run(tmp_path, text)
    q = manifest["onnx"]["quantization"]
    assert "training split" in q["calibration"]["data"] and method in q["activations"]
    ops = _ops(out / "model.onnx")
    assert ops["QuantizeLinear"] >= 1 and ops["DequantizeLinear"] >= 2, ops
    acc, _ = _digits_accuracy(out / "model.onnx", "digits-cnn")
    assert acc >= 90.0
    assert q["fidelity_on_calibration"]["min_cosine"] > 0.9
    assert not list(tmp_path.glob("**/*.onnx.data.tmp")) and not list(Path("/tmp").glob("compress-int8-*"))


def test_target_fidelity_moves_matrix_products_to_float_within_max_float(tmp_path):
    text = MLP_DYNAMIC.replace("min_elements: 64}", "min_elements: 64, smooth: off, target_fidelity: 1.0, max_float: 0.7}")
    out, manifest = _run(tmp_path, text)
    q = manifest["onnx"]["quantization"]
    moved = q["fidelity_on_calibration"]["moved_to_float"]
    assert 1 <= len(moved) <= 2  # 0.7 of 3 quantizable nodes
    assert set(moved) == set(q["float_compute_int8_weights"])
    assert not set(moved) & set(q["nodes_quantized"])
    # Float compute, int8 storage: the moved weights are int8 initializers feeding a Cast.
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    int8 = {i.name for i in model.graph.initializer if i.data_type == TensorProto.INT8}
    assert any(n.op_type == "Cast" and n.input[0] in int8 for n in model.graph.node)


def test_exclude_leaves_nodes_in_float_and_says_why(tmp_path):
    text = MLP_DYNAMIC.replace("min_elements: 64}", "min_elements: 64, exclude: [fc3]}")
    _, manifest = _run(tmp_path, text)
    q = manifest["onnx"]["quantization"]
    assert any("excluded by 'fc3'" in why for why in q["left_in_float"].values()), q["left_in_float"]
    assert len(q["nodes_quantized"]) == 2


def test_exclude_pattern_matching_no_node_is_a_recipe_error(tmp_path):
    (tmp_path / "r.yaml").write_text(MLP_DYNAMIC.replace("min_elements: 64}", "min_elements: 64, exclude: [nope*]}"))
    proc = run_cli("run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert "nope*" in proc.stderr and "match no node" in proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("passes, export, needle", [
    ("{mode: dynamic}", "", "exports no ONNX"),
    ("{mode: weight-only, smooth: 0.5}", "", "only apply to mode dynamic or static"),
    ("{mode: dynamic, method: entropy}", "export: {onnx: {}}", "only mode static"),
    ("{mode: static, smooth: 1.5}", "export: {onnx: {}}", "(0, 1]"),
    ("{mode: static, calibration: nope}", "export: {onnx: {}}", "not a built-in data set"),
])
def test_recipe_validation(tmp_path, passes, export, needle):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\nmodel: {{source: zoo, name: digits-mlp}}\npasses:\n  - quantize: {passes}\n{export}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert needle in str(err.value)


def test_shipped_int8_onnx_recipe_validates_and_calibrates_apart_from_evaluation():
    recipe = load_recipe(ROOT / "recipes" / "minilm-int8-onnx.yaml")
    (step,) = recipe.steps
    assert step.config.mode == "dynamic" and recipe.export.onnx is not None
    assert recipe.evaluate.data.builtin == "text-pairs"
    assert step.config.calibration.builtin in (None, "calibration-text")
    texts = (ROOT / "compressor" / "data" / "calibration_texts.jsonl").read_text().splitlines()
    pairs = (ROOT / "compressor" / "data" / "text_pairs.jsonl").read_text()
    assert len(texts) == 256 and not any(json.loads(t)["text"] in pairs for t in texts)


def test_a_zero_output_is_not_a_perfect_match():
    from compressor.export.int8_search import row_cosines

    got = row_cosines([np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])], [np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])])
    assert got.tolist() == [0.0, 1.0]


def test_tied_weights_are_left_alone():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 6)).astype(np.float32)
    model = _graph([helper.make_node("Gemm", ["x", "w"], ["h"], name="a", transB=1),
                    helper.make_node("Gemm", ["h", "w"], ["y"], name="b", transB=1)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [numpy_helper.from_array(w, "w")])
    x = rng.standard_normal((2, 6)).astype(np.float32)
    before = _session(model).run(None, {"x": x})[0]
    assert gemm_to_matmul(model) == []  # transposing a shared weight would change the other reader
    np.testing.assert_array_equal(_session(model).run(None, {"x": x})[0], before)
