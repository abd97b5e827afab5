"""Structured neuron pruning (`prune: {pattern: neurons}`): groups found from the architecture, layers physically
shrunk, the artifact reloaded at the new sizes and exported to ONNX."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch

import compressor
from compressor import zoo
from compressor.passes.base import Context, get_pass
from compressor.passes.structured import head_groups, neuron_groups
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
    extra = {"reconstruct": False} if importance == "activation" else {}
    report = _prune(model, pattern="neurons", sparsity=0.25, importance=importance, **extra)
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


@pytest.mark.parametrize("pattern", ["neurons", "heads"])
def test_reconstruction_refits_the_consumer_to_its_original_output(pattern):
    """Refitting the consumer by least squares on the calibration activations moves the hidden states (on other
    inputs than it was fitted on) less than removing the same units alone."""
    base = load_zoo("minilm")
    inputs = base.example_inputs
    real = inputs["attention_mask"].bool()  # padding positions are not what the model is for
    with torch.no_grad():
        ref = base.module(**inputs).last_hidden_state[real]
    errors = {}
    for reconstruct in (False, True):
        model = load_zoo("minilm")
        report = _prune(model, pattern=pattern, sparsity=0.25, reconstruct=reconstruct)
        assert report.details["reconstructed"] is reconstruct
        with torch.no_grad():
            out = model.module(**inputs).last_hidden_state[real]
        errors[reconstruct] = float((out - ref).pow(2).mean() / ref.pow(2).mean())
    # Measured: neurons 0.264 -> 0.130, heads 0.088 -> 0.079 (heads gain less away from the fitting data).
    assert errors[True] < (0.6 if pattern == "neurons" else 0.95) * errors[False]


def test_reconstruct_needs_activation_importance():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="reconstruct refits layers"):
        get_pass("prune").Config(pattern="neurons", sparsity=0.25, importance="magnitude", reconstruct=True)


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
    # The CNN has groups, but a module pattern matching none of them is refused before any work.
    recipe.write_text("name: n\nmodel: {source: zoo, name: digits-cnn}\npasses:\n"
                      "  - prune: {pattern: neurons, sparsity: 0.5, modules: [conv9]}\n")
    proc = run_cli("run", str(recipe), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and "match no neuron group" in proc.stderr and "r.yaml" in proc.stderr
    assert not (tmp_path / "out").exists()
    recipe.write_text("name: n\nmodel: {source: zoo, name: digits-mlp}\npasses:\n"
                      "  - prune: {pattern: neurons, sparsity: 0.5, scope: global}\n")
    proc = run_cli("validate", str(recipe))
    assert proc.returncode == 2 and "scope must be layer" in proc.stderr


def test_cnn_channel_groups_are_found_by_tracing_through_pooling_and_flatten():
    groups = neuron_groups(load_zoo("digits-cnn").module)
    # conv2's 32 channels reach fc1 through relu, max_pool2d and flatten(1): each owns 4*4 consecutive columns.
    assert [(g.producers, g.consumer, g.width, g.span) for g in groups] == [
        (["conv1"], "conv2", 16, 1), (["conv2"], "fc1", 32, 16), (["fc1"], "fc2", 64, 1)]


def test_bert_attention_head_groups_are_found():
    groups = head_groups(load_zoo("minilm").module)
    assert len(groups) == 6 and groups[0].attention == "encoder.layer.0.attention"
    assert groups[0].consumer == "encoder.layer.0.attention.output.dense" and (groups[0].width, groups[0].span) == (
        12, 32)
    assert head_groups(load_zoo("digits-mlp").module) == []


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
def test_heads_whose_output_is_zero_go_first_and_the_output_does_not_move(importance):
    """A head whose output-projection columns are zero contributes nothing: it ranks last by either measure, and
    removing it (with its query/key/value rows) leaves the model's output unchanged."""
    model = load_zoo("minilm")
    dense = model.module.encoder.layer[2].attention.output.dense
    with torch.no_grad():
        dense.weight[:, 3 * 32:4 * 32] = 0
        dense.weight[:, 7 * 32:8 * 32] = 0
        ref = model.module(**model.example_inputs).last_hidden_state
    before = model.numel()
    report = _prune(model, pattern="heads", sparsity=0.17, modules=["encoder.layer.2.*"], importance=importance)
    attention = model.module.encoder.layer[2].attention
    assert sorted(attention.pruned_heads) == [3, 7] and attention.self.num_attention_heads == 10
    assert attention.self.query.out_features == 320 and attention.output.dense.in_features == 320
    assert model.pruned_heads == {"encoder.layer.2.attention": [3, 7]}
    assert report.details["heads_removed"] == 2 and before - model.numel() == 2 * (3 * (32 * 384 + 32) + 32 * 384)
    with torch.no_grad():
        out = model.module(**model.example_inputs).last_hidden_state
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_a_second_head_pruning_counts_in_original_head_indices():
    model = load_zoo("minilm")
    _prune(model, pattern="heads", sparsity=0.25, modules=["encoder.layer.0.*"])
    first = model.pruned_heads["encoder.layer.0.attention"]
    _prune(model, pattern="heads", sparsity=0.34, modules=["encoder.layer.0.*"])  # 3 of the 9 left
    second = model.pruned_heads["encoder.layer.0.attention"]
    assert len(first) == 3 and len(second) == 6 and set(first) < set(second) and max(second) < 12
    assert model.module.encoder.layer[0].attention.self.num_attention_heads == 6


def test_head_pruned_artifact_reloads_and_matches_its_onnx_export(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: h\nmodel: {source: zoo, name: minilm}\npasses:\n"
                      "  - prune: {pattern: heads, sparsity: 0.25, importance: magnitude}\n"
                      "  - prune: {pattern: neurons, sparsity: 0.25, importance: magnitude}\nexport: {onnx: {}}\n")
    out = tmp_path / "h"
    result = run_recipe(load_recipe(recipe), out)
    heads = result.manifest.model.pruned_heads
    assert len(heads) == 6 and all(len(v) == 3 for v in heads.values())
    loaded = compressor.load(out)
    assert all(layer.attention.self.num_attention_heads == 9 for layer in loaded.encoder.layer)
    assert loaded.encoder.layer[0].intermediate.dense.out_features == 1152
    from safetensors.torch import load_file

    inputs = load_file(out / "example_inputs.safetensors")
    with torch.no_grad():
        expected = loaded(**inputs).last_hidden_state.numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["last_hidden_state"], {i.name: inputs[i.name].numpy() for i in session.get_inputs()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_heads_are_refused_for_models_without_attention(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: n\nmodel: {source: zoo, name: digits-mlp}\npasses:\n"
                      "  - prune: {pattern: heads, sparsity: 0.5}\n")
    proc = run_cli("run", str(recipe), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and "found no head groups" in proc.stderr and "prune_heads" in proc.stderr
    assert not (tmp_path / "out").exists()


_CONV_BN = textwrap.dedent("""\
    import torch
    from torch import nn


    class ConvBN(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
            self.head = nn.Linear(6 * 2 * 2, 4)
            with torch.no_grad():  # trained-looking statistics, and two channels conv2 ignores
                self.bn1.running_mean.uniform_(-1, 1)
                self.bn1.running_var.uniform_(0.5, 2)
                self.bn1.weight.uniform_(0.5, 1.5)
                self.conv2.weight[:, 2] = 0
                self.conv2.weight[:, 5] = 0

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = nn.functional.avg_pool2d(torch.relu(self.conv2(x)), 2)
            return self.head(torch.flatten(x, 1))


    def build():
        return ConvBN()
    """)


def test_conv_channels_shrink_batch_norm_and_reload_exactly(tmp_path):
    """Channels of conv1 that conv2 ignores are removed first, with their batch-norm statistics; the output is
    unchanged, and the artifact reloads at the new sizes and matches its ONNX export."""
    (tmp_path / "convbn.py").write_text(_CONV_BN)
    (tmp_path / "r.yaml").write_text(textwrap.dedent("""\
        name: c
        model:
          source: python
          factory: convbn:build
          inputs: {x: {shape: [5, 3, 4, 4]}}
        passes:
          - prune: {pattern: neurons, sparsity: 0.25, modules: [conv1], importance: magnitude}
        export: {onnx: {}}
        """))
    out = tmp_path / "c"
    result = run_recipe(load_recipe(tmp_path / "r.yaml"), out)
    resized = result.manifest.model.resized
    assert resized == {"conv1": {"in_channels": 3, "out_channels": 6}, "bn1": {"num_features": 6},
                       "conv2": {"in_channels": 6, "out_channels": 6}}
    loaded = compressor.load(out)
    assert loaded.bn1.running_mean.shape == (6,) and loaded.conv2.weight.shape == (6, 6, 3, 3)
    import importlib.util

    spec = importlib.util.spec_from_file_location("convbn_ref", tmp_path / "convbn.py")
    ref_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_module)
    original = ref_module.build().eval()
    x = torch.randn(7, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = original(x), loaded(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected.numpy(), atol=1e-4, rtol=1e-4)


def test_cnn_channel_pruning_keeps_accuracy_after_recovery(tmp_path):
    model = load_zoo("digits-cnn")
    base = zoo.digits_accuracy(model.module, "digits-cnn")
    report = _prune(model, pattern="neurons", sparsity=0.5, modules=["conv1", "conv2"])
    assert (model.module.conv1.out_channels, model.module.conv2.out_channels, model.module.fc1.in_features) == (
        8, 16, 256)
    assert report.details["parameters_after"] < 0.6 * report.details["parameters_before"]
    cls = get_pass("recover")
    cls(cls.Config(steps=100, lr=1e-3), index=1)(model, Context(seed=0, original=load_zoo("digits-cnn").module))
    assert zoo.digits_accuracy(model.module, "digits-cnn") >= base - 2


def test_a_module_called_twice_forms_no_group():
    """Weights shared across two calls: shrinking fc1 for one call would break the other, so no group uses it."""
    from torch import nn

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 2)

        def forward(self, x):
            h = self.fc2(torch.relu(self.fc1(x)))
            h = self.fc2(torch.relu(self.fc1(h)))
            return self.head(torch.relu(self.fc3(h)))

    groups = neuron_groups(Twice())
    assert [(g.producers, g.consumer) for g in groups] == [(["fc3"], "head")]
