"""Release gates: each threshold checked against every measured (device, format) it applies to."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_gates", "fmt_pair", "GATE_TEXT"]

# gate -> (what is measured, comparison, unit)
GATE_TEXT: dict[str, tuple[str, str, str]] = {
    "max_accuracy_drop": ("accuracy drop", "<=", " points"),
    "min_fidelity": ("min cosine similarity", ">=", ""),
    "min_speedup": ("latency speedup (worst configuration)", ">=", "x"),
    "max_size_bytes": ("model size", "<=", " bytes"),
    "min_compression": ("compression ratio", ">=", "x"),
    "max_load_ms": ("cold load time (median)", "<=", " ms"),
    "max_perplexity_increase": ("perplexity increase", "<=", " %"),
    "min_token_agreement": ("next-token agreement with the baseline", ">=", " %"),
    "min_decode_speedup": ("decoding speedup (worst batch size)", ">=", "x"),
}


def _measure(gate: str, row: dict[str, Any]) -> tuple[float | None, str]:
    """The measured value of ``gate`` on an artifact row, or None with the reason it could not be measured."""
    ratios = row.get("ratios") or {}
    if gate == "max_accuracy_drop":
        drop = ratios.get("accuracy_drop")
        return (drop, "") if drop is not None else (None, "no task metric: the evaluation data has no labels "
                                                          "(set evaluate.data to a labelled set)")
    if gate == "min_fidelity":
        fid = row.get("fidelity") or {}
        return fid.get("cos_min"), "" if fid else "no fidelity was measured"
    if gate == "min_speedup":
        speedups = [(c["speedup"], c) for c in row.get("latency") or [] if c.get("speedup") is not None]
        if not speedups:
            return None, "no latency was measured (--no-speed?)"
        worst, config = min(speedups, key=lambda x: x[0])
        where = f"batch {config['batch_size']}" + (f", length {config['seq_len']}" if config.get("seq_len") else "")
        return worst, f"at {where}"
    if gate == "max_size_bytes":
        return float(row["size_bytes"]), ""
    if gate == "min_compression":
        return ratios.get("compression"), ""
    if gate == "max_load_ms":
        cold = (row.get("load") or {}).get("cold")
        if not cold:
            return None, ("no cold load was measured (--no-speed, evaluate.speed.load_runs: 0, or an OS that "
                          "cannot evict files)")
        return cold["load_ms"]["median"], ""
    if gate in LM_GATES:
        return _measure_lm(gate, row)
    raise KeyError(gate)


LM_GATES = ("max_perplexity_increase", "min_token_agreement", "min_decode_speedup")


def _measure_lm(gate: str, row: dict[str, Any]) -> tuple[float | None, str]:
    lm = row.get("lm")
    if not lm:
        return None, "the model is not a causal language model (no text-generation evaluation)"
    if gate == "max_perplexity_increase":
        return (row.get("ratios") or {}).get("perplexity_increase"), ""
    if gate == "min_token_agreement":
        return lm.get("token_agreement"), ""
    speedups = [(d["speedup"], d) for d in lm.get("decode") or [] if d.get("speedup") is not None]
    if not speedups:
        return None, "no decoding speed was measured (--no-speed?)"
    worst, entry = min(speedups, key=lambda x: x[0])
    return worst, f"at batch {entry['batch_size']}"


def check_gates(gates: Any, results: list[dict[str, Any]], devices: list[str],
                skipped: dict[str, str]) -> list[dict[str, Any]]:
    """One entry per gate and (device, format): status passed, failed, skipped or error, with a message."""
    if gates is None:
        return []
    out = []
    artifact_rows = [r for r in results if r["role"] == "artifact"]
    for name in GATE_TEXT:
        threshold = getattr(gates, name)
        if threshold is None:
            continue
        what, op, unit = GATE_TEXT[name]
        wanted_devices = [threshold.device] if threshold.device else devices + [d for d in skipped if d not in devices]
        if getattr(threshold, "target", None):
            wanted_devices = ["cpu"]  # CPU families: the target rows are CPU rows
        for device in wanted_devices:
            if device in skipped:
                out.append(_entry(name, device, threshold.format, threshold.value, None, "skipped",
                                  f"{name} on {device}: skipped ({skipped[device]})"))
                continue
            rows = [r for r in artifact_rows if r["device"] == device and _applies(name, threshold, r)
                    and (threshold.format is None or r["format"] == threshold.format)]
            target = getattr(threshold, "target", None)
            if not rows and target is not None:
                known = any(r.get("target") == target for r in artifact_rows)
                if known and name in SPEED_GATES:  # an emulated target has numbers, not speed
                    out.append(_entry(name, device, threshold.format, threshold.value, None, "skipped",
                                      f"{name} for {target}: skipped (speed is measured on the CPU itself, and this "
                                      f"one is not {target})"))
                else:
                    out.append(_entry(name, device, threshold.format, threshold.value, None, "error",
                                      f"{name} for {target} on {device}: nothing was measured for it (the gate "
                                      f"needs an int8 ONNX artifact quantized for {target})"))
                out[-1]["target"] = target
                continue
            if not rows:
                fmt = threshold.format or "any format"
                out.append(_entry(name, device, threshold.format, threshold.value, None, "error",
                                  f"{name} on {device}/{fmt}: nothing was measured for this device and format"))
                continue
            for row in rows:
                value, note = _measure(name, row)
                label = f"{name} on {device}/{row['format']}" + _target_label(row)
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    out.append(_entry(name, device, row["format"], threshold.value, None, "error",
                                      f"{label}: not measured: {note}"))
                    continue
                ok = value <= threshold.value if op == "<=" else value >= threshold.value
                measured, limit = fmt_pair(value, threshold.value)
                shown = f"{measured}{unit}" + (f" ({note})" if note else "")
                message = f"{label}: {what} {shown} {'meets' if ok else 'misses'} the threshold {op} {limit}{unit}"
                out.append(_entry(name, device, row["format"], threshold.value, value, "passed" if ok else "failed",
                                  message))
                out[-1]["target"] = row.get("target")
    return out


SPEED_GATES = ("min_speedup", "max_load_ms", "min_decode_speedup")
SIZE_GATES = ("max_size_bytes", "min_compression")


def _applies(gate: str, threshold: Any, row: dict[str, Any]) -> bool:
    """Whether ``gate`` judges ``row``. Emulated target rows carry numbers, not speed; a row measured on a CPU the
    artifact was not quantized for shows its speed here but promises no accuracy; ``target:`` narrows a gate to
    one family's row(s)."""
    wanted = getattr(threshold, "target", None)
    if row.get("emulated") and (gate in SPEED_GATES or (gate in SIZE_GATES and wanted is None)):
        return False  # no speed to judge; the same file as the measured row, whose size is judged once
    if wanted is not None:
        return row.get("target") == wanted
    if "cpu_target" in row and row.get("target") is None and gate not in SPEED_GATES:
        return False
    return True


def _target_label(row: dict[str, Any]) -> str:
    if row.get("emulated"):
        return f" [{row['target']}, emulated]"
    if row.get("target"):
        return f" [{row['target']}, this CPU]"
    return ""


def _entry(gate: str, device: str, fmt: str | None, threshold: float, measured: float | None, status: str,
           message: str) -> dict[str, Any]:
    return {"gate": gate, "device": device, "format": fmt, "target": None, "threshold": threshold,
            "measured": measured, "comparison": GATE_TEXT[gate][1], "status": status, "message": message}


def _fmt(value: float, digits: int = 4) -> str:
    if value == int(value) and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.{max(1, digits - 3)}f}"


def fmt_pair(value: float, threshold: float) -> tuple[str, str]:
    """Both numbers with the digits it takes to show their real order: 0.99996 vs 0.99999, not 1 vs 1; and 0.99999
    vs 0.999 as 0.99999, not a rounded-up 1."""
    for digits in range(4, 13):
        a, b = _fmt(value, digits), _fmt(threshold, digits)
        shown = float(a.replace(",", ""))
        rounded_to_whole = shown == int(shown) and value != int(value) and abs(value) < 1000
        if value == threshold or (a != b and not rounded_to_whole and abs(shown - value) <= abs(value - threshold) / 10):
            return a, b
    return repr(value), repr(threshold)
