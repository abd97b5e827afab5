"""Shared fixtures: offline, a private model cache, and a guard that no test leaves files in the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_IGNORED_DIRS = {".venv", ".git", "__pycache__", ".pytest_cache", ".hypothesis", "compressor.egg-info"}

# Never reach for a model hub, whatever the machine allows.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

_TRAINER = pytest.StashKey[subprocess.Popen]()
_CACHE = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    """Trained zoo models are cached for the session in a directory of its own, never in the user's home."""
    cache = Path(tempfile.mkdtemp(prefix="compressor-test-cache-"))
    os.environ["COMPRESSOR_CACHE"] = str(cache)
    config.stash[_CACHE] = cache


def pytest_unconfigure(config: pytest.Config) -> None:
    trainer = config.stash.get(_TRAINER, None)
    if trainer is not None:
        if trainer.poll() is None:  # a run that never needed the model (-x, an interrupt)
            trainer.kill()
        trainer.stdin.close()
        trainer.wait()
    cache = config.stash.get(_CACHE, None)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)


# The background trainer: lowest priority, and it exits when this session's end of its stdin closes, so a killed
# session (an outer timeout, SIGKILL) does not leave it training.
_TRAIN = ("import os, sys, threading\n"
          "if hasattr(os, 'nice'): os.nice(19)\n"
          "threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()\n"
          "from compressor.tinylm import tiny_lm_path\n"
          "tiny_lm_path()\n")


@pytest.hookimpl(trylast=True)  # after -k / -m / --deselect have removed what will not run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run only where CUDA really is available. Tests of modules that use the zoo's tiny-lm run
    last, and the model trains meanwhile in a background process at the lowest priority: its four minutes on two
    cores then take the cycles the other tests leave idle (compressor.tinylm's lock makes the first test that
    needs it wait for that process instead of training again)."""
    uses_lm = {path for path in {item.path for item in items}
               if path.suffix == ".py" and any(word in path.read_text() for word in ("tiny-lm", "tiny_lm"))}
    if uses_lm and not config.option.collectonly:
        items.sort(key=lambda item: item.path in uses_lm)  # stable: each module keeps its own order
        log = open(config.stash[_CACHE] / "trainer.log", "w")  # noqa: SIM115 - the child's; closed with it
        config.stash[_TRAINER] = subprocess.Popen([sys.executable, "-c", _TRAIN], stdin=subprocess.PIPE,
                                                  stdout=log, stderr=subprocess.STDOUT)
        log.close()
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none available)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


def _tree() -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in _IGNORED_DIRS]
        rel = Path(dirpath).relative_to(ROOT)
        found.update(str(rel / f) for f in filenames)
        found.update(str(rel / d) + "/" for d in dirnames)
    return found


@pytest.fixture(autouse=True)
def no_files_left_behind():
    """Fail a test that leaves new files or directories in the repository."""
    before = _tree()
    yield
    new = sorted(_tree() - before)
    assert not new, f"test left files behind in the repository: {new[:10]}"


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600,
            fresh: bool = False) -> subprocess.CompletedProcess:
    """Run `compress ARGS` and return what a subprocess run would (exit code, stdout, stderr as text).

    By default the CLI runs in this process through click's test runner: the same entry point, exit codes and
    messages, without paying a fresh interpreter and torch import per call (about 4 s on 2 cores; the suite makes
    over a hundred calls). ``fresh=True`` runs `python -m compressor` in a new process, for what only a process
    shows: signals, what gets imported, a clean interpreter."""
    if fresh:
        return subprocess.run([sys.executable, "-m", "compressor", *args], cwd=cwd or ROOT,
                              env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=timeout)
    import traceback

    from click.testing import CliRunner

    from compressor.cli import cli

    previous = os.getcwd()
    os.chdir(cwd or ROOT)
    try:
        result = CliRunner().invoke(cli, list(args), env=env, prog_name="compress", catch_exceptions=True)
    finally:
        os.chdir(previous)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # What the interpreter would print for an exception that escaped the CLI.
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["compress", *args], result.exit_code, result.stdout, stderr)


@pytest.fixture(scope="session")
def minilm_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped recipes/minilm-fp16.yaml, run once for the session; returns the artifact directory."""
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    out = tmp_path_factory.mktemp("art") / "minilm-fp16"
    recipe = load_recipe(ROOT / "recipes" / "minilm-fp16.yaml")
    # Two cold and two warm load runs per model instead of the recipe's three: each is a fresh process (about 8 s on
    # 2 cores), and two already test medians across processes.
    speed = recipe.evaluate.speed.model_copy(update={"load_runs": 2})
    run_recipe(recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={"speed": speed})}), out)
    return out


def strict_json(text: str) -> dict:
    """json.loads that refuses NaN and Infinity (strict JSON has neither)."""

    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def read_report(artifact: Path) -> dict:
    """An artifact's report.json, parsed as strict JSON."""
    return strict_json((artifact / "report.json").read_text())


def assert_same_scores(original: dict, report: dict) -> None:
    """A re-evaluation reproduced the first one: same rows, accuracy and sizes, fidelity within 1e-6."""
    import pytest

    for before, now in zip(original["results"], report["results"], strict=True):
        assert now["role"] == before["role"]
        assert now["accuracy"] == before["accuracy"]
        assert now["size_bytes"] == before["size_bytes"]
    fid, fid_before = report["results"][1]["fidelity"], original["results"][1]["fidelity"]
    assert fid["cos_min"] == pytest.approx(fid_before["cos_min"], abs=1e-6)
    assert fid["top1_agreement"] == fid_before["top1_agreement"]


@pytest.fixture(scope="session")
def tiny_lm() -> Path:
    """The zoo's causal language model, trained once per test session (into the session's cache)."""
    from compressor.tinylm import tiny_lm_path

    return tiny_lm_path()


@pytest.fixture(scope="session")
def tiny_lm_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path):
    """The shipped recipes/tiny-lm-onnx.yaml, run once for the session; returns the RunResult."""
    from compressor.log import Reporter
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    out = tmp_path_factory.mktemp("art") / "tiny-lm-onnx"
    return run_recipe(load_recipe(ROOT / "recipes" / "tiny-lm-onnx.yaml"), out, Reporter(quiet=True))


def torch_greedy(module, input_ids, new_tokens: int):
    """Greedy continuation in torch with its own KV cache: (batch, new_tokens) token ids."""
    import torch

    mask = torch.ones_like(input_ids)
    tokens = []
    with torch.no_grad():
        out = module(input_ids=input_ids, attention_mask=mask, use_cache=True)
        for _ in range(new_tokens):
            nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = module(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens, dim=1)


def bare_environment(tmp_path: Path) -> Path:
    """A fresh virtual environment holding only numpy, onnxruntime and tokenizers (linked from this one: the
    tests run offline), and nothing of compressor, torch or transformers."""
    import importlib.util

    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    deps = tmp_path / "deps"
    deps.mkdir()
    for name in ("numpy", "onnxruntime", "tokenizers"):
        origin = Path(importlib.util.find_spec(name).origin).parent
        os.symlink(origin, deps / name)
        libs = origin.parent / f"{name}.libs"
        if libs.exists():
            os.symlink(libs, deps / libs.name)
    site = next((env / "lib").glob("python*/site-packages"))
    (site / "bundle-deps.pth").write_text(str(deps) + "\n")
    python = env / "bin" / "python"
    check = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert check.returncode != 0 and "No module named 'torch'" in check.stderr
    return python
