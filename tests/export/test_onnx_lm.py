"""Causal language models in ONNX with their KV cache: the exporter's check on prefill and decode steps, greedy
continuations that match torch token for token, and GPT-2 and Llama models of small configs through the `hf`
source. Real ONNX Runtime sessions; the zoo LM is trained once per session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torch_greedy

import compressor
from compressor.decoding import OrtDecoder
from compressor.ort import ort_session
from compressor.tinylm import held_out_texts


def _prompts(tokenizer, count: int = 8, length: int = 16) -> torch.Tensor:
    """``count`` held-out prompts of ``length`` tokens each."""
    rows = [tokenizer(text)["input_ids"][:length] for text in held_out_texts()[1:] if len(text) > 200][:count]
    return torch.tensor(rows)


def test_the_exporter_checks_prefill_and_every_decode_step(tiny_lm_onnx):
    manifest = tiny_lm_onnx.manifest
    assert manifest.source["corpus_sha256"] and manifest.task == "text-generation"
    check = manifest.onnx.check
    assert check["decode_steps"] >= 4 and len(check["decode_max_abs_err"]) == check["decode_steps"]
    assert check["prefill_max_abs_err"] <= 1e-4 and max(check["decode_max_abs_err"]) <= 1e-4
    inputs = manifest.onnx.inputs
    assert {"input_ids", "attention_mask", "position_ids"} <= set(inputs)
    assert any(n.startswith("past_key_values.") for n in inputs)


def test_greedy_continuations_of_held_out_prompts_match_torch_token_for_token(tiny_lm_onnx):
    from transformers import AutoTokenizer

    out = tiny_lm_onnx.out_dir
    module = compressor.load(out)
    prompts = _prompts(AutoTokenizer.from_pretrained(out))
    assert prompts.shape == (8, 16)
    decoder = OrtDecoder(ort_session(out / "model.onnx"))
    expected = torch_greedy(module, prompts, 32).numpy()
    got = decoder.generate(prompts.numpy(), None, 32)
    assert got.shape == (8, 32)
    assert (got == expected).all(), f"{int((got != expected).any(axis=1).sum())} of 8 continuations differ"
    # Streaming hands out the same tokens step by step.
    streamed: list[np.ndarray] = []
    decoder.generate(prompts[:1].numpy(), None, 5, on_tokens=streamed.append)
    assert np.stack(streamed, axis=1).tolist() == expected[:1, :5].tolist()


def test_seeded_sampling_is_reproducible_and_stays_in_the_top_k(tiny_lm_onnx):
    from transformers import AutoTokenizer

    out = tiny_lm_onnx.out_dir
    prompts = _prompts(AutoTokenizer.from_pretrained(out), count=2).numpy()
    decoder = OrtDecoder(ort_session(out / "model.onnx"))
    runs = [decoder.generate(prompts, None, 12, rng=np.random.default_rng(7), top_k=5, top_p=0.9, temperature=0.8)
            for _ in range(2)]
    assert (runs[0] == runs[1]).all()
    logits, _ = decoder.step(prompts, np.ones_like(prompts), decoder.empty_past(2))
    top5 = np.argsort(-logits[:, -1], axis=-1)[:, :5]
    assert all(runs[0][r, 0] in top5[r] for r in range(2))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_small_config_models_export_and_generate_through_the_hf_source(tmp_path: Path, family: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from compressor.log import Reporter
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    else:
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    source = tmp_path / family
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    (tmp_path / "recipe.yaml").write_text(
        f"name: {family}-lm\nmodel: {{source: hf, path: {family}, auto_class: AutoModelForCausalLM}}\n"
        "passes:\n  - quantize: {mode: weight-only}\nexport: {onnx: {atol: 1.0e-4, rtol: 0.0}}\n")
    result = run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out", Reporter(quiet=True))
    assert result.manifest.task == "text-generation"
    assert any(e["kind"] == "int8" for e in result.manifest.model.encodings.values())
    module = compressor.load(tmp_path / "out")
    prompts = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(1))
    got = OrtDecoder(ort_session(tmp_path / "out" / "model.onnx")).generate(prompts.numpy(), None, 16)
    assert (got == torch_greedy(module, prompts, 16).numpy()).all()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["onnx"]["check"]["decode_steps"] >= 4


def test_a_float16_decoder_is_checked_against_the_float32_view_step_by_step(tmp_path: Path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from compressor.log import Reporter
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama")
    (tmp_path / "recipe.yaml").write_text(
        "name: llama-fp16\nmodel: {source: hf, path: llama, auto_class: AutoModelForCausalLM}\n"
        "passes:\n  - cast: {dtype: float16}\nexport: {onnx: {}}\n")
    result = run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out", Reporter(quiet=True))
    cast = result.manifest.onnx.cast
    assert cast["check"]["relative"] == 0.01 and len(cast["check"]["decode_max_abs_err"]) >= 4
    decoder = OrtDecoder(ort_session(tmp_path / "out" / "model.onnx"))
    assert cast["compute"] == "float16" and cast["io"] == "float32"
    assert decoder.empty_past(1)[decoder.past_names[0]].dtype == np.float32  # float32_io: the cache too
    assert decoder.generate(np.array([[1, 2, 3, 4]]), None, 8).shape == (1, 8)


def test_int8_onnx_compute_is_refused_for_a_causal_lm_before_any_work(tmp_path: Path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from compressor.errors import RecipeError
    from compressor.log import Reporter
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=2)
                                     ).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "recipe.yaml").write_text(
        "name: gpt2-int8\nmodel: {source: hf, path: gpt2, auto_class: AutoModelForCausalLM}\n"
        "passes:\n  - quantize: {mode: dynamic}\nexport: {onnx: {}}\n")
    with pytest.raises(RecipeError, match=r"(?s)recipe.yaml:4:\d+: passes\[0\].quantize.mode: .*weight-only"):
        run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out", Reporter(quiet=True))
    assert not (tmp_path / "out").exists()


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(tiny_lm_onnx):
    from transformers import AutoTokenizer

    out = tiny_lm_onnx.out_dir
    tok = AutoTokenizer.from_pretrained(out)
    rows = [tok(text)["input_ids"][:length] for text, length in zip(held_out_texts()[1:4], (6, 11, 16))]
    width = max(map(len, rows))
    ids = np.array([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    decoder = OrtDecoder(ort_session(out / "model.onnx"))
    batch = decoder.generate(ids, mask, 12)
    for i, row in enumerate(rows):
        alone = decoder.generate(np.array([row]), None, 12)
        assert (batch[i] == alone[0]).all(), f"row {i} ({len(row)} tokens) differs when left-padded"


def test_a_causal_lm_without_dynamic_axes_is_refused_before_the_passes(tmp_path: Path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from compressor.errors import RecipeError
    from compressor.log import Reporter
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=2)
                                     ).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "recipe.yaml").write_text(
        "name: gpt2-static\nmodel: {source: hf, path: gpt2, auto_class: AutoModelForCausalLM}\n"
        "export: {onnx: {dynamic_axes: false}}\n")
    with pytest.raises(RecipeError, match=r"(?s)recipe.yaml:3:\d+: export.onnx.dynamic_axes: .*KV cache"):
        run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out", Reporter(quiet=True))
    assert not (tmp_path / "out").exists()


def test_the_trained_zoo_lm_narrows_to_float16_with_its_norms_computing_in_float32(tmp_path: Path, tiny_lm):
    """A trained decoder's residual stream exceeds 256, so an RMSNorm's mean of squares overflows float16: the kept
    norm nodes must really compute in float32 (the converter's float16 round trips between them are removed)."""
    from compressor.log import Reporter
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    (tmp_path / "recipe.yaml").write_text("name: tiny-lm-fp16\nmodel: {source: zoo, name: tiny-lm}\n"
                                          "passes:\n  - cast: {dtype: float16}\nexport: {onnx: {}}\n")
    cast = run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out", Reporter(quiet=True)).manifest.onnx.cast
    assert cast["float16_round_trips_removed"] > 0
    assert cast["check"]["prefill_max_abs_err"] < 0.05 and max(cast["check"]["decode_max_abs_err"]) < 0.05
