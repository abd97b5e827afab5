"""Run an evaluation: load baseline and artifact, score them on the same data, time them side by side, check the
gates and write the reports."""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..cpu import machine_cpu
from ..errors import CompressorError, UsageError
from ..log import Reporter
from ..manifest import Manifest
from ..report_format import REPORT_FORMAT, REPORT_VERSION, Report
from .ratios import ratios
from .subjects import Subject, artifact_subject, onnx_subject

__all__ = ["evaluate_artifact", "resolve_devices", "check_sequence_lengths", "artifact_config"]


def resolve_devices(wanted: list[str], require_cuda: bool) -> tuple[list[str], dict[str, str]]:
    """The devices that can be measured here, and the skipped ones with the reason."""
    import torch

    devices, skipped = [], {}
    for device in dict.fromkeys(wanted):
        if device == "cuda" and not torch.cuda.is_available():
            reason = "no CUDA device is available (torch.cuda.is_available() is False)"
            if require_cuda:
                raise CompressorError(f"the evaluation requires CUDA (evaluate.require_cuda), but {reason}; run it "
                                      "on a machine with a GPU, or set require_cuda: false to measure CPU only")
            skipped[device] = reason
            continue
        devices.append(device)
    return devices, skipped


DEVICE_ENV = "COMPRESS_DEVICE"


def env_devices() -> list[str] | None:
    """Devices named by $COMPRESS_DEVICE (cpu, cuda or all), for CI jobs that set the device per runner; None when
    unset. A bad value is a usage error naming the variable."""
    value = os.environ.get(DEVICE_ENV, "").strip()
    if not value:
        return None
    if value not in ("cpu", "cuda", "all"):
        raise UsageError(f"${DEVICE_ENV}={value!r}: use cpu, cuda or all (or unset it to use the recipe's devices)")
    return ["cpu", "cuda"] if value == "all" else [value]


def check_sequence_lengths(spec: Any, config: dict[str, Any] | None) -> None:
    """Refuse speed runs at sequence lengths the model cannot take, before any work (transformers would fail
    deep inside the forward pass)."""
    if not config:
        return
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if not isinstance(limit, int):
        return
    too_long = [n for n in spec.speed.sequence_lengths if n > limit]
    if too_long:
        raise UsageError(f"evaluate.speed.sequence_lengths: {', '.join(map(str, too_long))} exceed the model's "
                         f"{limit} positions (max_position_embeddings); use lengths up to {limit}")


def artifact_config(artifact: Path) -> dict[str, Any] | None:
    """The artifact's config.json (a transformers model's), or None where it has none or it is unreadable."""
    try:
        data = json.loads((artifact / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _machine(threads: int) -> dict[str, Any]:
    import torch

    cpu = machine_cpu()  # the model name and the flags that decide int8 kernels (compressor.cpu)
    info: dict[str, Any] = {"cpu": cpu["model"], "cpu_flags": cpu["flags"], "cpu_target": cpu["target"],
                            "cores": os.cpu_count(), "threads": threads, "platform": platform.platform(),
                            "python": platform.python_version(), "torch": torch.__version__, "cuda": None}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


@dataclass
class _Run:
    """What every step of one evaluation shares."""

    spec: Any
    log: Reporter
    data: Any
    task: str | None
    classifier: bool
    example_inputs: dict[str, Any]
    tokenizer: Any
    seq_lens: list[int | None]
    subjects: list[Subject]
    candidates: list[Subject]
    targets: list[str]
    quant_mode: str | None
    extra_path: list[str]
    measure_speed: bool
    lm: bool = False  # a causal language model: scored on text, timed generating (compressor.evaluate.lm)
    memory: dict[str, Any] | None = None  # set when the models are measured one at a time (compressor.evaluate.apart)
    scratch: Path | None = None  # where a causal LM's recorded logits may go meanwhile: the artifact directory


def evaluate_artifact(
    artifact: Path,
    *,
    baseline: Subject,
    spec: Any,
    gates: Any = None,
    devices: list[str] | None = None,
    base_dir: Path | None = None,
    log: Reporter | None = None,
    raise_on_gate: bool = True,
    measure_speed: bool = True,
    final_path: Path | None = None,
    data_file: Path | None = None,
) -> Report:
    """Evaluate an artifact directory against ``baseline`` and write report.json/.md, junit.xml and report.png
    into it. Returns the report. Raises GateFailure (exit code 3) after writing when a gate is missed.
    ``measure_speed=False`` measures accuracy, fidelity and size only (speed gates then cannot be checked).

    `compress run` evaluates its staging directory before it replaces the previous artifact; ``final_path`` is
    where the artifact will then be (what the report and messages name) and ``data_file`` the recipe's own
    evaluation data file (read instead of the artifact's byte-identical copy, so errors name the user's file)."""
    import torch

    from ..manifest import check_files, read_manifest
    from .gates import check_gates
    from .report import gate_failure, write_reports

    log = log or Reporter()
    artifact = artifact.resolve()
    shown = final_path.resolve() if final_path is not None else artifact
    manifest = read_manifest(artifact)
    check_files(artifact, manifest, hashes=True)  # a gate must never pass on a model the manifest does not describe
    base_dir = base_dir or Path.cwd()
    threads = spec.speed.threads or torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    added: list[str] = []  # sys.path entries this evaluation added, removed at the end
    try:
        devices_run, skipped = _devices(spec, devices, log)
        extra_path = _import_path(manifest, baseline, base_dir)
        added += [p for p in extra_path if p not in sys.path]
        sys.path[:0] = added
        run = _prepare(artifact, manifest, baseline, spec, base_dir, data_file, extra_path, measure_speed, log)
        from .apart import memory_plan
        run.memory, run.scratch = memory_plan(run.subjects, log), artifact  # one model at a time if need be
        results: list[dict[str, Any]] = []
        for device in devices_run:
            results += _measure_device(run, device)
    finally:
        torch.set_num_threads(previous_threads)
        for p in added:
            if p in sys.path:
                sys.path.remove(p)
    gate_results = check_gates(gates, results, devices_run, skipped)
    report = _report(artifact, shown, manifest, baseline, spec, run, threads, devices_run, skipped, results,
                     gate_results, gates)
    paths = write_reports(artifact, report)
    log.info(f"reports: {', '.join(p.name for p in paths)} in {shown}")
    for g in gate_results:
        log.info(f"gate {g['status']}: {g['message']}")
    if report.passed is False and raise_on_gate:
        raise gate_failure(report, shown)
    return report


def _devices(spec: Any, devices: list[str] | None, log: Reporter) -> tuple[list[str], dict[str, str]]:
    """The devices to measure (``--device``, else $COMPRESS_DEVICE, else the recipe's) and the skipped ones."""
    devices = devices or env_devices()
    devices_run, skipped = resolve_devices(devices or list(spec.devices), spec.require_cuda)
    for device in spec.devices:  # the recipe's devices left out by --device: its gates there are skipped
        if devices is not None and device not in devices:
            skipped.setdefault(device, "not requested (--device)")
    if not devices_run:
        raise CompressorError(f"nothing to measure: {'; '.join(f'{d} skipped, {r}' for d, r in skipped.items())}"
                              "; measure on cpu instead (--device cpu)")
    for device, reason in skipped.items():
        log.warn(f"{device} skipped: {reason}; measuring {', '.join(devices_run)} only")
    return devices_run, skipped


def _import_path(manifest: Manifest, baseline: Subject, base_dir: Path) -> list[str]:
    """Where a python-source artifact's factory is imported from: the recipe's directory (the baseline's, when
    known) and this one, here and in the load-timing processes."""
    if manifest.source.get("kind") != "python":
        return []
    return list(dict.fromkeys([baseline.spec.get("base_dir") or str(base_dir), str(base_dir)]))


def _prepare(artifact: Path, manifest: Manifest, baseline: Subject, spec: Any, base_dir: Path,
             data_file: Path | None, extra_path: list[str], measure_speed: bool, log: Reporter) -> _Run:
    """The data, inputs and subjects of the evaluation."""
    from ..data.datasets import build_data, tokenizer_for
    from ..loading import load_example_inputs
    from .targets import int8_targets

    task = manifest.task
    lm = task == "text-generation"
    example_inputs = {k: v.clone() for k, v in load_example_inputs(artifact).items()}
    if lm:
        from ..data.lm_text import build_lm_text
        from .lm_speed import check_prompt_lengths
        from .runner_lm import check_corpus

        check_corpus(manifest, log)
        check_prompt_lengths(spec.generation, artifact_config(artifact))
        data = build_lm_text(spec.data, spec.generation, artifact=artifact, data_file=data_file)
    else:
        data = build_data(spec.data, artifact=artifact, manifest=manifest, example_inputs=example_inputs,
                          base_dir=base_dir, data_file=data_file)
    log.info(f"evaluation data: {data.name}")
    text = "input_ids" in example_inputs and not lm
    if measure_speed and not lm:
        check_sequence_lengths(spec, artifact_config(artifact))
    candidates = [artifact_subject(artifact, manifest=manifest)]
    candidates += [s for s in (onnx_subject(artifact, manifest),) if s is not None]
    return _Run(spec=spec, log=log, data=data, task=task,
                classifier=data.metric == "top1_accuracy" or str(task or "").endswith("classification"),
                example_inputs=example_inputs, tokenizer=tokenizer_for(artifact) if text else None,
                seq_lens=list(spec.speed.sequence_lengths) if text else [None], subjects=[baseline] + candidates,
                candidates=candidates, targets=int8_targets(manifest),  # the CPU families int8 ONNX must hold on
                quant_mode=manifest.quantization.get("mode"),
                extra_path=extra_path, measure_speed=measure_speed, lm=lm)


def _measure_device(run: _Run, device: str) -> list[dict[str, Any]]:
    """Every subject's rows on ``device``: accuracy, fidelity, per-target int8 fidelity, latency and loads."""
    import torch

    from .speed import load_timings

    log = run.log
    onnx_candidate = next((c for c in run.candidates if c.format == "onnx"), None)
    outputs, metrics, fids, per_target, latency, lm = _scores(run, device, onnx_candidate)
    # Nothing of any model may stay mapped here: cold runs evict their files, and the kernel keeps pages that
    # any process maps.
    del outputs
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    loads: dict[str, Any] = {}
    if run.spec.speed.load_runs and run.measure_speed:
        with log.step(f"{device}: load times, {run.spec.speed.load_runs} cold and warm run(s) each, fresh "
                      "processes"):
            loads = load_timings(run.subjects, run.example_inputs, device=device, runs=run.spec.speed.load_runs,
                                 threads=run.spec.speed.threads, extra_path=run.extra_path, log=log)
    rows = _rows(run, device, metrics, fids, latency, loads, onnx_candidate, per_target)
    if lm:
        from .runner_lm import lm_rows

        lm_rows(rows, run.subjects, lm)
    return rows


def _scores(run: _Run, device: str, onnx_candidate: Subject | None) -> tuple[Any, Any, Any, Any, Any, Any]:
    """(outputs, metrics, fidelity, per-target fidelity, latency, LM entries) of every subject on ``device``: the
    models loaded together, or one at a time when they do not fit (compressor.evaluate.apart)."""
    from .apart import measure_apart, measure_lm_apart
    from .subjects import load_module

    lm, outputs, per_target = {}, {}, {}  # type: ignore[var-annotated]
    if run.memory is not None and run.lm:
        metrics, fids, lm = measure_lm_apart(run, device, run.scratch or Path.cwd())
        return outputs, metrics, fids, per_target, {s.key: [] for s in run.subjects}, lm
    if run.memory is not None:
        outputs, metrics, fids, latency = measure_apart(run, device)
    else:
        with run.log.step(f"{device}: loading {', '.join(s.label for s in run.subjects)}"):
            models = {s.key: load_module(s.spec, device, run.spec.speed.threads) for s in run.subjects}
        if run.lm:
            from .runner_lm import measure_lm
            metrics, fids, lm = measure_lm(run, device, models)
            return outputs, metrics, fids, per_target, {s.key: [] for s in run.subjects}, lm
        outputs, metrics, fids = _accuracy(run, device, models)
        latency = _latency(run, device, models)
    if onnx_candidate is not None:
        per_target = _per_target(run, device, onnx_candidate, outputs)
    return outputs, metrics, fids, per_target, latency, lm


def _accuracy(run: _Run, device: str, models: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any],
                                                                        dict[str, Any]]:
    """Outputs, task metric and fidelity to the baseline of every subject on the evaluation data."""
    from .accuracy import fidelity, run_outputs, task_metric

    log = run.log
    with log.step(f"{device}: accuracy and fidelity on {run.data.name}"):
        outputs = {key: run_outputs(m, run.data, device, run.task) for key, m in models.items()}
        metrics = {key: task_metric(run.data, outs) for key, outs in outputs.items()}
        fids = {c.key: fidelity(outputs["baseline"], outputs[c.key], run.classifier) for c in run.candidates}
    for s in run.subjects:
        if metrics[s.key] is not None:
            log.info(f"{device}: {s.label}: {metrics[s.key]['label']} = {metrics[s.key]['value']:.2f}")
    for c in run.candidates:
        fid = fids[c.key]
        log.info(f"{device}: {c.label}: fidelity cos min {fid['cos_min']:.5f}, mean {fid['cos_mean']:.5f}, "
                 f"max abs err {fid['max_abs_err']:.3g}")
    return outputs, metrics, fids


def _per_target(run: _Run, device: str, onnx_candidate: Subject, outputs: dict[str, Any]) -> dict[str, Any]:
    """int8 ONNX on CPU: outputs, accuracy and fidelity under each CPU family's arithmetic (emulated where this
    CPU computes otherwise)."""
    from .accuracy import fidelity, task_metric
    from .targets import target_outputs

    if device != "cpu" or not run.targets:
        return {}
    per_target = target_outputs(Path(onnx_candidate.spec["path"]), run.quant_mode, run.targets, run.data, run.task,
                                outputs[onnx_candidate.key], run.log)
    for target, entry in per_target.items():
        entry["accuracy"] = task_metric(run.data, entry["outputs"])
        entry["fidelity"] = fidelity(outputs["baseline"], entry["outputs"], run.classifier)
        fid = entry["fidelity"]
        run.log.info(f"{device}: onnx under {target} arithmetic ({'emulated' if entry['emulated'] else 'this CPU'}"
                     f"): fidelity cos min {fid['cos_min']:.5f}"
                     + (f", {entry['accuracy']['label']} = {entry['accuracy']['value']:.2f}"
                        if entry["accuracy"] else ""))
    return per_target


def _latency(run: _Run, device: str, models: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Latency of every subject at each batch size and sequence length, the models alternating in rounds."""
    from .speed import latency_inputs, measure_latency, percentile

    latency: dict[str, list[dict[str, Any]]] = {s.key: [] for s in run.subjects}
    speed = run.spec.speed
    configs = [(b, s) for b in speed.batch_sizes for s in run.seq_lens] if run.measure_speed else []
    title = f"{device}: latency, {len(configs)} configuration(s), {len(models)} models alternating"
    with run.log.step(title) if configs else nullcontext():
        for batch_size, seq_len in configs:
            inputs = latency_inputs(run.example_inputs, batch_size, seq_len, run.tokenizer, run.data.texts, 0)
            timed = measure_latency(models, inputs, device, warmup=speed.warmup, rounds=speed.rounds,
                                    calls=speed.calls)
            base = timed["baseline"]
            where = f"batch {batch_size}" + (f", length {seq_len}" if seq_len else "")
            for key, entry in timed.items():
                entry = {"batch_size": batch_size, "seq_len": seq_len, **entry}
                if key != "baseline":
                    # Spread of the speedup: the ratio within each round, where all ran under one load.
                    per_round = [b / a for b, a in zip(base["_rounds"], entry["_rounds"]) if a > 0]
                    entry["speedup"] = base["p50_ms"] / entry["p50_ms"] if entry["p50_ms"] > 0 else None
                    entry["speedup_q25"] = percentile(per_round, 25) if per_round else None
                    entry["speedup_q75"] = percentile(per_round, 75) if per_round else None
                    run.log.info(f"{device}: {where}: p50 {base['p50_ms']:.2f} ms -> {entry['p50_ms']:.2f} ms "
                                 f"({entry['speedup']:.2f}x, {key})")
                latency[key].append(entry)
    return latency


def _rows(run: _Run, device: str, metrics: dict[str, Any], fids: dict[str, Any], latency: dict[str, Any],
          loads: dict[str, Any], onnx_candidate: Subject | None, per_target: dict[str, Any]) -> list[dict[str, Any]]:
    """The report rows of one device: one per subject, and one per emulated CPU family of int8 ONNX."""
    here = machine_cpu()["target"]
    rows: list[dict[str, Any]] = []
    base_row: dict[str, Any] = {}
    for subject in run.subjects:
        row: dict[str, Any] = {
            "role": subject.role, "label": subject.label, "format": subject.format, "device": device,
            "size_bytes": subject.size_bytes, "files_bytes": subject.files_bytes,
            "accuracy": metrics[subject.key], "fidelity": fids.get(subject.key),
            "load": loads.get(subject.key), "latency": latency[subject.key],
        }
        if subject.role == "baseline":
            base_row = row
        else:
            row["ratios"] = ratios(base_row, row)
        if subject is onnx_candidate and run.targets and device == "cpu":  # CPU families: not GPU rows
            row["target"] = here if here in run.targets else None
            row["cpu_target"] = here
        rows.append(row)
        if subject is onnx_candidate:
            for target, entry in per_target.items():
                if not entry["emulated"]:
                    continue
                emulated = {**row, "label": f"artifact (onnx, {target} arithmetic, emulated)", "target": target,
                            "emulated": True, "arithmetic": entry["arithmetic"], "accuracy": entry["accuracy"],
                            "fidelity": entry["fidelity"], "load": None, "latency": []}
                emulated.pop("cpu_target", None)
                emulated["ratios"] = ratios(base_row, emulated)
                rows.append(emulated)
    return rows


def _report(artifact: Path, shown: Path, manifest: Manifest, baseline: Subject, spec: Any, run: _Run,
            threads: int, devices_run: list[str], skipped: dict[str, str], results: list[dict[str, Any]],
            gate_results: list[dict[str, Any]], gates: Any) -> Report:
    """The report (report.json's content), validated against its schema."""
    from .report import clean_json

    report = {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "compressor": _version(),
        "artifact": {"name": manifest.name, "path": str(shown), "manifest_sha256": _sha(artifact)},
        "baseline": baseline.describe(),
        "machine": _machine(threads),
        "settings": {**spec.model_dump(mode="json"), "measure_speed": run.measure_speed},
        "data": {"name": run.data.name, "metric": run.data.metric,
                 "label": None if run.data.metric is None else _metric_label(run.data.metric),
                 "examples": run.data.examples},
        "devices": devices_run,
        "skipped": [{"device": d, "reason": r} for d, r in skipped.items()],
        "results": results,
        "gates": gate_results,
        "passed": None if gates is None else all(g["status"] in ("passed", "skipped") for g in gate_results),
        "memory": run.memory,
    }
    quant = manifest.quantization
    if run.targets:
        goal = quant.get("fidelity_on_calibration")
        goal = goal if isinstance(goal, dict) else {}  # a hand-edited manifest: report what can be said
        report["int8"] = {"targets": run.targets, "arithmetic": quant.get("arithmetic"),
                          "target_fidelity": goal.get("target"), "reached": goal.get("reached"),
                          "calibration_min_cosine": goal.get("min_cosine")}
    return Report.model_validate(clean_json(report))


def _metric_label(metric: str) -> str:
    from .accuracy import METRIC_LABELS

    return METRIC_LABELS[metric]


def _version() -> str:
    from ..version import __version__

    return __version__


def _sha(artifact: Path) -> str:
    from ..manifest import MANIFEST, sha256_file

    return sha256_file(artifact / MANIFEST)
