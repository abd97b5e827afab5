"""Shared by the benchmark scripts: run a measuring child process, summarize its runs."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys


def run_child(code: str, *args: str) -> dict[str, float]:
    """Run ``python -c code args`` in a fresh process; its last stdout line is a JSON object of measurements."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"measurement {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median, min and max of every measured key."""
    return {k: {"median": round(statistics.median(r[k] for r in runs), 2),
                "min": round(min(r[k] for r in runs), 2), "max": round(max(r[k] for r in runs), 2)}
            for k in runs[0]}
