"""Acceptance of the evaluator on the shipped recipes/minilm-fp16.yaml (run once per session by the fixture)."""

from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ET

import pytest

from conftest import read_report, run_cli

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def report(minilm_fp16):
    return read_report(minilm_fp16)


def _cpu(report, role):
    (row,) = [r for r in report["results"] if r["device"] == "cpu" and r["role"] == role]
    return row


def test_all_four_reports_are_written(minilm_fp16):
    for name in ("report.json", "report.md", "junit.xml", "report.png"):
        assert (minilm_fp16 / name).stat().st_size > 0, name
    assert (minilm_fp16 / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(minilm_fp16 / "report.png")
    assert image.shape[0] >= 300 and image.shape[1] >= 600


def test_retrieval_accuracy_on_the_shipped_text_pairs(report):
    assert report["data"]["metric"] == "retrieval_top1" and report["data"]["examples"] >= 200
    base, art = _cpu(report, "baseline"), _cpu(report, "artifact")
    for row in (base, art):
        acc = row["accuracy"]
        assert acc["examples"] == report["data"]["examples"]
        assert acc["value"] == pytest.approx(100 * acc["correct"] / acc["examples"])
        assert 70 < acc["value"] <= 100  # a real encoder on real pairs: far above chance (<1%)
    assert abs(art["ratios"]["accuracy_drop"] - (base["accuracy"]["value"] - art["accuracy"]["value"])) < 1e-9


def test_fidelity_and_size(report):
    base, art = _cpu(report, "baseline"), _cpu(report, "artifact")
    fid = art["fidelity"]
    assert 0.999 < fid["cos_min"] <= fid["cos_mean"] <= 1.0 + 1e-6
    assert 0 < fid["max_abs_err"] < 0.1
    assert fid["examples"] == 2 * report["data"]["examples"]  # queries and passages
    assert base["fidelity"] is None
    assert 1.9 < art["ratios"]["compression"] < 2.1
    assert art["size_bytes"] < base["size_bytes"]


def test_cold_and_warm_loads_come_from_fresh_processes_and_are_reported_apart(report):
    for role in ("baseline", "artifact"):
        load = _cpu(report, role)["load"]
        cold, warm = load["cold"], load["warm"]
        for entry in (cold, warm):
            assert entry["load_ms"]["runs"] == 2 and entry["first_inference_ms"]["runs"] == 2
            assert entry["load_ms"]["median"] > 0 and entry["first_inference_ms"]["median"] > 0
            assert entry["peak_rss_mb"] > 0 and entry["anon_rss_mb"] > 0
            assert len(set(entry["pids"])) == 2 and os.getpid() not in entry["pids"]
        assert not set(cold["pids"]) & set(warm["pids"])
        assert cold["resident_after_evict"] is not None and cold["resident_after_evict"] <= 0.05
        assert "resident_after_evict" not in warm


def test_latency_percentiles_and_throughput(report):
    settings = report["settings"]["speed"]
    for role in ("baseline", "artifact"):
        latency = _cpu(report, role)["latency"]
        assert [(c["batch_size"], c["seq_len"]) for c in latency] == [(1, 128), (8, 128)]
        for c in latency:
            assert 0 < c["p50_ms"] <= c["p90_ms"] <= c["p99_ms"]
            assert c["calls"] == settings["rounds"] * settings["calls"]
            assert c["throughput_per_s"] == pytest.approx(c["batch_size"] * 1000 / c["p50_ms"])
    base, art = _cpu(report, "baseline")["latency"], _cpu(report, "artifact")["latency"]
    for b, a in zip(base, art):
        assert a["speedup"] == pytest.approx(b["p50_ms"] / a["p50_ms"])
        assert a["speedup_q25"] <= a["speedup_q75"]


def test_cuda_is_skipped_plainly_without_a_gpu(report):
    import torch

    if torch.cuda.is_available():
        assert report["devices"] == ["cpu", "cuda"]
    else:
        assert report["devices"] == ["cpu"]
        assert report["skipped"] == [{"device": "cuda", "reason": report["skipped"][0]["reason"]}]
        assert "CUDA" in report["skipped"][0]["reason"]


def test_gates_in_report_markdown_and_junit(minilm_fp16, report):
    assert report["passed"] is True
    passed = [g for g in report["gates"] if g["status"] == "passed"]
    assert {g["gate"] for g in passed} == {"max_accuracy_drop", "min_fidelity", "min_compression"}
    tree = ET.parse(minilm_fp16 / "junit.xml")
    cases = tree.getroot().findall(".//testcase")
    assert {c.get("name") for c in cases} == {"max_accuracy_drop", "min_fidelity", "min_compression"}
    cpu_cases = [c for c in cases if ".cpu." in c.get("classname")]
    assert cpu_cases and all(c.find("failure") is None and c.find("error") is None for c in cpu_cases)
    md = (minilm_fp16 / "report.md").read_text()
    for text in ("baseline (source)", "artifact (safetensors)", "## Load", "cold load", "warm load",
                 "## Latency", "p99", "speedup", "## Gates", "compression"):
        assert text in md, text


def test_eval_of_a_copy_elsewhere_reproduces_the_accuracy(minilm_fp16, report, tmp_path):
    copy = tmp_path / "elsewhere" / "minilm"
    shutil.copytree(minilm_fp16, copy)
    proc = run_cli("eval", str(copy), "--no-speed", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = read_report(copy)
    assert again["artifact"]["path"] == str(copy.resolve())
    for role in ("baseline", "artifact"):
        assert _cpu(again, role)["accuracy"] == _cpu(report, role)["accuracy"]
    assert _cpu(again, "artifact")["fidelity"]["cos_min"] == pytest.approx(
        _cpu(report, "artifact")["fidelity"]["cos_min"], abs=1e-6)
    assert "cpu/safetensors: accuracy" in proc.stdout
