"""`compress inspect`: what an artifact is, from its manifest, its safetensors headers and its last report.

Reads no tensor data and imports no torch: source, recipe, what each pass did, tensors by encoding and dtype, file
sizes by role, the ONNX export, the tensor-parallel split, and the gates with their last results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .manifest import PLAN_FILE, REPORT_JSON, Manifest, PassReport, confined, read_manifest
from .report_format import read_report

__all__ = ["inspect_artifact", "render_text"]

_ROLES = (
    ("weights", lambda rel, m: rel in m.model.weights),
    ("onnx", lambda rel, m: m.onnx is not None and rel in m.onnx.files),
    ("plan", lambda rel, m: rel == PLAN_FILE),
    ("example inputs", lambda rel, m: rel == m.model.example_inputs),
    ("evaluation data", lambda rel, m: rel.startswith("eval/")),
    ("model files (config, tokenizer)", lambda rel, m: rel in m.model.copied_files),
)


def _role(rel: str, manifest: Manifest) -> str:
    for role, test in _ROLES:
        if test(rel, manifest):
            return role
    return "other"


def _pass_effect(report: PassReport) -> str:
    before, after = report.bytes_before, report.bytes_after
    details = report.details
    bits = [f"{before:,} -> {after:,} bytes" + (f" ({before / after:.2f}x)" if after and after != before else "")]
    for key in ("sparsity_overall", "neurons_removed", "heads_removed", "parameters_after", "tensor_parallel",
                "mode", "dtype", "bits", "steps", "final_loss"):
        if key in details and not isinstance(details[key], (dict, list)):
            bits.append(f"{key} {details[key]}")
    return "; ".join(bits)


def inspect_artifact(root: Path) -> dict[str, Any]:
    """A summary of the artifact at ``root`` (see the module docstring); ArtifactError if it is not one."""
    from .encodings import stored_base
    from .safetensors_io import read_header

    root = Path(root)
    manifest = read_manifest(root)
    info = manifest.model
    encodings = info.encodings
    parts: dict[str, dict[str, tuple[str, int]]] = {}  # tensor name -> {suffix: (dtype, bytes)}
    for rel in info.weights:
        if not rel.endswith(".safetensors"):
            continue
        path = confined(root, rel)  # never a file outside the artifact, whatever the manifest or a link says
        if not path.is_file():
            continue
        header, _ = read_header(path)
        for stored, entry in header.items():
            if stored == "__metadata__":
                continue
            name, suffix = stored_base(stored, encodings)
            dtype, size = parts.setdefault(name, {}).get(suffix, ("", 0))
            # A tensor-parallel artifact holds a slice of a tensor in every rank file: sizes add up.
            parts[name][suffix] = (entry["dtype"], size + entry["data_offsets"][1] - entry["data_offsets"][0])
    tensors: dict[tuple[str, str], dict[str, int]] = {}
    for name, found in parts.items():
        kind = (encodings.get(name) or {}).get("kind", "dense")
        main = next((found[s][0] for s in ("", ".__q", ".__values", ".__shared", "_packed") if s in found),
                    next(iter(found.values()))[0])
        slot = tensors.setdefault((kind, main), {"tensors": 0, "bytes": 0})
        slot["tensors"] += 1
        slot["bytes"] += sum(size for _, size in found.values())
    files: dict[str, dict[str, Any]] = {}
    for rel, entry in sorted(manifest.files.items()):
        files[rel] = {"bytes": entry.bytes, "role": _role(rel, manifest)}
    last = None
    report_path = root / REPORT_JSON
    if report_path.is_file():
        try:
            report = read_report(report_path)
            last = {"created": report.created, "passed": report.passed,
                    "gates": [g.model_dump(mode="json", include={"gate", "device", "format", "threshold", "measured",
                                                                 "status"}) for g in report.gates]}
        except ArtifactError as exc:
            last = {"error": f"report.json is unreadable: {exc}"}
    onnx = manifest.onnx.to_json() if manifest.onnx is not None else None
    return {
        "artifact": str(root),
        "name": manifest.name,
        "description": manifest.description,
        "source": manifest.source,
        "task": manifest.task,
        "versions": manifest.versions,
        "passes": [{"name": p.name, "effect": _pass_effect(p), "config": p.config} for p in manifest.passes],
        "parameters": info.parameters,
        "tensors": [{"encoding": k, "dtype": d, **v} for (k, d), v in sorted(tensors.items())],
        "files": files,
        "bytes_by_role": _sum_roles(files),
        "onnx": None if onnx is None else {k: onnx.get(k) for k in ("model", "exporter", "opset", "inputs", "outputs",
                                                                  "quantization", "cast", "int8_weights")
                                   if onnx.get(k) is not None},
        "tensor_parallel": manifest.tensor_parallel.to_json() if manifest.tensor_parallel is not None else None,
        "gates": manifest.recipe.get("gates"),
        "last_report": last,
    }


def _sum_roles(files: dict[str, dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for entry in files.values():
        out[entry["role"]] = out.get(entry["role"], 0) + int(entry["bytes"] or 0)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def render_text(summary: dict[str, Any]) -> str:
    """The summary as readable text."""
    src = summary.get("source") or {}
    detail = src.get("name") or src.get("path") or src.get("factory") or ""
    lines = [f"{summary['name']}: {summary.get('description') or ''}".rstrip(": "),
             f"  artifact   {summary['artifact']}",
             f"  source     {src.get('kind')}: {detail}" + (f" ({src.get('model_type')})" if src.get("model_type") else ""),
             f"  task       {summary.get('task')}",
             f"  parameters {summary['parameters']:,}" if summary.get("parameters") is not None else "  parameters ?",
             "", "passes:"]
    for i, p in enumerate(summary["passes"]):
        lines.append(f"  {i}. {p['name']}: {p['effect']}")
    if not summary["passes"]:
        lines.append("  (none: the source model as is)")
    lines += ["", "tensors by encoding and dtype:"]
    for t in summary["tensors"]:
        lines.append(f"  {t['encoding']:<9} {t['dtype']:<16} {t['tensors']:>5} tensors {t['bytes']:>14,} bytes")
    lines += ["", "files:"]
    for role, size in summary["bytes_by_role"].items():
        lines.append(f"  {role:<32} {size:>14,} bytes")
    for rel, f in summary["files"].items():
        if f["role"] in ("weights", "onnx", "plan"):
            lines.append(f"    {rel:<44} {f['bytes']:>14,}")
    if summary.get("onnx"):
        o = summary["onnx"]
        quant = o.get("quantization") if isinstance(o.get("quantization"), dict) else None
        targets = quant.get("targets") if quant else None
        weights = o.get("int8_weights") if isinstance(o.get("int8_weights"), dict) else None
        extra = (f", int8 {quant.get('mode')}" + (f" for {', '.join(map(str, targets))}" if isinstance(targets, list)
                                                  else ", no CPU targets recorded") if quant
                 else f", {o['cast'].get('dtype')}" if isinstance(o.get("cast"), dict)
                 else f", weight-only int8: {len(weights.get('initializers') or {})} weights stored int8, computed in "
                      "float32" if weights else "")
        lines += ["", f"onnx: {o.get('model')} ({o.get('exporter')}, opset {o.get('opset')}{extra}); inputs "
                      f"{', '.join(o.get('inputs') or [])}; outputs {', '.join(o.get('outputs') or [])}"]
    tp = summary.get("tensor_parallel")
    if tp:
        lines += ["", f"tensor parallel: {tp['world']} ranks ({tp.get('family')}); per rank "
                      f"{', '.join(f'{b:,}' for b in tp.get('bytes_per_rank', []))} bytes; replicated "
                      f"{tp.get('replicated_bytes', 0):,} bytes"]
    lines += ["", "gates:"]
    gates = summary.get("gates") or {}
    set_gates = {k: v for k, v in gates.items() if v is not None} if isinstance(gates, dict) else {}
    if not set_gates:
        lines.append("  (none in the recipe)")
    for k, v in set_gates.items():
        if isinstance(v, dict):
            where = "/".join(str(v[x]) for x in ("device", "format") if v.get(x))
            lines.append(f"  {k}: {v.get('value')}" + (f" (on {where})" if where else ""))
        else:
            lines.append(f"  {k}: {v}")
    last = summary.get("last_report")
    if last and "gates" in last:
        verdict = {True: "passed", False: "FAILED", None: "not checked"}[last.get("passed")]
        lines.append(f"  last evaluation ({last.get('created')}): {verdict}")
        for g in last["gates"]:
            measured = g["measured"]
            shown = f"{measured:.4g}" if isinstance(measured, (int, float)) else "–"
            target = f" [{g['target']}]" if g.get("target") else ""
            lines.append(f"    {g['status']:<8} {g['gate']} on {g['device']}/{g['format']}{target}: {shown} "
                         f"(threshold {g['threshold']})")
    elif last:
        lines.append(f"  last evaluation: {last.get('error')}")
    else:
        lines.append("  not evaluated yet (compress eval)")
    return "\n".join(lines)
