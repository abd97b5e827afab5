"""int8 ONNX artifacts and the CPU families they are built for (issue #14): the `targets` and `strict` keys, pair-safe
weights, per-target rows and gates in the evaluator, the CPU in the report, and `compress pack` refusing a bundle
for a family the artifact was not quantized for. Real digits MLP, real ONNX Runtime sessions; nothing here
depends on which CPU runs it."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from compressor.cpu import TARGETS, machine_cpu
from compressor.errors import RecipeError
from compressor.export.int8_arith import risky_pairs
from compressor.export.int8_emulate import products
from compressor.recipe import load_recipe

from conftest import run_cli

RECIPE = """\
name: mlp-int8
model: {{source: zoo, name: digits-mlp}}
passes:
  - quantize: {{mode: dynamic, min_elements: 64, calibration: {{limit: 128}}{extra}}}
export:
  onnx: {{}}
evaluate:
  data: digits
  speed: {{batch_sizes: [64], rounds: 2, calls: 1, load_runs: 0}}
gates:
  max_accuracy_drop: 2.0
  min_fidelity: {fidelity}
"""


def _run(tmp_path: Path, extra: str = "", fidelity: str = "0.99", name: str = "r"):
    (tmp_path / f"{name}.yaml").write_text(RECIPE.format(extra=extra, fidelity=fidelity))
    out = tmp_path / name
    proc = run_cli("run", str(tmp_path / f"{name}.yaml"), "-o", str(out), "--quiet")
    return proc, out


@pytest.fixture(scope="module")
def default_targets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8-targets")
    proc, out = _run(tmp)
    assert proc.returncode == 0, proc.stderr
    return proc, out


def test_default_targets_give_pair_safe_weights_identical_on_every_family(default_targets):
    proc, out = default_targets
    quant = json.loads((out / "manifest.json").read_text())["onnx"]["quantization"]
    assert quant["targets"] == list(TARGETS)
    assert "identical on every target" in quant["arithmetic"] and "pair-safe" in quant["weights"]
    by_target = quant["fidelity_on_calibration"]["by_target"]
    assert set(by_target) == set(TARGETS) and len({f["min"] for f in by_target.values()}) == 1
    assert quant["fidelity_on_calibration"]["reached"] is True
    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found = products(model)
    assert found and all(len(risky_pairs(inits[p.weight])[0]) == 0 for p in found)


def test_report_names_the_cpu_and_gives_every_target_a_row_and_its_gates(default_targets):
    proc, out = default_targets
    report = json.loads((out / "report.json").read_text())
    here = machine_cpu()
    assert report["machine"]["cpu"] == here["model"] and report["machine"]["cpu_flags"] == here["flags"]
    assert report["machine"]["cpu_target"] == here["target"]
    onnx_rows = [r for r in report["results"] if r["format"] == "onnx"]
    assert sorted(r["target"] for r in onnx_rows) == sorted(TARGETS)
    measured = [r for r in onnx_rows if not r.get("emulated")]
    assert len(measured) == 1 and measured[0]["target"] == here["target"] and measured[0]["latency"]
    for row in onnx_rows:  # pair-safe: every family computes the same integers
        assert row["fidelity"]["cos_min"] == pytest.approx(measured[0]["fidelity"]["cos_min"], abs=1e-6)
        assert row["accuracy"]["value"] == measured[0]["accuracy"]["value"]
    fidelity_gates = [g for g in report["gates"] if g["gate"] == "min_fidelity" and g["format"] == "onnx"]
    assert sorted(g["target"] for g in fidelity_gates) == sorted(TARGETS)
    md = (out / "report.md").read_text()
    assert "emulated" in md and here["model"] in md and "int8 target" in md
    assert "worst of 3 targets" in proc.stdout


def test_gates_and_bundles_follow_the_targets_the_artifact_was_quantized_for(tmp_path):
    """Quantized for x86-vnni and arm64 only: weights need not be pair-safe, a gate narrowed to x86-avx2 has nothing
    to judge (an error, exit 3), and `compress pack` refuses an x86-64 bundle (it may land on AVX2) but builds an
    ARM64 one, recording the families and their evaluated numbers."""
    proc, out = _run(tmp_path, extra=", targets: [x86-vnni, arm64]", fidelity="{value: 0.99, target: x86-avx2}")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    gate = [g for g in report["gates"] if g["gate"] == "min_fidelity"]
    assert len(gate) == 1 and gate[0]["status"] == "error" and "quantized for x86-avx2" in gate[0]["message"]
    quant = json.loads((out / "manifest.json").read_text())["onnx"]["quantization"]
    assert quant["targets"] == ["x86-vnni", "arm64"] and "exact" in quant["arithmetic"]
    # One row per declared target (measured where this CPU is one, emulated otherwise); an AVX2 CPU's own row is
    # measured but promises nothing for them.
    assert sorted(r["target"] for r in report["results"] if r.get("target")) == ["arm64", "x86-vnni"]
    refused = run_cli("pack", str(out), "-o", str(tmp_path / "b.zip"))
    assert refused.returncode == 2 and "x86-avx2" in refused.stderr and "targets" in refused.stderr
    assert not (tmp_path / "b.zip").exists()
    ok = run_cli("pack", str(out), "--target", "cpu-arm64", "-o", str(tmp_path / "arm.zip"))
    assert ok.returncode == 0, ok.stderr
    with zipfile.ZipFile(tmp_path / "arm.zip") as z:
        body = json.loads(z.read(next(n for n in z.namelist() if n.endswith("bundle.json"))))
    assert body["int8_cpu_families"]["families"] == ["arm64"]
    assert body["int8_cpu_families"]["evaluation"]["arm64"]["cos_min"] > 0.9


def test_unreached_target_fidelity_is_flagged_and_strict_fails_without_writing(tmp_path):
    proc, out = _run(tmp_path, extra=", smooth: off, target_fidelity: 1.0, max_float: 0", fidelity="0.9")
    assert proc.returncode == 0, proc.stderr
    assert "target_fidelity 1.0 NOT reached" in proc.stdout
    assert json.loads((out / "report.json").read_text())["int8"]["reached"] is False
    strict, out2 = _run(tmp_path, extra=", smooth: off, target_fidelity: 1.0, max_float: 0, strict: true",
                        fidelity="0.9", name="strict")
    assert strict.returncode == 1 and "strict" in strict.stderr and "target_fidelity" in strict.stderr
    assert not out2.exists()


@pytest.mark.parametrize("extra, needle", [
    (", targets: [x86-avx512]", "did you mean 'x86-avx2'? valid values: x86-avx2, x86-vnni, arm64"),
    (", targets: []", "at least 1"),
    (", targets: [arm64, arm64]", "twice"),
    (", strict: true", "set target_fidelity too"),
])
def test_targets_and_strict_are_validated_with_the_recipe(tmp_path, extra, needle):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(extra=extra, fidelity="0.9"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert needle in str(err.value)
    assert "quantize" in str(err.value)


def test_weight_only_takes_no_targets(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - quantize: {targets: [arm64]}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "only apply to mode dynamic or static" in str(err.value)


def test_dynamic_conv_weights_are_made_safe_in_any_pairing_and_keep_accuracy(tmp_path):
    """ConvInteger kernels pack K in their own order: with x86-avx2 among the targets no two same-sign weights of a
    channel may exceed the pair limit together, and the model still classifies digits."""
    import onnxruntime as ort

    from compressor.export.int8_arith import PAIR_LIMIT
    from compressor.zoo import digits_split

    text = ("name: cnn\nmodel: {source: zoo, name: digits-cnn}\npasses:\n  - quantize: {mode: dynamic, "
            "min_elements: 64, smooth: off, calibration: {limit: 128}}\nexport:\n  onnx: {}\n")
    (tmp_path / "cnn.yaml").write_text(text)
    proc = run_cli("run", str(tmp_path / "cnn.yaml"), "-o", str(tmp_path / "cnn"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(tmp_path / "cnn" / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "ConvInteger"]
    assert convs
    for node in convs:
        w = inits[node.input[1]].reshape(inits[node.input[1]].shape[0], -1).astype(int)
        for row in w:
            assert sum(sorted(row[row > 0])[-2:]) <= PAIR_LIMIT and sum(sorted(-row[row < 0])[-2:]) <= PAIR_LIMIT
    _, x_test, _, y_test = digits_split("digits-cnn")
    session = ort.InferenceSession(str(tmp_path / "cnn" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x_test})[0]
    assert (logits.argmax(1) == y_test).mean() >= 0.9


def test_a_target_gate_cannot_name_a_gpu_or_the_safetensors_artifact(tmp_path):
    for extra in ("device: cuda", "format: safetensors"):
        path = tmp_path / "r.yaml"
        path.write_text(RECIPE.format(extra="", fidelity=f"{{value: 0.99, target: arm64, {extra}}}"))
        with pytest.raises(RecipeError) as err:
            load_recipe(path)
        assert "CPU family" in str(err.value)


def test_a_cpu_without_readable_flags_has_no_family():
    assert machine_cpu("processor: 0\nmodel name: Mystery\n")["target"] in (None, "arm64")
