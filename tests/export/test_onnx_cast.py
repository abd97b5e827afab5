"""float16 / bfloat16 ONNX (issue #4): a `cast` recipe with `export.onnx` writes a narrowed graph that runs in a plain
ONNX Runtime session, keeps float32 inputs and outputs unless told otherwise, and reproduces the cast weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from compressor import zoo
from compressor.evaluate.subjects import OrtModule
from compressor.export.onnx import FLOAT16_TOLERANCE
from compressor.passes.base import Context, get_pass
from compressor.pipeline import run_recipe
from compressor.recipe import load_recipe
from compressor.sources.zoo import load_zoo
from compressor.zoo import digits_split

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, text: str, name: str = "r") -> tuple[Path, dict]:
    (tmp_path / f"{name}.yaml").write_text(text)
    out = tmp_path / name
    run_recipe(load_recipe(tmp_path / f"{name}.yaml"), out)
    return out, json.loads((out / "manifest.json").read_text())


def _recipe(model: str, cast: str) -> str:
    return f"name: n\nmodel: {{source: zoo, name: {model}}}\npasses:\n  - cast: {cast}\nexport: {{onnx: {{}}}}\n"


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _inits(path: Path) -> dict[str, int]:
    """Initializer name -> ONNX data type, without reading the weights."""
    return {i.name: i.data_type for i in onnx.load(str(path), load_external_data=False).graph.initializer}


def _float32_reference(model_name: str, dtype: torch.dtype, x: np.ndarray) -> np.ndarray:
    """The zoo model with its weights rounded to ``dtype`` and computed in float32: what the narrowed graph
    must reproduce."""
    module = zoo.digits_model(model_name)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).float())
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("model", ["digits-mlp", "digits-cnn"])
def test_float16_onnx_runs_with_float32_io_at_any_batch_and_keeps_accuracy(tmp_path, model):
    out, manifest = _run(tmp_path, _recipe(model, "{dtype: float16}"))
    path = out / "model.onnx"
    session = _session(path)
    assert [i.type for i in session.get_inputs()] == ["tensor(float)"]
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"]
    # Every weight matrix is stored in float16: the data file is about half the float32 weights.
    inits = _inits(path)
    assert inits and all(t == TensorProto.FLOAT16 for n, t in inits.items() if n.endswith("weight")), inits
    report = manifest["onnx"]["cast"]
    assert report["dtype"] == "float16" and report["compute"] == "float16" and report["io"] == "float32"
    assert report["float_bytes"]["after"] * 2 == report["float_bytes"]["before"]
    # The float32 export of the same weights was checked tightly; the narrowed one within its own limit.
    assert manifest["onnx"]["check"]["max_abs_err"]["logits"] < 1e-4
    check = report["check"]
    assert check["max_abs_err"]["logits"] <= FLOAT16_TOLERANCE * check["max_abs_value"]["logits"]

    _, x_test, _, y_test = digits_split(model)
    name = session.get_inputs()[0].name
    for batch in (1, 37):
        assert session.run(None, {name: x_test[:batch]})[0].shape == (batch, 10)
    logits = session.run(None, {name: x_test})[0]
    reference = _float32_reference(model, torch.float16, x_test)
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.995
    assert (logits.argmax(1) == y_test).mean() >= 0.9


def test_float16_io_graph_takes_and_gives_float16_and_the_evaluator_feeds_it(tmp_path):
    out, manifest = _run(tmp_path, _recipe("digits-mlp", "{dtype: float16, float32_io: false}"))
    session = _session(out / "model.onnx")
    assert [i.type for i in session.get_inputs()] == ["tensor(float16)"]
    assert [o.type for o in session.get_outputs()] == ["tensor(float16)"]
    assert manifest["onnx"]["cast"]["io"] == "float16"
    _, x_test, _, y_test = digits_split("digits-mlp")
    # OrtModule (what `compress eval` runs) is called with the float32 tensors the torch model takes.
    logits = OrtModule(out / "model.onnx")(**{session.get_inputs()[0].name: torch.from_numpy(x_test)}).logits
    assert logits.dtype == torch.float16
    assert (logits.float().argmax(1).numpy() == y_test).mean() >= 0.9


def test_kept_modules_stay_float32_in_the_float16_graph(tmp_path):
    out, manifest = _run(tmp_path, _recipe("digits-mlp", "{dtype: float16, keep: [fc3]}"))
    inits = _inits(out / "model.onnx")
    assert inits["fc3.weight"] == TensorProto.FLOAT and inits["fc1.weight"] == TensorProto.FLOAT16
    assert manifest["onnx"]["cast"]["nodes_kept_float32"] >= 1
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert any(n.name.startswith("/fc3/") for n in graph.node)


def test_bfloat16_onnx_stores_bfloat16_and_reproduces_the_cast_weights_in_float32(tmp_path):
    out, manifest = _run(tmp_path, _recipe("digits-cnn", "{dtype: bfloat16, keep: [fc2]}"))
    path = out / "model.onnx"
    inits = _inits(path)
    assert inits["fc1.weight.bf16"] == TensorProto.BFLOAT16 and inits["conv2.weight.bf16"] == TensorProto.BFLOAT16
    assert inits["fc2.weight"] == TensorProto.FLOAT  # kept by the recipe: not bfloat16-exact, left alone
    report = manifest["onnx"]["cast"]
    assert report["compute"] == "float32" and report["io"] == "float32" and report["initializers_narrowed"] >= 2
    assert report["check"]["max_abs_err"]["logits"] < 1e-4
    session = _session(path)
    _, x_test, _, _ = digits_split("digits-cnn")
    got = session.run(None, {session.get_inputs()[0].name: x_test[:37]})[0]
    # fc2 stays float32 in both; everything else is the bfloat16 grid computed in float32.
    module = zoo.digits_model("digits-cnn")
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("fc2."):
                p.copy_(p.to(torch.bfloat16).float())
        expected = module(torch.from_numpy(x_test[:37])).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_float32_view_widens_exactly_and_restores_dtypes_and_bridges():
    model = load_zoo("digits-mlp")
    cast = get_pass("cast")
    cast(cast.Config(dtype="float16", keep=["fc3"]), index=0).apply(model, Context())
    (x,) = model.example_inputs.values()
    with torch.no_grad():
        before = model.module(x)
        weight = model.module.fc1.weight.detach().clone()
        with model.float32_view() as module:
            assert module.fc1.weight.dtype == torch.float32 and module.fc3.weight.dtype == torch.float32
            assert torch.equal(module.fc1.weight.half(), weight)
            widened = module(x)  # no bridges: float32 in, float32 through
        after = model.module(x)
    assert model.module.fc1.weight.dtype == torch.float16 and torch.equal(model.module.fc1.weight, weight)
    assert torch.equal(before, after)
    assert widened.dtype == torch.float32 and after.dtype == torch.float32
    assert (widened - after).abs().max() < 0.05


@pytest.mark.parametrize(
    "cast, export, message",
    [
        ("{dtype: bfloat16, float32_io: false}", "export: {onnx: {}}", "float32_io false needs dtype float16"),
        ("{dtype: float16, float32_io: false}", "", "this recipe exports no ONNX"),
    ],
)
def test_impossible_io_requests_are_refused_at_validation(tmp_path, cast, export, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: n\nmodel: {{source: zoo, name: digits-mlp}}\npasses:\n  - cast: {cast}\n{export}\n")
    proc = run_cli("validate", str(recipe))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "float32_io" in proc.stderr


def test_minilm_float16_onnx_matches_its_float32_export_on_the_example_inputs(tmp_path):
    text = (ROOT / "recipes" / "minilm-fp16-onnx.yaml").read_text().split("\nevaluate:")[0]
    out, manifest = _run(tmp_path, text, "minilm")
    session = _session(out / "model.onnx")
    assert {i.type for i in session.get_inputs()} == {"tensor(int64)"}
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"]
    report = manifest["onnx"]["cast"]
    assert report["nodes_kept_float32"] >= 13  # every LayerNorm (keep_norms)
    assert report["float_bytes"]["after"] < 0.51 * report["float_bytes"]["before"]
    assert (out / "model.onnx.data").stat().st_size < 0.51 * 90_000_000
    check = report["check"]
    # As close to the float32 graph as the float16 torch model is, or closer.
    assert check["max_abs_err"]["last_hidden_state"] <= max(check["torch_max_abs_err"]["last_hidden_state"], 1e-3)
