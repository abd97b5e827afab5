"""The `compress` command line: help, `passes`, error reporting and exit codes, output-directory safety, and the
generated recipe reference."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from compressor.errors import EXIT_USAGE

from conftest import ROOT, run_cli

DIGITS_RECIPE = "name: digits-fp16\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - cast: {dtype: float16}\n"
BROKEN_RECIPE = "name: x\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - cast: {dtyp: float16}\n"


# ------------------------------------------------------------------------------------------------- help


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    commands = result.stdout.split("Commands:", 1)[1]
    for name in ("run", "validate", "passes"):
        assert re.search(rf"^\s+{name}\s+\S", commands, re.M), result.stdout
    assert "--debug" in result.stdout
    assert "Exit codes: 0 ok, 1 runtime failure, 2 invalid recipe or usage, 3" in result.stdout
    assert run_cli("-h").stdout == result.stdout


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["passes"]], ids=" ".join)
def test_light_commands_do_not_import_torch(args: list[str]):
    # -X importtime lists every module the interpreter imported, on stderr.
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "compressor", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "compressor.cli" in imported  # the probe works: the CLI module shows up
    assert "click" in imported
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "transformers"))
    assert heavy == []


# ----------------------------------------------------------------------------------------------- passes


CAST_PARAMS = {
    "dtype": ("float16 | bfloat16", '"float16"'),
    "keep_norms": ("bool", "true"),
    "keep": ("list[str]", "[]"),
    "float32_io": ("bool", "true"),
}


def test_passes_lists_cast_with_its_parameters():
    result = run_cli("passes")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("cast: ") for line in lines), result.stdout
    for name, (kind, default) in CAST_PARAMS.items():
        assert f"  {name} ({kind}, default {default})" in lines, result.stdout
    # each parameter is followed by its description
    i = lines.index('  dtype (float16 | bfloat16, default "float16")')
    assert "float16 or bfloat16" in lines[i + 1]


def test_passes_json_matches_the_text():
    result = run_cli("passes", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    cast = data["cast"]
    assert cast["summary"]
    params = {row["name"]: (row["type"], row["default"]) for row in cast["parameters"]}
    assert params == CAST_PARAMS
    assert [row["name"] for row in cast["parameters"]] == ["dtype", "keep_norms", "keep", "float32_io"]
    assert all(row["description"] for row in cast["parameters"])

    text = run_cli("passes").stdout
    for name, info in data.items():
        assert f"{name}: {info['summary']}" in text
        for row in info["parameters"]:
            assert f"  {row['name']} ({row['type']}, default {row['default']})" in text
            assert row["description"] in text


# ------------------------------------------------------------------------------------------ run: errors


def test_run_broken_recipe_exits_2_without_traceback(tmp_path: Path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(BROKEN_RECIPE)
    out = tmp_path / "out"
    result = run_cli("run", str(recipe), "-o", str(out))
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{recipe}:4:" in result.stderr and "did you mean 'dtype'?" in result.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml"]


def test_run_broken_recipe_with_debug_shows_the_traceback(tmp_path: Path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(BROKEN_RECIPE)
    result = run_cli("--debug", "run", str(recipe), "-o", str(tmp_path / "out"))
    assert result.returncode == EXIT_USAGE
    assert "Traceback (most recent call last)" in result.stderr
    assert "RecipeError" in result.stderr
    assert "did you mean 'dtype'?" in result.stderr


def test_run_missing_recipe_exits_2(tmp_path: Path):
    result = run_cli("run", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "out"))
    assert result.returncode == EXIT_USAGE
    assert "Traceback" not in result.stderr
    assert "no such recipe file" in result.stderr


# ---------------------------------------------------------------------------------- run: output safety


def test_run_refuses_a_user_directory(tmp_path: Path):
    recipe = tmp_path / "digits.yaml"
    recipe.write_text(DIGITS_RECIPE)
    out = tmp_path / "mine"
    out.mkdir()
    precious = out / "notes.txt"
    precious.write_text("do not lose this\n")

    result = run_cli("run", str(recipe), "-o", str(out))
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "Traceback" not in result.stderr
    assert "refusing" in result.stderr and str(out) in result.stderr
    assert precious.read_text() == "do not lose this\n"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.yaml", "mine"]  # no temporary directory left


def test_run_refuses_a_file_as_output(tmp_path: Path):
    recipe = tmp_path / "digits.yaml"
    recipe.write_text(DIGITS_RECIPE)
    target = tmp_path / "model.bin"
    target.write_bytes(b"user data")
    result = run_cli("run", str(recipe), "-o", str(target))
    assert result.returncode == EXIT_USAGE
    assert "Traceback" not in result.stderr
    assert target.read_bytes() == b"user data"


@pytest.mark.slow
def test_run_writes_then_replaces_its_own_artifact(tmp_path: Path):
    recipe = tmp_path / "digits.yaml"
    recipe.write_text(DIGITS_RECIPE)
    out = tmp_path / "art"
    first = run_cli("run", str(recipe), "-o", str(out), "-q")
    assert first.returncode == 0, first.stderr
    assert f"wrote {out}" in first.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "digits-fp16"
    assert [p["name"] for p in manifest["passes"]] == ["cast"]

    # An earlier artifact (unlike a user's directory) is replaced.
    second = run_cli("run", str(recipe), "-o", str(out), "-q")
    assert second.returncode == 0, second.stderr
    assert json.loads((out / "manifest.json").read_text())["name"] == "digits-fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "digits.yaml"]


# ------------------------------------------------------------------------------------- recipe reference


def _schema_models() -> list[type[BaseModel]]:
    from compressor import recipe as r
    from compressor.passes import available_passes

    models = [r.Recipe, r.HFModel, r.PythonModel, r.ZooModel, r.InputSpec, r.ExportSpec, r.SafetensorsExport,
              r.EvaluateSpec, r.GatesSpec, r.Threshold]
    return models + [cls.Config for cls in available_passes().values()]


def test_recipe_reference_mentions_every_field():
    from compressor.docs import recipe_reference

    text = recipe_reference()
    sections = [s for s in text.split("#### ")[1:]]
    tables = [re.findall(r"^\| `([^`]+)` \|", s, re.M) for s in sections]
    models = _schema_models()
    assert any(m.__name__ == "CastConfig" for m in models)
    for model in models:
        expected = list(model.model_fields)
        assert expected, model
        # one section documents exactly this model's keys, in order
        assert expected in tables, f"{model.__name__}: {expected} not among {tables}"
        for name, info in model.model_fields.items():
            assert f"| `{name}` |" in text
            assert info.description and info.description.replace("|", "\\|") in text, (model.__name__, name)
    # the discriminating `source` values of each model source are there too
    for source in ("hf", "python", "zoo"):
        assert f"`source: {source}`" in text
