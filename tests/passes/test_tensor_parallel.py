"""Tensor-parallel sharding (`shard` pass): per-rank files, the plan, and real torch.distributed runs (gloo on
CPU, spawned processes) compared with the same artifact loaded whole."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

import compressor
from compressor.errors import UsageError
from compressor.sources.zoo import load_zoo

from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


def _run(recipe: Path, out: Path, cli: bool = False) -> dict:
    """Run a recipe: through `compress run` (``cli``) or in this process (the same pipeline, no start-up cost)."""
    if cli:
        proc = run_cli("run", str(recipe), "-o", str(out))
        assert proc.returncode == 0, proc.stderr
    else:
        from compressor.log import Reporter
        from compressor.pipeline import run_recipe
        from compressor.recipe import load_recipe

        run_recipe(load_recipe(recipe), out, Reporter(quiet=True))
    return json.loads((out / "manifest.json").read_text())


def _eval_tp(out: Path, world: int, *extra: str) -> dict:
    proc = run_cli("eval", str(out), "--tp", str(world), *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"tp {world} (gloo, cpu)" in proc.stdout
    return json.loads((out / "tp-report.json").read_text())


@pytest.fixture(scope="module")
def minilm_tp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tp") / "minilm-tp2"
    _run(ROOT / "recipes" / "minilm-tp2.yaml", out, cli=True)
    return out


def test_minilm_tp2_files_hold_each_rank_its_slices_and_replicated_tensors_once(minilm_tp2):
    manifest = json.loads((minilm_tp2 / "manifest.json").read_text())
    entry = manifest["tensor_parallel"]
    assert entry["world"] == 2 and entry["ranks"] == ["model-tp-rank00-of-02.safetensors",
                                                      "model-tp-rank01-of-02.safetensors"]
    assert entry["bytes_per_rank"][0] == entry["bytes_per_rank"][1] == entry["sharded_bytes"] // 2
    plan = json.loads((minilm_tp2 / "tensor_parallel.json").read_text())
    modules = plan["modules"]
    assert modules["encoder.layer.0.attention.self.query"]["style"] == "colwise"
    assert modules["encoder.layer.0.attention.output.dense"]["style"] == "rowwise"
    assert modules["encoder.layer.3.intermediate.dense"]["style"] == "colwise"
    assert modules["encoder.layer.3.output.dense"]["style"] == "rowwise"
    assert modules["embeddings.word_embeddings"]["style"] == "vocab"
    assert "embeddings.LayerNorm" not in modules  # replicated
    assert plan["attributes"]["encoder.layer.0.attention.self"] == {"num_attention_heads": 6, "all_head_size": 192}
    # Rowwise biases are replicated (added once after the all-reduce); colwise biases are split.
    assert "encoder.layer.0.output.dense.bias" not in plan["tensors"]
    assert plan["tensors"]["encoder.layer.0.intermediate.dense.bias"] == {"dim": 0, "parts": 1, "uneven": False}
    from safetensors import safe_open

    with safe_open(str(minilm_tp2 / "model-tp-rank01-of-02.safetensors"), "pt") as f:
        assert f.get_slice("encoder.layer.0.attention.self.query.weight").get_shape() == [192, 384]
        assert f.get_slice("encoder.layer.0.output.dense.weight").get_shape() == [384, 768]
        assert "encoder.layer.0.output.LayerNorm.weight" not in f.keys()
    with safe_open(str(minilm_tp2 / "model-tp-replicated.safetensors"), "pt") as f:
        assert "encoder.layer.0.output.LayerNorm.weight" in f.keys()
        assert "encoder.layer.0.attention.self.query.weight" not in f.keys()


def test_minilm_tp2_loads_whole_exactly_as_the_source(minilm_tp2):
    whole = compressor.load(minilm_tp2)
    source = load_zoo("minilm")
    for name, tensor in source.module.state_dict().items():
        assert torch.equal(whole.state_dict()[name], tensor), name


def test_minilm_tp2_runs_tensor_parallel_on_gloo_and_matches_the_whole_model(minilm_tp2):
    report = _eval_tp(minilm_tp2, 2, "--limit", "32")
    assert report["passed"] and report["fidelity"]["cos_min"] >= 0.9999
    assert report["metric"]["whole"]["value"] == report["metric"]["tensor_parallel"]["value"]
    for r, rank in enumerate(report["ranks"]):
        # Each rank mapped only its own slices and the replicated file, and its slices are half the split weights.
        assert rank["mapped_files"] == sorted([f"model-tp-rank{r:02d}-of-02.safetensors",
                                               "model-tp-replicated.safetensors"])
        assert rank["maps_only_own_files"] is True and rank["own_file_share"] <= 0.5 + 1e-3


def test_minilm_tp4_matches_the_whole_model_with_an_uneven_vocabulary(tmp_path):
    out = tmp_path / "minilm-tp4"
    manifest = _run(ROOT / "recipes" / "minilm-tp4.yaml", out)
    assert manifest["tensor_parallel"]["world"] == 4
    plan = json.loads((out / "tensor_parallel.json").read_text())
    # 30522 rows over 4 ranks: torch.chunk sizes 7631, 7631, 7631, 7629.
    assert plan["tensors"]["embeddings.word_embeddings.weight"]["uneven"] is True
    report = _eval_tp(out, 4, "--limit", "16")  # 32 texts: the acceptance run over all 480 is in the closing note
    assert report["fidelity"]["cos_min"] >= 0.9999 and report["data"].endswith("(16 query/passage pairs)")
    assert all(r["maps_only_own_files"] and r["own_file_share"] <= 0.25 + 1e-3 for r in report["ranks"])


def test_tp5_on_minilm_is_refused_at_validation_naming_the_dimension(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmodel: {source: zoo, name: minilm}\npasses:\n  - shard: {tensor_parallel: 5}\n")
    proc = run_cli("validate", str(recipe))
    assert proc.returncode == 2
    assert "num_attention_heads = 12" in proc.stderr and "tensor_parallel = 5" in proc.stderr
    assert "2, 3, 4, 6, 12" in proc.stderr and "r.yaml:4" in proc.stderr


def _causal_lm(tmp_path: Path, kind: str) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=1001, n_positions=64, n_embd=64, n_layer=2, n_head=4))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=1001, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64))
    path = tmp_path / kind
    model.save_pretrained(path)
    recipe = tmp_path / f"{kind}.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        name: {kind}-tp2
        model: {{source: hf, path: {path}, auto_class: AutoModelForCausalLM, max_length: 16}}
        passes:
          - shard: {{tensor_parallel: 2}}
        """))
    return recipe


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoders_shard_at_tp2_and_match_their_unsharded_logits(tmp_path, kind):
    """GPT-2 (q, k, v fused in one Conv1D; LM head tied to the embedding; 1001-token vocabulary split unevenly)
    and Llama (grouped-query attention) from a transformers config with a fixed seed."""
    recipe = _causal_lm(tmp_path, kind)
    out = tmp_path / "out"
    _run(recipe, out)
    plan = json.loads((out / "tensor_parallel.json").read_text())
    if kind == "gpt2":
        assert plan["modules"]["transformer.h.0.attn.c_attn"] == {"kind": "conv1d", "parts": 3, "style": "colwise"}
        assert plan["modules"]["lm_head"]["style"] == "vocab" and plan["aliases"] == {
            "lm_head.weight": "transformer.wte.weight"}
        assert plan["attributes"]["transformer.h.0.attn"] == {"num_heads": 2, "split_size": 32}
    else:
        assert plan["modules"]["model.layers.0.self_attn.k_proj"]["style"] == "colwise"
        assert plan["modules"]["model.layers.1.mlp.down_proj"]["style"] == "rowwise"
    # Both families run tensor-parallel (GPT-2 also in a user's own process group, below) and generate: every rank
    # steps its own slice of the KV cache, and the continuations are the whole model's.
    report = _eval_tp(out, 2)
    assert report["fidelity"]["max_abs_err"] <= 1e-4
    assert report["data"] == "example inputs"
    assert report["greedy"]["identical"] and report["greedy"]["new_tokens"] == 32
    assert report["greedy"]["exact"] == report["greedy"]["prompts"] >= 1
    # The whole artifact is the source model exactly.
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(tmp_path / kind).eval()
    from compressor.loading import load_example_inputs

    inputs = load_example_inputs(out)
    with torch.no_grad():
        assert torch.equal(compressor.load(out)(**inputs).logits, source(**inputs).logits)


def test_gpt2_tp2_runs_in_a_user_process_group(tmp_path):
    """The documented API: compressor.load(dir, tp_rank=r, tp_world=N) inside the caller's own process group."""
    recipe = _causal_lm(tmp_path, "gpt2")
    out = tmp_path / "out"
    _run(recipe, out)
    script = tmp_path / "user.py"
    script.write_text(textwrap.dedent(f"""\
        import os, sys
        import torch, torch.distributed as dist, torch.multiprocessing as mp
        import compressor

        def main(rank, world, port):
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank, world_size=world)
            model = compressor.load({str(out)!r}, tp_rank=rank, tp_world=world)
            ids = torch.tensor([[5, 17, 999, 1000, 3]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            if rank == 0:
                whole = compressor.load({str(out)!r})
                with torch.no_grad():
                    ref = whole(input_ids=ids).logits
                print("MAXERR", float((logits - ref).abs().max()), tuple(logits.shape))
            dist.destroy_process_group()

        if __name__ == "__main__":
            import socket
            s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
            mp.spawn(main, args=(2, port), nprocs=2)
        """))
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MAXERR"))
    err, shape = line.split(maxsplit=2)[1:]
    assert float(err) <= 1e-4 and shape == "(1, 5, 1001)"


def test_int8_weights_shard_with_their_scales(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: q\nmodel: {source: zoo, name: minilm}\npasses:\n"
                      "  - quantize: {mode: weight-only}\n  - shard: {tensor_parallel: 2}\n")
    out = tmp_path / "q"
    _run(recipe, out)
    tensors = json.loads((out / "tensor_parallel.json").read_text())["tensors"]
    # Per-channel scales (one per output row) are split with a colwise weight's rows, replicated for rowwise.
    assert tensors["encoder.layer.0.attention.self.query.weight.__scale"]["dim"] == 0
    assert tensors["encoder.layer.0.attention.output.dense.weight.__q"]["dim"] == 1
    assert "encoder.layer.0.attention.output.dense.weight.__scale" not in tensors
    report = _eval_tp(out, 2, "--limit", "16")
    assert report["fidelity"]["cos_min"] >= 0.9999


def test_user_plan_shards_a_model_the_built_in_plans_do_not_know(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: m\nmodel: {source: zoo, name: digits-mlp}\npasses:\n"
                      "  - shard: {tensor_parallel: 2, plan: {fc1: colwise, fc2: rowwise}}\n")
    out = tmp_path / "m"
    _run(recipe, out)
    report = _eval_tp(out, 2)
    assert report["fidelity"]["max_abs_err"] <= 1e-4
    assert report["metric"]["whole"]["value"] == report["metric"]["tensor_parallel"]["value"]


@pytest.mark.parametrize(("passes", "message"), [
    ("  - shard: {tensor_parallel: 2}\n", "no tensor-parallel plan is known for DigitsMLP"),
    ("  - shard: {tensor_parallel: 2, plan: {fc9: colwise}}\n", "match no Linear, Embedding or Conv1D"),
    ("  - shard: {tensor_parallel: 7, plan: {fc1: colwise, fc2: rowwise}}\n",
     "output features of fc1 = 300"),
    ("  - shard: {tensor_parallel: 2}\n  - cast: {}\n", "'shard' must be the last pass"),
    ("  - shard: {tensor_parallel: 1}\n", "2 to 64"),
])
def test_unsatisfiable_shards_are_refused_before_any_work(tmp_path, passes, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: m\nmodel: {source: zoo, name: digits-mlp}\npasses:\n" + passes)
    proc = run_cli("run", str(recipe), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_masked_lm_with_a_tied_decoder_bias_shards_and_matches(tmp_path):
    """BertForMaskedLM ties cls.predictions.bias to the vocabulary-parallel decoder's bias: stored once, split
    once, and both modules hold the same DTensor on each rank."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=999, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=64)).save_pretrained(tmp_path / "mlm")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: mlm\nmodel: {{source: hf, path: {tmp_path / 'mlm'}, auto_class: AutoModelForMaskedLM, "
                      "max_length: 16}\npasses:\n  - shard: {tensor_parallel: 2}\n")
    _run(recipe, tmp_path / "out")
    plan = json.loads((tmp_path / "out" / "tensor_parallel.json").read_text())
    assert plan["modules"]["cls.predictions.decoder"]["style"] == "vocab"
    assert plan["tensors"]["cls.predictions.bias"] == {"dim": 0, "parts": 1, "uneven": True}
    report = _eval_tp(tmp_path / "out", 2)
    assert report["fidelity"]["max_abs_err"] <= 1e-4


def test_shard_refuses_onnx_export_and_encoded_weights(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: m\nmodel: {source: zoo, name: minilm}\npasses:\n  - shard: {tensor_parallel: 2}\n"
                      "export: {onnx: {}}\n")
    proc = run_cli("validate", str(recipe))
    assert proc.returncode == 2 and "ONNX export of a sharded model is not supported" in proc.stderr
    recipe.write_text("name: m\nmodel: {source: zoo, name: minilm}\npasses:\n"
                      "  - share: {bits: 4, modules: [encoder.layer.0.intermediate.dense]}\n"
                      "  - shard: {tensor_parallel: 2}\n")
    proc = run_cli("run", str(recipe), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and "stored as codebook, which cannot be split over ranks" in proc.stderr
    assert not (tmp_path / "out").exists()
    recipe.write_text("name: m\nmodel: {source: zoo, name: minilm}\npasses:\n"
                      "  - shard: {tensor_parallel: 2, plan: {Embedding: colwise}}\n")
    proc = run_cli("run", str(recipe), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and "is an Embedding: split it with `vocab`" in proc.stderr


def test_rank_loading_needs_a_process_group_and_the_right_world(minilm_tp2):
    with pytest.raises(UsageError, match="initialised process group"):
        compressor.load(minilm_tp2, tp_rank=0, tp_world=2)
    with pytest.raises(UsageError, match="sharded for tensor_parallel = 2, not 4"):
        compressor.load(minilm_tp2, tp_rank=0, tp_world=4)
    proc = run_cli("eval", str(minilm_tp2), "--tp", "4")
    assert proc.returncode == 2 and "run with --tp 2" in proc.stderr


@pytest.mark.gpu
def test_tp2_on_nccl(minilm_tp2):
    """The NCCL path: one GPU per rank."""
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL tensor parallelism needs 2 GPUs (one per rank); this machine has fewer")
    proc = run_cli("eval", str(minilm_tp2), "--tp", "2", "--device", "cuda")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((minilm_tp2 / "tp-report.json").read_text())
    assert report["backend"] == "nccl" and report["fidelity"]["cos_min"] >= 0.9999
