"""Bundles that generate: `compress pack` of a causal language model (the zoo's tiny-lm with its KV cache) writes
run.py, generate.py and decoding.py beside the model and tokenizer, and run.py, in an environment holding only
numpy, onnxruntime and tokenizers, continues prompts with the very tokens compressor's own ONNX Runtime session
gives, greedy or seeded, with the CLI's exit-code contract."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, bare_environment, run_cli

NEW_TOKENS = 20


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def packed(tiny_lm_onnx, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-lm-onnx packed for cpu-x86_64 (the zip)."""
    out = tmp_path_factory.mktemp("lm-bundle") / "tiny-lm.zip"
    proc = run_cli("pack", str(tiny_lm_onnx.out_dir), "-o", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def bundle(packed: Path) -> Path:
    """The bundle unpacked: its folder (run.py and the rest)."""
    with zipfile.ZipFile(packed) as zf:
        zf.extractall(packed.parent / "device")
    return packed.parent / "device" / "tiny-lm-onnx"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python whose environment has only numpy, onnxruntime and tokenizers."""
    return bare_environment(tmp_path_factory.mktemp("bare"))


def _prompts() -> list[str]:
    """Three held-out prompts of different lengths (so the batch is left-padded)."""
    from compressor.tinylm import held_out_texts

    texts = [t for t in held_out_texts()[1:] if len(t) > 300]
    return [texts[0][:24], texts[1][:90], texts[2][:200]]


def _run(python: Path, bundle: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """run.py of ``bundle`` with ``python``, from another working directory."""
    return subprocess.run([str(python), str(bundle / "run.py"), *args], capture_output=True, text=True,
                          cwd=cwd or bundle.parent.parent, timeout=300)


def _reference(artifact: Path, prompts: list[str], new_tokens: int, **sampling) -> tuple[list, list]:
    """(prompt token ids, new token ids up to the end-of-text token) from compressor's own ONNX Runtime session
    and decoder, with transformers' tokenizer and the prompts left-padded into one batch."""
    from transformers import AutoTokenizer

    from compressor.decoding import OrtDecoder
    from compressor.ort import ort_session

    tok = AutoTokenizer.from_pretrained(artifact)
    rows = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    ids = np.array([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    decoder = OrtDecoder(ort_session(artifact / "model.onnx"))
    eos = tok.eos_token_id
    got = decoder.generate(ids, mask, new_tokens, eos_token_id=eos, **sampling).tolist()
    return rows, [row[: row.index(eos) + 1] if eos in row else row for row in got]


def test_a_causal_lm_bundle_carries_its_generator_tokenizer_and_settings_and_packs_reproducibly(
        tiny_lm_onnx, packed, tmp_path):
    again = tmp_path / "again.zip"
    assert run_cli("pack", str(tiny_lm_onnx.out_dir), "-o", str(again), "-q").returncode == 0
    assert _sha(again) == _sha(packed)
    with zipfile.ZipFile(packed) as zf:
        names = {n.split("/", 1)[1] for n in zf.namelist()}
        info = json.loads(zf.read("tiny-lm-onnx/bundle.json"))
        assert zf.read("tiny-lm-onnx/decoding.py") == (ROOT / "compressor" / "decoding.py").read_bytes()
        assert zf.read("tiny-lm-onnx/generate.py") == (ROOT / "compressor" / "bundle_generate.py").read_bytes()
    assert {"run.py", "generate.py", "decoding.py", "tokenizer.json", "tokenizer_config.json", "config.json",
            "model.onnx", "bundle.json", "manifest.json"} <= names
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_onnx.out_dir)
    assert info["task"] == "text-generation" and info["requires"] == ["numpy", "onnxruntime", "tokenizers"]
    assert info["generation"] == {"eos_token_id": tok.eos_token_id, "max_positions": 1024}
    assert info["tokenizer"]["eos_id"] == tok.eos_token_id
    assert {"run.py", "generate.py", "decoding.py"} <= set(info["files"])


def test_run_py_generates_the_greedy_tokens_of_compressors_own_session_with_only_onnxruntime(
        tiny_lm_onnx, bundle, bare_python, tmp_path):
    prompts = _prompts()
    proc = _run(bare_python, bundle, *prompts, "--max-new-tokens", str(NEW_TOKENS), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    rows, expected = _reference(tiny_lm_onnx.out_dir, prompts, NEW_TOKENS)
    assert len({len(r) for r in rows}) == 3  # three lengths: the batch is left-padded
    assert out["prompts"] == prompts and out["prompt_tokens"] == rows
    assert out["tokens"] == expected
    eos = out["settings"]["eos_token_id"]
    assert out["stopped"] == ["eos" if t[-1] == eos else "length" for t in expected]
    assert all(len(t) == NEW_TOKENS for t, why in zip(expected, out["stopped"]) if why == "length")
    assert all(isinstance(t, str) and t for t in out["text"])
    assert proc.stderr == ""  # several prompts: nothing streams
    # One prompt: its text streams to stderr as it comes, and it continues as it did in the batch.
    proc = _run(bare_python, bundle, prompts[1], "--max-new-tokens", str(NEW_TOKENS), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    alone = json.loads(proc.stdout)
    assert alone["tokens"] == [expected[1]]
    assert proc.stderr == prompts[1] + alone["text"][0] + "\n"


def test_seeded_sampling_repeats_with_its_seed_and_matches_the_decoder(tiny_lm_onnx, bundle, bare_python):
    prompts = _prompts()[:2]
    sampling = ["--sample", "--top-k", "40", "--top-p", "0.95", "--temperature", "0.9", "--no-stream"]
    runs = []
    for seed in ("11", "11", "12"):
        proc = _run(bare_python, bundle, *prompts, "--max-new-tokens", str(NEW_TOKENS), "--seed", seed, *sampling)
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout)["tokens"])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    _, expected = _reference(tiny_lm_onnx.out_dir, prompts, NEW_TOKENS, rng=np.random.default_rng(11), top_k=40,
                             top_p=0.95, temperature=0.9)
    assert runs[0] == expected
    # The same from Python, in the environment with only numpy, onnxruntime and tokenizers.
    script = ("import json, sys\nsys.path.insert(0, sys.argv[1])\nfrom run import Bundle\n"
              "out = Bundle(sys.argv[1]).generate(json.loads(sys.argv[2]), max_new_tokens=%d, sample=True, seed=11, "
              "top_k=40, top_p=0.95, temperature=0.9)\nprint(json.dumps(out['tokens']))\n" % NEW_TOKENS)
    proc = subprocess.run([str(bare_python), "-c", script, str(bundle), json.dumps(prompts)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == expected


BAD = {
    "empty prompt": ([""], "prompt 1 is empty"),
    "blank second prompt": (["Once", "  "], "prompt 2 is empty"),
    "top-p zero": (["Once", "--sample", "--top-p", "0"], "--top-p 0.0: the probability mass to draw from, in (0, 1]"),
    "top-p above one": (["Once", "--sample", "--top-p", "1.5"], "in (0, 1]"),
    "no new tokens": (["Once", "--max-new-tokens", "0"], "--max-new-tokens 0: generate at least 1 token"),
    "temperature zero": (["Once", "--sample", "--temperature", "0"], "--temperature 0.0: a positive number"),
    "negative top-k": (["Once", "--sample", "--top-k", "-1"], "--top-k -1"),
    "seed without --sample": (["Once", "--seed", "3"], "add --sample"),
    "prompt past the positions": (["word " * 1100], "positions in all; shorten it"),
    "prompt and tokens past the positions": (["word " * 450, "--max-new-tokens", "200"], "ask for at most 124 new"),
    "arrays": (["--input", "x.npy"], "takes no arrays"),
    "save": (["Once", "--save", "out.npz"], "the tokens and text come in the JSON document"),
    "not a number": (["Once", "--max-new-tokens", "many"], "--max-new-tokens: invalid int value"),
    "nothing": ([], "give texts"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_prompts_and_settings_exit_2_saying_what_works(bundle, bare_python, case):
    args, message = BAD[case]
    proc = _run(bare_python, bundle, *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(("error: ", "usage: ")) and message in proc.stderr, proc.stderr


def test_an_ort_format_bundle_for_arm_generates_the_same_greedy_tokens(tiny_lm_onnx, bare_python, tmp_path):
    """Converting to ORT format checks the decoder on the prompt with an empty cache (its first step)."""
    out = tmp_path / "arm.zip"
    proc = run_cli("pack", str(tiny_lm_onnx.out_dir), "-o", str(out), "--target", "cpu-arm64", "-q")
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(out) as zf:
        zf.extractall(tmp_path / "x")
    prompts = _prompts()[:2]
    proc = _run(bare_python, tmp_path / "x" / "tiny-lm-onnx", *prompts, "--max-new-tokens", "16")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tokens"] == _reference(tiny_lm_onnx.out_dir, prompts, 16)[1]


def test_a_bundle_missing_its_decoder_exits_1_naming_the_file(bundle, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    (copy / "decoding.py").unlink()
    proc = _run(Path(sys.executable), copy, "Once")
    assert proc.returncode == 1 and "decoding.py is missing" in proc.stderr and "Traceback" not in proc.stderr


def test_a_bundle_that_does_not_generate_says_what_it_takes(tmp_path):
    import importlib.util

    (tmp_path / "r.yaml").write_text("name: mlp\nmodel: {source: zoo, name: digits-mlp}\nexport: {onnx: {}}\n")
    assert run_cli("run", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "mlp"), "-q").returncode == 0
    assert run_cli("pack", str(tmp_path / "mlp"), "-o", str(tmp_path / "mlp.zip"), "-q").returncode == 0
    with zipfile.ZipFile(tmp_path / "mlp.zip") as zf:
        assert not {"mlp/generate.py", "mlp/decoding.py"} & set(zf.namelist())
        assert "generation" not in json.loads(zf.read("mlp/bundle.json"))
        zf.extractall(tmp_path / "x")
    np.save(tmp_path / "x.npy", np.zeros((1, 64), np.float32))
    proc = _run(Path(sys.executable), tmp_path / "x" / "mlp", "--input", str(tmp_path / "x.npy"),
                "--max-new-tokens", "5")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--max-new-tokens: only bundles of causal language models generate" in proc.stderr
    assert "--input x.npy" in proc.stderr  # what this one takes
    spec = importlib.util.spec_from_file_location("mlp_run", tmp_path / "x" / "mlp" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(module.InputError, match="does not generate text"):
        module.Bundle(tmp_path / "x" / "mlp").generate(["Once"])
