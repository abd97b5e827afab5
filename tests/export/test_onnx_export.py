"""ONNX export (issue #4, first part): torch.onnx and optimum-onnx paths, the check against torch, and the
memory-mappable external-data layout."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch

import compressor
from compressor.export.onnx import BIG_ALIGN, BIG_TENSOR, INLINE_BELOW, ONNX_DATA, SMALL_ALIGN

from conftest import run_cli

CNN = """\
name: digits-cnn-onnx
model: {source: zoo, name: digits-cnn}
export:
  onnx: {}
"""

# A plain ONNX Runtime session in a process that never imports compressor: what a user without it runs.
PLAIN_ORT = r"""
import json, sys
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
out = {}
for batch in (1, 37):
    x = np.random.default_rng(batch).random((batch, 1, 8, 8), dtype=np.float32)
    out[batch] = session.run(None, {"x": x})[0].tolist()
assert "compressor" not in sys.modules and "torch" not in sys.modules
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    (root / "r.yaml").write_text(CNN)
    out = root / "out"
    proc = run_cli("run", str(root / "r.yaml"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_digits_cnn_runs_in_plain_onnxruntime_at_batch_1_and_37(cnn_onnx):
    proc = subprocess.run([sys.executable, "-c", PLAIN_ORT, str(cnn_onnx / "model.onnx")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    model = compressor.load(cnn_onnx)
    for batch in (1, 37):
        x = np.random.default_rng(batch).random((batch, 1, 8, 8), dtype=np.float32)
        with torch.no_grad():
            ref = model(x=torch.from_numpy(x)).numpy()
        onnx_out = np.asarray(got[str(batch)], dtype=np.float32)
        assert onnx_out.shape == (batch, 10)
        np.testing.assert_allclose(onnx_out, ref, atol=1e-4, rtol=1e-3)


def test_external_data_is_aligned_for_memory_mapping(cnn_onnx):
    proto = onnx.load(str(cnn_onnx / "model.onnx"), load_external_data=False)
    data_size = (cnn_onnx / ONNX_DATA).stat().st_size
    external, inline = 0, 0
    end = 0
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            offset, length = int(info["offset"]), int(info["length"])
            assert info["location"] == ONNX_DATA
            assert offset % (BIG_ALIGN if length >= BIG_TENSOR else SMALL_ALIGN) == 0, tensor.name
            assert offset >= end, "tensors must not overlap"
            end = offset + length
            external += 1
        else:
            assert len(tensor.raw_data) < INLINE_BELOW or not tensor.raw_data, tensor.name
            inline += 1
    assert external >= 3 and end == data_size


def test_manifest_records_the_export_and_its_check(cnn_onnx):
    manifest = json.loads((cnn_onnx / "manifest.json").read_text())
    entry = manifest["onnx"]
    assert entry["exporter"] == "torch.onnx" and entry["opset"] == 18
    assert entry["files"] == ["model.onnx", "model.onnx.data"]
    assert entry["inputs"] == ["x"] and entry["outputs"] == ["logits"]
    assert 0 <= entry["check"]["max_abs_err"]["logits"] < 1e-4
    assert {"model.onnx", "model.onnx.data"} <= set(manifest["files"])
    compressor.load(cnn_onnx, verify_hashes=True)  # the safetensors side is unaffected


def test_a_mismatch_beyond_the_tolerance_fails_the_run_and_writes_nothing(tmp_path):
    (tmp_path / "r.yaml").write_text(CNN.replace("onnx: {}", "onnx: {atol: 0.0, rtol: 0.0}"))
    out = tmp_path / "out"
    proc = run_cli("run", str(tmp_path / "r.yaml"), "-o", str(out))
    assert proc.returncode == 1, proc.stderr
    assert "does not match torch" in proc.stderr and "'logits'" in proc.stderr and "differs by up to" in proc.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["r.yaml"]


def test_onnx_settings_are_validated(tmp_path):
    (tmp_path / "r.yaml").write_text(CNN.replace("onnx: {}", "onnx: {opset: 9, atol: -1}"))
    proc = run_cli("validate", str(tmp_path / "r.yaml"))
    assert proc.returncode == 2
    assert "export.onnx.opset" in proc.stderr and "export.onnx.atol" in proc.stderr


def test_tuple_outputs_of_a_python_model_are_exported_and_checked(tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    (project / "twohead.py").write_text(textwrap.dedent("""\
        import torch
        from torch import nn

        class TwoHead(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.body = nn.Linear(12, 32)
                self.a = nn.Linear(32, 3)
                self.b = nn.Linear(32, 5)

            def forward(self, x):
                h = torch.relu(self.body(x))
                return self.a(h), self.b(h)

        def build():
            return TwoHead()
        """))
    (project / "r.yaml").write_text(textwrap.dedent("""\
        name: twohead
        model:
          source: python
          factory: twohead:build
          inputs: {x: {shape: [4, 12]}}
        export:
          onnx: {opset: 17}
        """))
    out = tmp_path / "out"
    proc = run_cli("run", str(project / "r.yaml"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    entry = json.loads((out / "manifest.json").read_text())["onnx"]
    assert entry["outputs"] == ["output_0", "output_1"] and entry["opset"] == 17
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    a, b = session.run(None, {"x": np.ones((9, 12), dtype=np.float32)})
    assert a.shape == (9, 3) and b.shape == (9, 5)


@pytest.mark.slow
def test_minilm_exports_through_optimum_with_dynamic_batch_and_sequence(tmp_path):
    (tmp_path / "r.yaml").write_text("name: m\nmodel: {source: zoo, name: minilm}\nexport:\n  onnx: {}\n")
    out = tmp_path / "out"
    proc = run_cli("run", str(tmp_path / "r.yaml"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    entry = json.loads((out / "manifest.json").read_text())["onnx"]
    assert entry["exporter"] == "optimum-onnx" and "last_hidden_state" in entry["outputs"]
    import onnxruntime as ort
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    enc = tokenizer(["short", "a somewhat longer sentence about memory mapped files", "third one"],
                    padding=True, return_tensors="np")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    # The large, page-aligned tensors are memory-mapped by ONNX Runtime, not read into private memory.
    assert any(str(out / "model.onnx.data") in line for line in open("/proc/self/maps"))
    feed = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    (hidden,) = session.run(["last_hidden_state"], feed)
    from compressor.zoo import minilm_path

    reference = AutoModel.from_pretrained(str(minilm_path())).eval()
    with torch.no_grad():
        ref = reference(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    assert hidden.shape == ref.shape and hidden.shape[0] == 3
    np.testing.assert_allclose(hidden, ref, atol=1e-4, rtol=1e-3)

    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    big = [{e.key: e.value for e in t.external_data} for t in proto.graph.initializer
           if t.data_location == onnx.TensorProto.EXTERNAL and int({e.key: e.value for e in t.external_data}["length"])
           >= BIG_TENSOR]
    assert len(big) >= 12  # the embeddings and the feed-forward weights of six layers
    assert all(int(info["offset"]) % BIG_ALIGN == 0 for info in big)


def test_evaluation_measures_the_onnx_model_in_onnxruntime_beside_torch(tmp_path):
    (tmp_path / "r.yaml").write_text(CNN + textwrap.dedent("""\
        evaluate:
          speed: {batch_sizes: [2], rounds: 2, calls: 2, warmup: 1, load_runs: 1}
        gates:
          min_fidelity: {value: 0.9999, format: onnx}
          max_accuracy_drop: 0.0
        """))
    out = tmp_path / "out"
    proc = run_cli("run", str(tmp_path / "r.yaml"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "cpu/onnx:" in proc.stdout and "cpu/safetensors:" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    rows = report["results"]
    assert [(r["role"], r["format"]) for r in rows] == [("baseline", "source"), ("artifact", "safetensors"),
                                                        ("artifact", "onnx")]
    base, onnx_row = rows[0], rows[2]
    assert onnx_row["accuracy"]["value"] == base["accuracy"]["value"] > 90
    assert onnx_row["fidelity"]["cos_min"] > 0.9999 and onnx_row["fidelity"]["top1_agreement"] == 100.0
    assert onnx_row["size_bytes"] == sum((out / f).stat().st_size for f in ("model.onnx", "model.onnx.data"))
    assert onnx_row["latency"][0]["speedup"] > 0 and onnx_row["load"]["cold"]["load_ms"]["median"] > 0
    gates = {(g["gate"], g["format"]): g["status"] for g in report["gates"]}
    assert gates == {("min_fidelity", "onnx"): "passed", ("max_accuracy_drop", "safetensors"): "passed",
                     ("max_accuracy_drop", "onnx"): "passed"}
    md = (out / "report.md").read_text()
    assert "artifact (onnx)" in md and "ratio baseline / onnx" in md
