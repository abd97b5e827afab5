"""The `quantize` pass, weight-only int8 (issue #4): exact storage, size and fidelity on real models."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compressor
from compressor.encodings import Int8
from compressor.errors import RecipeError
from compressor.safetensors_io import read_header
from compressor.log import Reporter
from compressor.pipeline import run_recipe
from compressor.recipe import parse_recipe

MLP = """\
name: q
model: {source: zoo, name: digits-mlp}
passes:
  - quantize: {}
"""


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), per_channel=st.booleans(), seed=st.integers(0, 2**31),
       scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]), zero_row=st.booleans())
def test_int8_effective_tensors_round_trip_exactly(rows, cols, per_channel, seed, scale, zero_row):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * scale
    if zero_row:
        w[0] = 0
    enc = Int8(per_channel=per_channel)
    stored = enc.encode(w)
    assert stored[".__q"].dtype == torch.int8 and stored[".__scale"].dtype == torch.float32
    assert stored[".__scale"].shape == ((rows,) if per_channel else ())
    effective = enc.decode(stored)
    # The effective tensor is on the int8 grid: encoding it again gives back the same bits.
    again = enc.encode(effective)
    assert torch.equal(enc.decode(again), effective)
    assert torch.equal(again[".__q"], stored[".__q"])
    # Symmetric rounding: at most half a step from the original in every row.
    step = stored[".__scale"].reshape(-1, 1) if per_channel else stored[".__scale"]
    assert bool(((effective - w).abs() <= step / 2 * (1 + 1e-5) + 1e-30).all())


def test_digits_mlp_stores_int8_and_scales_and_loads_to_the_same_model(tmp_path):
    recipe = parse_recipe(MLP)
    out = tmp_path / "q"
    result = run_recipe(recipe, out, Reporter(quiet=True))
    header, _ = read_header(out / "model.safetensors")
    assert header["fc1.weight.__q"]["dtype"] == "I8" and header["fc1.weight.__q"]["shape"] == [300, 64]
    assert header["fc1.weight.__scale"]["dtype"] == "F32" and header["fc1.weight.__scale"]["shape"] == [300]
    assert header["fc1.bias"]["dtype"] == "F32"  # biases are not quantized
    manifest = result.manifest.to_json()
    assert manifest["model"]["encodings"]["fc1.weight"] == {"kind": "int8", "per_channel": True}
    (report,) = manifest["passes"]
    assert report["details"]["tensors_quantized"] == 2
    assert "fc3.weight" in report["details"]["left_in_float"]  # 1000 elements < min_elements
    assert report["bytes_before"] / report["bytes_after"] > 3.5

    model = compressor.load(out, verify_hashes=True)
    from compressor.zoo import digits_accuracy, digits_model

    original = digits_model("digits-mlp")
    assert model.fc1.weight.dtype == torch.float32
    assert abs(digits_accuracy(model, "digits-mlp") - digits_accuracy(original, "digits-mlp")) <= 1.0
    for name in ("fc1", "fc2", "fc3"):
        w, q = getattr(original, name).weight, getattr(model, name).weight
        step = (w.abs().amax(dim=1, keepdim=True) / 127)
        assert bool(((q - w).abs() <= step / 2 + 1e-7).all()), name


def test_minilm_weight_only_int8_is_3_5x_smaller_at_cosine_0_999(tmp_path):
    recipe = parse_recipe("name: m\nmodel: {source: zoo, name: minilm}\npasses:\n  - quantize: {}\n")
    out = tmp_path / "m"
    run_recipe(recipe, out, Reporter(quiet=True))
    from transformers import AutoModel, AutoTokenizer

    from compressor.data.datasets import builtin_text_pairs
    from compressor.zoo import minilm_path

    size = (out / "model.safetensors").stat().st_size
    original_size = (minilm_path() / "model.safetensors").stat().st_size
    assert original_size / size >= 3.5

    texts = [r["passage"] for r in builtin_text_pairs()[:48]] + [r["query"] for r in builtin_text_pairs()[:48]]
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    reference = AutoModel.from_pretrained(str(minilm_path())).eval()
    quantized = compressor.load(out)

    def pooled(model):
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    cos = torch.nn.functional.cosine_similarity(pooled(reference), pooled(quantized), dim=1)
    assert float(cos.min()) >= 0.999


def test_exclude_keeps_modules_in_float_and_must_match(tmp_path):
    recipe = parse_recipe(MLP.replace("quantize: {}", "quantize: {exclude: [fc2]}"))
    result = run_recipe(recipe, tmp_path / "q", Reporter(quiet=True))
    assert set(result.manifest.model.encodings) == {"fc1.weight"}
    with pytest.raises(RecipeError, match="'nope' match no module"):
        run_recipe(parse_recipe(MLP.replace("quantize: {}", "quantize: {exclude: [nope]}")), tmp_path / "r",
                   Reporter(quiet=True))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("passes", ["[{cast: {}}, {quantize: {}}]", "[{quantize: {}}, {cast: {}}]",
                                    "[{quantize: {}}, {quantize: {}}]"])
def test_orders_that_cannot_work_are_refused(passes):
    with pytest.raises(RecipeError) as info:
        parse_recipe(f"name: q\nmodel: {{source: zoo, name: digits-mlp}}\npasses: {passes}\n")
    assert info.value.exit_code == 2 and "passes[1]" in str(info.value)


def test_nothing_to_quantize_is_a_recipe_error(tmp_path):
    recipe = parse_recipe(MLP.replace("quantize: {}", "quantize: {min_elements: 100000000}"))
    with pytest.raises(RecipeError, match="no weight was quantized"):
        run_recipe(recipe, tmp_path / "q", Reporter(quiet=True))


def test_pass_is_listed_with_its_parameters():
    from conftest import run_cli

    proc = run_cli("passes", "--json")
    assert proc.returncode == 0
    data = json.loads(proc.stdout)
    assert {"mode", "per_channel", "modules", "exclude", "min_elements", "smooth", "calibration", "method",
            "percentile", "target_fidelity", "max_float", "targets", "strict", "bits", "group_size", "symmetric",
            "ratio", "activations", "embeddings"} == {
               p["name"] for p in data["quantize"]["parameters"]}


def test_load_can_keep_int8_and_dequantize_on_the_fly(tmp_path):
    out = tmp_path / "q"
    run_recipe(parse_recipe(MLP), out, Reporter(quiet=True))
    dense = compressor.load(out)
    kept = compressor.load(out, int8="keep")
    assert kept.fc1.parametrizations.weight.original.dtype == torch.int8
    assert kept.fc1.weight.dtype == torch.float32 and torch.equal(kept.fc1.weight, dense.fc1.weight)
    assert kept.fc3.weight.dtype == torch.float32 and not hasattr(kept.fc3, "parametrizations")  # left in float
    x = torch.rand(17, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(kept(x=x), dense(x=x))
    held = sum(p.numel() * p.element_size() for p in kept.parameters())
    full = sum(p.numel() * p.element_size() for p in dense.parameters())
    assert full / held > 3
    with pytest.raises(ValueError, match="int8='fast'"):
        compressor.load(out, int8="fast")
