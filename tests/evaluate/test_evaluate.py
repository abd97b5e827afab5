"""The evaluator: accuracy, fidelity, size, speed and load of an artifact against its baseline, release gates,
reports (report.json/.md, junit.xml, report.png), `compress eval`, evaluation data sources and their recipe
validation. Real models only (the zoo's digits MLP); every file in tmp_path."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from compressor.errors import RecipeError, UsageError
from compressor.recipe import EvaluateSpec, parse_recipe

from conftest import assert_same_scores, read_report, run_cli, strict_json

REPORT_FILES = ("report.json", "report.md", "junit.xml", "report.png")

SPEED_TINY = "{batch_sizes: [4], rounds: 2, calls: 1, warmup: 1, load_runs: 1}"
SPEED_NO_LOAD = "{batch_sizes: [4], rounds: 2, calls: 1, warmup: 1, load_runs: 0}"

DIGITS_BF16 = """\
name: digits-bf16
model: {source: zoo, name: digits-mlp}
passes:
  - cast: {dtype: bfloat16}
"""

FAILING_GATE = DIGITS_BF16 + f"""\
evaluate:
  speed: {SPEED_TINY}
gates:
  min_speedup: 100
"""

GENEROUS_GATES = DIGITS_BF16 + f"""\
evaluate:
  speed: {SPEED_NO_LOAD}
gates:
  min_speedup: 0.001
  max_accuracy_drop: 5
  min_fidelity: 0.99
  min_compression: 1.5
  max_size_bytes: 1MB
"""


# ------------------------------------------------------------------------------------------------- helpers


def digits_recipe(extra: str) -> str:
    """The digits-mlp bfloat16 recipe with more sections (given indented, as in a test body)."""
    return DIGITS_BF16 + textwrap.dedent(extra)


def write_recipe(directory: Path, text: str, name: str = "recipe.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def run_in_process(directory: Path, text: str, out: Path):
    from compressor.log import Reporter
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    return run_recipe(load_recipe(write_recipe(directory, text)), out, Reporter(quiet=True))


def digits_rows() -> list[tuple[int, list[float]]]:
    """The held-out digits split the built-in `digits` data set uses, as (label, 64 pixels) rows."""
    from compressor.zoo import digits_split

    _, x_test, _, y_test = digits_split("digits-mlp")
    return [(int(y), [float(v) for v in x]) for x, y in zip(x_test, y_test)]


def builtin_digits_accuracy(artifact: Path) -> tuple[dict, dict]:
    """(baseline, artifact) accuracy entries of ``artifact`` on the built-in digits set, measured in-process."""
    from compressor.evaluate import evaluate_artifact
    from compressor.evaluate.subjects import source_subject
    from compressor.log import Reporter

    spec = EvaluateSpec.model_validate({"data": "digits"})
    report = evaluate_artifact(artifact, baseline=source_subject({"source": "zoo", "name": "digits-mlp"}, artifact),
                               spec=spec, log=Reporter(quiet=True), measure_speed=False).to_json()
    base, art = report["results"]
    return base["accuracy"], art["accuracy"]


def junit_cases(path: Path) -> list[ET.Element]:
    return list(ET.parse(path).getroot().iter("testcase"))


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def failed_gate_run(tmp_path_factory: pytest.TempPathFactory):
    """`compress run` of digits-mlp in bfloat16 with a speed gate it cannot meet (and one load run per mode)."""
    base = tmp_path_factory.mktemp("gate-fail")
    out = base / "out"
    proc = run_cli("run", str(write_recipe(base / "recipe", FAILING_GATE)), "-o", str(out))
    return proc, out


@pytest.fixture
def copied_artifact(failed_gate_run, tmp_path: Path) -> Path:
    """The failed-gate artifact, copied elsewhere by way of a directory that is then deleted."""
    _, out = failed_gate_run
    assert (out / "manifest.json").is_file(), "the run wrote no artifact"
    first = tmp_path / "first" / "art"
    shutil.copytree(out, first)
    moved = tmp_path / "elsewhere" / "art"
    shutil.copytree(first, moved)
    shutil.rmtree(tmp_path / "first")
    return moved


# ------------------------------------------------------------------------------------------------ imports


# ----------------------------------------------------------------------------------------- gates via the CLI


def test_missed_gate_exits_3_after_writing_artifact_and_reports(failed_gate_run):
    proc, out = failed_gate_run
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    for name in ("manifest.json", "model.safetensors", "example_inputs.safetensors", *REPORT_FILES):
        assert (out / name).is_file(), name
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import compressor

    compressor.load(out, verify_hashes=True)  # the artifact is kept intact

    report = read_report(out)
    assert report["passed"] is False
    (gate,) = report["gates"]
    assert (gate["gate"], gate["device"], gate["format"], gate["status"]) == ("min_speedup", "cpu", "safetensors",
                                                                              "failed")
    assert gate["threshold"] == 100 and gate["comparison"] == ">=" and 0 < gate["measured"] < 100
    measured = f"{gate['measured']:.4g}x"

    root = ET.parse(out / "junit.xml").getroot()
    assert root.tag == "testsuites" and root.get("failures") == "1" and root.get("errors") == "0"
    (case,) = junit_cases(out / "junit.xml")
    assert case.get("name") == "min_speedup"
    assert case.get("classname") == "compressor.gates.cpu.safetensors"
    failure = case.find("failure")
    assert failure is not None
    assert measured in failure.get("message") and ">= 100x" in failure.get("message")
    assert "measured" in failure.text and "100" in failure.text

    both = proc.stdout + proc.stderr
    assert "min_speedup" in proc.stderr and measured in proc.stderr and ">= 100x" in proc.stderr
    assert "1 release gate(s) missed" in proc.stderr
    assert "gates: 0 passed, 1 failed" in both

    markdown = (out / "report.md").read_text()
    assert "min_speedup" in markdown and "**FAIL**" in markdown and "**a gate failed**" in markdown


def test_generous_gates_exit_0_and_every_junit_case_passes(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("run", str(write_recipe(tmp_path / "recipe", GENEROUS_GATES)), "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gates: 5 passed" in proc.stdout
    report = read_report(out)
    assert report["passed"] is True
    assert {g["gate"]: g["status"] for g in report["gates"]} == {
        "max_accuracy_drop": "passed", "min_fidelity": "passed", "min_speedup": "passed",
        "max_size_bytes": "passed", "min_compression": "passed"}
    size_gate = next(g for g in report["gates"] if g["gate"] == "max_size_bytes")
    assert size_gate["threshold"] == 1_000_000 and size_gate["measured"] == report["results"][1]["size_bytes"]

    root = ET.parse(out / "junit.xml").getroot()
    assert (root.get("tests"), root.get("failures"), root.get("errors"), root.get("skipped")) == ("5", "0", "0", "0")
    cases = junit_cases(out / "junit.xml")
    assert sorted(c.get("name") for c in cases) == sorted(report["gates"][i]["gate"] for i in range(5))
    for case in cases:
        assert [child.tag for child in case] == ["system-out"], ET.tostring(case)
        assert "meets the threshold" in case.find("system-out").text
    # load_runs: 0 skips load timing
    assert all(row["load"] is None for row in report["results"])


# -------------------------------------------------------------------------------------- report.json schema


ROW_KEYS = {"role", "label", "format", "device", "size_bytes", "files_bytes", "accuracy", "fidelity", "load",
            "latency"}
LATENCY_KEYS = {"batch_size", "seq_len", "p50_ms", "p90_ms", "p99_ms", "iqr_ms", "min_ms", "mean_ms", "calls",
                "throughput_per_s"}
STAT_KEYS = {"median", "iqr", "min", "max", "runs"}


def test_report_json_schema(failed_gate_run):
    _, out = failed_gate_run
    text = (out / "report.json").read_text()
    report = strict_json(text)  # no NaN / Infinity anywhere
    assert report["format"] == "compressor-report" and report["format_version"] == 1
    assert {"created", "compressor", "artifact", "baseline", "machine", "settings", "data", "devices", "skipped",
            "results", "gates", "passed"} <= set(report)
    assert report["artifact"]["name"] == "digits-bf16" and Path(report["artifact"]["path"]) == out.resolve()
    import hashlib

    assert report["artifact"]["manifest_sha256"] == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert report["baseline"]["label"] == "zoo: digits-mlp" and report["baseline"]["format"] == "source"
    assert report["baseline"]["spec"]["kind"] == "source"
    assert {"cpu", "cores", "threads", "platform", "python", "torch", "cuda"} <= set(report["machine"])
    assert report["settings"]["speed"]["load_runs"] == 1 and report["settings"]["devices"] == ["cpu"]
    assert report["data"]["metric"] == "top1_accuracy" and report["data"]["examples"] == 450
    assert report["devices"] == ["cpu"] and report["skipped"] == []

    base, art = report["results"]
    assert (base["role"], art["role"]) == ("baseline", "artifact")
    assert base["device"] == art["device"] == "cpu"
    assert (base["format"], art["format"]) == ("source", "safetensors")
    assert ROW_KEYS <= set(base) and ROW_KEYS | {"ratios"} <= set(art)
    assert base["fidelity"] is None
    for row in (base, art):
        acc = row["accuracy"]
        assert acc["metric"] == "top1_accuracy" and acc["examples"] == 450
        assert acc["value"] == pytest.approx(100 * acc["correct"] / 450) and acc["value"] > 90
        (lat,) = row["latency"]
        assert LATENCY_KEYS <= set(lat) and lat["batch_size"] == 4 and lat["seq_len"] is None and lat["calls"] == 2
        assert not any(k.startswith("_") for k in lat)  # private per-round data is not written
        assert lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
        assert lat["throughput_per_s"] == pytest.approx(4 * 1000 / lat["p50_ms"])  # from the median call
        for mode in ("cold", "warm"):
            entry = row["load"][mode]
            for key in ("load_ms", "first_inference_ms"):
                assert set(entry[key]) == STAT_KEYS and entry[key]["runs"] == 1 and entry[key]["median"] > 0
            for key in ("peak_rss_mb", "rss_added_mb", "anon_rss_mb"):
                assert isinstance(entry[key], (int, float)) and entry[key] >= 0
            assert entry["peak_gpu_mb"] is None
            assert len(entry["pids"]) == 1 and entry["pids"][0] != os.getpid()
        resident = row["load"]["cold"]["resident_after_evict"]
        assert isinstance(resident, (int, float)) and 0 <= resident <= 0.05
        assert "resident_after_evict" not in row["load"]["warm"]
    assert base["load"]["cold"]["pids"] != art["load"]["cold"]["pids"]  # one fresh process per run

    assert set(art["fidelity"]) == {"cos_min", "cos_mean", "max_abs_err", "top1_agreement", "examples"}
    assert 0.999 < art["fidelity"]["cos_min"] <= art["fidelity"]["cos_mean"] <= 1 + 1e-6
    assert art["fidelity"]["examples"] == 450 and art["fidelity"]["top1_agreement"] > 95
    assert {"speedup", "speedup_q25", "speedup_q75"} <= set(art["latency"][0])
    assert art["latency"][0]["speedup"] == pytest.approx(base["latency"][0]["p50_ms"] / art["latency"][0]["p50_ms"])
    ratios = art["ratios"]
    assert set(ratios) == {"compression", "accuracy_drop", "cold_load_speedup", "warm_load_speedup",
                           "cold_first_inference_speedup", "warm_first_inference_speedup", "rss_added_ratio"}
    assert ratios["rss_added_ratio"] == pytest.approx(base["load"]["cold"]["rss_added_mb"]
                                                      / art["load"]["cold"]["rss_added_mb"])
    assert ratios["compression"] == pytest.approx(base["size_bytes"] / art["size_bytes"]) and ratios["compression"] > 1.8
    assert ratios["accuracy_drop"] == pytest.approx(base["accuracy"]["value"] - art["accuracy"]["value"])
    assert ratios["cold_load_speedup"] == pytest.approx(base["load"]["cold"]["load_ms"]["median"]
                                                        / art["load"]["cold"]["load_ms"]["median"])
    assert art["size_bytes"] == (out / "model.safetensors").stat().st_size

    (gate,) = report["gates"]
    assert set(gate) == {"gate", "device", "format", "target", "threshold", "comparison", "measured", "status",
                         "message"}
    assert gate["target"] is None  # a CPU family, for int8 ONNX rows only
    assert gate["status"] in ("passed", "failed", "error", "skipped")


# ------------------------------------------------------------------------------------------ compress eval


def test_eval_of_a_copied_artifact_reproduces_the_run_and_no_gates_exits_0(failed_gate_run, copied_artifact):
    _, out = failed_gate_run
    original = read_report(out)
    proc = run_cli("eval", str(copied_artifact), "--no-gates")
    assert proc.returncode == 0, proc.stderr[-3000:]  # although min_speedup: 100 is missed again
    report = read_report(copied_artifact)
    assert Path(report["artifact"]["path"]) == copied_artifact.resolve()
    assert report["gates"] == [] and report["passed"] is None
    assert report["baseline"]["label"] == "zoo: digits-mlp"
    assert_same_scores(original, report)
    assert report["results"][1]["latency"][0]["speedup"] < 100  # the gate would have failed
    assert report["results"][1]["load"]["cold"]["load_ms"]["runs"] == 1
    root = ET.parse(copied_artifact / "junit.xml").getroot()
    assert [c.get("name") for c in root.iter("testcase")] == ["evaluation"]
    assert "report:" in proc.stdout and "gates:" not in proc.stdout


def test_eval_device_all_without_cuda_measures_cpu_and_says_cuda_was_skipped(copied_artifact):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the test is about machines without it")
    proc = run_cli("eval", str(copied_artifact), "--device", "all", "--no-speed", "--no-gates")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cuda skipped" in proc.stderr and "cuda: skipped" in proc.stdout
    report = read_report(copied_artifact)
    assert report["devices"] == ["cpu"]
    (skipped,) = report["skipped"]
    assert skipped["device"] == "cuda" and "CUDA" in skipped["reason"]
    assert [r["device"] for r in report["results"]] == ["cpu", "cpu"]
    assert report["settings"]["measure_speed"] is False
    assert all(r["latency"] == [] and r["load"] is None for r in report["results"])
    assert "cuda skipped" in (copied_artifact / "report.md").read_text()


def test_eval_device_cuda_alone_without_cuda_exits_1(copied_artifact):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = (copied_artifact / "report.json").read_bytes()
    proc = run_cli("eval", str(copied_artifact), "--device", "cuda")
    assert proc.returncode == 1, proc.stderr
    assert "nothing to measure" in proc.stderr and "no CUDA device" in proc.stderr and "--device cpu" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (copied_artifact / "report.json").read_bytes() == before  # no report was rewritten


def test_eval_with_zoo_baseline_checks_the_recipe_gates(failed_gate_run, copied_artifact):
    _, out = failed_gate_run
    proc = run_cli("eval", str(copied_artifact), "--baseline", "zoo:digits-mlp", "--no-speed")
    # The recipe's min_speedup cannot be measured without speed: an error, which fails like a miss (exit 3).
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "min_speedup" in proc.stderr and "not measured" in proc.stderr
    report = read_report(copied_artifact)
    assert report["baseline"]["label"] == "zoo: digits-mlp"
    assert [r["accuracy"] for r in report["results"]] == [r["accuracy"] for r in read_report(out)["results"]]
    (gate,) = report["gates"]
    assert gate["status"] == "error" and gate["measured"] is None and report["passed"] is False
    (case,) = junit_cases(copied_artifact / "junit.xml")
    error = case.find("error")
    assert error is not None and error.get("type") == "NotMeasured" and "min_speedup" in error.get("message")


@pytest.mark.parametrize("baseline, expected", [
    ("zoo:nope", "no zoo model 'nope'"),
    ("/nonexistent/model", "not a directory"),
])
def test_eval_with_an_unusable_baseline_exits_2(failed_gate_run, baseline, expected):
    _, out = failed_gate_run
    proc = run_cli("eval", str(out), "--baseline", baseline)
    assert proc.returncode == 2, proc.stderr
    assert f"--baseline {baseline}" in proc.stderr and expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_artifact_directory_as_baseline_is_remembered_by_the_report(tmp_path):
    from compressor.evaluate import evaluate_artifact
    from compressor.evaluate.subjects import baseline_from_argument, baseline_from_manifest
    from compressor.log import Reporter
    from compressor.manifest import read_manifest

    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    run_in_process(tmp_path / "r32", "name: digits-fp32\nmodel: {source: zoo, name: digits-mlp}\n", fp32)
    run_in_process(tmp_path / "r16", DIGITS_BF16, bf16)
    baseline = baseline_from_argument(str(fp32), read_manifest(bf16))
    assert (baseline.role, baseline.format, baseline.label) == ("baseline", "safetensors", "artifact fp32")
    report = evaluate_artifact(bf16, baseline=baseline, spec=EvaluateSpec(), log=Reporter(quiet=True),
                               measure_speed=False).to_json()
    base, art = report["results"]
    assert base["format"] == art["format"] == "safetensors"
    assert base["size_bytes"] == (fp32 / "model.safetensors").stat().st_size
    assert art["ratios"]["compression"] == pytest.approx(base["size_bytes"] / art["size_bytes"])
    assert 1.8 < art["ratios"]["compression"] < 2.0
    assert report["baseline"]["spec"] == {"kind": "artifact", "path": str(fp32.resolve())}

    # Without --baseline, `compress eval` compares with what the artifact's last report used.
    again = baseline_from_manifest(bf16, read_manifest(bf16))
    assert (again.spec, again.label) == (baseline.spec, baseline.label)

    zoo_base, _ = builtin_digits_accuracy(bf16)  # the fp32 artifact scores exactly as the zoo model it holds
    assert base["accuracy"] == zoo_base

    with pytest.raises(UsageError, match="neither a compressor artifact"):
        baseline_from_argument(str(tmp_path / "r16"), read_manifest(bf16))


def test_eval_on_a_directory_that_is_not_an_artifact_exits_1(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a model\n")
    proc = run_cli("eval", str(plain))
    assert proc.returncode == 1, proc.stderr  # ArtifactError: runtime failure, not usage
    assert "has no manifest.json" in proc.stderr and "not a compressor artifact" in proc.stderr
    assert sorted(p.name for p in plain.iterdir()) == ["notes.txt"]  # nothing written into it

    missing = run_cli("eval", str(tmp_path / "missing"))
    assert missing.returncode == 1, missing.stderr
    assert "is not a directory" in missing.stderr


# ----------------------------------------------------------------------------------------- recipe validation


def parse(text: str, base_dir: Path | None = None):
    return parse_recipe(textwrap.dedent(text), file="r.yaml", base_dir=base_dir)


def parse_error(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        parse(text)
    assert info.value.exit_code == 2
    return str(info.value)


def test_devices_all_expands_to_cpu_and_cuda():
    recipe = parse(DIGITS_BF16 + "evaluate:\n  devices: all\n")
    assert recipe.evaluate.devices == ["cpu", "cuda"]
    assert parse(DIGITS_BF16 + "evaluate: {}\n").evaluate.devices == ["cpu"]
    assert "not a valid value" in parse_error(DIGITS_BF16 + "evaluate:\n  devices: [tpu]\n")


@pytest.mark.parametrize("shorthand, field, value", [
    ("digits", "builtin", "digits"),
    ("text-pairs", "builtin", "text-pairs"),
    ("held_out.jsonl", "path", "held_out.jsonl"),
    ("rows.CSV", "path", "rows.CSV"),
    ("mydata.sets:batches", "function", "mydata.sets:batches"),
])
def test_data_shorthand(shorthand, field, value):
    data = parse(DIGITS_BF16 + f"evaluate:\n  data: {shorthand}\n").evaluate.data
    assert getattr(data, field) == value
    assert {f: getattr(data, f) for f in ("builtin", "path", "function") if f != field} == {
        f: None for f in ("builtin", "path", "function") if f != field}
    assert data.batch_size == 32 and data.limit is None


@pytest.mark.parametrize("data, expected", [
    ("imagenet", "is not a built-in data set (digits, digits-train, text-pairs, calibration-text, held-out-text), a "
                 ".jsonl/.csv/.txt file or a module:function"),
    ("{builtin: digits, path: x.jsonl}", "give one of builtin, path and function, not builtin and path"),
    ("{path: x.jsonl, function: m:f}", "not path and function"),
    ("{path: rows.parquet}", "only .jsonl, .csv and .txt files are read"),
    ("{function: 'not a function'}", "write it as module:function"),
    ("{builtin: mnist}", "not a valid value"),
])
def test_invalid_data_sections_are_rejected(data, expected):
    message = parse_error(DIGITS_BF16 + f"evaluate:\n  data: {data}\n")
    assert expected in message
    assert "evaluate.data" in message


def test_max_size_bytes_accepts_size_strings():
    gates = parse(DIGITS_BF16 + "gates:\n  max_size_bytes: 50MB\n").gates
    assert gates.max_size_bytes.value == 50_000_000
    gates = parse(DIGITS_BF16 + "gates:\n  max_size_bytes: {value: 1.5GiB, device: cpu}\n").gates
    assert gates.max_size_bytes.value == int(1.5 * 2**30) and gates.max_size_bytes.device == "cpu"
    assert parse(DIGITS_BF16 + "gates:\n  max_size_bytes: 123456\n").gates.max_size_bytes.value == 123456
    message = parse_error(DIGITS_BF16 + "gates:\n  max_size_bytes: fifty megabytes\n")
    assert "'fifty megabytes' is not a size" in message and "50MB" in message


def test_gate_thresholds_take_a_number_or_a_mapping():
    gates = parse(DIGITS_BF16 + "gates:\n  min_speedup: 1.5\n  min_fidelity: {value: 0.99, format: safetensors}\n"
                  ).gates
    assert (gates.min_speedup.value, gates.min_speedup.device, gates.min_speedup.format) == (1.5, None, None)
    assert (gates.min_fidelity.value, gates.min_fidelity.format) == (0.99, "safetensors")
    assert "expected a number" in parse_error(DIGITS_BF16 + "gates:\n  min_speedup: fast\n")
    assert "unknown key 'min_speed'" in parse_error(DIGITS_BF16 + "gates:\n  min_speed: 2\n")


def test_gate_on_a_device_that_is_not_evaluated_is_rejected():
    message = parse_error(DIGITS_BF16 + "evaluate:\n  devices: [cpu]\ngates:\n  min_speedup: {value: 1.2, device: cuda}\n")
    assert "gates.min_speedup applies to device cuda" in message and "evaluate.devices (cpu)" in message
    # without an evaluate section the default devices ([cpu]) apply
    assert "applies to device cuda" in parse_error(DIGITS_BF16 + "gates:\n  min_fidelity: {value: 0.9, device: cuda}\n")
    ok = parse(DIGITS_BF16 + "evaluate:\n  devices: all\ngates:\n  min_speedup: {value: 1.2, device: cuda}\n")
    assert ok.gates.min_speedup.device == "cuda"


def test_max_load_ms_needs_load_runs():
    message = parse_error(DIGITS_BF16 + "evaluate:\n  speed: {load_runs: 0}\ngates:\n  max_load_ms: 500\n")
    assert "max_load_ms needs load timing" in message and "load_runs is 0" in message
    assert parse(DIGITS_BF16 + "evaluate:\n  speed: {load_runs: 1}\ngates:\n  max_load_ms: 500\n"
                 ).gates.max_load_ms.value == 500


def test_gate_on_a_format_that_is_never_exported_is_rejected():
    message = parse_error(DIGITS_BF16 + "gates:\n  min_speedup: {value: 1.2, format: onnx}\n")
    assert "onnx" in message


def test_gates_without_evaluate_use_the_default_evaluation():
    recipe = parse(DIGITS_BF16 + "gates:\n  min_compression: 1.9\n")
    assert recipe.evaluate is None
    assert recipe.evaluation == EvaluateSpec()
    assert recipe.evaluation.speed.load_runs == 3 and recipe.evaluation.devices == ["cpu"]
    assert parse(DIGITS_BF16).evaluation is None
    assert parse(DIGITS_BF16 + "evaluate:\n  data: digits\n").evaluation.data.builtin == "digits"


# ------------------------------------------------------------------------------------------------ user data


def write_jsonl(path: Path, rows: list[tuple[int, list[float]]]) -> Path:
    path.write_text("".join(json.dumps({"label": label, "x": x}) + "\n" for label, x in rows))
    return path


def test_jsonl_data_is_copied_into_the_artifact_and_scores_like_the_builtin_set(tmp_path):
    recipe_dir = tmp_path / "recipe"
    (recipe_dir / "data").mkdir(parents=True)
    write_jsonl(recipe_dir / "data" / "held_out.jsonl", digits_rows())
    out = tmp_path / "out"
    result = run_in_process(recipe_dir, digits_recipe(f"""\
        evaluate:
          data: {{path: data/held_out.jsonl, batch_size: 64}}
          speed: {SPEED_NO_LOAD}
        """), out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["evaluation"] == {"data_file": "eval/held_out.jsonl"}
    assert "eval/held_out.jsonl" in manifest["files"]
    assert (out / "eval" / "held_out.jsonl").read_bytes() == (recipe_dir / "data" / "held_out.jsonl").read_bytes()

    report = result.report.to_json()
    assert report["data"]["name"] == "held_out.jsonl (450 labelled rows)" and report["data"]["examples"] == 450
    builtin = builtin_digits_accuracy(out)
    assert [r["accuracy"]["value"] for r in report["results"]] == [a["value"] for a in builtin]
    assert [r["accuracy"]["correct"] for r in report["results"]] == [a["correct"] for a in builtin]

    # The artifact evaluates from its own copy: the original file is not needed any more.
    (recipe_dir / "data" / "held_out.jsonl").unlink()
    proc = run_cli("eval", str(out), "--no-speed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = read_report(out)
    assert again["data"]["name"] == report["data"]["name"]
    assert [r["accuracy"] for r in again["results"]] == [r["accuracy"] for r in report["results"]]


def test_csv_data_with_label_and_feature_columns(tmp_path):
    rows = digits_rows()[:100]
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    lines = ["label," + ",".join(f"f{i}" for i in range(64))]
    lines += [f"{label}," + ",".join(repr(v) for v in x) for label, x in rows]
    (recipe_dir / "digits.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    report = run_in_process(recipe_dir, digits_recipe(f"""\
        evaluate:
          data: digits.csv
          speed: {SPEED_NO_LOAD}
        """), out).report.to_json()
    assert report["data"]["name"] == "digits.csv (100 labelled rows)"
    assert (out / "eval" / "digits.csv").is_file()

    import compressor
    import torch

    x = torch.tensor([x for _, x in rows])
    y = torch.tensor([label for label, _ in rows])
    with torch.no_grad():
        expected = int((compressor.load(out)(x).argmax(-1) == y).sum())
    art = report["results"][1]["accuracy"]
    assert art["correct"] == expected and art["examples"] == 100


def test_malformed_jsonl_line_is_reported_with_file_and_line(tmp_path):
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    rows = digits_rows()[:3]
    text = json.dumps({"label": rows[0][0], "x": rows[0][1]}) + "\n\n"  # a blank line is skipped
    text += json.dumps({"label": rows[1][0], "x": rows[1][1]}) + "\n"
    text += '{"label": 3, "x": [0.0, 0.5\n'  # line 4: cut short
    (recipe_dir / "bad.jsonl").write_text(text)
    with pytest.raises(UsageError) as info:
        run_in_process(recipe_dir, DIGITS_BF16 + f"evaluate:\n  data: bad.jsonl\n  speed: {SPEED_NO_LOAD}\n",
                       tmp_path / "out")
    assert info.value.exit_code == 2
    assert "bad.jsonl:4: not valid JSON" in str(info.value)


def test_jsonl_row_with_the_wrong_number_of_values_is_reported(tmp_path):
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    rows = digits_rows()[:2]
    write_jsonl(recipe_dir / "short.jsonl", [rows[0], (rows[1][0], rows[1][1][:60])])
    with pytest.raises(UsageError) as info:
        run_in_process(recipe_dir, DIGITS_BF16 + f"evaluate:\n  data: short.jsonl\n  speed: {SPEED_NO_LOAD}\n",
                       tmp_path / "out")
    assert "short.jsonl:2: input 'x' has 60 values, the model expects 64" in str(info.value)


def test_missing_data_file_is_a_recipe_error_before_any_work(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RecipeError) as info:
        run_in_process(tmp_path / "recipe", DIGITS_BF16 + "evaluate:\n  data: nowhere.jsonl\n", out)
    assert "nowhere.jsonl does not exist" in str(info.value) and "evaluate.data.path" in str(info.value)
    assert not out.exists()


DATA_MODULE = """\
import torch

from compressor.zoo import digits_split


def batches():
    _, x, _, y = digits_split("digits-mlp")
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    for i in range(0, len(x), 50):
        yield {"x": x[i:i + 50], "labels": y[i:i + 50]}


def unlabelled():
    _, x, _, _ = digits_split("digits-mlp")
    yield {"x": torch.from_numpy(x[:40])}
"""


@pytest.fixture
def data_module(tmp_path: Path):
    """A module of data functions beside the recipe; forgotten again afterwards."""
    name = "evaluate_test_digits_batches"
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / f"{name}.py").write_text(DATA_MODULE)
    sys.modules.pop(name, None)
    yield name
    sys.modules.pop(name, None)


def test_function_data_source(tmp_path, data_module):
    out = tmp_path / "out"
    report = run_in_process(tmp_path / "recipe", digits_recipe(f"""\
        evaluate:
          data: {data_module}:batches
          speed: {SPEED_NO_LOAD}
        gates:
          max_accuracy_drop: 5
        """), out).report.to_json()
    assert report["data"]["name"] == f"{data_module}:batches (9 batches)"
    assert report["data"]["metric"] == "top1_accuracy" and report["data"]["examples"] == 450
    builtin = builtin_digits_accuracy(out)
    assert [r["accuracy"]["correct"] for r in report["results"]] == [a["correct"] for a in builtin]
    assert report["passed"] is True


def test_function_data_without_labels_gives_fidelity_only_and_accuracy_gate_error(tmp_path, data_module):
    out = tmp_path / "out"
    report = run_in_process(tmp_path / "recipe", digits_recipe(f"""\
        evaluate:
          data: {{function: "{data_module}:unlabelled"}}
          speed: {SPEED_NO_LOAD}
        gates:
          max_accuracy_drop: 5
          min_fidelity: 0.99
        """), out).report.to_json()
    assert report["data"]["metric"] is None and report["data"]["examples"] == 40
    base, art = report["results"]
    assert base["accuracy"] is None and art["accuracy"] is None
    assert art["fidelity"]["examples"] == 40 and art["fidelity"]["cos_min"] > 0.99
    assert art["ratios"]["accuracy_drop"] is None
    status = {g["gate"]: (g["status"], g["message"]) for g in report["gates"]}
    assert status["min_fidelity"][0] == "passed"
    assert status["max_accuracy_drop"][0] == "error" and "no task metric" in status["max_accuracy_drop"][1]
    assert report["passed"] is False


def test_unimportable_data_function_names_the_evaluate_key(tmp_path):
    from compressor.errors import CompressorError

    with pytest.raises(CompressorError) as info:
        run_in_process(tmp_path / "recipe", digits_recipe(f"""\
            evaluate:
              data: evaluate_test_no_such_module:batches
              speed: {SPEED_NO_LOAD}
            """), tmp_path / "out")
    message = str(info.value)
    assert info.value.exit_code == 2
    assert "cannot import 'evaluate_test_no_such_module'" in message
    assert "evaluate.data.function" in message and "model.factory" not in message


def test_function_data_limit_keeps_only_the_first_examples(tmp_path, data_module):
    report = run_in_process(tmp_path / "recipe", digits_recipe(f"""\
        evaluate:
          data: {{function: "{data_module}:batches", limit: 10}}
          speed: {SPEED_NO_LOAD}
        """), tmp_path / "out").report.to_json()
    assert report["results"][0]["accuracy"]["examples"] == 10


def test_file_data_limit_keeps_only_the_first_rows(tmp_path):
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    write_jsonl(recipe_dir / "d.jsonl", digits_rows()[:30])
    report = run_in_process(recipe_dir, digits_recipe(f"""\
        evaluate:
          data: {{path: d.jsonl, limit: 10}}
          speed: {SPEED_NO_LOAD}
        """), tmp_path / "out").report.to_json()
    assert report["data"]["examples"] == 10 and report["results"][0]["accuracy"]["examples"] == 10


# ------------------------------------------------------------------------------------------------ staging


def test_rerun_into_an_artifact_with_reports_succeeds_but_unknown_files_are_refused(tmp_path):
    recipe_text = GENEROUS_GATES
    out = tmp_path / "out"
    first = run_in_process(tmp_path / "recipe", recipe_text, out)
    assert all((out / name).is_file() for name in REPORT_FILES)
    created = first.report.created

    second = run_in_process(tmp_path / "recipe", recipe_text, out)  # reports are known files: no refusal
    assert second.report.passed is True
    assert all((out / name).is_file() for name in REPORT_FILES)
    assert read_report(out)["created"] >= created
    assert not [p for p in tmp_path.iterdir() if ".compress-tmp-" in p.name]

    (out / "notes.txt").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = run_cli("run", str(tmp_path / "recipe" / "recipe.yaml"), "-o", str(out))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "refusing to replace" in proc.stderr and "notes.txt" in proc.stderr
    assert "report.json" not in proc.stderr.split("would be lost:", 1)[1]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# ------------------------------------------------------------------------------------------------ unit: gates


def artifact_row(device: str = "cpu", fmt: str = "safetensors", *, speedups=(2.0, 1.2), drop=0.5, cos=0.999,
                 size=1000, compression=2.0, cold_ms=50.0) -> dict:
    return {
        "role": "artifact", "label": "artifact", "format": fmt, "device": device, "size_bytes": size,
        "fidelity": None if cos is None else {"cos_min": cos},
        "latency": [{"batch_size": b, "seq_len": None, "speedup": s} for b, s in zip((1, 8), speedups)],
        "load": {"cold": None if cold_ms is None else {"load_ms": {"median": cold_ms}}, "warm": None},
        "ratios": {"compression": compression, "accuracy_drop": drop},
    }


def baseline_row(device: str = "cpu") -> dict:
    return {"role": "baseline", "label": "zoo", "format": "source", "device": device, "size_bytes": 2000}


def gates(**values):
    from compressor.recipe import GatesSpec

    return GatesSpec.model_validate(values)


def test_check_gates_passed_and_failed_with_the_worst_speedup():
    from compressor.evaluate.gates import check_gates

    rows = [baseline_row(), artifact_row(speedups=(2.0, 1.2))]
    (entry,) = check_gates(gates(min_speedup=1.5), rows, ["cpu"], {})
    assert entry["status"] == "failed" and entry["measured"] == 1.2  # the worst configuration, not the best
    assert entry["threshold"] == 1.5 and entry["comparison"] == ">=" and entry["device"] == "cpu"
    assert "at batch 8" in entry["message"] and "misses the threshold >= 1.5x" in entry["message"]
    (entry,) = check_gates(gates(min_speedup=1.2), rows, ["cpu"], {})  # the bound itself passes
    assert entry["status"] == "passed" and "meets" in entry["message"]

    result = check_gates(gates(max_accuracy_drop=0.5, min_fidelity=0.9995, max_size_bytes=1000, min_compression=2.5,
                               max_load_ms=49), rows, ["cpu"], {})
    assert [(g["gate"], g["status"], g["measured"]) for g in result] == [
        ("max_accuracy_drop", "passed", 0.5), ("min_fidelity", "failed", 0.999),
        ("max_size_bytes", "passed", 1000.0), ("min_compression", "failed", 2.0), ("max_load_ms", "failed", 50.0)]
    assert check_gates(None, rows, ["cpu"], {}) == []


def test_check_gates_errors_when_a_value_was_not_measured():
    from compressor.evaluate.gates import check_gates

    rows = [baseline_row(), artifact_row(speedups=(), drop=None, cold_ms=None, cos=None)]
    result = check_gates(gates(max_accuracy_drop=1, min_fidelity=0.9, min_speedup=1, max_load_ms=100), rows, ["cpu"],
                         {})
    assert [g["status"] for g in result] == ["error"] * 4
    assert all(g["measured"] is None for g in result)
    messages = {g["gate"]: g["message"] for g in result}
    assert "no task metric" in messages["max_accuracy_drop"]
    assert "no fidelity was measured" in messages["min_fidelity"]
    assert "no latency was measured" in messages["min_speedup"]
    assert "no cold load was measured" in messages["max_load_ms"]

    nan_row = artifact_row(cos=math.nan)
    (entry,) = check_gates(gates(min_fidelity=0.9), [baseline_row(), nan_row], ["cpu"], {})
    assert entry["status"] == "error" and entry["measured"] is None


def test_gate_message_tells_the_measured_value_from_the_threshold():
    from compressor.evaluate.gates import check_gates

    (entry,) = check_gates(gates(min_fidelity=0.99999), [baseline_row(), artifact_row(cos=0.99996)], ["cpu"], {})
    assert entry["status"] == "failed" and entry["measured"] == 0.99996
    assert "0.99996" in entry["message"] and "0.99999" in entry["message"]


def test_check_gates_skipped_devices_and_device_format_filters():
    from compressor.evaluate.gates import check_gates

    rows = [baseline_row(), artifact_row(speedups=(3.0, 2.0))]
    skipped = {"cuda": "no CUDA device is available"}
    result = check_gates(gates(min_speedup=1.5), rows, ["cpu"], skipped)
    assert [(g["device"], g["status"]) for g in result] == [("cpu", "passed"), ("cuda", "skipped")]
    assert "no CUDA device is available" in result[1]["message"] and result[1]["measured"] is None

    only_cpu = check_gates(gates(min_speedup={"value": 1.5, "device": "cpu"}), rows, ["cpu"], skipped)
    assert [(g["device"], g["status"]) for g in only_cpu] == [("cpu", "passed")]
    only_cuda = check_gates(gates(min_speedup={"value": 1.5, "device": "cuda"}), rows, ["cpu"], skipped)
    assert [(g["device"], g["status"]) for g in only_cuda] == [("cuda", "skipped")]

    (onnx,) = check_gates(gates(min_speedup={"value": 1.5, "format": "onnx"}), rows, ["cpu"], {})
    assert onnx["status"] == "error" and onnx["format"] == "onnx"
    assert "nothing was measured for this device and format" in onnx["message"]
    (st,) = check_gates(gates(min_speedup={"value": 1.5, "format": "safetensors"}), rows, ["cpu"], {})
    assert st["status"] == "passed" and st["format"] == "safetensors"

    two_devices = rows + [baseline_row("cuda"), artifact_row("cuda", speedups=(1.0, 4.0))]
    result = check_gates(gates(min_speedup=1.5), two_devices, ["cpu", "cuda"], {})
    assert [(g["device"], g["status"], g["measured"]) for g in result] == [("cpu", "passed", 2.0),
                                                                           ("cuda", "failed", 1.0)]


# ------------------------------------------------------------------------------------- unit: accuracy, fidelity


def test_fidelity_of_identical_outputs():
    import torch

    from compressor.evaluate.accuracy import fidelity

    gen = torch.Generator().manual_seed(0)
    outs = [torch.randn(5, 10, generator=gen), torch.randn(3, 10, generator=gen)]
    fid = fidelity(outs, [o.clone() for o in outs], classifier=True)
    assert fid["cos_min"] == pytest.approx(1.0, abs=1e-6) and fid["cos_mean"] == pytest.approx(1.0, abs=1e-6)
    assert fid["max_abs_err"] == 0.0 and fid["top1_agreement"] == 100.0 and fid["examples"] == 8
    assert fidelity(outs, outs, classifier=False)["top1_agreement"] is None


def test_fidelity_measures_differences_and_reports_nan_as_worst():
    import torch

    from compressor.evaluate.accuracy import fidelity

    base = [torch.tensor([[1.0, 0.0], [0.0, 2.0]])]
    cand = [torch.tensor([[0.0, 1.0], [0.0, 2.5]])]  # first row orthogonal, argmax flipped; second scaled
    fid = fidelity(base, cand, classifier=True)
    assert fid["cos_min"] == pytest.approx(0.0, abs=1e-6) and fid["cos_mean"] == pytest.approx(0.5, abs=1e-6)
    assert fid["max_abs_err"] == pytest.approx(1.0) and fid["top1_agreement"] == 50.0

    nan = [torch.tensor([[1.0, float("nan")], [0.0, 2.0]])]
    fid = fidelity(base, nan, classifier=True)
    assert fid["cos_min"] == -1.0 and fid["max_abs_err"] == math.inf
    assert all(math.isfinite(fid[k]) for k in ("cos_min", "cos_mean"))

    with pytest.raises(ValueError, match="output shapes differ"):
        fidelity(base, [torch.zeros(2, 3)], classifier=True)


def test_fidelity_of_identical_zero_outputs_is_perfect():
    import torch

    from compressor.evaluate.accuracy import fidelity

    outs = [torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])]
    fid = fidelity(outs, [o.clone() for o in outs], classifier=False)
    assert fid["max_abs_err"] == 0.0
    assert fid["cos_min"] == pytest.approx(1.0)


def test_task_metric_top1_and_retrieval():
    import torch

    from compressor.evaluate.accuracy import task_metric
    from compressor.data.datasets import EvalData

    labels = torch.tensor([0, 1, 2, 1])
    data = EvalData(name="hand", metric="top1_accuracy", batches=[], labels=labels)
    outputs = [torch.tensor([[5.0, 1.0, 0.0], [0.0, 3.0, 1.0]]), torch.tensor([[0.0, 0.0, 9.0], [4.0, 1.0, 0.0]])]
    metric = task_metric(data, outputs)
    assert metric == {"metric": "top1_accuracy", "label": "top-1 accuracy (%)", "value": 75.0, "correct": 3,
                      "examples": 4}
    from compressor.errors import UsageError

    with pytest.raises(UsageError, match="3 outputs for 4 labels"):
        task_metric(data, [outputs[0], outputs[1][:1]])
    with pytest.raises(UsageError, match="label 5 is out of range for the model's output of 3 values"):
        task_metric(EvalData(name="hand", metric="top1_accuracy", batches=[], labels=torch.tensor([0, 1, 5, 1])),
                    outputs)

    # Retrieval: outputs[:3] queries, outputs[3:6] their passages; query 1 is nearest to passage 2.
    queries = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.2, 1.0], [0.0, 0.0, 1.0]])
    passages = torch.tensor([[2.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])  # norms differ: cosine is used
    pairs = EvalData(name="pairs", metric="retrieval_top1", batches=[], pairs=3)
    metric = task_metric(pairs, [queries[:2], torch.cat([queries[2:], passages[:1]]), passages[1:]])
    assert metric["metric"] == "retrieval_top1" and metric["label"] == "top-1 retrieval accuracy (%)"
    assert (metric["correct"], metric["examples"]) == (2, 3) and metric["value"] == pytest.approx(200 / 3)

    assert task_metric(EvalData(name="none", metric=None, batches=[]), outputs) is None


# ------------------------------------------------------------------------------------------ unit: speed, report


def test_percentile_and_summarize():
    from compressor.evaluate.speed import percentile, summarize

    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 25) == pytest.approx(1.75) and percentile(values, 75) == pytest.approx(3.25)
    assert percentile([7.0], 90) == 7.0
    assert math.isnan(percentile([], 50))
    assert values == [4.0, 1.0, 3.0, 2.0]  # not sorted in place
    assert summarize([10.0, 1.0, 3.0, 2.0, 4.0]) == {"median": 3.0, "iqr": 2.0, "min": 1.0, "max": 10.0, "runs": 5}


def test_clean_json_turns_non_finite_numbers_into_null_and_drops_private_keys():
    from compressor.evaluate.report import clean_json

    raw = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "_rounds": [1.0], "c": {"_x": 2, "d": None, "e": 3},
           "t": (1.0, math.nan), "s": "nan", "flag": True}
    cleaned = clean_json(raw)
    assert cleaned == {"a": None, "b": [None, None, 1.5], "c": {"d": None, "e": 3}, "t": [1.0, None], "s": "nan",
                       "flag": True}
    assert strict_json(json.dumps(cleaned, allow_nan=False)) == cleaned
    assert raw["_rounds"] == [1.0]  # the input is not modified


def test_render_junit_lists_every_gate_as_a_testcase():
    from compressor.evaluate.report import render_junit

    def gate(name, status, measured, message):
        return {"gate": name, "device": "cpu", "format": "safetensors", "threshold": 1.5, "measured": measured,
                "comparison": ">=", "status": status, "message": message}

    report = {
        "artifact": {"name": "demo", "path": "/tmp/demo"}, "baseline": {"label": "zoo: digits-mlp"},
        "data": {"name": "digits & <friends>"}, "created": "2026-01-01T00:00:00Z",
        "gates": [gate("min_compression", "passed", 2.0, "ok"),
                  gate("min_speedup", "failed", 0.5, "min_speedup: 0.5x misses >= 1.5x & more"),
                  gate("max_accuracy_drop", "error", None, "not measured: no labels"),
                  {**gate("min_fidelity", "skipped", None, "skipped (no CUDA)"), "device": "cuda", "format": None}],
    }
    data = render_junit(report)
    assert data.startswith(b"<?xml")
    root = ET.fromstring(data)
    assert (root.tag, root.get("tests"), root.get("failures"), root.get("errors"), root.get("skipped")) == (
        "testsuites", "4", "1", "1", "1")
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == "compressor.gates.demo" and suite.get("timestamp") == "2026-01-01T00:00:00Z"
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props == {"artifact": "/tmp/demo", "baseline": "zoo: digits-mlp", "data": "digits & <friends>"}
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert list(cases) == ["min_compression", "min_speedup", "max_accuracy_drop", "min_fidelity"]
    assert [ch.tag for ch in cases["min_compression"]] == ["system-out"]
    failure = cases["min_speedup"].find("failure")
    assert failure.get("message") == "min_speedup: 0.5x misses >= 1.5x & more" and failure.get("type") == "GateFailed"
    assert "0.5" in failure.text and ">= 1.5" in failure.text
    assert cases["max_accuracy_drop"].find("error").get("type") == "NotMeasured"
    assert cases["min_fidelity"].find("skipped").get("message") == "skipped (no CUDA)"
    assert cases["min_fidelity"].get("classname") == "compressor.gates.cuda.any"

    empty = ET.fromstring(render_junit({**report, "gates": []}))
    assert [c.get("name") for c in empty.iter("testcase")] == ["evaluation"]
    assert empty.get("tests") == "1" and empty.get("failures") == "0"


# --------------------------------------------------------------------------------------------- unit: page cache


def test_pagecache_evict_and_warm(tmp_path):
    from compressor.evaluate import pagecache

    if not pagecache.can_evict():
        pytest.skip("no posix_fadvise on this platform")
    path = tmp_path / "blob.bin"
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * (4 * 4096))  # 4 MiB
        f.flush()
        os.fsync(f.fileno())
    if pagecache.resident_fraction([path]) is None:
        pytest.skip("mincore is not available here")
    pagecache.evict([path])
    assert pagecache.resident_fraction([path]) <= 0.05
    pagecache.warm([path])
    assert pagecache.resident_fraction([path]) >= 0.95
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert pagecache.resident_fraction([empty]) == 0.0
