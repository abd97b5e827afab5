"""User mistakes around sources and output paths: clear errors, right exit codes, nothing of the user's lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compressor.errors import RecipeError
from compressor.pipeline import run_recipe
from compressor.recipe import load_recipe
from compressor.staging import TargetError
from compressor.zoo import minilm_path

from conftest import run_cli

DIGITS = "name: d\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - cast: {dtype: float16}\n"


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_hf_directory_with_a_missing_weight_is_refused(tmp_path):
    """transformers would fill the gap with random values and only warn; we refuse."""
    src = tmp_path / "hf"
    shutil.copytree(minilm_path(), src)
    state = load_file(str(src / "model.safetensors"))
    del state["encoder.layer.0.attention.self.query.weight"]
    save_file(state, str(src / "model.safetensors"))
    recipe = _recipe(tmp_path, "name: h\nmodel: {source: hf, path: hf}\n")
    with pytest.raises(RecipeError, match="missing keys: encoder.layer.0.attention.self.query.weight"):
        run_recipe(load_recipe(recipe), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extra_user_files_in_an_earlier_artifact_are_never_deleted(tmp_path):
    recipe = _recipe(tmp_path, DIGITS)
    out = tmp_path / "out"
    run_recipe(load_recipe(recipe), out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TargetError, match="notes.txt"):
        run_recipe(load_recipe(recipe), out)
    assert (out / "notes.txt").read_text() == "mine"


def test_the_current_directory_is_never_an_output(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, DIGITS)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = run_cli("run", str(recipe), "-o", ".", cwd=work)
    assert result.returncode == 2 and "current directory" in result.stderr
    assert work.is_dir() and list(work.iterdir()) == []


def test_output_under_a_file_is_a_usage_error_before_any_work(tmp_path):
    recipe = _recipe(tmp_path, DIGITS)
    (tmp_path / "afile").write_text("x")
    result = run_cli("run", str(recipe), "-o", str(tmp_path / "afile" / "sub"))
    assert result.returncode == 2, result.stderr
    assert "cannot write the artifact" in result.stderr and "Traceback" not in result.stderr
    assert "loading model" not in result.stderr  # refused before the model was loaded


@pytest.mark.parametrize("body, expected", [
    ("def build():\n    raise ValueError('bad config')\n", "factory brokenmod:build raised ValueError: bad config"),
    ("def build(:\n", "importing 'brokenmod' for model.factory failed: SyntaxError"),
], ids=["raises", "syntax-error"])
def test_a_broken_user_factory_is_named_not_reported_as_our_bug(tmp_path, body, expected):
    (tmp_path / "brokenmod.py").write_text(body)
    recipe = _recipe(tmp_path, "name: p\nmodel:\n  source: python\n  factory: brokenmod:build\n"
                               "  inputs: {x: {shape: [1, 4]}}\n")
    # A fresh process: both cases name their module brokenmod, and an interpreter imports a module once.
    result = run_cli("run", str(recipe), "-o", str(tmp_path / "out"), fresh=True)
    assert result.returncode == 1
    assert expected in result.stderr and "please report" not in result.stderr


def test_huge_seed_is_refused_at_validation(tmp_path):
    recipe = _recipe(tmp_path, "name: s\nseed: 99999999999999999999999\nmodel: {source: zoo, name: digits-mlp}\n")
    result = run_cli("validate", str(recipe))
    assert result.returncode == 2 and "r.yaml:2:7: seed" in result.stderr


def test_load_turns_a_malformed_manifest_into_an_artifact_error(tmp_path):
    import json

    import compressor
    from compressor.errors import ArtifactError

    out = tmp_path / "out"
    run_recipe(load_recipe(_recipe(tmp_path, DIGITS)), out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model"]["dtype_bridges"]["no.such.module"] = {"run": "float32"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="dtype_bridges"):
        compressor.load(out)


# ----------------------------------------------------------------------------- numbers (issue #15, case 7)


@pytest.mark.parametrize("gate, value, needle", [
    ("min_compression", ".nan", "finite number"),
    ("min_fidelity", ".inf", "finite number"),
    ("max_accuracy_drop", "-.inf", "finite number"),
    ("min_compression", "-1", "can never be measured"),
    ("max_size_bytes", "0", "can never be measured"),
    ("max_accuracy_drop", "-0.5", "better model than the baseline"),
    ("min_fidelity", "1.5", "not a cosine similarity"),
])
def test_gate_thresholds_must_be_finite_and_sensible(tmp_path, gate, value, needle):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\nmodel: {{source: zoo, name: digits-mlp}}\ngates:\n  {gate}: {value}\n")
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert needle in proc.stderr and f"{path}:4:" in proc.stderr and "Traceback" not in proc.stderr


def test_pass_numbers_must_be_finite(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nmodel: {source: zoo, name: digits-mlp}\npasses:\n"
                    "  - quantize: {mode: dynamic, target_fidelity: .nan}\nexport: {onnx: {}}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "finite number" in str(err.value) and "target_fidelity" in str(err.value)


def test_min_cosine_on_the_command_line_must_be_finite(tmp_path):
    proc = run_cli("eval", str(tmp_path), "--tp", "2", "--min-cosine", "nan")
    assert proc.returncode == 2 and "not a finite number" in proc.stderr


# ---------------------------------------------------------------- user code that exits (issue #15, case 8)


@pytest.mark.parametrize("where", ["factory", "import"])
def test_a_factory_that_calls_sys_exit_fails_the_run(tmp_path, where):
    body = "import sys\nimport torch\n"
    body += "sys.exit(0)\n" if where == "import" else ""
    body += "def build():\n    " + ("sys.exit(0)\n" if where == "factory" else "return torch.nn.Linear(4, 2)\n")
    (tmp_path / "exits_here.py").write_text(body)
    (tmp_path / "r.yaml").write_text("name: r\nmodel:\n  source: python\n  factory: exits_here:build\n"
                                     "  inputs: {x: {shape: [2, 4]}}\n")
    # A fresh process: both cases name their module exits_here, and an interpreter imports a module once.
    proc = run_cli("run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), fresh=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "SystemExit" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------- eval checks every hash first (issue #15, case 12)


def test_eval_refuses_an_artifact_with_a_same_size_flipped_byte(small_artifact, tmp_path):
    out = tmp_path / "mlp"
    shutil.copytree(small_artifact, out)
    for name in ("model.safetensors", "model.onnx"):
        path = out / name
        original = path.read_bytes()
        data = bytearray(original)
        data[-3] ^= 0x01  # same size, one bit: only the hash can tell
        path.write_bytes(bytes(data))
        proc = run_cli("eval", str(out), "--no-speed", "--quiet")
        path.write_bytes(original)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"{name}: sha256 differs" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------ bounded recipe reading (issue #15, cases 4 and 5)


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    import time

    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")  # 9**9 values once expanded, in under 400 bytes
    start = time.perf_counter()
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert time.perf_counter() - start < 2
    assert "expands to more than" in str(err.value) and f"{path}:" in str(err.value)


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_recipe_files_must_be_regular_files(tmp_path, kind):
    import os

    if kind == "fifo":
        path = tmp_path / "pipe.yaml"
        os.mkfifo(path)  # nobody writes: opening it for reading would block forever
    else:
        path = Path("/dev/zero")  # never ends: reading it whole would fill memory
    proc = run_cli("validate", str(path), timeout=30)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr


# ------------------------------------------------- one confinement rule for every reader (issue #15, cases 1-3)


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("confine")
    (tmp / "r.yaml").write_text("name: mlp\nmodel: {source: zoo, name: digits-mlp}\nexport: {onnx: {}}\n")
    out = tmp / "mlp"
    proc = run_cli("run", str(tmp / "r.yaml"), "-o", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def _outside_reference(artifact: Path, tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """A copy of ``artifact`` that names a file outside itself in one of four ways; returns it and the outside
    file."""
    import hashlib
    import json

    copy = tmp_path / "art"
    shutil.copytree(artifact, copy)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    manifest = json.loads((copy / "manifest.json").read_text())
    if kind == "symlinked-file":
        shutil.copyfile(copy / "model.safetensors", secret)  # identical bytes: only the link is wrong
        (copy / "model.safetensors").unlink()
        (copy / "model.safetensors").symlink_to(secret)
    elif kind == "symlinked-manifest":
        (outside / "manifest.json").write_text(json.dumps(manifest))
        (copy / "manifest.json").unlink()
        (copy / "manifest.json").symlink_to(outside / "manifest.json")
        secret = outside / "manifest.json"
    else:
        secret.write_bytes(b"not yours\n")
        name = str(secret) if kind == "absolute" else "../outside/secret.bin"
        manifest["files"][name] = {"bytes": 10, "sha256": hashlib.sha256(b"not yours\n").hexdigest()}
        (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy, secret


class _OpenWatch:
    """Every open of a file in ``directory`` by any process, native code included (Linux inotify): ONNX Runtime
    and safetensors open files from C++ and Rust, where Python's audit hooks do not see them."""

    IN_OPEN, IN_NONBLOCK = 0x20, 0o4000

    def __init__(self, directory: Path) -> None:
        import ctypes
        import os

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(self.IN_NONBLOCK)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        assert self.libc.inotify_add_watch(self.fd, os.fsencode(directory), self.IN_OPEN) >= 0

    def events(self) -> int:
        import os

        count = 0
        while True:
            try:
                count += len(os.read(self.fd, 65536))
            except BlockingIOError:
                return count

    def close(self) -> None:
        import os

        os.close(self.fd)


_AUDITED = """
import atexit, json, sys
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].startswith({outside!r}):
        opened.append(args[0])
sys.addaudithook(hook)
atexit.register(lambda: opened and print("OPENED OUTSIDE: " + " ".join(opened), file=sys.stderr))
from compressor.cli import cli
codes = []
for command in {commands!r}:
    try:
        cli.main(args=command, prog_name="compress")
    except SystemExit as exc:
        codes.append(exc.code)
    print("---", file=sys.stderr)
print("CODES:" + json.dumps(codes))
"""


@pytest.mark.parametrize("kind", ["symlinked-file", "symlinked-manifest", "absolute", "dotdot"])
def test_no_reader_opens_a_file_outside_the_artifact(small_artifact, tmp_path, kind):
    """verify, inspect, eval, pack (in a process with an audit hook on `open`) and compressor.load (here) on an
    artifact that names a file outside itself: each refuses it with exit 1, and no process opens that file."""
    import json
    import subprocess
    import sys

    import compressor
    from compressor.errors import ArtifactError

    from conftest import ROOT

    copy, secret = _outside_reference(small_artifact, tmp_path, kind)
    outside = str(secret.parent.resolve())
    watch = _OpenWatch(secret.parent)
    try:
        commands = [["verify", str(copy)], ["inspect", str(copy)], ["eval", str(copy), "--no-speed"],
                    ["pack", str(copy), "-o", str(tmp_path / "b.zip")]]
        # One audited process runs the four commands as `compress` would (one process each costs seconds).
        code = _AUDITED.format(outside=outside, commands=commands)
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        codes = json.loads(proc.stdout.rsplit("CODES:", 1)[1])
        assert codes == [1, 1, 1, 1], (codes, proc.stderr)
        assert "Traceback" not in proc.stderr and "OPENED OUTSIDE" not in proc.stderr, proc.stderr
        assert proc.stderr.count("error: ") >= 3, proc.stderr  # verify reports on stdout
        assert watch.events() == 0, f"a command opened a file in {outside}"
        assert not (tmp_path / "b.zip").exists()
        opened: list[str] = []

        def audit(event: str, args: tuple) -> None:
            if event == "open" and isinstance(args[0], (str, Path)) and str(args[0]).startswith(outside):
                opened.append(str(args[0]))

        sys.addaudithook(audit)  # stays installed, but only records opens under this test's own directory
        with pytest.raises(ArtifactError):
            compressor.load(copy, verify_hashes=True)
        with pytest.raises(ArtifactError):
            compressor.load(copy)
        assert opened == [] and watch.events() == 0, opened
        secret.read_bytes()  # the control: an open there is seen
        assert watch.events() > 0 and opened
    finally:
        watch.close()


# ---------------------------------------- evaluation happens before the exchange (issue #15, case 6)


EVAL_DIGITS = ("name: d\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - cast: {dtype: float16}\n"
               "evaluate: {data: %s, speed: {load_runs: 0, rounds: 1, calls: 1}}\n")


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def evaluated_artifact(tmp_path_factory):
    """An artifact with its reports, written once for these tests."""
    tmp = tmp_path_factory.mktemp("evaluated")
    (tmp / "r.yaml").write_text(EVAL_DIGITS % "digits")
    proc = run_cli("run", str(tmp / "r.yaml"), "-o", str(tmp / "out"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    return tmp / "out"


@pytest.fixture
def previous_artifact(tmp_path, evaluated_artifact):
    """An earlier artifact (with its reports) in tmp_path/out, and its bytes."""
    shutil.copytree(evaluated_artifact, tmp_path / "out")
    return tmp_path / "out", _snapshot(tmp_path / "out")


def test_a_data_file_error_during_evaluation_leaves_the_previous_artifact_and_names_the_users_file(
        tmp_path, previous_artifact):
    out, before = previous_artifact
    # Well-formed rows (they pass the check before any work), but three values where the model takes 64.
    (tmp_path / "rows.jsonl").write_text('{"x": [1, 2, 3], "label": 1}\n')
    (tmp_path / "r.yaml").write_text(EVAL_DIGITS % "rows.jsonl")
    proc = run_cli("run", str(tmp_path / "r.yaml"), "-o", str(out), "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert f"{tmp_path / 'rows.jsonl'}:1: input 'x' has 3 values" in proc.stderr, proc.stderr
    assert "compress-tmp" not in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if "compress-tmp" in p.name] == []


def test_an_evaluation_error_names_the_artifact_where_it_will_be_not_the_staging_directory(
        tmp_path, previous_artifact):
    out, before = previous_artifact
    # Text rows pass the check before any work, but the digits model has no tokenizer.
    (tmp_path / "rows.jsonl").write_text('{"text": "a sentence", "label": 1}\n')
    (tmp_path / "r.yaml").write_text(EVAL_DIGITS % "rows.jsonl")
    proc = run_cli("run", str(tmp_path / "r.yaml"), "-o", str(out), "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert "has no tokenizer files" in proc.stderr and str(out) in proc.stderr, proc.stderr
    assert "compress-tmp" not in proc.stderr
    assert _snapshot(out) == before


def test_an_evaluator_failure_leaves_the_previous_artifact_byte_identical(tmp_path, previous_artifact):
    out, before = previous_artifact
    (tmp_path / "failing_data.py").write_text("def batches():\n    raise RuntimeError('data server down')\n")
    (tmp_path / "r.yaml").write_text(EVAL_DIGITS % "{function: 'failing_data:batches'}")
    proc = run_cli("run", str(tmp_path / "r.yaml"), "-o", str(out), "--quiet")
    assert proc.returncode == 1, proc.stderr  # the user's code failed: a runtime failure, like a failing factory
    assert "failing_data:batches raised RuntimeError: data server down" in proc.stderr
    assert _snapshot(out) == before


def test_an_interrupt_during_evaluation_leaves_the_previous_artifact_byte_identical(tmp_path, previous_artifact):
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    out, before = previous_artifact
    marker = tmp_path / "evaluating"
    (tmp_path / "slow_data.py").write_text(
        "import time\nfrom pathlib import Path\n"
        f"def batches():\n    Path({str(marker)!r}).write_text('now')\n    time.sleep(120)\n    return []\n")
    (tmp_path / "r.yaml").write_text(EVAL_DIGITS % "{function: 'slow_data:batches'}")
    # SIGINT as at a terminal: a test run started in the background (nohup, `&`) hands its children SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen([sys.executable, "-m", "compressor", "run", str(tmp_path / "r.yaml"), "-o", str(out),
                             "--quiet"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), "the evaluation never started"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if "compress-tmp" in p.name] == []


def test_a_gate_miss_still_replaces_the_artifact_and_writes_its_reports(tmp_path, previous_artifact):
    import json

    out, _ = previous_artifact
    (tmp_path / "r.yaml").write_text(EVAL_DIGITS % "digits" + "gates: {min_compression: 50}\n")
    proc = run_cli("run", str(tmp_path / "r.yaml"), "-o", str(out), "--quiet")
    assert proc.returncode == 3, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["artifact"]["path"] == str(out.resolve())
    assert json.loads((out / "manifest.json").read_text())["recipe"]["gates"]["min_compression"]["value"] == 50


# ------------------------------------------- a damaged ONNX model with its hash updated (issue #15, case 9)


def _damage_onnx(artifact: Path, copy: Path, kind: str) -> None:
    """Copy ``artifact`` and damage its ONNX model one way, then rewrite the manifest's sizes and hashes so that
    only a structural check (or ONNX Runtime) can tell."""
    import hashlib
    import json

    import onnx

    shutil.copytree(artifact, copy)
    model = copy / "model.onnx"
    if kind == "garbage":
        model.write_bytes(b"\xff\xfe\x00garbage\x9c" * 50)
    elif kind == "truncated-data":
        data = copy / "model.onnx.data"
        data.write_bytes(data.read_bytes()[:1000])
    else:
        proto = onnx.load(str(model), load_external_data=False)
        if kind == "unknown-op":
            proto.graph.node[0].op_type = "NoSuchOperator"  # parses; only ONNX Runtime refuses it
        else:
            entries = {e.key: e for e in proto.graph.initializer[0].external_data}
            if kind == "offset-past-end":
                entries["offset"].value = "999999999"
            elif kind == "traversal":
                entries["location"].value = "../../../../etc/passwd"
            elif kind == "unlisted-file":
                entries["location"].value = "report.json"  # inside, but no hash covers it
            elif kind == "nul-in-location":
                entries["location"].value = "model.onnx.data\x00.txt"
        model.write_bytes(proto.SerializeToString())
    manifest = json.loads((copy / "manifest.json").read_text())
    for rel in manifest["files"]:
        body = (copy / rel).read_bytes()
        manifest["files"][rel] = {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    (copy / "report.json").write_text("{}")
    (copy / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind, needle", [
    ("garbage", "not a readable ONNX model"),
    ("offset-past-end", "spans bytes 999999999"),
    ("traversal", "points outside the artifact"),
    ("unlisted-file", "which the manifest does not list"),
    ("nul-in-location", "is not a usable file name"),
    ("truncated-data", "of model.onnx.data, which has 1000"),
    ("unknown-op", "ONNX Runtime cannot load"),
])
def test_a_damaged_onnx_model_is_named_cleanly(small_artifact, tmp_path, kind, needle):
    """check_files(hashes=True) is what `compress eval`, `pack` and `load(verify_hashes=True)` call first; verify
    runs the same structure check; ONNX Runtime's own refusal (an unknown operator) is named when eval opens it.
    Two kinds go through the CLI end to end, the rest in-process (each subprocess costs seconds)."""
    from compressor.errors import ArtifactError
    from compressor.manifest import check_files, read_manifest
    from compressor.verify import verify_artifact

    copy = tmp_path / "art"
    _damage_onnx(small_artifact, copy, kind)
    if kind in ("garbage", "unknown-op"):
        proc = run_cli("eval", str(copy), "--no-speed", "--quiet")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert needle in proc.stderr and "model.onnx" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr and "EP Error" not in proc.stdout
        return
    with pytest.raises(ArtifactError, match="model.onnx") as err:
        check_files(copy, read_manifest(copy), hashes=True)
    assert needle in str(err.value)
    result = verify_artifact(copy)
    assert not result["ok"] and any(needle in p for p in result["problems"]), result["problems"]


# ------------------------------------------ runtime recipe errors carry file:line:col (issue #15, case 11)


@pytest.mark.parametrize("factory, needle", [
    ("mods:as_dict", "returned dict, not a torch.nn.Module"),
    ("mods:nothing", "returned NoneType, not a torch.nn.Module"),
    ("no_such_module:build", "cannot import 'no_such_module'"),
    ("mods:no_such_function", "'mods' has no function 'no_such_function'"),
])
def test_a_factory_problem_found_at_run_time_names_the_recipe_line(tmp_path, factory, needle):
    (tmp_path / "mods.py").write_text("def as_dict():\n    return {'a': 1}\n\ndef nothing():\n    return None\n")
    recipe = _recipe(tmp_path, f"name: r\nmodel:\n  source: python\n  factory: {factory}\n"
                               "  inputs: {x: {shape: [2, 4]}}\n")
    if factory == "mods:as_dict":  # one through the CLI: exit 2 and the paragraph; the rest in-process
        proc = run_cli("run", str(recipe), "-o", str(tmp_path / "out"))
        assert proc.returncode == 2, proc.stderr
        message = proc.stderr
    else:
        with pytest.raises(RecipeError) as err:
            run_recipe(load_recipe(recipe), tmp_path / "out")
        message = str(err.value)
    assert f"{recipe}:4:12: model.factory: " in message and needle in message, message
    assert not (tmp_path / "out").exists()


def test_a_pass_problem_found_against_the_model_names_the_recipe_line(tmp_path):
    recipe = _recipe(tmp_path, "name: d\nmodel: {source: zoo, name: digits-mlp}\npasses:\n"
                               "  - prune: {sparsity: 0.5}\n  - quantize:\n      exclude: [no_such_layer]\n")
    with pytest.raises(RecipeError) as err:
        run_recipe(load_recipe(recipe), tmp_path / "out")
    assert str(err.value).count(f"{recipe}:6:") == 1, str(err.value)
    assert "passes[1].quantize.exclude" in str(err.value)


def test_an_evaluation_function_that_does_not_exist_names_the_recipe_line(tmp_path):
    (tmp_path / "mydata.py").write_text("def batches():\n    return []\n")
    recipe = _recipe(tmp_path, "name: d\nmodel: {source: zoo, name: digits-mlp}\n"
                               "evaluate:\n  data: {function: 'mydata:no_such_function'}\n")
    proc = run_cli("run", str(recipe), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert f"{recipe}:4:" in proc.stderr and "no function 'no_such_function'" in proc.stderr, proc.stderr


# ------------------------------------------------------------------ the bundle runner (issue #15, case 13)


@pytest.fixture(scope="module")
def unpacked_bundle(small_artifact, tmp_path_factory):
    """The digits MLP packed and unpacked: returns its run.py."""
    import zipfile

    tmp = tmp_path_factory.mktemp("bundle")
    proc = run_cli("pack", str(small_artifact), "-o", str(tmp / "b.zip"), "-q")
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(tmp / "b.zip") as zf:
        zf.extractall(tmp / "x")
    return tmp / "x" / "mlp" / "run.py"


def _run_bundle(run_py: Path, *args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(run_py), *args], capture_output=True, text=True, timeout=120)


def _bad_input(tmp_path: Path, kind: str) -> list[str]:
    """Command-line arguments that give the digits MLP (input x: float32 [batch, 64]) one kind of bad input."""
    import numpy as np

    path = tmp_path / "in.npy"
    arrays = {
        "wrong-size": np.zeros((2, 63), np.float32), "wrong-rank": np.zeros((64,), np.float32),
        "rank-3": np.zeros((1, 2, 64), np.float32), "strings": np.array([["a"] * 64]),
        "complex": np.zeros((1, 64), np.complex64), "nan": np.full((1, 64), np.nan, np.float32),
        "inf": np.full((1, 64), np.inf, np.float32), "empty": np.zeros((0, 64), np.float32),
    }
    if kind in arrays:
        np.save(path, arrays[kind])
    elif kind == "missing-file":
        return ["--input", str(tmp_path / "nope.npy")]
    elif kind == "text-file":
        path.write_text("1, 2, 3\n")
    elif kind == "pickle":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "directory":
        path.mkdir()
    elif kind == "npz-wrong-name":
        path = tmp_path / "in.npz"
        np.savez(path, y=np.zeros((1, 64), np.float32))
    elif kind == "npz-truncated":
        path = tmp_path / "in.npz"
        np.savez(path, x=np.zeros((1, 64), np.float32))
        path.write_bytes(path.read_bytes()[:100])
    elif kind == "npy-named-npz":
        path = tmp_path / "in.npz"
        with open(path, "wb") as f:
            np.save(f, np.zeros((1, 64), np.float32))
    elif kind == "text":
        return ["a sentence"]
    elif kind == "nothing":
        return []
    return ["--input", str(path)]


BAD_INPUTS = ["wrong-size", "wrong-rank", "rank-3", "strings", "complex", "nan", "inf", "empty", "missing-file",
              "text-file", "pickle", "directory", "npz-wrong-name", "npz-truncated", "npy-named-npz", "text",
              "nothing"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_the_bundle_runner_refuses_bad_input_in_one_paragraph(unpacked_bundle, tmp_path, kind):
    proc = _run_bundle(unpacked_bundle, *_bad_input(tmp_path, kind))
    assert proc.returncode == 2, (kind, proc.stdout, proc.stderr)
    assert proc.stdout == "" and "Traceback" not in proc.stderr and "unexpected" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(("error: ", "usage: ")), proc.stderr


def test_the_bundle_runner_prints_valid_json_and_saves_whole_files(unpacked_bundle, tmp_path):
    import json

    import numpy as np

    from compressor.zoo import digits_split

    _, x_test, _, _ = digits_split("digits-mlp")
    np.save(tmp_path / "x.npy", x_test[:3])
    np.savez(tmp_path / "x.npz", x=x_test[:3])
    for given in ("x.npy", "x.npz"):
        proc = _run_bundle(unpacked_bundle, "--input", str(tmp_path / given), "--save", str(tmp_path / "o.npz"))
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["outputs"]["logits"]["shape"] == [3, 10] and summary["outputs"]["logits"]["non_finite"] == 0
        assert np.load(tmp_path / "o.npz")["logits"].shape == (3, 10)
    proc = _run_bundle(unpacked_bundle, "--input", str(tmp_path / "x.npy"), "--save", str(tmp_path / "o.txt"))
    assert proc.returncode == 2 and "*.npz" in proc.stderr


def test_the_bundle_runner_writes_non_finite_outputs_as_null(unpacked_bundle):
    import importlib.util
    import json
    import math

    import numpy as np

    spec = importlib.util.spec_from_file_location("bundle_run", unpacked_bundle)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bundle = module.Bundle(unpacked_bundle.parent)
    summary = module.summarize(bundle, {"logits": np.array([[1.0, np.nan, np.inf, -np.inf]], np.float32)})
    text = json.dumps(summary, allow_nan=False)  # would raise on NaN
    assert json.loads(text)["outputs"]["logits"] == {"shape": [1, 4], "dtype": "float32",
                                                     "head": [1.0, None, None, None], "non_finite": 3}
    assert not any(isinstance(v, float) and math.isnan(v) for v in json.loads(text)["outputs"]["logits"]["head"])
    with pytest.raises(module.InputError, match="empty"):
        bundle.run({"x": np.zeros((0, 64), np.float32)})


def test_the_bundle_runner_names_a_broken_bundle_with_exit_1(unpacked_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(unpacked_bundle.parent, copy)
    (copy / "model.onnx").write_bytes(b"not a model")
    proc = _run_bundle(copy / "run.py", "--input", "x.npy")
    assert proc.returncode == 1 and "ONNX Runtime cannot load" in proc.stderr and "Traceback" not in proc.stderr


def test_pack_never_overwrites_a_file_that_is_not_a_bundle(small_artifact, tmp_path):
    import zipfile

    mine = tmp_path / "photos.zip"
    with zipfile.ZipFile(mine, "w") as zf:
        zf.writestr("holiday/1.jpg", b"jpeg bytes")
    before = mine.read_bytes()
    proc = run_cli("pack", str(small_artifact), "-o", str(mine))
    assert proc.returncode == 2 and "not a compressor bundle" in proc.stderr
    assert mine.read_bytes() == before
    bundle = tmp_path / "b.zip"
    for _ in range(2):  # an earlier bundle is replaced
        proc = run_cli("pack", str(small_artifact), "-o", str(bundle), "-q")
        assert proc.returncode == 0, proc.stderr


def test_a_rerun_into_an_artifact_with_a_tp_report_is_not_refused(tmp_path):
    """One list of report files: a tp-report.json beside the manifest is a report, not a user's file."""
    recipe = _recipe(tmp_path, DIGITS)
    out = tmp_path / "out"
    run_recipe(load_recipe(recipe), out)
    (out / "tp-report.json").write_text("{}")
    run_recipe(load_recipe(recipe), out)
    assert (out / "manifest.json").is_file()


def test_a_module_pattern_with_dots_is_located_as_one_key(tmp_path):
    from compressor.errors import Problem

    recipe = _recipe(tmp_path, "name: t\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - shard:\n"
                               "      tensor_parallel: 2\n      plan:\n        layers.*.fc: colwise\n")
    problem = Problem("no such module", path="passes[0].shard.plan.layers.*.fc")
    located = load_recipe(recipe).locate(RecipeError(problem))
    assert f"{recipe}:7:" in str(located), str(located)
