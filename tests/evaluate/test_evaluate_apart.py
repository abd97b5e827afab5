"""Evaluation of models that do not fit in memory together (compressor.evaluate.apart): one at a time, the baseline's
outputs recorded first, the same accuracy and fidelity as measured together, and the report says so."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from compressor.log import Reporter
from compressor.memory import LIMIT_ENV

QUICK_LM = {"generation": {"max_tokens": 1024, "prompts": 4, "prompt_tokens": 16, "new_tokens": 8,
                           "prompt_lengths": [32], "decode_batch_sizes": [1], "decode_tokens": 4},
            "speed": {"rounds": 1, "warmup": 0, "load_runs": 0}}


def _between(subjects) -> str:
    """A memory limit with room for one model at a time and not for all of them together."""
    from compressor.evaluate.apart import _PER_MODEL
    from compressor.budget import FIXED_BYTES, MARGIN

    base = subjects[0].size_bytes
    held = [2 * s.files_bytes if s.format == "onnx" else max(s.size_bytes, base) for s in subjects]
    one, together = (FIXED_BYTES + _PER_MODEL * max(held)) * MARGIN, (FIXED_BYTES + _PER_MODEL * sum(held)) * MARGIN
    return f"{int((one + together) / 2)}B"


def _evaluate(artifact: Path, baseline, spec, monkeypatch, limit: str | None):
    from compressor.evaluate import evaluate_artifact

    if limit is None:
        monkeypatch.setenv(LIMIT_ENV, "off")
    else:
        monkeypatch.setenv(LIMIT_ENV, limit)
    return evaluate_artifact(artifact, baseline=baseline, spec=spec, log=Reporter(quiet=True))


def test_a_language_model_measured_apart_scores_as_measured_together(tiny_lm_onnx, tmp_path, monkeypatch):
    from compressor.evaluate.subjects import artifact_subject, onnx_subject, source_subject
    from compressor.recipe import EvaluateSpec

    artifact = tmp_path / "art"
    shutil.copytree(tiny_lm_onnx.out_dir, artifact)
    baseline = source_subject({"source": "zoo", "name": "tiny-lm"}, tmp_path)
    spec = EvaluateSpec.model_validate(QUICK_LM)
    together = _evaluate(artifact, baseline, spec, monkeypatch, None)
    assert together.memory is None
    limit = _between([baseline, artifact_subject(artifact), onnx_subject(artifact)])
    apart = _evaluate(artifact, baseline, spec, monkeypatch, limit)
    assert apart.memory["mode"] == "apart" and "one after the other" in apart.memory["note"]
    assert [p.name for p in artifact.iterdir() if p.name.startswith(".eval-apart")] == []  # scratch removed
    for a, b in zip(together.results, apart.results):
        assert (a.role, a.format) == (b.role, b.format)
        for key in ("perplexity", "nll_mean", "tokens", "token_agreement", "kl_mean"):
            if a.lm.get(key) is None:
                assert b.lm.get(key) is None, key  # the baseline has no agreement with itself
            else:
                assert a.lm[key] == b.lm[key], key  # the same logits, the same arithmetic
        assert a.fidelity == b.fidelity and a.accuracy == b.accuracy
        assert (a.lm.get("greedy") or {}) == (b.lm.get("greedy") or {})
        if a.role != "baseline":
            assert [e["speedup"] > 0 for e in b.lm["decode"]] == [True]  # timed alone, ratios of medians
    assert "one after the other" in (artifact / "report.md").read_text()


def test_a_classifier_measured_apart_scores_as_measured_together(tmp_path, monkeypatch):
    from compressor.evaluate.subjects import artifact_subject, source_subject
    from compressor.pipeline import run_recipe
    from compressor.recipe import EvaluateSpec, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: d\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - quantize: {mode: weight-only}\n")
    artifact = run_recipe(load_recipe(recipe), tmp_path / "art", Reporter(quiet=True)).out_dir
    baseline = source_subject({"source": "zoo", "name": "digits-mlp"}, tmp_path)
    spec = EvaluateSpec.model_validate({"data": "digits", "speed": {"batch_sizes": [8], "rounds": 2, "calls": 2,
                                                                      "load_runs": 0}})
    together = _evaluate(artifact, baseline, spec, monkeypatch, None)
    apart = _evaluate(artifact, baseline, spec, monkeypatch, _between([baseline, artifact_subject(artifact)]))
    assert together.memory is None and apart.memory["mode"] == "apart"
    for a, b in zip(together.results, apart.results):
        assert a.accuracy == b.accuracy and a.fidelity == b.fidelity
        assert [e["batch_size"] for e in b.latency] == [8] and all(e["p50_ms"] > 0 for e in b.latency)
    art = next(r for r in apart.results if r.role == "artifact")
    assert art.latency[0]["speedup"] > 0 and art.latency[0]["speedup_q25"] is None


def test_an_evaluation_that_does_not_fit_even_one_model_at_a_time_is_refused_before_loading(tiny_lm_onnx, tmp_path,
                                                                                         monkeypatch):
    from compressor.errors import UsageError
    from compressor.evaluate.subjects import source_subject
    from compressor.recipe import EvaluateSpec

    artifact = tmp_path / "art"
    shutil.copytree(tiny_lm_onnx.out_dir, artifact)
    baseline = source_subject({"source": "zoo", "name": "tiny-lm"}, tmp_path)
    with pytest.raises(UsageError, match="one model at a time"):
        _evaluate(artifact, baseline, EvaluateSpec.model_validate(QUICK_LM), monkeypatch, "100MB")
    assert not (artifact / "report.json").exists()
