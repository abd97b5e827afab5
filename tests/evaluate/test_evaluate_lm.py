"""Evaluation of causal language models: perplexity, next-token agreement, KL, greedy continuations, time to first
token and decoding speed, baseline and artifacts side by side, and the language-model gates. Real models (the zoo
LM, trained once per session; GPT-2 and Llama of small configs) in torch and real ONNX Runtime sessions."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from compressor.log import Reporter

QUICK = {"generation": {"max_tokens": 1024, "prompts": 4, "prompt_tokens": 16, "new_tokens": 8,
                        "prompt_lengths": [32], "decode_batch_sizes": [1, 2], "decode_tokens": 4},
         "speed": {"rounds": 1, "warmup": 0, "load_runs": 0}}


def _quick_yaml(indent: str = "  ") -> str:
    g = QUICK["generation"]
    return (f"{indent}generation: {{max_tokens: {g['max_tokens']}, prompts: 4, prompt_tokens: 16, new_tokens: 8, "
            "prompt_lengths: [32], decode_batch_sizes: [1, 2], decode_tokens: 4}\n"
            f"{indent}speed: {{rounds: 1, warmup: 0, load_runs: 0}}\n")


def test_a_float_onnx_decoder_scores_as_the_model_and_the_report_shows_every_figure(tiny_lm_onnx, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.evaluate import evaluate_artifact
    from compressor.evaluate.subjects import source_subject
    from compressor.recipe import EvaluateSpec
    from compressor.tinylm import EOS, held_out_texts, perplexity, tiny_lm_path

    artifact = tmp_path / "art"
    shutil.copytree(tiny_lm_onnx.out_dir, artifact)  # the reports are written into it
    baseline = source_subject({"source": "zoo", "name": "tiny-lm"}, tmp_path)
    report = evaluate_artifact(artifact, baseline=baseline, spec=EvaluateSpec.model_validate(QUICK),
                               log=Reporter(quiet=True))
    rows = {(r.role, r.format): r for r in report.results}
    base, onnx = rows[("baseline", "source")].lm, rows[("artifact", "onnx")].lm
    # The baseline's perplexity is the model's own on the same 1,024 held-out tokens, computed independently.
    tok = AutoTokenizer.from_pretrained(tiny_lm_path())
    stream = [t for text in held_out_texts() for t in tok(text)["input_ids"] + [tok.convert_tokens_to_ids(EOS)]]
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path()).eval()
    expected = perplexity(model, torch.tensor(stream[:1025]), 128)
    assert base["tokens"] == 1024
    assert math.isclose(base["perplexity"], expected, rel_tol=1e-5)
    assert math.isclose(onnx["perplexity"], expected, rel_tol=1e-4)
    assert onnx["token_agreement"] == 100.0 and onnx["kl_mean"] < 1e-6
    assert onnx["greedy"]["exact"] == onnx["greedy"]["prompts"] == 4 and onnx["greedy"]["new_tokens"] == 8
    assert [e["prompt_tokens"] for e in onnx["ttft"]] == [32]
    assert [e["batch_size"] for e in onnx["decode"]] == [1, 2] and all(e["median"] > 0 for e in onnx["decode"])
    assert rows[("artifact", "onnx")].ratios["decode_speedup"] > 0
    assert report.data["metric"] == "next_token_top1"
    md = (artifact / "report.md").read_text()
    for needle in ("## Language model", "Time to first token", "Decoding with the KV cache", "4/4"):
        assert needle in md
    assert json.loads((artifact / "report.json").read_text())["results"][0]["lm"]["tokens"] == 1024


def test_language_model_gates_exit_3_when_missed_and_a_text_file_is_the_evaluation_text(tmp_path: Path, tiny_lm):
    (tmp_path / "text.txt").write_text("\n\n".join(
        ["The quick brown fox jumps over the lazy dog, and then it returns to the forest to sleep."] * 8
        + ["Python is a programming language that lets you work quickly and integrate systems effectively."] * 8))
    (tmp_path / "recipe.yaml").write_text(
        "name: lm-gates\nmodel: {source: zoo, name: tiny-lm}\npasses:\n  - quantize: {mode: weight-only}\n"
        "export: {onnx: {}}\nevaluate:\n  data: text.txt\n"
        + _quick_yaml().replace("max_tokens: 1024", "max_tokens: 256")
        + "gates:\n  max_perplexity_increase: 5\n  min_token_agreement: 100\n  min_decode_speedup: 1000\n"
        "  min_compression: {value: 3.0, format: onnx}\n")
    result = run_cli("run", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "out"))
    assert result.returncode == 3, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["data"]["name"].startswith("text.txt")
    status = {(g["gate"], g["format"]): g["status"] for g in report["gates"]}
    assert status[("max_perplexity_increase", "onnx")] == "passed"
    assert status[("min_compression", "onnx")] == "passed"  # int8 weights in the ONNX graph too
    assert status[("min_decode_speedup", "onnx")] == "failed"
    assert "min_decode_speedup" in result.stderr and "min_token_agreement" in result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["onnx"]["int8_weights"]["initializers"]) >= 29
    assert manifest["onnx"]["int8_weights"]["check"]["prefill_max_abs_err"] <= 1e-4
    assert "weight-only int8: " in run_cli("inspect", str(tmp_path / "out")).stdout


def test_a_token_agreement_written_as_a_fraction_is_refused_with_the_percentage(tmp_path: Path):
    (tmp_path / "recipe.yaml").write_text("name: x\nmodel: {source: zoo, name: tiny-lm}\n"
                                          "gates:\n  min_token_agreement: 0.95\n")
    result = run_cli("run", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "min_token_agreement" in result.stderr and "write 95" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_small_config_models_are_evaluated_generating(tmp_path: Path, family: str, tiny_lm: Path):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(vocab_size=1024, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    else:
        config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    source = tmp_path / family
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_lm / name, source / name)  # the zoo LM's 1,024-token tokenizer
    (tmp_path / "recipe.yaml").write_text(
        f"name: {family}-lm\nmodel: {{source: hf, path: {family}, auto_class: AutoModelForCausalLM}}\n"
        "passes:\n  - quantize: {mode: weight-only}\nexport: {onnx: {}}\nevaluate:\n  data: calibration-text\n"
        + _quick_yaml() + "gates:\n  max_perplexity_increase: 5\n  min_token_agreement: 80\n")
    result = run_cli("run", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {g["status"] for g in report["gates"]} == {"passed"}
    onnx = next(r for r in report["results"] if r["format"] == "onnx")
    assert onnx["lm"]["greedy"]["prompts"] == 4 and onnx["lm"]["decode"]


def test_prompt_lengths_beyond_the_models_positions_are_refused_before_any_measurement(tiny_lm_onnx, tmp_path):
    from compressor.errors import UsageError
    from compressor.evaluate import evaluate_artifact
    from compressor.evaluate.subjects import source_subject
    from compressor.recipe import EvaluateSpec

    spec = EvaluateSpec.model_validate({**QUICK, "generation": {**QUICK["generation"], "prompt_lengths": [4096]}})
    artifact = tmp_path / "art"
    shutil.copytree(tiny_lm_onnx.out_dir, artifact)
    with pytest.raises(UsageError, match=r"4096 tokens .* 1024 positions"):
        evaluate_artifact(artifact, baseline=source_subject({"source": "zoo", "name": "tiny-lm"}, tmp_path),
                          spec=spec, log=Reporter(quiet=True))
    assert not (artifact / "report.json").exists()


def test_the_sharded_zoo_lm_generates_tensor_parallel_as_it_does_whole(tmp_path: Path, tiny_lm):
    (tmp_path / "recipe.yaml").write_text(
        "name: tiny-lm-tp2\nmodel: {source: zoo, name: tiny-lm}\npasses:\n  - shard: {tensor_parallel: 2}\n"
        "evaluate:\n" + _quick_yaml())
    assert run_cli("run", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "out")).returncode == 0
    proc = run_cli("eval", str(tmp_path / "out"), "--tp", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "greedy continuations: 4/4 identical" in proc.stdout
    report = json.loads((tmp_path / "out" / "tp-report.json").read_text())
    assert report["data"].startswith("held-out-text") and report["fidelity"]["max_abs_err"] <= 1e-4
    assert report["greedy"] == {"prompts": 4, "prompt_tokens": 16, "new_tokens": 8, "exact": 4, "identical": True}


def test_an_artifact_of_another_corpus_is_flagged_before_it_is_compared():
    import io
    from types import SimpleNamespace

    from compressor.evaluate.runner_lm import check_corpus
    from compressor.tinylm import corpus_sha256

    stream = io.StringIO()
    check_corpus(SimpleNamespace(source={"kind": "zoo", "name": "tiny-lm", "corpus_sha256": "0" * 64}),
                 Reporter(stream, force_plain=True))
    assert "another CPython release" in stream.getvalue()
    stream = io.StringIO()
    check_corpus(SimpleNamespace(source={"kind": "zoo", "name": "tiny-lm", "corpus_sha256": corpus_sha256()}),
                 Reporter(stream, force_plain=True))
    assert stream.getvalue() == ""
