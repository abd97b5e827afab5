"""Hostile Hugging Face sources under `--stream always`: each refused with one paragraph naming what is wrong, the
right exit code, no traceback, nothing read outside the directory, and no artifact copied into its successor."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

INT8 = "  - quantize: {mode: weight-only}\n"


def _llama(where: Path, shard: str | None = None) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(where, **({"max_shard_size": shard} if shard else {}))
    return where


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adversarial")
    return _llama(root / "whole"), _llama(root / "sharded", "200KB")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _run(tmp: Path, src: Path, out: Path | None = None, mode: str = "always"):
    recipe = tmp / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{source: hf, path: {src}, auto_class: AutoModelForCausalLM}}\n"
                      f"passes:\n{INT8}")
    proc = run_cli("run", str(recipe), "-o", str(out or tmp / "out"), "-q", "--stream", mode)
    assert "Traceback" not in proc.stderr and "unexpected failure" not in proc.stderr, proc.stderr
    return proc, " ".join(proc.stderr.split())


def _edit(file: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    save_file(fn(load_file(file)), file, metadata={"format": "pt"})


def test_a_weight_of_an_integer_dtype_where_the_model_has_a_float_parameter(tmp_path, models):
    import torch

    src = _copy(models[0], tmp_path / "src")
    name = "model.layers.0.self_attn.q_proj.weight"
    _edit(src / "model.safetensors", lambda t: {**t, name: t[name].view(torch.int32)})
    proc, err = _run(tmp_path, src)
    assert proc.returncode == 2 and f"{name} is int32 in the files" in err


@pytest.mark.parametrize("config", ["{oops", "[1]", '{"model_type": "llama", "hidden_size": "big"}'])
def test_an_unreadable_config_is_named_not_reported_as_a_bug(tmp_path, models, config):
    src = _copy(models[0], tmp_path / "src")
    (src / "config.json").write_text(config)
    proc, err = _run(tmp_path, src)
    assert proc.returncode == 1 and f"could not build the model in {src}" in err and "config.json" in err
    assert not (tmp_path / "out").exists()


def test_a_config_asking_for_millions_of_layers_is_refused_before_building_them(tmp_path, models):
    src = _copy(models[0], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10_000_000}))
    start = time.perf_counter()
    proc, err = _run(tmp_path, src)
    assert proc.returncode == 2 and "num_hidden_layers=10,000,000" in err
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABS", 3])
@pytest.mark.parametrize("mode", ["always", "never"])
def test_an_index_naming_a_shard_outside_the_directory_is_refused(tmp_path, models, shard, mode):
    src = _copy(models[1], tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside.safetensors"
    (src / first).rename(outside)
    shard = str(outside) if shard == "ABS" else shard
    index["weight_map"] = {k: shard if v == first else v for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    proc, err = _run(tmp_path, src, mode=mode)
    assert proc.returncode == 2 and f"{src / 'model.safetensors.index.json'} " in err
    if isinstance(shard, str):
        assert f"names the weight file {shard!r}, which is not a file name in {src}" in err
    assert not (tmp_path / "out").exists()


def test_a_tensor_in_two_shards_without_an_index_is_refused(tmp_path, models):
    src = _copy(models[1], tmp_path / "src")
    (src / "model.safetensors.index.json").unlink()
    first, second = sorted(src.glob("*.safetensors"))[:2]
    from safetensors.torch import load_file

    a = load_file(first)
    name = next(iter(a))
    _edit(second, lambda t: {**t, name: a[name] * 2})
    proc, err = _run(tmp_path, src)
    assert proc.returncode == 2 and f"{name} is in two weight files, {first.name} and {second.name}" in err


def test_an_index_mapping_a_tensor_to_the_wrong_shard_says_so(tmp_path, models):
    src = _copy(models[1], tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    name = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][name] = second
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    proc, err = _run(tmp_path, src)
    assert proc.returncode == 2 and f"maps {name} to {second}, which does not hold it (it is in {first})" in err


@pytest.mark.parametrize("mode", ["always", "never"])
def test_an_artifact_inside_its_source_directory_is_not_copied_into_the_next_one(tmp_path, models, mode):
    src = _copy(models[0], tmp_path / "src")
    out = src / "artifact"
    for _ in range(2):
        proc, _ = _run(tmp_path, src, out, mode)
        assert proc.returncode == 0, proc.stderr
    assert not (out / "artifact").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not [f for f in manifest["model"]["copied_files"] if f.startswith("artifact/")]


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("mode", ["always", "never"])
def test_a_weight_with_nan_or_inf_is_refused_by_int8_naming_it(tmp_path, models, bad, mode):
    """A NaN row used to be stored as zeros at scale 1 and an infinite one saturated, with exit 0 and no word."""
    import torch
    from safetensors.torch import load_file, save_file

    src = _copy(models[0], tmp_path / "src")
    state = load_file(src / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 7] = float(bad)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    proc, said = _run(tmp_path, src, mode=mode)
    assert proc.returncode == 1, said
    assert "model.layers.1.mlp.up_proj.weight holds 1 NaN or infinite values" in said and "exclude" in said
    assert not (tmp_path / "out").exists()
    assert torch.isfinite(load_file(models[0] / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]).all()
