"""CUDA paths: loading straight onto the GPU and evaluating there. Run only where CUDA is present (marker `gpu`)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import compressor
from compressor.loading import load_example_inputs

from conftest import run_cli

pytestmark = [pytest.mark.gpu]

# A fresh process took about 13 s on the lent GPU machine (its torch is a CUDA build): these tests build their own
# artifacts without the evaluator's load probes (fresh processes), and the evaluation test asks for one probe each.
FP16 = "name: fp16\nmodel: {source: zoo, name: minilm}\npasses:\n  - cast: {dtype: float16, keep_norms: true}\n"
EVALUATE = ("evaluate:\n  devices: [cpu, cuda]\n  data: text-pairs\n"
            "  speed: {batch_sizes: [8], sequence_lengths: [128], rounds: 2, calls: 1, load_runs: 1}\n")


@pytest.fixture(scope="module")
def fp16(tmp_path_factory: pytest.TempPathFactory):
    """MiniLM cast to float16 (as recipes/minilm-fp16.yaml), not evaluated."""
    root = tmp_path_factory.mktemp("gpu")
    (root / "r.yaml").write_text(FP16)
    proc = run_cli("run", str(root / "r.yaml"), "-o", str(root / "fp16"))
    assert proc.returncode == 0, proc.stderr
    return root / "fp16"


def test_cuda_load_matches_cpu_load(fp16):
    cpu = compressor.load(fp16)
    gpu = compressor.load(fp16, device="cuda")
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    assert all(b.device.type == "cuda" for b in gpu.buffers())
    cpu_state, gpu_state = cpu.state_dict(), gpu.state_dict()
    assert cpu_state.keys() == gpu_state.keys()
    for name, tensor in cpu_state.items():
        assert gpu_state[name].dtype == tensor.dtype, name
        assert torch.equal(gpu_state[name].cpu(), tensor), name
    inputs = load_example_inputs(fp16)
    with torch.inference_mode():
        out = gpu(**{k: v.cuda() for k, v in inputs.items()}).last_hidden_state.float().cpu()
        ref = cpu(**inputs).last_hidden_state.float()
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1)
    assert float(cos.min()) > 0.999


def test_cuda_load_of_a_sharded_artifact_reads_every_shard(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent("""\
        name: sharded
        model: {source: zoo, name: digits-mlp}
        export: {safetensors: {max_shard_size: 60kB}}
        """))
    out = tmp_path / "out"
    proc = run_cli("run", str(recipe), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads((out / "manifest.json").read_text())["model"]["weights"]) > 2
    cpu, gpu = compressor.load(out), compressor.load(out, device="cuda")
    for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        assert torch.equal(a, b.cpu()), name


def test_eval_on_cuda_reports_gpu_memory_and_both_devices(tmp_path):
    (tmp_path / "r.yaml").write_text(FP16 + EVALUATE)
    art = tmp_path / "art"
    proc = run_cli("run", str(tmp_path / "r.yaml"), "-o", str(art))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((art / "report.json").read_text())
    assert report["devices"] == ["cpu", "cuda"] and report["skipped"] == []
    cuda_rows = [r for r in report["results"] if r["device"] == "cuda"]
    assert [r["role"] for r in cuda_rows] == ["baseline", "artifact"]
    for row in cuda_rows:
        assert row["load"]["cold"]["peak_gpu_mb"] > 0
        assert row["accuracy"]["value"] > 50
    assert cuda_rows[1]["fidelity"]["cos_min"] > 0.99


def test_float16_onnx_runs_on_the_cuda_provider_and_matches_the_cpu_run(tmp_path):
    from compressor.evaluate.subjects import OrtModule
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: fp16\nmodel: {source: zoo, name: minilm}\npasses:\n  - cast: {dtype: float16}\n"
                      "export: {onnx: {}}\n")
    out = tmp_path / "fp16"
    run_recipe(load_recipe(recipe), out)
    inputs = load_example_inputs(out)
    gpu = OrtModule(out / "model.onnx", device="cuda")
    assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    got = gpu(**inputs).last_hidden_state.float()
    ref = OrtModule(out / "model.onnx")(**inputs).last_hidden_state.float()  # CPU: widens most float16 ops
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1), dim=1)
    assert float(cos.min()) > 0.999


def test_a_cuda_bundle_runs_on_the_cuda_provider(tmp_path):
    """run.py alone (numpy and onnxruntime-gpu, no torch imported) finds pip's CUDA libraries and runs on CUDA."""
    import subprocess
    import sys
    import zipfile

    import numpy as np

    from compressor.zoo import digits_split

    (tmp_path / "r.yaml").write_text("name: cnn\nmodel: {source: zoo, name: digits-cnn}\nexport: {onnx: {}}\n")
    assert run_cli("run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "cnn")).returncode == 0
    proc = run_cli("pack", str(tmp_path / "cnn"), "-o", str(tmp_path / "c.zip"), "--target", "cuda", "-q")
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(tmp_path / "c.zip") as zf:
        zf.extractall(tmp_path / "x")
    np.save(tmp_path / "x.npy", digits_split("digits-cnn")[1][:5])
    proc = subprocess.run([sys.executable, str(tmp_path / "x" / "cnn" / "run.py"), "--input", str(tmp_path / "x.npy")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["providers"][0] == "CUDAExecutionProvider", proc.stderr
