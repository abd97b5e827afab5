"""Evaluation reports written into the artifact directory: report.json, report.md, junit.xml and report.png."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import GateFailure
from ..manifest import EVALUATION_REPORTS
from ..report_format import REPORT_FORMAT, Report
from .report_lm import lm_summary, md_lm

__all__ = ["summary_lines", "result_line", "gate_failure", "REPORT_FORMAT", "write_reports", "render_markdown",
           "render_junit", "render_plot", "clean_json", "as_json"]


def clean_json(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null (strict JSON has neither); private keys (``_x``) dropped."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items() if not (isinstance(k, str) and k.startswith("_"))}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


def as_json(report: Report | dict[str, Any]) -> dict[str, Any]:
    """report.json's content: every function here takes a :class:`Report` or that content (read back from a
    file), and renders the content."""
    return report.to_json() if isinstance(report, Report) else report


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; reports are read by CI users and web servers
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_reports(artifact: Path, report: Report) -> list[Path]:
    """Write all four reports (each file replaced atomically); returns their paths."""
    report = clean_json(as_json(report))
    # Render everything first: a failure in any renderer leaves the previous reports as they were.
    contents = [(json.dumps(report, indent=2, allow_nan=False) + "\n").encode(), render_markdown(report).encode(),
                render_junit(report), render_plot(report)]
    paths = [artifact / name for name in EVALUATION_REPORTS]
    for path, data in zip(paths, contents):
        _atomic_write(path, data)
    return paths


def summary_lines(report: Report | dict[str, Any]) -> list[str]:
    """A few terminal lines: per device, accuracy, fidelity, size, speed and load of the artifact vs baseline;
    then every gate that did not pass."""
    report = as_json(report)
    lines = []
    for base, art in _pairs(report["results"]):
        ratios = art.get("ratios") or {}
        parts = []
        if art.get("accuracy"):
            parts.append(f"accuracy {base['accuracy']['value']:.2f} -> {art['accuracy']['value']:.2f}")
        fid = art.get("fidelity") or {}
        if fid:
            parts.append(f"cos min {_n(fid.get('cos_min'), '.4f')}")
        parts += lm_summary(base, art)
        parts.append(f"size {_mb(base['size_bytes'])} -> {_mb(art['size_bytes'])} "
                     f"({_ratio(ratios.get('compression'))})")
        speedups = [c["speedup"] for c in art.get("latency") or [] if c.get("speedup")]
        if speedups:
            parts.append(f"speedup {min(speedups):.2f}x-{max(speedups):.2f}x")
        if ratios.get("cold_load_speedup"):
            parts.append(f"cold load {_ratio(ratios['cold_load_speedup'])}")
        where = f"{art['device']}/{art['format']}"
        if art.get("target"):
            where += f" [{art['target']}{', emulated' if art.get('emulated') else ', this CPU'}]"
        lines.append(f"{where}: " + ", ".join(parts))
    for item in report.get("skipped", []):
        lines.append(f"{item['device']}: skipped ({item['reason']})")
    if report.get("memory"):
        lines.append(f"memory: {report['memory']['note']}")
    if report.get("gates"):
        counts = {s: sum(1 for g in report["gates"] if g["status"] == s) for s in ("passed", "failed", "error",
                                                                                   "skipped")}
        lines.append("gates: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s == "passed"))
    return lines


def _pairs(results: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(baseline row, artifact row) for every artifact row, with the baseline measured on the same device."""
    base = {r["device"]: r for r in results if r["role"] == "baseline"}
    return [(base[r["device"]], r) for r in results if r["role"] != "baseline" and r["device"] in base]


# ------------------------------------------------------------------------------------------------- markdown


def _n(value: Any, fmt: str = ".1f", none: str = "–") -> str:
    if value is None:
        return none
    return format(value, fmt)


def _mb(nbytes: int | None) -> str:
    if nbytes is None:
        return "–"
    return f"{nbytes / 1e3:,.1f} kB" if nbytes < 1e6 else f"{nbytes / 1e6:,.2f} MB"


def _ms(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "–"
    return f"{stat['median']:,.1f} ± {stat['iqr']:,.1f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _row_name(row: dict[str, Any]) -> str:
    if row.get("emulated"):
        return f"{row['role']} ({row['format']}, {row['target']} emulated)"
    if row.get("target"):
        return f"{row['role']} ({row['format']}, {row['target']}: this CPU)"
    return f"{row['role']} ({row['format']})"


def _flags(machine: dict[str, Any]) -> str:
    """The CPU flags that decide int8 kernels, and the target family they make it."""
    if "cpu_flags" not in machine:
        return ""
    flags = ", ".join(machine["cpu_flags"]) or "no int8-relevant flags"
    return f" ({flags}; int8 target {machine.get('cpu_target') or 'none'})"


def render_markdown(report: Report | dict[str, Any]) -> str:
    """Baseline and artifact side by side, with ratios, per device."""
    report = as_json(report)
    results = report["results"]
    lines = _md_header(report) + _md_accuracy(report, results) + md_lm(results) + _md_load(results)
    if not any(r.get("lm") for r in results):  # causal LMs are timed generating (md_lm), not per forward pass
        lines += _md_latency(results)
    lines += _md_gates(report)
    return "\n".join(lines).rstrip() + "\n"


def _md_header(report: dict[str, Any]) -> list[str]:
    """Title, verdict, baseline, data, machine and skipped devices."""
    lines = [f"# Evaluation of `{report['artifact']['name']}`", ""]
    verdict = {True: "**all gates passed**", False: "**a gate failed**", None: "no gates"}[report.get("passed")]
    lines += [f"{report['created']} · compressor {report['compressor']} · {verdict}", ""]
    base = report["baseline"]
    lines += [f"- baseline: {base['label']} ({_mb(base['size_bytes'])})",
              f"- data: {report['data']['name']}",
              f"- machine: {report['machine']['cpu']}" + _flags(report['machine']) + f" · {report['machine']['threads']} threads · "
              f"torch {report['machine']['torch']}" + (f" · {report['machine']['cuda']}" if report['machine'].get('cuda')
                                                        else ""),
              ""]
    for item in report.get("skipped", []):
        lines += [f"> **{item['device']} skipped:** {item['reason']}", ""]
    if report.get("memory"):
        lines += [f"> **Measured one model at a time:** {report['memory']['note']}.", ""]
    return lines


def _md_accuracy(report: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """Accuracy, size and fidelity of every row; the int8 targets."""
    lines = ["## Accuracy and size", "",
              "| model | device | size | compression | accuracy | drop (points) | cos min | cos mean | max abs err "
              "| top-1 agreement |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results:
        acc = row.get("accuracy") or {}
        fid = row.get("fidelity") or {}
        ratios = row.get("ratios") or {}
        lines.append(
            f"| {_row_name(row)} | {row['device']} | {_mb(row['size_bytes'])} | {_ratio(ratios.get('compression'))} "
            f"| {_n(acc.get('value'), '.2f')} | {_n(ratios.get('accuracy_drop'), '+.2f')} "
            f"| {_n(fid.get('cos_min'), '.5f')} | {_n(fid.get('cos_mean'), '.5f')} | {_n(fid.get('max_abs_err'), '.3g')} "
            f"| {_n(fid.get('top1_agreement'), '.2f')} |")
    if report["data"].get("metric"):
        lines += ["", f"Accuracy: {report['data']['label']} on {report['data']['name']}."]
    int8 = report.get("int8") or {}
    if int8.get("targets"):
        goal = int8.get("target_fidelity")
        reached = {True: "reached", False: "**NOT reached**", None: "not set"}[int8.get("reached") if goal else None]
        lines += ["", f"int8 quantized for {', '.join(int8['targets'])}"
                  + (f"; {int8['arithmetic']}" if int8.get("arithmetic") else "")
                  + (f". target_fidelity {goal} on the calibration data: {reached} (min cosine "
                     f"{_n(int8.get('calibration_min_cosine'), '.5f')})." if goal else ".")]
    if any(r.get("emulated") for r in results):
        lines += ["", "int8 ONNX on each CPU family it was quantized for: *this CPU* rows are measured here; "
                  "*emulated* rows run the same model with its integer matrix products computing that family's "
                  "arithmetic exactly (x86-avx2: adjacent products summed in saturating 16-bit integers; x86-vnni "
                  "and arm64: exact 32-bit sums). Gates on accuracy, fidelity and size apply to every one."]
    lines.append("")
    return lines


def _md_load(results: list[dict[str, Any]]) -> list[str]:
    """Cold and warm loads in fresh processes, with the baseline/artifact ratios."""
    lines = ["## Load (fresh process each run; median ± IQR, ms)", "",
              "| model | device | cold load | cold first inference | warm load | warm first inference | peak RSS "
              "| RSS added | anon RSS | peak GPU |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results:
        if row.get("emulated"):
            continue  # numbers only: an emulated row is the same file, run on another CPU's arithmetic
        load = row.get("load") or {}
        cold, warm = load.get("cold") or {}, load.get("warm") or {}
        either = cold or warm
        lines.append(
            f"| {_row_name(row)} | {row['device']} | {_ms(cold.get('load_ms'))} | {_ms(cold.get('first_inference_ms'))} "
            f"| {_ms(warm.get('load_ms'))} | {_ms(warm.get('first_inference_ms'))} "
            f"| {_n(either.get('peak_rss_mb'))} MB "
            f"| {_n(either.get('rss_added_mb'))} MB | {_n(either.get('anon_rss_mb'))} MB "
            f"| {_n(either.get('peak_gpu_mb'), '.1f')} |")
        if row["role"] == "artifact" and row.get("load"):
            r = row.get("ratios") or {}
            lines.append(f"| ratio baseline / {row['format']} | {row['device']} | {_ratio(r.get('cold_load_speedup'))} "
                         f"| {_ratio(r.get('cold_first_inference_speedup'))} | {_ratio(r.get('warm_load_speedup'))} "
                         f"| {_ratio(r.get('warm_first_inference_speedup'))} | | "
                         f"{_ratio(r.get('rss_added_ratio'))} | | |")
    lines += ["", "Ratios above 1× favour the artifact (it loads faster, or adds less memory)."]
    for row in results:
        cold = (row.get("load") or {}).get("cold") or {}
        share = cold.get("resident_after_evict")
        if share is not None and share > 0.05:
            lines += ["", f"> Cold runs of {_row_name(row)} on {row['device']} are not fully cold: {share:.0%} of its "
                          "files stayed in the page cache after eviction (another process maps them)."]
    lines.append("")
    return lines


def _md_latency(results: list[dict[str, Any]]) -> list[str]:
    """Latency and throughput per device, batch and length."""
    lines = ["## Latency and throughput (same process, alternating; ms)", "",
              "| device | batch | length | model | p50 | p90 | p99 | IQR | throughput/s | speedup (IQR of rounds) |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for device in dict.fromkeys(r["device"] for r in results):
        rows = [r for r in results if r["device"] == device]
        for configs in zip(*(r.get("latency") or [] for r in rows)):
            for row, c in zip(rows, configs):
                speed = "" if c.get("speedup") is None else (
                    f"**{c['speedup']:.2f}×** ({_n(c.get('speedup_q25'), '.2f')}–{_n(c.get('speedup_q75'), '.2f')})")
                lines.append(f"| {row['device']} | {c['batch_size']} | {_n(c.get('seq_len'), 'd')} | {_row_name(row)} "
                             f"| {c['p50_ms']:.2f} | {c['p90_ms']:.2f} | {c['p99_ms']:.2f} | {c['iqr_ms']:.2f} "
                             f"| {c['throughput_per_s']:,.1f} | {speed} |")
    lines.append("")
    return lines


def _md_gates(report: dict[str, Any]) -> list[str]:
    """Every gate, and the message of each that did not pass."""
    from .gates import fmt_pair

    lines: list[str] = []
    if report.get("gates"):
        lines += ["## Gates", "", "| gate | device | format | target | measured | threshold | result |",
                  "|---|---|---|---|---:|---:|---|"]
        for g in report["gates"]:
            mark = {"passed": "pass", "failed": "**FAIL**", "error": "**ERROR**", "skipped": "skipped"}[g["status"]]
            measured, limit = ("–", f"{g['threshold']:g}") if g["measured"] is None else fmt_pair(
                g["measured"], g["threshold"])
            lines.append(f"| {g['gate']} | {g['device']} | {g['format'] or 'any'} | {g.get('target') or ''} | {measured} "
                         f"| {g['comparison']} {limit} | {mark} |")
        lines += [""] + [f"- {g['message']}" for g in report["gates"] if g["status"] != "passed"] + [""]
    return lines


# ---------------------------------------------------------------------------------------------------- junit


def render_junit(report: Report | dict[str, Any]) -> bytes:
    """JUnit XML with one testcase per gate and (device, format), so CI systems list gates as tests."""
    report = as_json(report)
    import xml.etree.ElementTree as ET

    gates = report.get("gates") or []
    counts = {s: sum(1 for g in gates if g["status"] == s) for s in ("failed", "error", "skipped")}
    total = max(len(gates), 1)
    suites = ET.Element("testsuites", name="compressor", tests=str(total), failures=str(counts["failed"]),
                        errors=str(counts["error"]), skipped=str(counts["skipped"]))
    suite = ET.SubElement(suites, "testsuite", name=f"compressor.gates.{report['artifact']['name']}",
                          tests=str(total), failures=str(counts["failed"]), errors=str(counts["error"]),
                          skipped=str(counts["skipped"]), timestamp=report["created"])
    props = ET.SubElement(suite, "properties")
    for key, value in (("artifact", report["artifact"]["path"]), ("baseline", report["baseline"]["label"]),
                       ("data", report["data"]["name"])):
        ET.SubElement(props, "property", name=key, value=str(value))
    if not gates:
        # No gates configured: one passing case so the run still shows up as evaluated.
        ET.SubElement(suite, "testcase", classname="compressor.evaluate", name="evaluation", time="0")
    for g in gates:
        target = f".{g['target']}" if g.get("target") else ""
        case = ET.SubElement(suite, "testcase", classname=f"compressor.gates.{g['device']}.{g['format'] or 'any'}{target}",
                             name=g["gate"], time="0")
        ET.SubElement(case, "system-out").text = g["message"]
        if g["status"] == "failed":
            el = ET.SubElement(case, "failure", message=g["message"], type="GateFailed")
            el.text = f"measured {g['measured']!r}, threshold {g['comparison']} {g['threshold']!r}"
        elif g["status"] == "error":
            ET.SubElement(case, "error", message=g["message"], type="NotMeasured")
        elif g["status"] == "skipped":
            ET.SubElement(case, "skipped", message=g["message"])
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


# ----------------------------------------------------------------------------------------------------- plot


def render_plot(report: Report | dict[str, Any]) -> bytes:
    """PNG: accuracy (or fidelity) against size and against latency, baseline and artifact per device."""
    report = as_json(report)
    import io

    import matplotlib

    matplotlib.use("Agg", force=True)  # no display, no GUI toolkit
    import matplotlib.pyplot as plt

    metric = report["data"].get("label")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    markers = {"baseline": "o", "artifact": "s"}
    for row in report["results"]:
        acc = (row.get("accuracy") or {}).get("value")
        if acc is None:  # no labels: plot fidelity (baseline = 1 by definition)
            acc = (row.get("fidelity") or {}).get("cos_mean", 1.0 if row["role"] == "baseline" else None)
        if acc is None:
            continue
        name = f"{row['role']} ({row['format']}, {row['device']})"
        axes[0].scatter(row["size_bytes"] / 1e6, acc, marker=markers.get(row["role"], "^"), s=60, label=name)
        latency = (row.get("latency") or [None])[0]
        decode = ((row.get("lm") or {}).get("decode") or [None])[0]
        if latency:
            axes[1].scatter(latency["p50_ms"], acc, marker=markers.get(row["role"], "^"), s=60, label=name)
        elif decode:  # a causal LM: decoding speed instead of the latency of one forward pass
            axes[1].scatter(decode["median"], acc, marker=markers.get(row["role"], "^"), s=60, label=name)
    ylabel = metric or "mean cosine similarity to baseline"
    axes[0].set(xlabel="model size (MB)", ylabel=ylabel, title="accuracy vs size")
    first = next((c for r in report["results"] for c in (r.get("latency") or [])), None)
    decode = next((c for r in report["results"] for c in ((r.get("lm") or {}).get("decode") or [])), None)
    where = "" if first is None else f" (batch {first['batch_size']}" + (
        f", length {first['seq_len']})" if first.get("seq_len") else ")")
    if first is None and decode is not None:
        axes[1].set(xlabel=f"decoding tokens/s (batch {decode['batch_size']})", ylabel=ylabel,
                    title="accuracy vs decoding speed")
    else:
        axes[1].set(xlabel=f"p50 latency (ms){where}", ylabel=ylabel, title="accuracy vs latency")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.margins(0.15)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(f"{report['artifact']['name']}: baseline vs artifact", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def result_line(report: Report | dict[str, Any], where: Path, name: str | None) -> str:
    """One line for logs and CI: gates, the headline numbers of the last artifact row (ONNX when measured), where
    the report is."""
    report = as_json(report)
    gates = report.get("gates") or []
    failed = [g for g in gates if g["status"] in ("failed", "error")]
    passed = sum(1 for g in gates if g["status"] == "passed")
    if not gates:
        verdict = "no gates"
    elif failed:
        verdict = f"FAILED {len(failed)} of {len(gates)} gates (" + ", ".join(
            f"{g['gate']} on {g['device']}/{g.get('format') or 'torch'}" for g in failed[:3]) + ")"
    else:
        verdict = f"passed {passed} of {len(gates)} gates"
    rows = [r for r in report.get("results", []) if r.get("role") != "baseline" and not r.get("emulated")]
    figures = ""
    if rows:
        row = rows[-1]
        bits = []
        ratio = (row.get("ratios") or {}).get("compression")
        if ratio:
            bits.append(f"{ratio:.2f}x smaller")
        fid = row.get("fidelity") or {}
        if fid.get("cos_min") is not None:
            bits.append(f"cos min {fid['cos_min']:.4f}")
        if row.get("lm"):
            bits.append(f"perplexity {row['lm']['perplexity']:.2f} "
                        f"({(row.get('ratios') or {}).get('perplexity_increase') or 0.0:+.2f} %)")
        elif row.get("accuracy"):
            bits.append(f"{row['accuracy']['label'].split(' (')[0]} {row['accuracy']['value']:.2f}")
        targets = [r for r in report.get("results", []) if r.get("target") and r.get("fidelity")]
        if len(targets) > 1:
            worst = min(targets, key=lambda r: r["fidelity"]["cos_min"])
            bits.append(f"worst of {len(targets)} targets {worst['target']} cos min {worst['fidelity']['cos_min']:.4f}")
        figures = f" ({row['device']}/{row['format']}: {', '.join(bits)})" if bits else ""
    int8 = report.get("int8") or {}
    if int8.get("reached") is False:
        figures += (f"; target_fidelity {int8['target_fidelity']} NOT reached (calibration min cos "
                    f"{int8['calibration_min_cosine']:.4f})")
    return f"{name or where.name}: {verdict}{figures}; report: {where / 'report.md'}"


def gate_failure(report: Report | dict[str, Any], where: Path) -> GateFailure:
    """The error (exit code 3) for a report whose gates were missed: each missed gate, and where the kept
    artifact and reports are."""
    report = as_json(report)
    failed = [g["message"] for g in report.get("gates") or [] if g["status"] in ("failed", "error")]
    return GateFailure(f"{len(failed)} release gate(s) missed; artifacts and reports are kept in {where}:\n  "
                       + "\n  ".join(failed))
