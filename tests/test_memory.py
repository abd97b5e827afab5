"""A run that will not fit in memory is refused up front (exit 2) with what it needs, never half done."""

from __future__ import annotations

import hashlib

import pytest
from conftest import run_cli

from compressor.budget import FIXED_BYTES, estimate_run
from compressor.memory import LIMIT_ENV, available_memory, parse_size
from compressor.passes import get_pass


@pytest.mark.parametrize("text, expected", [("24GiB", 24 << 30), ("1.5GB", 1_500_000_000), ("500M", 500_000_000),
                                            ("4096", 4096), (" 2 kib ", 2048)])
def test_sizes_read_with_their_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "12 parsecs", "-5GB"])
def test_a_size_that_is_not_one_says_what_works(text):
    with pytest.raises(ValueError, match="e.g. 24GiB"):
        parse_size(text)


def test_the_limit_can_be_set_or_switched_off(monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "3GB")
    assert available_memory() == (3_000_000_000, f"{LIMIT_ENV}=3GB")
    monkeypatch.setenv(LIMIT_ENV, "off")
    assert available_memory()[0] is None
    monkeypatch.setenv(LIMIT_ENV, "plenty")
    with pytest.raises(ValueError, match=LIMIT_ENV):
        available_memory()
    monkeypatch.delenv(LIMIT_ENV)
    found, source = available_memory()
    assert found is None or (found > 0 and "held now" in source)


def _passes(*steps):
    return [get_pass(name)(get_pass(name).Config(**config), i) for i, (name, config) in enumerate(steps)]


def test_the_estimate_grows_with_what_the_run_holds():
    gb = 1_000_000_000
    plain = estimate_run(gb, [], onnx=False)
    assert plain.peak > FIXED_BYTES + gb  # the model itself, on top of the libraries
    int8 = estimate_run(gb, _passes(("quantize", {"mode": "weight-only"})), onnx=False)
    int4 = estimate_run(gb, _passes(("quantize", {"mode": "weight-only", "bits": 4})), onnx=False)
    onnx = estimate_run(gb, _passes(("quantize", {"mode": "weight-only"})), onnx=True)
    assert plain.peak < int8.peak < int4.peak
    assert onnx.peak > int8.peak and onnx.peak_phase == "exporting ONNX"
    assert int4.peak_phase == "pass 1 (quantize)"
    evaluated = estimate_run(gb, _passes(("quantize", {"mode": "weight-only"})), onnx=False, evaluate=True)
    assert evaluated.peak_phase == "evaluating"  # the baseline and the artifact side by side
    # cast halves what the later phases hold
    cast = estimate_run(gb, _passes(("cast", {}), ("shard", {"tensor_parallel": 2})), onnx=False)
    phases = dict(cast.phases)
    assert phases["writing the artifact"] < phases["loading the model"]


def _llama_dir(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    src = tmp_path / "llama"
    LlamaForCausalLM(config).eval().save_pretrained(src, safe_serialization=True)
    return src


def _tree_digest(path):
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_run_that_will_not_fit_is_refused_before_loading_and_the_old_artifact_stays(tmp_path):
    src = _llama_dir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: m\nmodel: {{source: hf, path: {src}, auto_class: AutoModelForCausalLM}}\npasses:\n"
                      "  - quantize: {mode: weight-only}\n")
    art = tmp_path / "art"
    assert run_cli("run", str(recipe), "--output", str(art), "-q").returncode == 0
    before = _tree_digest(art)
    proc = run_cli("run", str(recipe), "--output", str(art), "-q", env={LIMIT_ENV: "100MB"})
    assert proc.returncode == 2, proc.stderr
    message = " ".join(proc.stderr.split())
    assert "would need about" in message and f"may hold 100 MB ({LIMIT_ENV}=100MB)" in message
    # auto would stream this recipe, and even that does not fit: the message says both
    assert "streaming tensor by tensor" in message and "Loading the model whole would need about" in message
    assert "Traceback" not in proc.stderr
    assert _tree_digest(art) == before  # nothing rewritten, nothing half-written
    assert run_cli("run", str(recipe), "--output", str(tmp_path / "fresh"), "-q",
                   env={LIMIT_ENV: "100MB"}).returncode == 2
    assert not (tmp_path / "fresh").exists()


def test_a_run_that_fits_only_without_onnx_is_told_so(tmp_path):
    from compressor.budget import check_fits
    from compressor.errors import UsageError
    gb = 1_000_000_000
    est = estimate_run(gb, _passes(("cast", {})), onnx=True)
    without = estimate_run(gb, _passes(("cast", {})), onnx=False)
    room = (without.peak + est.peak) // 2
    import os

    previous = os.environ.get(LIMIT_ENV)
    os.environ[LIMIT_ENV] = str(room)
    try:
        with pytest.raises(UsageError, match="Without `export.onnx` the run fits"):
            check_fits(est, "model")
        check_fits(without, "model")  # fits: no error
    finally:
        if previous is None:
            del os.environ[LIMIT_ENV]
        else:
            os.environ[LIMIT_ENV] = previous


def test_a_cgroup_limit_counts_its_working_set_not_its_reclaimable_page_cache(tmp_path):
    from compressor.memory import _cgroup_room

    (tmp_path / "memory.max").write_text("8000000000\n")
    (tmp_path / "memory.current").write_text("6000000000\n")
    (tmp_path / "memory.stat").write_text("anon 1000000000\nfile 5000000000\ninactive_file 4000000000\n")
    assert _cgroup_room(str(tmp_path)) == 6_000_000_000  # 8 GB - (6 GB used - 4 GB inactive page cache)
    (tmp_path / "memory.max").write_text("max\n")
    assert _cgroup_room(str(tmp_path)) is None  # no limit
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("2000000000\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("500000000\n")
    assert _cgroup_room(str(v1)) == 1_500_000_000  # no memory.stat: usage as reported
