"""End to end on real small models: recipe -> passes -> artifact -> compressor.load / transformers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import compressor
from compressor import zoo
from compressor.errors import ArtifactError, CompressorError, RecipeError
from compressor.loading import load_example_inputs
from compressor.pipeline import run_recipe
from compressor.recipe import load_recipe
from compressor.staging import TargetError

from conftest import ROOT, run_cli

DIGITS_FP16 = """\
name: digits-fp16
model: {source: zoo, name: digits-mlp}
passes:
  - cast: {dtype: float16}
"""


# ------------------------------------------------------------------------------------------------- helpers


def write_recipe(directory: Path, text: str, name: str = "recipe.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def run(directory: Path, text: str, out: Path):
    return run_recipe(load_recipe(write_recipe(directory, text)), out)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path."""
    return {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and ".compress-tmp-" in p.name)


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of ``path``, from /proc/self/maps."""
    target = str(path.resolve())
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.rstrip("\n").split(maxsplit=5)
            if len(parts) == 6 and parts[5] == target:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def assert_zero_copy(module: torch.nn.Module, weight_files: list[Path]) -> None:
    ranges = [r for f in weight_files for r in mapped_ranges(f)]
    assert ranges, f"none of {[f.name for f in weight_files]} is memory-mapped"
    params = list(module.named_parameters())
    assert params
    for name, p in params:
        start, end = p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()
        assert any(lo <= start and end <= hi for lo, hi in ranges), f"{name} is not a view on the mapped file"


def digits_test_set() -> torch.Tensor:
    _, x_test, _, _ = zoo.digits_split("digits-mlp")
    return torch.from_numpy(x_test)


@pytest.fixture(scope="module")
def digits_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits-mlp cast-to-float16 recipe, run once for this module."""
    base = tmp_path_factory.mktemp("digits")
    out = base / "digits-fp16"
    run(base / "recipe", DIGITS_FP16, out)
    return out


# ------------------------------------------------------------------------------------------- digits, fp16


def test_digits_fp16_keeps_accuracy_and_stores_float16(digits_artifact):
    baseline = zoo.digits_model("digits-mlp")
    base_acc = zoo.digits_accuracy(baseline, "digits-mlp")
    assert base_acc > 90, "the reference model did not train; the comparison below would mean nothing"

    module = compressor.load(digits_artifact)
    params = dict(module.named_parameters())
    assert set(params) == {f"fc{i}.{k}" for i in (1, 2, 3) for k in ("weight", "bias")}
    assert {p.dtype for p in params.values()} == {torch.float16}
    for name, p in baseline.named_parameters():  # the stored values are the rounded trained ones
        assert torch.equal(params[name], p.detach().to(torch.float16)), name

    acc = zoo.digits_accuracy(module, "digits-mlp")  # float32 pixels in: the root dtype bridge casts them
    assert abs(acc - base_acc) <= 1.0, f"float16 accuracy {acc:.2f} vs float32 {base_acc:.2f}"
    with torch.no_grad():
        logits = module(digits_test_set()[:4])
    assert logits.dtype == torch.float32  # and casts the output back to the caller's dtype


def test_digits_artifact_loads_zero_copy(digits_artifact):
    module = compressor.load(digits_artifact)
    assert_zero_copy(module, [digits_artifact / "model.safetensors"])


# --------------------------------------------------------------------------------------------- MiniLM fp16


@pytest.fixture(scope="module")
def minilm_reference():
    import transformers

    path = zoo.minilm_path()
    model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()
    return model


MORE_SENTENCES = [
    "A cat sat on the mat.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "hi",
    "Zero-copy loading maps the weights file straight into memory; nothing is read until it is used.",
]


def mean_pooled(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state.float()
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def input_sets(artifact: Path) -> dict[str, dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(artifact), local_files_only=True)
    more = tokenizer(MORE_SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return {"example_inputs": load_example_inputs(artifact), "more_sentences": dict(more)}


@pytest.mark.slow
def test_minilm_artifact_files_and_dtypes(minilm_fp16):
    names = {p.name for p in minilm_fp16.iterdir()}
    assert {"manifest.json", "model.safetensors", "config.json", "example_inputs.safetensors"} <= names
    assert "tokenizer.json" in names or "vocab.txt" in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".onnx")) for n in names)
    with safe_open(str(minilm_fp16 / "model.safetensors"), framework="pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    norms = {n for n in dtypes if "LayerNorm" in n}
    assert norms and len(dtypes) > len(norms)
    assert {dtypes[n] for n in norms} == {"F32"}, "LayerNorm weights must stay float32"
    others = {n: d for n, d in dtypes.items() if n not in norms}
    assert set(others.values()) == {"F16"}, {n: d for n, d in others.items() if d != "F16"}


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["transformers", "compressor"])
def test_minilm_embeddings_match_the_original(minilm_fp16, minilm_reference, loader):
    if loader == "transformers":
        import transformers

        model = transformers.AutoModel.from_pretrained(str(minilm_fp16), local_files_only=True).eval()
    else:
        model = compressor.load(minilm_fp16)
        assert {p.dtype for p in model.parameters()} == {torch.float16, torch.float32}
    for label, inputs in input_sets(minilm_fp16).items():
        ref = mean_pooled(minilm_reference, inputs)
        got = mean_pooled(model, inputs)
        assert got.shape == ref.shape == (len(inputs["input_ids"]), 384)
        cosine = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
        assert cosine.min().item() >= 0.999, f"{loader} on {label}: min cosine {cosine.min().item():.6f}"
        assert not torch.equal(ref, got)  # it really is the float16 model, not the original


@pytest.mark.slow
def test_minilm_loads_zero_copy(minilm_fp16):
    module = compressor.load(minilm_fp16)
    assert_zero_copy(module, [minilm_fp16 / "model.safetensors"])


@pytest.mark.slow
def test_minilm_manifest(minilm_fp16):
    manifest = json.loads((minilm_fp16 / "manifest.json").read_text())
    assert manifest["format"] == "compressor-artifact"
    assert manifest["format_version"] == 1
    for lib in ("python", "torch", "transformers", "safetensors", "compressor"):
        assert manifest["versions"].get(lib), lib
    assert manifest["versions"]["torch"] == torch.__version__

    on_disk = {p.relative_to(minilm_fp16).as_posix(): p for p in minilm_fp16.rglob("*") if p.is_file()}
    on_disk.pop("manifest.json")
    for report in ("report.json", "report.md", "junit.xml", "report.png"):  # written beside it, hold timings
        on_disk.pop(report)
    assert set(manifest["files"]) == set(on_disk), "the manifest must list every file but the reports"
    assert any("/" in rel for rel in on_disk), "files in subdirectories (1_Pooling/) are expected too"
    for rel, path in on_disk.items():
        assert manifest["files"][rel] == {"sha256": sha256(path), "bytes": path.stat().st_size}, rel

    assert manifest["model"]["weights"] == ["model.safetensors"]
    assert manifest["model"]["example_inputs"] == "example_inputs.safetensors"
    (report,) = manifest["passes"]
    assert report["name"] == "cast" and report["config"]["dtype"] == "float16"
    ratio = report["bytes_before"] / report["bytes_after"]
    assert 1.95 <= ratio <= 2.0, ratio
    assert report["bytes_after"] == manifest["model"]["stored_bytes"]
    data_bytes = manifest["files"]["model.safetensors"]["bytes"]
    assert report["bytes_after"] < data_bytes <= report["bytes_after"] + 64 * 1024  # only header and padding


# ------------------------------------------------------------------------------------------- determinism


@pytest.mark.slow
def test_same_recipe_twice_gives_identical_model_files(tmp_path, monkeypatch):
    """Each run trains digits-mlp from scratch in its own cache: training, cast and export are all reproducible."""
    digests = []
    for i in (1, 2):
        monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / f"cache{i}"))
        out = tmp_path / f"run{i}"
        run(tmp_path / "recipe", DIGITS_FP16, out)
        assert list((tmp_path / f"cache{i}" / "zoo").glob("digits-mlp-*.safetensors")), "no fresh training"
        files = sorted(out.glob("model*.safetensors")) + [out / "example_inputs.safetensors", out / "manifest.json"]
        digests.append({p.name: sha256(p) for p in files})
        manifest = json.loads((out / "manifest.json").read_text())
        assert {n: manifest["files"][n]["sha256"] for n in digests[-1] if n != "manifest.json"} == {
            n: d for n, d in digests[-1].items() if n != "manifest.json"}
    assert "model.safetensors" in digests[0]
    assert digests[0] == digests[1]


@pytest.mark.slow
def test_training_is_bit_reproducible():
    first = zoo.train_digits("digits-mlp").state_dict()
    second = zoo.train_digits("digits-mlp").state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    untrained = zoo.build_digits("digits-mlp").state_dict()
    assert not torch.equal(first["fc1.weight"], untrained["fc1.weight"])


# ---------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("max_shard", [100_000, 40_000])
def test_sharded_artifact_loads_and_matches_the_single_file_one(tmp_path, digits_artifact, max_shard):
    recipe = DIGITS_FP16 + f"export:\n  safetensors:\n    max_shard_size: {max_shard}\n"
    out = tmp_path / "sharded"
    result = run(tmp_path / "recipe", recipe, out)

    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 2
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    with safe_open(str(digits_artifact / "model.safetensors"), framework="pt") as single:
        assert set(index["weight_map"]) == set(single.keys())
    assert set(index["weight_map"].values()) == set(shards)
    assert result.manifest.model.weights == shards + ["model.safetensors.index.json"]
    assert set(result.manifest.files) >= set(result.manifest.model.weights)
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            count = len(f.keys())
        assert (out / shard).stat().st_size <= max_shard + 8192 or count == 1, shard

    sharded, whole = compressor.load(out, verify_hashes=True), compressor.load(digits_artifact)
    assert_zero_copy(sharded, [out / s for s in shards])
    x = digits_test_set()
    with torch.no_grad():
        assert torch.equal(sharded(x), whole(x))
    assert zoo.digits_accuracy(sharded, "digits-mlp") == zoo.digits_accuracy(whole, "digits-mlp")


# ----------------------------------------------------------------------------------------- python source

TIED_MODULE = "compressor_test_tiedmod"
TIED_SOURCE = """\
import torch
from torch import nn


class TiedLM(nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)
        self.out.weight = self.emb.weight  # tied: one Parameter, two names

    def forward(self, x):
        return self.out(self.norm(self.emb(x)))


def build(vocab=10, dim=16):
    torch.manual_seed(1234)
    return TiedLM(vocab, dim)
"""


@pytest.fixture
def tied_project(tmp_path, monkeypatch):
    """A directory with the factory module; the module is forgotten before and after, so imports are real."""
    (tmp_path / f"{TIED_MODULE}.py").write_text(TIED_SOURCE)
    monkeypatch.delitem(sys.modules, TIED_MODULE, raising=False)
    yield tmp_path
    sys.modules.pop(TIED_MODULE, None)


def tied_reference(project: Path, weights: Path | None, monkeypatch) -> torch.nn.Module:
    from safetensors.torch import load_file

    monkeypatch.syspath_prepend(str(project))
    module = __import__(TIED_MODULE).build()
    if weights is not None:
        module.load_state_dict(load_file(str(weights)), strict=True)
    sys.modules.pop(TIED_MODULE, None)
    return module.eval()


def trained_like_weights(project: Path) -> Path:
    """Weights differing from the factory's init, saved with both tied names (safetensors' save_file needs
    distinct storage, so the tied tensor is cloned)."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(project))
    try:
        module = __import__(TIED_MODULE).build()
    finally:
        sys.path.remove(str(project))
        sys.modules.pop(TIED_MODULE, None)
    gen = torch.Generator().manual_seed(7)
    state = {k: (torch.randn(v.shape, generator=gen) * 0.5).contiguous() for k, v in module.state_dict().items()}
    state["out.weight"] = state["emb.weight"].clone()
    path = project / "weights.safetensors"
    save_file(state, str(path))
    return path


def python_recipe(weights: str | None, passes: str = "[]") -> str:
    lines = [
        "name: tied-python",
        "model:",
        "  source: python",
        f"  factory: {TIED_MODULE}:build",
        "  inputs: {x: {shape: [2, 5], dtype: int64, low: 0, high: 10}}",
    ]
    if weights:
        lines.append(f"  weights: {weights}")
    lines.append(f"passes: {passes}")
    return "\n".join(lines) + "\n"


def load_tied(out: Path, project: Path, monkeypatch) -> torch.nn.Module:
    sys.modules.pop(TIED_MODULE, None)  # the loader must import the factory again, by name
    monkeypatch.syspath_prepend(str(project))
    return compressor.load(out)


@pytest.mark.parametrize("with_weights", [True, False], ids=["weights-file", "factory-init"])
def test_python_source_keeps_ties_and_outputs(tied_project, monkeypatch, with_weights):
    weights = trained_like_weights(tied_project) if with_weights else None
    out = tied_project / "artifact"
    run(tied_project, python_recipe(weights.name if weights else None), out)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == {"kind": "python", "factory": f"{TIED_MODULE}:build", "kwargs": {}}
    assert manifest["model"]["aliases"] == {"out.weight": "emb.weight"}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["emb.weight", "norm.bias", "norm.weight", "out.bias"]  # tied tensor once

    inputs = load_example_inputs(out)
    assert list(inputs) == ["x"] and inputs["x"].shape == (2, 5) and inputs["x"].dtype == torch.int64
    assert 0 <= int(inputs["x"].min()) and int(inputs["x"].max()) < 10

    reference = tied_reference(tied_project, weights, monkeypatch)
    loaded = load_tied(out, tied_project, monkeypatch)
    assert loaded.out.weight is loaded.emb.weight, "the tie must come back as one Parameter"
    assert loaded.out.weight.data_ptr() == loaded.emb.weight.data_ptr()
    assert_zero_copy(loaded, [out / "model.safetensors"])
    every_token = torch.arange(10).reshape(2, 5)
    with torch.no_grad():
        for x in (inputs["x"], every_token):
            assert torch.equal(loaded(x), reference(x))
    if with_weights:  # the weights file was really used, not the factory's init
        fresh = tied_reference(tied_project, None, monkeypatch)
        assert not torch.equal(fresh.emb.weight, loaded.emb.weight)


def test_python_source_with_ties_survives_cast(tied_project, monkeypatch):
    weights = trained_like_weights(tied_project)
    out = tied_project / "artifact"
    run(tied_project, python_recipe(weights.name, "\n  - cast: {dtype: float16}"), out)
    reference = tied_reference(tied_project, weights, monkeypatch)
    loaded = load_tied(out, tied_project, monkeypatch)
    assert loaded.out.weight is loaded.emb.weight
    assert loaded.emb.weight.dtype == torch.float16
    assert loaded.norm.weight.dtype == torch.float32
    x = torch.arange(10).reshape(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).float(), reference(x), atol=2e-2, rtol=2e-2)


def test_python_source_accepts_weights_saved_with_save_model(tied_project, monkeypatch):
    from safetensors.torch import load_file, save_model

    reference = tied_reference(tied_project, trained_like_weights(tied_project), monkeypatch)
    save_model(reference, str(tied_project / "saved.safetensors"))
    assert len(load_file(str(tied_project / "saved.safetensors"))) == 4  # the tied tensor is stored once
    out = tied_project / "artifact"
    run(tied_project, python_recipe("saved.safetensors"), out)
    loaded = load_tied(out, tied_project, monkeypatch)
    x = torch.arange(10).reshape(2, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


# ------------------------------------------------------------------------------------------- load refusals


@pytest.fixture
def artifact_copy(tmp_path, digits_artifact) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(digits_artifact, dst)
    compressor.load(dst, verify_hashes=True)  # the untouched copy is fine
    return dst


def test_load_refuses_truncated_weights(artifact_copy):
    weights = artifact_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(ArtifactError, match="model.safetensors") as info:
        compressor.load(artifact_copy)
    assert "truncated" in str(info.value)


def test_load_refuses_truncated_weights_even_if_the_manifest_agrees(artifact_copy):
    """The strict header check catches a truncation that the manifest's sizes do not."""
    weights = artifact_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    manifest_path = artifact_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.safetensors"] = {"sha256": sha256(weights), "bytes": weights.stat().st_size}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="model.safetensors"):
        compressor.load(artifact_copy)


def test_load_refuses_a_directory_without_manifest(artifact_copy):
    (artifact_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json"):
        compressor.load(artifact_copy)


def test_verify_hashes_catches_one_flipped_byte(artifact_copy):
    weights = artifact_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    assert middle > 4096  # inside the tensor data, past the header
    data[middle] ^= 0x01
    weights.write_bytes(bytes(data))
    compressor.load(artifact_copy)  # sizes and header still fine: the lazy default cannot see it
    with pytest.raises(ArtifactError, match="model.safetensors") as info:
        compressor.load(artifact_copy, verify_hashes=True)
    assert "sha256" in str(info.value)


# --------------------------------------------------------------------------------------------- atomic output


@pytest.mark.slow
def test_failed_run_leaves_the_existing_artifact_untouched(tmp_path, digits_artifact):
    out = tmp_path / "out"
    shutil.copytree(digits_artifact, out)
    before = tree_digest(out)
    recipe = write_recipe(tmp_path / "recipe", DIGITS_FP16.replace("{dtype: float16}", '{keep: ["no_such_module"]}'))
    proc = run_cli("run", str(recipe), "-o", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "no_such_module" in proc.stderr and "passes[0].cast.keep" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree_digest(out) == before
    assert leftovers(tmp_path) == []


def test_run_failing_while_writing_removes_its_temporary_directory(tmp_path, digits_artifact, monkeypatch):
    """A failure inside the staging directory (a tensor safetensors cannot store) cleans up after itself."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "complexmod.py").write_text(
        "import torch\n"
        "def build():\n"
        "    m = torch.nn.Linear(3, 3)\n"
        "    m.register_buffer('phase', torch.zeros(3, dtype=torch.complex64))\n"
        "    return m\n"
    )
    monkeypatch.delitem(sys.modules, "complexmod", raising=False)
    out = tmp_path / "out"
    shutil.copytree(digits_artifact, out)
    before = tree_digest(out)
    recipe = write_recipe(project, """\
        name: complex
        model:
          source: python
          factory: complexmod:build
          inputs: {input: {shape: [1, 3]}}
        """)
    with pytest.raises(ArtifactError, match="complex64"):
        run_recipe(load_recipe(recipe), out)
    sys.modules.pop("complexmod", None)
    assert tree_digest(out) == before
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_killed_run_keeps_the_old_artifact_and_the_next_run_cleans_up(tmp_path, minilm_fp16):
    out = tmp_path / "out"
    shutil.copytree(minilm_fp16, out)  # what a first successful run wrote
    # The shipped recipe without its (minutes-long) evaluation: this test is about the write path.
    recipe = tmp_path / "minilm-fp16.yaml"
    text = (ROOT / "recipes" / "minilm-fp16.yaml").read_text()
    recipe.write_text(text[: text.index("\nevaluate:")] + "\n")
    for name in ("report.json", "report.md", "junit.xml", "report.png"):
        (out / name).unlink()
    before = tree_digest(out)
    log = tmp_path / "killed.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "compressor", "run", str(recipe), "-o", str(out)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, env=dict(os.environ),
        )
        try:
            deadline = time.monotonic() + 300
            seen: list[str] = []
            while time.monotonic() < deadline and proc.poll() is None:
                seen = leftovers(tmp_path)
                if seen:
                    break
                time.sleep(0.005)
        finally:
            proc.kill()
            proc.wait()
    assert seen, f"the run ended (rc {proc.returncode}) before its temporary directory was seen:\n{log.read_text()}"
    assert seen[0].startswith(".out.compress-tmp-")
    assert proc.returncode == -9

    assert tree_digest(out) == before, "a killed run must not touch the previous artifact"
    assert leftovers(tmp_path), "SIGKILL cannot be cleaned up after; the temporary directory stays"
    assert str(proc.pid) in leftovers(tmp_path)[0]

    done = run_cli("run", str(recipe), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert leftovers(tmp_path) == [], "the next run removes the dead run's temporary directory"
    after = tree_digest(out)
    assert after.keys() == before.keys()
    assert after["model.safetensors"] == before["model.safetensors"]  # same recipe, same bytes
    compressor.load(out, verify_hashes=True)


def test_output_may_be_an_existing_empty_directory(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    run(tmp_path / "recipe", DIGITS_FP16, out)
    assert (out / "manifest.json").is_file() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []
    compressor.load(out, verify_hashes=True)


def test_output_refuses_a_directory_that_is_not_an_artifact(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(TargetError, match="refusing to replace") as info:
        run(tmp_path / "recipe", DIGITS_FP16, out)
    assert isinstance(info.value, CompressorError) and not isinstance(info.value, RecipeError)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ evaluate / gates


@pytest.mark.slow
def test_run_evaluates_and_reports_beside_a_still_valid_manifest(tmp_path):
    recipe = write_recipe(tmp_path / "recipe", DIGITS_FP16 + textwrap.dedent("""\
        evaluate:
          devices: [cpu]
          speed: {batch_sizes: [1], rounds: 2, calls: 1, load_runs: 0}
        gates:
          max_accuracy_drop: 1.0
          min_compression: {value: 1.9}
        """))
    out = tmp_path / "out"
    proc = run_cli("run", str(recipe), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "gates: 2 passed" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True and [g["status"] for g in report["gates"]] == ["passed", "passed"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["gates"]["max_accuracy_drop"]["value"] == 1.0
    assert not {"report.json", "report.md", "junit.xml", "report.png"} & set(manifest["files"])
    compressor.load(out, verify_hashes=True)  # the reports beside the manifest do not upset it


# ------------------------------------------------------------------- kept modules fed by integer inputs, smoke


def test_kept_module_with_integer_inputs_hands_the_narrow_dtype_on(tied_project, monkeypatch):
    """A kept embedding gets token ids (no float input to restore); its float32 output must still be cast to
    the model's float16, or the next Linear fails. Regression: this broke MiniLM with keep: [embeddings]."""
    out = tied_project / "artifact"
    run(tied_project, python_recipe(None, "\n  - cast: {dtype: float16, keep: [emb]}"), out)
    reference = tied_reference(tied_project, None, monkeypatch)
    loaded = load_tied(out, tied_project, monkeypatch)
    assert loaded.emb.weight.dtype == torch.float32  # kept, and out.weight is tied to it
    x = torch.arange(10).reshape(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).float(), reference(x), atol=2e-2, rtol=2e-2)


def test_example_inputs_that_do_not_fit_the_model_fail_before_anything_is_written(tied_project):
    text = python_recipe(None).replace("{x: {shape", "{tokens: {shape")
    out = tied_project / "artifact"
    with pytest.raises(CompressorError, match="source model fails on its example inputs.*model.inputs"):
        run(tied_project, text, out)
    assert not out.exists() and leftovers(tied_project) == []
