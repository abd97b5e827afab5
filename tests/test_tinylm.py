"""The zoo's causal language model (compressor.tinylm): a corpus every CPython has, a held-out part never trained
on, deterministic training that beats a unigram model clearly, and a Hugging Face directory transformers loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from compressor import tinylm


def test_the_corpus_is_fixed_and_its_held_out_part_is_never_trained_on():
    docs = tinylm.corpus()
    assert len(docs) > 1000 and sum(map(len, docs)) > 1_000_000  # megabytes of prose
    held, train = tinylm.held_out_texts(), tinylm.training_texts()
    assert len(held) + len(train) == len(docs) and not set(held) & set(train)
    assert held[0] == docs[0] and held[1] == docs[tinylm.HOLD_OUT_EVERY]
    assert tinylm.corpus_sha256() == tinylm.corpus_sha256() and len(tinylm.corpus_sha256()) == 64


def test_training_is_deterministic(tmp_path):
    plan = tinylm.LMTraining(steps=3, warmup=1, hidden_size=64, intermediate_size=128, layers=1, heads=2, kv_heads=1)
    first, second = tmp_path / "a", tmp_path / "b"
    records = [tinylm.train_tiny_lm(d, plan, log=lambda m: None) for d in (first, second)]
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert records[0]["loss_last"] == records[1]["loss_last"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the training lock is POSIX flock")
def test_a_second_first_use_waits_for_the_process_that_is_training(tmp_path):
    """Two first uses train once: while another process holds the training lock, a caller waits and says so, and
    goes on when that process lets go."""
    import subprocess
    import sys
    import threading

    lock = tmp_path / ".tiny-lm.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+b'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.readline()",
                               str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    released = threading.Event()

    def release() -> None:
        released.set()
        holder.stdin.write("go\n")
        holder.stdin.flush()

    try:
        assert holder.stdout.readline().strip() == "held"
        said: list[str] = []
        threading.Timer(1.0, release).start()
        with tinylm._one_trainer(lock, said.append):
            assert released.is_set()  # it waited for the holder
        assert said == ["tiny-lm: another process is training it; waiting for that one"]
    finally:
        holder.wait(timeout=60)
    said.clear()
    with tinylm._one_trainer(lock, said.append):  # free: no wait, nothing said
        assert said == []


def test_the_trained_model_beats_a_unigram_model_clearly_and_loads_with_transformers(tiny_lm: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = json.loads((tiny_lm / "training.json").read_text())
    assert record["corpus_sha256"] == tinylm.corpus_sha256()
    assert record["held_out_perplexity"] < 0.5 * record["unigram_perplexity"], record
    assert record["loss_last"] < record["loss_first"] - 1.0
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    assert model.config.model_type == "llama" and model.config.num_key_value_heads < model.config.num_attention_heads
    ids = tok(tinylm.held_out_texts()[3], return_tensors="pt")["input_ids"][:, :200]
    held = tinylm.perplexity(model, ids[0], 128)
    assert held < record["unigram_perplexity"]
    assert tok.decode(ids[0]).startswith(tinylm.held_out_texts()[3][:40])  # byte-level BPE: lossless
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_first_use_training_reports_through_the_active_reporter_and_is_silent_when_quiet(capsys):
    import io

    from compressor import tinylm
    from compressor.log import Reporter

    loud, quiet = io.StringIO(), io.StringIO()
    with Reporter(loud, force_plain=True).active():
        tinylm._stderr("tiny-lm: step 1/200")
    with Reporter(quiet, quiet=True).active():
        tinylm._stderr("tiny-lm: step 2/200")
    assert "compress: tiny-lm: step 1/200" in loud.getvalue() and quiet.getvalue() == ""
    tinylm._stderr("tiny-lm: step 3/200")  # no run in progress: stderr, as compress prints
    assert "compress: tiny-lm: step 3/200" in capsys.readouterr().err
