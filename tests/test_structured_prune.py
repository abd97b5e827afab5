"""Structured neuron pruning (`prune: {pattern: neurons}`): groups found from the architecture, layers physically
shrunk, the artifact reloaded at the new sizes and exported to ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import compressor
from compressor import zoo
from compressor.passes.base import Context, get_pass
from compressor.passes.structured import neuron_groups
from compressor.pipeline import run_recipe
from compressor.recipe import load_recipe
from compressor.sources.zoo import load_zoo

from conftest import run_cli


def _prune(model, **config):
    cls = get_pass("prune")
    return cls(cls.Config(**config), index=0)(model, Context(seed=0))


def test_mlp_groups_are_found_by_tracing():
    groups = neuron_groups(load_zoo("digits-mlp").module)
    assert [(g.producers, g.consumer, g.width) for g in groups] == [(["fc1"], "fc2", 300), (["fc2"], "fc3", 100)]


def test_bert_ffn_groups_are_found_by_name():
    groups = neuron_groups(load_zoo("minilm").module)
    assert len(groups) == 6
    assert groups[0].producers == ["encoder.layer.0.intermediate.dense"]
    assert groups[0].consumer == "encoder.layer.0.output.dense" and groups[0].width == 1536


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
def test_neurons_shrink_both_layers_and_keep_the_kept_neurons_exactly(importance):
    model = load_zoo("digits-mlp")
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    report = _prune(model, pattern="neurons", sparsity=0.25, importance=importance)
    m = model.module
    assert (m.fc1.out_features, m.fc2.in_features, m.fc2.out_features, m.fc3.in_features) == (225, 225, 75, 75)
    assert m.fc1.weight.shape == (225, 64) and m.fc1.bias.shape == (225,) and m.fc2.weight.shape == (75, 225)
    # Every kept row of fc1 is an original row, unchanged, and fc2's columns follow the same neurons.
    rows = [int((before["fc1.weight"] == r).all(dim=1).nonzero()[0]) for r in m.fc1.weight]
    assert rows == sorted(rows) and len(set(rows)) == 225
    assert torch.equal(m.fc2.weight, before["fc2.weight"][:, rows][[
        int((before["fc2.weight"][:, rows] == r).all(dim=1).nonzero()[0]) for r in m.fc2.weight]])
    assert report.details["neurons_removed"] == 75 + 25
    assert report.details["parameters_after"] == model.numel() < 50_610
    assert model.resized == {"fc1": {"in_features": 64, "out_features": 225},
                             "fc2": {"in_features": 225, "out_features": 75},
                             "fc3": {"in_features": 75, "out_features": 10}}
    assert zoo.digits_accuracy(m, "digits-mlp") > 90


def test_activation_ranking_beats_magnitude_on_minilm_hidden_states():
    """Measured on the example inputs: removing a quarter of the FFN neurons by activation moves the output less."""
    errors = {}
    base = load_zoo("minilm")
    inputs = base.example_inputs
    with torch.no_grad():
        ref = base.module(**inputs).last_hidden_state
    for importance in ("activation", "magnitude"):
        model = load_zoo("minilm")
        _prune(model, pattern="neurons", sparsity=0.25, importance=importance)
        with torch.no_grad():
            out = model.module(**inputs).last_hidden_state
        errors[importance] = float((out - ref).pow(2).mean() / ref.pow(2).mean())
    assert errors["activation"] < errors["magnitude"]


def test_pruned_artifact_reloads_at_its_sizes_and_exports_to_onnx(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: n\nmodel: {source: zoo, name: digits-mlp}\npasses:\n"
                      "  - prune: {pattern: neurons, sparsity: 0.5}\n  - recover: {steps: 50, lr: 1.0e-3}\n"
                      "export: {onnx: {}}\n")
    out = tmp_path / "n"
    run_recipe(load_recipe(recipe), out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["resized"]["fc2"] == {"in_features": 150, "out_features": 50}
    assert manifest["model"]["parameters"] == 64 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10
    loaded = compressor.load(out)
    assert loaded.fc1.out_features == 150 and loaded.fc3.in_features == 50
    _, x_test, _, _ = zoo.digits_split("digits-mlp")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = loaded(torch.from_numpy(x_test[:37])).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x_test[:37]})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_neurons_refuse_models_without_groups_and_encoded_layers(tmp_path):
    recipe = tmp_path / "r.yaml"
    # The CNN's fc1 -> fc2 is a group, but a module pattern matching no group is refused before any work.
    recipe.write_text("name: n\nmodel: {source: zoo, name: digits-cnn}\npasses:\n"
                      "  - prune: {pattern: neurons, sparsity: 0.5, modules: [conv1]}\n")
    proc = run_cli("run", str(recipe), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and "match no neuron group" in proc.stderr and "r.yaml" in proc.stderr
    assert not (tmp_path / "out").exists()
    recipe.write_text("name: n\nmodel: {source: zoo, name: digits-mlp}\npasses:\n"
                      "  - prune: {pattern: neurons, sparsity: 0.5, scope: global}\n")
    proc = run_cli("validate", str(recipe))
    assert proc.returncode == 2 and "scope must be layer" in proc.stderr
