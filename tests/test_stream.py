"""Streaming (compressor/stream.py): a model written tensor by tensor from the meta device gives the same bytes as
a model loaded whole, under one process or several (torchrun, gloo), within memory bounded by a layer, and a
recipe that cannot stream says why."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compressor.memory import LIMIT_ENV
from tests.conftest import run_cli

RECIPES = {
    "cast": "  - cast: {dtype: float16}\n",
    "int8": "  - quantize: {mode: weight-only}\n",
    "int8-tp2": "  - quantize: {mode: weight-only}\n  - shard: {tensor_parallel: 2}\n",
    # NNCF's round to nearest, one Linear at a time when streamed; the tables int8 per row
    "int4-sym": "  - quantize: {mode: weight-only, bits: 4, group_size: 32}\n",
    "int4-asym": "  - quantize: {mode: weight-only, bits: 4, group_size: 32, symmetric: false}\n",
    # round to nearest with mixed precision: ranked by NNCF's sensitivities on the calibration text, layer by layer
    "int4-mixed": "  - quantize: {mode: weight-only, bits: 4, group_size: 32, ratio: 0.7, calibration: {limit: 4}}\n",
}
# NNCF's data-aware methods on the shipped calibration text, one decoder layer at a time when streamed
LAYERWISE = {
    "int4-awq-se": "  - quantize: {mode: weight-only, bits: 4, group_size: 32, symmetric: false, "
                   "method: [awq, scale-estimation], calibration: {limit: 4}}\n",
    "int4-se-sym": "  - quantize: {mode: weight-only, bits: 4, group_size: 32, method: scale-estimation, "
                   "calibration: {limit: 4}}\n",
    # mixed precision: the layers run twice, first for NNCF's sensitivities, ranked across the model
    "int4-awq-se-mixed": "  - quantize: {mode: weight-only, bits: 4, group_size: 32, symmetric: false, "
                         "method: [awq, scale-estimation], ratio: 0.6, calibration: {limit: 4}}\n",
}


def _llama(where: Path, layers: int = 2, hidden: int = 64, intermediate: int = 128, vocab: int = 512,
           tied: bool = False, tokenizer: bool = False) -> Path:
    """A small Llama with seeded random weights, saved as float32 safetensors (memory and bytes are what these tests
    measure, not what it says), with a byte-level BPE tokenizer when ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tied)
    LlamaForCausalLM(config).eval().save_pretrained(where, safe_serialization=True)
    if tokenizer:  # for the passes that calibrate on text
        from compressor.tinylm import bpe_tokenizer, save_tokenizer, training_texts

        save_tokenizer(bpe_tokenizer(training_texts()[:100], vocab), where, 64)
    return where


def _recipe(tmp: Path, src: Path, passes: str, name: str = "m", extra: str = "") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(f"name: {name}\nmodel: {{source: hf, path: {src}, auto_class: AutoModelForCausalLM}}\n"
                    f"passes:\n{passes}{extra}")
    return path


def _digest(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _manifest_holds(path: Path) -> bool:
    """Every file's sha256 in the manifest is the file's (weight files are hashed while they are written)."""
    files = json.loads((path / "manifest.json").read_text())["files"]
    real = _digest(path)
    return len(files) > 3 and all(real[rel] == entry["sha256"] for rel, entry in files.items())


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _llama(tmp_path_factory.mktemp("stream") / "llama", tokenizer=True)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_streamed_artifact_is_byte_identical_to_a_whole_model_run(tmp_path, llama, recipe):
    path = _recipe(tmp_path, llama, RECIPES[recipe])
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    assert run_cli("run", str(path), "-o", str(whole), "-q", "--stream", "never").returncode == 0
    proc = run_cli("run", str(path), "-o", str(streamed), "--stream", "always")
    assert proc.returncode == 0, proc.stderr
    assert "tensor by tensor" in proc.stderr and "streamed" in proc.stderr  # it did stream, and said so
    assert _digest(streamed) == _digest(whole)  # weights, manifest (pass reports included), plan, index
    assert _manifest_holds(streamed)


def test_layer_by_layer_4bit_mixed_precision_handles_tied_embeddings_and_says_what_it_needs(tmp_path):
    from compressor.passes.layerwise import held_bytes
    from compressor.recipe import load_recipe
    from compressor.sources import lazy_source

    src = _llama(tmp_path / "tied", layers=3, tied=True, tokenizer=True)
    path = _recipe(tmp_path, src, LAYERWISE["int4-awq-se-mixed"])
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    assert run_cli("run", str(path), "-o", str(whole), "-q", "--stream", "never").returncode == 0
    proc = run_cli("run", str(path), "-o", str(streamed), "--stream", "always")
    assert proc.returncode == 0, proc.stderr
    assert "one decoder layer at a time (3 layers)" in proc.stderr and "layer 3/3 done" in proc.stderr
    assert "sensitivities of layer 3/3 done" in proc.stderr  # the first run of the layers, for ratio 0.6
    assert "mixed precision: 10 of 21 weights at 4 bits" in proc.stderr
    # the integers of a whole run: NNCF's ranking across the layers, AWQ's rescaling of the 4-bit weights
    assert _digest(streamed) == _digest(whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml", "streamed", "tied", "whole"]  # no scratch left

    # The up-front estimate counts a layer three times, the embeddings read to catch the first layer's inputs and
    # the windows' hidden states; a limit below it refuses before anything is read, naming that phase.
    model, _ = lazy_source(load_recipe(path).model, tmp_path, 0)
    layer = sum(t.numel() * 4 for n, t in model.tensors().items() if n.startswith("model.layers.0."))
    # the embeddings and the final norm; the hidden states three times, the widest input (128) twice
    assert held_bytes(model, 4, 128) == 3 * layer + (512 * 64 + 64) * 4 + 4 * 128 * 4 * (3 * 64 + 2 * 128)
    proc = run_cli("run", str(path), "-o", str(tmp_path / "none"), "-q", "--stream", "always",
                   env={LIMIT_ENV: "700MB"})  # streaming alone would fit (0.55 GB)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "passes one decoder layer at a time" in message, message
    assert not (tmp_path / "none").exists()


def test_layers_called_with_different_arguments_get_their_own(tmp_path):
    # Qwen2 with sliding-window and full-attention layers: the model gives each layer the mask of its kind, so a
    # layer run alone must get the arguments the model gave it, not the first layer's.
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from compressor.tinylm import bpe_tokenizer, save_tokenizer, training_texts

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         use_sliding_window=True, sliding_window=32, max_window_layers=1,
                         layer_types=["full_attention", "sliding_attention"])
    src = tmp_path / "qwen2"
    Qwen2ForCausalLM(config).eval().save_pretrained(src, safe_serialization=True)
    save_tokenizer(bpe_tokenizer(training_texts()[:100], 512), src, 256)
    path = _recipe(tmp_path, src, LAYERWISE["int4-se-sym"])  # symmetric scale estimation: the other method
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    assert run_cli("run", str(path), "-o", str(whole), "-q", "--stream", "never").returncode == 0
    proc = run_cli("run", str(path), "-o", str(streamed), "-q", "--stream", "always")
    assert proc.returncode == 0, proc.stderr
    assert _digest(streamed) == _digest(whole)


def test_evaluation_settings_the_model_cannot_take_are_refused_before_the_layers_run(tmp_path, llama):
    # The default generation window (512 tokens) exceeds this model's 64 positions: refused up front, not after
    # the layers' minutes of work, whether streamed or whole.
    path = _recipe(tmp_path, llama, LAYERWISE["int4-awq-se"], extra="evaluate: {}\n")
    for stream in ("always", "never"):
        proc = run_cli("run", str(path), "-o", str(tmp_path / "out"), "--stream", stream)
        message = " ".join(proc.stderr.split())
        assert proc.returncode == 2 and "exceed the model's 64 positions" in message, message
        assert "pass 1/1" not in message and not (tmp_path / "out").exists()


def test_tied_embeddings_and_shards_stream_to_the_same_bytes(tmp_path):
    src = _llama(tmp_path / "tied", tied=True)
    path = _recipe(tmp_path, src, RECIPES["cast"], extra="export: {safetensors: {max_shard_size: 100KB}}\n")
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    assert run_cli("run", str(path), "-o", str(whole), "-q", "--stream", "never").returncode == 0
    assert run_cli("run", str(path), "-o", str(streamed), "-q", "--stream", "always").returncode == 0
    files = _digest(streamed)
    assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 2
    assert files == _digest(whole)
    assert _manifest_holds(streamed) and _manifest_holds(whole)


def test_auto_streams_what_would_not_fit_whole_and_refuses_what_would_not_fit_at_all(tmp_path, llama):
    from compressor.budget import estimate_run, estimate_stream
    from compressor.passes import get_pass
    from compressor.recipe import load_recipe

    path = _recipe(tmp_path, llama, RECIPES["int8"])
    recipe = load_recipe(path)
    passes = [get_pass(s.name)(s.config, s.index) for s in recipe.steps]
    from compressor.safetensors_io import read_header

    header, _ = read_header(llama / "model.safetensors")
    spans = [v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"]
    size = sum(f.stat().st_size for f in llama.glob("*.safetensors"))
    whole = estimate_run(size, passes, False).peak
    stream = estimate_stream(sum(spans), spans).peak
    assert stream < whole
    between = f"{(stream + whole) // 2}B"  # room for streaming, not for the whole model
    proc = run_cli("run", str(path), "-o", str(tmp_path / "auto"), env={LIMIT_ENV: between})
    assert proc.returncode == 0, proc.stderr
    assert "the whole model would not fit in memory" in proc.stderr
    assert run_cli("run", str(path), "-o", str(tmp_path / "whole"), "-q", "--stream", "never").returncode == 0
    assert _digest(tmp_path / "auto") == _digest(tmp_path / "whole")

    proc = run_cli("run", str(path), "-o", str(tmp_path / "none"), "-q", env={LIMIT_ENV: "100MB"})
    assert proc.returncode == 2
    message = " ".join(proc.stderr.split())
    assert "streaming tensor by tensor" in message and "Loading the model whole would need about" in message
    assert "Traceback" not in proc.stderr and not (tmp_path / "none").exists()


def test_a_recipe_that_cannot_stream_says_why(tmp_path, llama):
    prune = _recipe(tmp_path, llama, "  - prune: {sparsity: 0.5}\n", name="p",
                    extra="export: {onnx: {}}\n")
    proc = run_cli("run", str(prune), "-o", str(tmp_path / "out"), "-q", "--stream", "always")
    assert proc.returncode == 2
    message = " ".join(proc.stderr.split())
    assert "must stream the model, and it cannot" in message
    assert "export.onnx traces the whole graph" in message and "passes[0] (prune)" in message
    assert not (tmp_path / "out").exists()


# Linux counts a forked child's memory from before its exec in the child's peak (ru_maxrss): a child of this
# process, which holds torch and a model, would start at this process's size. A small launcher forks it instead.
_LAUNCH = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
           "_, status, usage = os.wait4(p.pid, 0); print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)")


def _peak_rss(args: list[str]) -> int:
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, *args], capture_output=True, text=True, timeout=600)
    code, peak = proc.stdout.split()
    assert code == "0", proc.stderr[-2000:]
    return int(peak)


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    # 12 MB of float32 per decoder layer: a model of 16 layers holds 100 MB more than one of 8, a fifth of the
    # process's fixed cost, which a whole-model run shows and a streamed one must not.
    peaks = {}
    for layers in (8, 16):
        src = _llama(tmp_path / f"l{layers}", layers=layers, hidden=512, intermediate=1280, vocab=1024)
        path = _recipe(tmp_path, src, RECIPES["int8"], name=f"d{layers}")
        run = [sys.executable, "-m", "compressor", "run", str(path), "-o", str(tmp_path / f"o{layers}"), "-q",
               "--stream", "always"]
        peaks[layers] = min(_peak_rss(run) for _ in range(2))  # the lower of two: threads' arenas vary a little
        shutil.rmtree(src)
    assert peaks[16] <= 1.10 * peaks[8], peaks


def _torchrun(nproc: int, recipe: Path, out: Path, port: int, scratch: Path) -> str:
    """Run ``recipe`` under torchrun with ``nproc`` processes; rank 0's progress (standard error). torchrun's own
    log directory (a ``torchelastic_*`` it never removes) goes under ``scratch``, not the machine's /tmp."""
    scratch.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(scratch))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
                           str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "compressor",
                           "run", str(recipe), "-o", str(out), "--stream", "always"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.parametrize("recipe", ["int8-tp2", "int4-awq-se-mixed"])
def test_one_and_two_torchrun_processes_write_the_same_bytes(tmp_path, tmp_path_factory, llama, recipe):
    from torch.distributed.elastic.utils.distributed import get_free_port

    path = _recipe(tmp_path, llama, {**RECIPES, **LAYERWISE}[recipe])
    scratch = tmp_path_factory.mktemp("torchrun")
    _torchrun(1, path, tmp_path / "one", get_free_port(), scratch)
    said = _torchrun(2, path, tmp_path / "two", get_free_port(), scratch)
    if recipe in LAYERWISE:  # each process compresses every other layer, their sensitivities ranked together
        assert "compressed by 2 processes in turn" in said, said[-3000:]
        assert "layer 2/2 run, compressed by another process" in said and "layer 1/2 done" in said
        assert "sensitivities of layer 2/2 run, scored by another process" in said
    one, two = _digest(tmp_path / "one"), _digest(tmp_path / "two")
    assert len(one) > 5 and one == two  # every file's sha256, rank files and manifest included
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml", "one", "two"]  # no scratch left behind


def test_a_bfloat16_checkpoint_streams_to_the_same_bytes(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    path = _recipe(tmp_path, tmp_path / "bf16", RECIPES["cast"])
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    assert run_cli("run", str(path), "-o", str(whole), "-q", "--stream", "never").returncode == 0
    assert run_cli("run", str(path), "-o", str(streamed), "-q", "--stream", "always").returncode == 0
    assert _digest(streamed) == _digest(whole)


def _edited(llama: Path, where: Path, edit) -> Path:
    """A copy of ``llama`` whose weights ``edit`` changed: {name: tensor} -> {name: tensor}."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(llama, where)
    tensors = edit(load_file(where / "model.safetensors"))
    save_file(tensors, where / "model.safetensors", metadata={"format": "pt"})
    return where


def test_weights_streaming_cannot_read_as_loading_would_are_refused_with_the_reason(tmp_path, llama):
    import torch

    extra = _edited(llama, tmp_path / "extra", lambda t: {**t, "stray.weight": torch.zeros(4)})
    half = _edited(llama, tmp_path / "half", lambda t: {k: v.half() if "layers.0." in k else v for k, v in t.items()})
    for src, reason in ((extra, "does not use: stray.weight"), (half, "float16, float32 and config.json says")):
        path = _recipe(tmp_path, src, RECIPES["cast"], name=src.name)
        proc = run_cli("run", str(path), "-o", str(tmp_path / f"out-{src.name}"), "-q", "--stream", "always")
        assert proc.returncode == 2, proc.stderr
        assert "must stream the model" in proc.stderr and reason in " ".join(proc.stderr.split())
        assert not (tmp_path / f"out-{src.name}").exists()


def test_a_corrupt_source_weight_file_is_named_in_full(tmp_path, llama):
    src = tmp_path / "corrupt"
    shutil.copytree(llama, src)
    raw = bytearray((src / "model.safetensors").read_bytes())
    raw[8:16] = b"{not-js!"
    (src / "model.safetensors").write_bytes(bytes(raw))
    path = _recipe(tmp_path, src, RECIPES["cast"])
    proc = run_cli("run", str(path), "-o", str(tmp_path / "out"), "-q", "--stream", "always")
    assert proc.returncode == 1
    assert f"the source model's weight file {src / 'model.safetensors'} cannot be read" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
