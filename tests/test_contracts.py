"""The typed records between layers (docs/architecture.md, "The contracts between layers"): the export plan a pass
fills for the exporters, the manifest, and the evaluation report. Each is validated where it is written and where
it is read; a damaged file is refused naming the key that is wrong, and keys a newer compressor adds survive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor.errors import ArtifactError
from compressor.manifest import MANIFEST, Manifest, read_manifest
from compressor.report_format import REPORT_VERSION, Report, read_report

DIGITS_CAST = """\
name: digits-contract
model: {source: zoo, name: digits-mlp}
passes:
  - prune: {sparsity: 0.5}
  - cast: {dtype: float16}
export: {onnx: {}}
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory):
    """A digits MLP pruned to half and cast to float16, exported to safetensors and ONNX (in-process)."""
    from compressor.log import Reporter
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    root = tmp_path_factory.mktemp("contract")
    (root / "recipe.yaml").write_text(DIGITS_CAST)
    return run_recipe(load_recipe(root / "recipe.yaml"), root / "out", Reporter(quiet=True))


def test_the_manifest_written_is_the_manifest_read_back(artifact):
    on_disk = json.loads((artifact.out_dir / MANIFEST).read_text())
    assert isinstance(artifact.manifest, Manifest)
    assert artifact.manifest.to_json() == on_disk
    again = read_manifest(artifact.out_dir)
    assert again == artifact.manifest
    # The export plan reached the exporter: the ONNX model was narrowed by the cast pass's plan.
    assert again.onnx is not None and again.onnx.cast is not None
    assert list(on_disk) == ["format", "format_version", "name", "description", "recipe", "source", "task",
                             "versions", "passes", "model", "onnx", "files"]
    assert again.model.encodings["fc1.weight"]["kind"] == "cast"
    assert set(again.model.weights) <= set(again.files)


def _passes_applied(text: str):
    from compressor.log import Reporter
    from compressor.passes import Context, get_pass
    from compressor.recipe import parse_recipe
    from compressor.sources import load_source

    recipe = parse_recipe("name: plan\nmodel: {source: zoo, name: digits-mlp}\nexport: {onnx: {}}\n" + text)
    model = load_source(recipe.model, recipe.base_dir, recipe.seed)
    assert model.export.onnx_cast is model.export.onnx_quantize is model.export.tensor_parallel is None
    ctx = Context(seed=0, log=Reporter(quiet=True), base_dir=Path.cwd())
    for step in recipe.steps:
        get_pass(step.name)(step.config, step.index)(model, ctx)
    return model


def test_the_export_plan_is_filled_by_the_passes_that_hand_work_to_the_exporter():
    import torch

    from compressor.model import CastPlan, QuantizePlan

    model = _passes_applied("passes:\n  - prune: {sparsity: 0.5}\n  - cast: {dtype: bfloat16}\n")
    assert model.export.onnx_cast == CastPlan(index=1, dtype="bfloat16", float32_io=True, kept_modules=[])
    assert model.export.onnx_quantize is None and model.export.tensor_parallel is None
    assert model.module.fc1.weight.dtype == torch.bfloat16

    model = _passes_applied("passes:\n  - quantize: {mode: dynamic}\n")
    assert isinstance(model.export.onnx_quantize, QuantizePlan) and model.export.onnx_quantize.index == 0
    assert model.export.onnx_quantize.config.mode == "dynamic"
    assert model.export.onnx_cast is None
    assert model.module.fc1.weight.dtype == torch.float32  # int8 compute happens in the ONNX model only


def _damage(artifact_dir: Path, tmp_path: Path, change) -> Path:
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(artifact_dir, copy)
    data = json.loads((copy / MANIFEST).read_text())
    change(data)
    (copy / MANIFEST).write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize("change, key", [
    (lambda m: m["model"].update(weights="model.safetensors"), "model.weights"),
    (lambda m: m.pop("model"), "model"),
    (lambda m: m["files"]["model.safetensors"].update(bytes=True), "files.model.safetensors.bytes"),
    (lambda m: m["files"]["model.safetensors"].update(bytes=-1), "files.model.safetensors.bytes"),
    (lambda m: m["model"].update(pruned_heads={"fc1": "all"}), "model.pruned_heads.fc1"),
    (lambda m: m["onnx"].update(files=None), "onnx.files"),
    (lambda m: m["model"].update(resized={"fc1": {"out_features": "16"}}), "model.resized.fc1.out_features"),
    (lambda m: m["passes"][0].update(bytes_before="a"), "passes.0.bytes_before"),
])
def test_a_damaged_manifest_is_refused_naming_the_key(artifact, tmp_path, change, key):
    import compressor

    damaged = _damage(artifact.out_dir, tmp_path, change)
    with pytest.raises(ArtifactError, match=f"manifest.json: {key.replace('.', '[.]')}: .*the manifest is damaged"):
        read_manifest(damaged)
    with pytest.raises(ArtifactError, match=key.replace(".", "[.]")):
        compressor.load(damaged)


def test_keys_a_newer_compressor_adds_survive_a_read(artifact, tmp_path):
    damaged = _damage(artifact.out_dir, tmp_path, lambda m: (m.update(signed_by="ci"),
                                                             m["model"].update(layout="v2"),
                                                             m["files"]["model.safetensors"].update(mtime=1)))
    manifest = read_manifest(damaged)
    assert manifest.to_json()["signed_by"] == "ci" and manifest.model.to_json()["layout"] == "v2"
    assert manifest.files["model.safetensors"].to_json()["mtime"] == 1


def test_the_report_is_validated_on_write_and_read_back_whole(artifact):
    from compressor.evaluate import evaluate_artifact
    from compressor.evaluate.report import render_markdown
    from compressor.evaluate.subjects import source_subject
    from compressor.log import Reporter
    from compressor.recipe import EvaluateSpec

    report = evaluate_artifact(artifact.out_dir, spec=EvaluateSpec.model_validate({"data": "digits"}),
                               baseline=source_subject({"source": "zoo", "name": "digits-mlp"}, artifact.out_dir),
                               log=Reporter(quiet=True), measure_speed=False)
    try:
        assert isinstance(report, Report) and report.format_version == REPORT_VERSION
        assert [(r.role, r.format) for r in report.results] == [("baseline", "source"), ("artifact", "safetensors"),
                                                                ("artifact", "onnx")]
        again = read_report(artifact.out_dir / "report.json")
        assert again.to_json() == json.loads((artifact.out_dir / "report.json").read_text())
        assert again.results[1].accuracy == report.results[1].accuracy
        # The renderers take the Report or report.json's content alike.
        assert render_markdown(report) == render_markdown(again.to_json())
    finally:
        for name in ("report.json", "report.md", "junit.xml", "report.png"):
            (artifact.out_dir / name).unlink(missing_ok=True)


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    ('{"format": "something-else"}', "not a compressor report"),
    ('{"format": "compressor-report", "format_version": 99}', "reads up to 1"),
    ('{"format": "compressor-report", "format_version": 1, "created": "x"}', "compressor: Field required"),
])
def test_a_damaged_report_is_refused_saying_what_is_wrong(tmp_path, text, message):
    (tmp_path / "report.json").write_text(text)
    with pytest.raises(ArtifactError, match=message):
        read_report(tmp_path / "report.json")
