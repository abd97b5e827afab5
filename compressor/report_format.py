"""report.json: the evaluation report's schema and version, the contract between the evaluator that writes it and
everything that reads it (the CLI, the other report formats, `compress inspect`, CI scripts).

Only the top level, the rows and the gates are typed; each measurement (accuracy, fidelity, load, latency, ratios)
is a JSON object whose keys the evaluator documents where it measures them (compressor.evaluate). Every model keeps
keys it does not know (``extra="allow"``), so a newer compressor's report of the same version reads back whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .manifest import read_document

__all__ = ["REPORT_FORMAT", "REPORT_VERSION", "Report", "ResultRow", "GateResult", "read_report"]

REPORT_FORMAT = "compressor-report"
REPORT_VERSION = 1


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")

    def to_json(self) -> dict[str, Any]:
        """As written: only the keys that were set, in declaration order."""
        return self.model_dump(mode="json", exclude_unset=True)


class ResultRow(_Part):
    """One subject (baseline or artifact, in one format) measured on one device."""

    role: Literal["baseline", "artifact"]
    label: str
    format: str  #: "source", "safetensors" or "onnx"
    device: str  #: "cpu" or "cuda"
    size_bytes: int | None = None  #: bytes of the files holding the weights
    files_bytes: int | None = None  #: bytes of every file read when loading
    accuracy: dict[str, Any] | None = None  #: {"metric", "value", ...} on the evaluation data
    fidelity: dict[str, Any] | None = None  #: cosine and error statistics of the outputs against the baseline's
    load: dict[str, Any] | None = None  #: {"cold": ..., "warm": ...} load and first-inference times, RSS
    latency: list[dict[str, Any]] = []  #: per sequence length: median, IQR and speedup over the baseline
    ratios: dict[str, Any] | None = None  #: artifact over baseline: compression, accuracy drop, speedups
    lm: dict[str, Any] | None = None  #: causal LMs: perplexity, agreement, KL, greedy match, ttft, decode speed
    target: str | None = None  #: the int8 CPU family this row's arithmetic is that of
    cpu_target: str | None = None  #: this machine's int8 family
    emulated: bool = False  #: the row is another family's arithmetic, emulated on this machine
    arithmetic: str | None = None


class GateResult(_Part):
    """One gate checked against one row."""

    gate: str
    device: str | None = None
    format: str | None = None
    target: str | None = None
    threshold: Any = None
    measured: float | None = None
    comparison: str | None = None  #: how measured is compared with threshold (">=", "<=")
    status: Literal["passed", "failed", "error", "skipped"]
    message: str = ""


class Report(_Part):
    """report.json."""

    format: Literal["compressor-report"] = REPORT_FORMAT
    format_version: int = REPORT_VERSION
    created: str  #: UTC, ISO 8601
    compressor: str  #: the version that wrote it
    artifact: dict[str, Any]  #: {"name", "path", "manifest_sha256"}
    baseline: dict[str, Any]  #: the baseline subject's record
    machine: dict[str, Any]  #: CPU, its int8 flags and family, threads, Python, torch, CUDA device
    settings: dict[str, Any]  #: the evaluate section used
    data: dict[str, Any]  #: {"name", "metric", "label", "examples"}
    devices: list[str]
    skipped: list[dict[str, str]] = []  #: devices not measured, with the reason
    results: list[ResultRow]
    gates: list[GateResult] = []
    passed: bool | None = None  #: None when the recipe has no gates
    int8: dict[str, Any] | None = None  #: the CPU families an int8 ONNX artifact holds on
    #: set when the models did not fit in memory together and were measured one after the other:
    #: {"mode": "apart", "together_bytes", "apart_bytes", "note"}
    memory: dict[str, Any] | None = None

    def gate_problems(self) -> list[str]:
        """The messages of every gate that failed or could not be checked."""
        return [g.message for g in self.gates if g.status in ("failed", "error")]


def read_report(path: Path) -> Report:
    """Read and validate a report.json; ArtifactError saying what is wrong otherwise."""
    return read_document(Path(path), Report, REPORT_FORMAT, REPORT_VERSION, "report")
