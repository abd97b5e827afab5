"""docs/ci.md: its GitHub Actions workflow and GitLab job are valid YAML whose shell steps name files that exist
and `compress` invocations the CLI accepts (parsed by click itself, not run: running them is the release job)."""

from __future__ import annotations

import re
import shlex

import yaml

from compressor.cli import cli
from conftest import ROOT

DOC = (ROOT / "docs" / "ci.md").read_text()


def _blocks() -> list[dict]:
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", DOC, flags=re.S)]


def _commands(script: str) -> list[list[str]]:
    out = []
    for line in script.splitlines():
        line = line.strip()
        if line.startswith(".venv/bin/compress "):
            out.append(shlex.split(line)[1:])
    return out


def _accepted(args: list[str]) -> None:
    """click parses the command line exactly as `compress` would (options, choices, required arguments)."""
    name, rest = args[0], args[1:]
    command = cli.commands[name]
    command.make_context(name, list(rest), parent=cli.make_context("compress", [name, *rest]))


def test_github_workflow_runs_the_documented_commands_in_order():
    workflow = next(b for b in _blocks() if "jobs" in b)
    steps = workflow["jobs"]["compress"]["steps"]
    scripts = [s["run"] for s in steps if "run" in s]
    assert scripts[0] == "make install"
    commands = [c for s in scripts for c in _commands(s)]
    assert [c[0] for c in commands] == ["run", "verify", "pack"]
    for args in commands:
        _accepted(args)
    recipe = commands[0][1]
    assert (ROOT / recipe).is_file()
    # The summary, the JUnit report and the bundle are the files those commands write.
    name = "minilm-int8-onnx"
    assert f"artifacts/{name}/report.md" in scripts[-1]
    uploads = [s["with"] for s in steps if s.get("uses", "").startswith(("actions/upload-artifact",
                                                                          "mikepenz/action-junit-report"))]
    assert uploads[0]["report_paths"] == f"artifacts/{name}/junit.xml"
    assert uploads[1]["path"] == f"dist/{name}-cpu-x86_64.zip"
    assert workflow["jobs"]["compress"]["env"]["COMPRESS_BUNDLE_DIR"] == "dist"
    # The local replay lists the same shell steps, in the same order.
    replay = re.search(r"GITHUB_STEP_SUMMARY=summary.md\n(.*?)```", DOC, flags=re.S).group(1)
    assert _commands(replay) == commands


def test_gitlab_job_is_the_same_pipeline():
    job = next(b for b in _blocks() if "compress-model" in b)["compress-model"]
    assert job["script"][0] == "make install"
    commands = _commands("\n".join(job["script"]))
    assert [c[0] for c in commands] == ["run", "verify", "pack"]
    for args in commands:
        _accepted(args)
    assert job["artifacts"]["when"] == "always"
    assert job["artifacts"]["reports"]["junit"].endswith("junit.xml")
