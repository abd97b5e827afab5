"""dtype bridges of a cast model: the loaded model follows a conversion of its tensors (``model.float()``,
``.half()``, ``.bfloat16()``), and still copies and pickles."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch

import compressor
from compressor.pipeline import run_recipe
from compressor.recipe import load_recipe


@pytest.fixture(scope="module")
def cast_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer Llama (real transformers modules, seed 0) cast to float16 by `compress run`, RMSNorms kept in
    float32 (the pass's default) so that the model holds both dtypes and bridges between them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bridges")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(root / "src")
    recipe = root / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{source: hf, path: {root / 'src'}, auto_class: AutoModelForCausalLM}}\n"
                      "passes:\n  - cast: {dtype: float16}\n")
    run_recipe(load_recipe(recipe), root / "art")
    return root / "art"


IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 2]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


def test_a_cast_model_converted_to_float32_computes_its_weights_in_float32(cast_llama):
    from transformers import AutoModelForCausalLM

    model = compressor.load(cast_llama)
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float16
    assert _logits(model).dtype == torch.float16
    widened = _logits(model.float())  # failed before: the bridges still handed the layers float16
    assert widened.dtype == torch.float32
    # transformers reads the same float16 weights into float32 and computes everything in float32
    reference = AutoModelForCausalLM.from_pretrained(str(cast_llama), torch_dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = reference(input_ids=IDS).logits
    torch.testing.assert_close(widened, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_cast_model_converted_whole_to_a_narrow_dtype_runs_in_it(cast_llama, dtype):
    model = compressor.load(cast_llama).to(dtype)  # its float32 norms too
    assert model.model.norm.weight.dtype == dtype
    logits = _logits(model)
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_a_copy_follows_its_own_tensors_and_the_model_pickles(cast_llama):
    model = compressor.load(cast_llama)
    before = _logits(model)
    widened = copy.deepcopy(model).float()
    assert _logits(widened).dtype == torch.float32
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)  # the original still runs in float16
    again = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(_logits(again), before, rtol=0, atol=0)
    assert _logits(again.float()).dtype == torch.float32


@pytest.fixture(scope="module")
def cast_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer GPT-2 cast to float16, its LayerNorms kept in float32: unlike Llama's RMSNorm, F.layer_norm
    refuses an input whose dtype differs from its weight's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("bridges-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(
        root / "src")
    recipe = root / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{source: hf, path: {root / 'src'}, auto_class: AutoModelForCausalLM}}\n"
                      "passes:\n  - cast: {dtype: float16}\n")
    run_recipe(load_recipe(recipe), root / "art")
    return root / "art"


@pytest.mark.parametrize("convert", ["half", "float", "bfloat16"])
def test_a_cast_model_with_layer_norms_converts_whole(cast_gpt2, convert):
    model = compressor.load(cast_gpt2)
    assert model.transformer.ln_f.weight.dtype == torch.float32
    logits = _logits(getattr(model, convert)())  # each failed: the bridges kept running LayerNorms in float32
    expected = {"half": torch.float16, "float": torch.float32, "bfloat16": torch.bfloat16}[convert]
    assert model.transformer.ln_f.weight.dtype == expected and logits.dtype == expected
    assert torch.isfinite(logits).all()
