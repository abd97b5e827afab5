"""compressor.sources.hf.read_config: the config transformers' AutoConfig.from_pretrained gives, read faster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor.sources.hf import read_config

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "bert": transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                    pruned_heads={1: [0, 2]}, id2label={0: "no", 1: "yes"}),
    "llama": transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
                                      rope_scaling={"rope_type": "linear", "factor": 2.0}, dtype="bfloat16"),
    "gpt2": transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, architectures=["GPT2LMHeadModel"]),
    "t5": transformers.T5Config(d_model=32, num_layers=2, num_heads=4, d_ff=64),
}


def _same(config_dir: Path) -> None:
    ours = read_config(config_dir)
    theirs = transformers.AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    assert type(ours) is type(theirs)
    assert ours.to_dict() == theirs.to_dict()
    assert ours.to_json_string(use_diff=True) == theirs.to_json_string(use_diff=True)
    assert ours.name_or_path == theirs.name_or_path == str(config_dir)
    assert ours._attn_implementation == theirs._attn_implementation
    assert getattr(ours, "pruned_heads", None) == getattr(theirs, "pruned_heads", None)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_read_config_gives_what_from_pretrained_gives(kind: str, tmp_path: Path) -> None:
    CONFIGS[kind].save_pretrained(tmp_path)
    _same(tmp_path)
    if kind == "bert":  # layer numbers again, not the file's strings
        assert read_config(tmp_path).pruned_heads == {1: [0, 2]}


def test_read_config_of_the_zoo_models() -> None:
    from compressor.zoo import minilm_path

    _same(minilm_path())


def test_what_from_pretrained_treats_specially_goes_through_it(tmp_path: Path) -> None:
    CONFIGS["gpt2"].save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "model_type": "no-such-model"}))
    with pytest.raises(ValueError, match="no-such-model"):  # transformers' own message
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OSError):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**data, "auto_map": {"AutoConfig": "x.Config"}}))
    _same(tmp_path)  # transformers' own class, remote code not trusted


def test_a_mistral_config_with_layer_types_is_read_as_transformers_reads_it(tmp_path: Path) -> None:
    """AutoConfig reads it as a Ministral config (alternating sliding windows): read_config leaves it to AutoConfig."""
    config = transformers.MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64)
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "layer_types": ["full_attention"] * 2}))
    _same(tmp_path)
