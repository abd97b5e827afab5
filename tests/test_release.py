"""Release pipelines and edge packaging: `compress verify`, `compress inspect`, `compress pack` and the bundle's
runner in an environment holding only numpy, onnxruntime and tokenizers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, bare_environment, run_cli

CNN_ONNX = "name: cnn\nmodel: {source: zoo, name: digits-cnn}\nexport: {onnx: {}}\n"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small artifact with safetensors and ONNX (external data) files; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("release")
    (root / "r.yaml").write_text(CNN_ONNX)
    proc = run_cli("run", str(root / "r.yaml"), "-o", str(root / "cnn"))
    assert proc.returncode == 0, proc.stderr
    return root / "cnn"


@pytest.fixture
def copy(cnn: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(cnn, tmp_path / "copy"))


def test_verify_passes_an_untouched_artifact_and_ignores_evaluation_reports(copy):
    (copy / "report.json").write_text("{}")  # written by `compress eval` after the manifest
    proc = run_cli("verify", str(copy))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "intact" in proc.stdout and "sha256" in proc.stdout


@pytest.mark.parametrize("victim", ["model.onnx.data", "model.safetensors", "model.onnx"])
def test_flipping_one_byte_makes_verify_exit_1_naming_the_file(copy, victim):
    path = copy / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    proc = run_cli("verify", str(copy))
    assert proc.returncode == 1
    assert f"{victim}: modified: sha256 differs from the manifest" in proc.stdout
    assert "1 problem(s)" in proc.stdout


def test_verify_names_missing_and_extra_files_and_speaks_json(copy):
    (copy / "example_inputs.safetensors").unlink()
    (copy / "notes.txt").write_text("not part of the release")
    proc = run_cli("verify", str(copy), "--json")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["ok"] is False
    assert result["files"]["example_inputs.safetensors"]["status"] == "missing"
    assert result["files"]["notes.txt"]["status"] == "extra"
    assert result["files"]["model.onnx"]["status"] == "ok"


def test_verify_checks_onnx_external_data_references_are_in_bounds(copy):
    """A model.onnx whose hash matches its manifest but whose tensor points past the end of the data file (an
    inconsistent release, e.g. an edited manifest) is invalid, named, exit 1."""
    import onnx

    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "offset":
            entry.value = str((copy / "model.onnx.data").stat().st_size)
    onnx.save_model(model, str(copy / "model.onnx"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {"sha256": _sha(copy / "model.onnx"),
                                       "bytes": (copy / "model.onnx").stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("verify", str(copy))
    assert proc.returncode == 1
    assert "model.onnx: invalid:" in proc.stdout and f"tensor {tensor.name} spans bytes" in proc.stdout


def test_external_data_without_length_or_offset_is_valid_onnx(copy):
    """Both keys are optional in ONNX (offset 0, length to the end of the file)."""
    import onnx

    from compressor.verify import check_onnx_external_data

    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert check_onnx_external_data(copy / "model.onnx", copy) == len(external) > 0
    data = copy / "model.onnx.data"
    first = onnx.TensorProto()
    first.CopyFrom(external[0])
    info = {e.key: e.value for e in first.external_data}
    data.write_bytes(data.read_bytes()[int(info["offset"]):int(info["offset"]) + int(info["length"])])
    del first.external_data[:]
    first.external_data.add(key="location", value="model.onnx.data")
    del model.graph.initializer[:]  # the others pointed into the bytes just cut away
    model.graph.initializer.append(first)
    onnx.save_model(model, str(copy / "model.onnx"))
    assert check_onnx_external_data(copy / "model.onnx", copy) == 1


def test_verify_refuses_a_directory_that_is_not_an_artifact(tmp_path):
    proc = run_cli("verify", str(tmp_path))
    assert proc.returncode == 1 and "no manifest.json" in proc.stdout


def test_inspect_summarizes_the_artifact_in_text_and_json(cnn):
    proc = run_cli("inspect", str(cnn))
    assert proc.returncode == 0, proc.stderr
    for text in ("source     zoo: digits-cnn", "passes:", "(none: the source model as is)",
                 "tensors by encoding and dtype:", "dense     F32", "model.onnx.data", "torch.onnx",
                 "not evaluated yet"):
        assert text in proc.stdout, text
    summary = json.loads(run_cli("inspect", str(cnn), "--json").stdout)
    assert summary["name"] == "cnn" and summary["onnx"]["exporter"] == "torch.onnx"
    assert summary["tensors"] == [{"encoding": "dense", "dtype": "F32", "tensors": 8,
                                   "bytes": summary["tensors"][0]["bytes"]}]
    assert summary["bytes_by_role"]["weights"] == summary["files"]["model.safetensors"]["bytes"]


def test_inspect_shows_passes_and_the_last_gate_results(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: g\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - cast: {dtype: float16}\n"
                      "evaluate: {speed: {batch_sizes: [1], rounds: 1, calls: 1, load_runs: 0}}\n"
                      "gates: {min_compression: 1.5, max_accuracy_drop: 0.5}\n")
    assert run_cli("run", str(recipe), "-o", str(tmp_path / "g"), "-q").returncode == 0
    text = run_cli("inspect", str(tmp_path / "g")).stdout
    assert "0. cast: 202,440 -> 101," in text and "cast      F16" in text
    assert "min_compression: 1.5" in text and "last evaluation" in text and "passed   min_compression" in text


def _bundle_names(bundle: Path) -> list[str]:
    with zipfile.ZipFile(bundle) as zf:
        return zf.namelist()


def test_pack_twice_gives_the_same_bytes_and_a_complete_bundle(cnn, tmp_path):
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    for out in (first, second):
        proc = run_cli("pack", str(cnn), "-o", str(out), "-q")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("\n") == 1 and proc.stdout.startswith(f"wrote {out}")
    assert _sha(first) == _sha(second)
    assert sorted(_bundle_names(first)) == sorted(f"cnn/{n}" for n in (
        "bundle.json", "manifest.json", "model.onnx", "model.onnx.data", "run.py"))
    with zipfile.ZipFile(first) as zf:
        info = json.loads(zf.read("cnn/bundle.json"))
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert info["target"] == "cpu-x86_64" and info["providers"] == ["CPUExecutionProvider"]
    assert info["requires"] == ["numpy", "onnxruntime"] and info["tokenizer"] is None


def test_pack_for_a_minimal_build_converts_to_ort_format_reproducibly_and_runs(cnn, tmp_path):
    outs = [tmp_path / f"m{i}.zip" for i in range(2)]
    for out in outs:
        proc = run_cli("pack", str(cnn), "-o", str(out), "--target", "cpu-arm64", "-q")
        assert proc.returncode == 0, proc.stderr
    assert _sha(outs[0]) == _sha(outs[1])
    names = _bundle_names(outs[0])
    assert "cnn/model.ort" in names and "cnn/required_operators.config" in names and "cnn/model.onnx" not in names
    with zipfile.ZipFile(outs[0]) as zf:
        zf.extractall(tmp_path / "x")
        config = zf.read("cnn/required_operators.config").decode()
    assert "ai.onnx;" in config and "/tmp" not in config
    from compressor.zoo import digits_split

    _, x_test, _, _ = digits_split("digits-cnn")
    np.save(tmp_path / "x.npy", x_test[:5])
    proc = subprocess.run([sys.executable, str(tmp_path / "x" / "cnn" / "run.py"), "--input", str(tmp_path / "x.npy"),
                           "--save", str(tmp_path / "out.npz")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import onnxruntime as ort

    session = ort.InferenceSession(str(cnn / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x_test[:5]})[0]
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["logits"], expected, atol=1e-4, rtol=1e-4)


def test_pack_lists_targets_and_refuses_what_it_cannot_pack(copy, tmp_path):
    listing = run_cli("pack", "--list-targets").stdout
    for target in ("cpu-x86_64", "cpu-x86_64-minimal", "cpu-arm64", "cuda"):
        assert f"{target}\n  format" in listing
    proc = run_cli("pack", str(copy), "-o", str(tmp_path / "b.zip"), "--target", "tpu")
    assert proc.returncode == 2 and "unknown target 'tpu'" in proc.stderr
    (copy / "model.onnx.data").write_bytes(b"\0" * 10)
    proc = run_cli("pack", str(copy), "-o", str(tmp_path / "b.zip"))
    assert proc.returncode == 1 and "refusing to pack" in proc.stderr and "model.onnx.data" in proc.stderr
    assert not (tmp_path / "b.zip").exists()
    (tmp_path / "r.yaml").write_text("name: s\nmodel: {source: zoo, name: digits-mlp}\n")
    assert run_cli("run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "s")).returncode == 0
    proc = run_cli("pack", str(tmp_path / "s"), "-o", str(tmp_path / "b.zip"))
    assert proc.returncode == 2 and "has no ONNX model" in proc.stderr


def test_pack_for_cuda_narrows_a_float32_export_to_float16(cnn, tmp_path):
    out = tmp_path / "c.zip"
    proc = run_cli("pack", str(cnn), "-o", str(out), "--target", "cuda", "-q")
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(out) as zf:
        info = json.loads(zf.read("cnn/bundle.json"))
        zf.extractall(tmp_path / "x")
    assert info["dtype"].startswith("float16") and info["providers"] == ["CUDAExecutionProvider",
                                                                         "CPUExecutionProvider"]
    import onnx

    model = onnx.load(str(tmp_path / "x" / "cnn" / "model.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    # run.py on this machine: on CUDA where ONNX Runtime can start it (it loads pip's CUDA libraries itself),
    # else on the CPU with a note on stderr; stdout stays one JSON document, naming what the session runs on.
    from compressor.zoo import digits_split

    np.save(tmp_path / "x.npy", digits_split("digits-cnn")[1][:5])
    proc = subprocess.run([sys.executable, str(tmp_path / "x" / "cnn" / "run.py"), "--input", str(tmp_path / "x.npy")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ran = json.loads(proc.stdout)["providers"]
    import importlib.util

    import onnxruntime as ort

    # Whether ONNX Runtime can start CUDA here is its own affair (torch's build says nothing of it): the report must
    # agree with what happened. tests/test_gpu.py requires CUDA where a GPU is present.
    fell_back = ran[0] != "CUDAExecutionProvider" and "CUDAExecutionProvider" in ort.get_available_providers()
    if ran[0] != "CUDAExecutionProvider":
        assert ran == ["CPUExecutionProvider"]
    assert ("could not start its CUDA provider" in proc.stderr) == fell_back, proc.stderr
    assert proc.stderr.count("\n") <= 1 and "\x1b" not in proc.stderr, proc.stderr  # at most one plain note
    # From Python, the same note as a warning (ONNX Runtime's logging and stdout are left alone there).
    spec = importlib.util.spec_from_file_location("cuda_bundle_run", tmp_path / "x" / "cnn" / "run.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert runner.Bundle(tmp_path / "x" / "cnn").providers == ran
    assert len([w for w in caught if "could not start its CUDA provider" in str(w.message)]) == fell_back


@pytest.mark.slow
def test_minilm_int8_bundle_reproduces_the_artifact_embeddings_with_only_onnxruntime(tmp_path):
    from compressor.log import Reporter
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    # MiniLM with dynamic int8 ONNX, as recipes/minilm-int8-onnx.yaml without its smoothing search and evaluation
    # (the bundle carries whatever int8 graph the artifact has; the search only costs minutes here).
    (tmp_path / "r.yaml").write_text("name: minilm-int8-onnx\nmodel: {source: zoo, name: minilm}\npasses:\n"
                                     "  - quantize: {mode: dynamic, per_channel: true, smooth: off}\nexport: {onnx: {}}\n")
    artifact = tmp_path / "minilm-int8-onnx"
    run_recipe(load_recipe(tmp_path / "r.yaml"), artifact, Reporter(quiet=True))
    bundle = tmp_path / "minilm.zip"
    proc = run_cli("pack", str(artifact), "-o", str(bundle), "--target", "cpu-x86_64", "-q")
    assert proc.returncode == 0, proc.stderr
    assert {"minilm-int8-onnx/tokenizer.json", "minilm-int8-onnx/run.py"} <= set(_bundle_names(bundle))
    with zipfile.ZipFile(bundle) as zf:
        zf.extractall(tmp_path / "device")
    texts = [r["query"] for r in map(json.loads, (ROOT / "compressor" / "data" / "text_pairs.jsonl").open())][:24]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    script = ("import json, sys, numpy as np\nsys.path.insert(0, sys.argv[1])\nfrom run import Bundle\n"
              "vectors = Bundle(sys.argv[1]).embed(json.load(open(sys.argv[2])))\nnp.save(sys.argv[3], vectors)\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'compressor')))\n")
    python = bare_environment(tmp_path)
    proc = subprocess.run([str(python), "-c", script, str(tmp_path / "device" / "minilm-int8-onnx"),
                           str(tmp_path / "texts.json"), str(tmp_path / "bundle.npy")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    # compressor's own ONNX session on the artifact, with compressor's tokenization, mean-pooled the same way, on
    # the same single batch: dynamic int8 measures activation ranges per batch, so batching must match.
    from compressor.data.datasets import tokenizer_for
    from compressor.ort import ort_session

    tok = tokenizer_for(artifact)
    enc = tok(texts, padding=True, truncation=True, max_length=512, return_tensors="np")
    session = ort_session(artifact / "model.onnx")
    feed = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    hidden = session.run(None, feed)[0]
    mask = enc["attention_mask"][..., None].astype(np.float32)
    expected = (hidden * mask).sum(1) / mask.sum(1)
    got = np.load(tmp_path / "bundle.npy")
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() >= 0.9999, cos.min()
