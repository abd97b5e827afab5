"""Shared by the benchmark scripts: run a measuring child process, summarize its runs."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_child(code: str, *args: str) -> dict[str, float]:
    """Run ``python -c code args`` in a fresh process; its last stdout line is a JSON object of measurements."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"measurement {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fresh_memory_rate(megabytes: int = 256) -> float:
    """MB/s at which a fresh process gets new memory and writes it (``megabytes``, each page touched once).

    Several GB/s on a machine of its own. On some virtual machines the host takes memory the guest has freed back
    within seconds (free page reporting: 30 s after a child freed 8 GB, a fresh 1 GB took 12.4 s to touch, against
    0.2 s right after) and hands it out again at about 100 MB/s; then every new page is slow, the page cache's
    included, and a loader's or writer's time depends on how many fresh pages it takes more than on its own work.
    The benchmarks print this at their start and end so that such runs can be told apart."""
    code = (f"import time; t = time.perf_counter(); b = b'1' * ({megabytes} << 20); "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True)
    return round(megabytes / max(float(out.stdout.strip()), 1e-6), 1)


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median, min and max of every measured key."""
    return {k: {"median": round(statistics.median(r[k] for r in runs), 2),
                "min": round(min(r[k] for r in runs), 2), "max": round(max(r[k] for r in runs), 2)}
            for k in runs[0]}


def spread(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Median, min, max and each run's value of ``keys`` (runs without a value left out), and the largest share of
    the files that stayed resident after eviction and the smallest share resident when the clock stopped (cold
    runs: what a loader had read by then)."""
    out: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
                        "max": round(max(values), 1), "each": [round(v, 1) for v in values]}
    resident = [r["resident_after_evict"] for r in runs if r.get("resident_after_evict") is not None]
    if resident:
        out["resident_after_evict"] = round(max(resident), 4)
    read = [r["resident_at_end"] for r in runs if r.get("resident_at_end") is not None]
    if read:  # the smallest share of the files in the page cache when the clock stopped (cold runs)
        out["resident_at_end"] = round(min(read), 4)
    return out


# Config-sized Llama models (random weights: load time and memory are what is measured, the tokens mean nothing).
SIZES = {
    # tiny: a quick check of the script itself (a few MB)
    "tiny": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "vocab_size": 1000},
    "0.25b": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16, "vocab_size": 32000},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "vocab_size": 32000},
}


def make_llama(where: Path, size: str) -> Path:
    """A Llama of ``SIZES[size]`` with random weights (seed 0), float32 safetensors, sharded at 2 GB like
    transformers' default."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size], num_attention_heads=16 if SIZES[size]["hidden_size"] >= 1024 else 4,
                         num_key_value_heads=4 if SIZES[size]["hidden_size"] >= 1024 else 2,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(where), safe_serialization=True, max_shard_size="2GB")
    del model
    # A byte-level BPE tokenizer (tiny-lm's texts, 1,000 tokens: ids within every size's vocabulary), for the
    # passes that calibrate on text; the model's weights are random either way.
    from compressor.tinylm import bpe_tokenizer, save_tokenizer, training_texts

    save_tokenizer(bpe_tokenizer(training_texts()[:300], 1000), where, 2048)
    return where
