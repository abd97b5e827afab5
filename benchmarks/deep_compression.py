"""Deep Compression as recipes: compression ratio and accuracy change for digits-mlp, digits-cnn and MiniLM, and
the speed of a structurally pruned MiniLM in ONNX Runtime against the unpruned one.

Parts (all by default; `--only` picks some):
- `digits-mlp`: recipes/digits-deep-compression.yaml. Ratio = float32 safetensors bytes of the same model written by
  compressor / compressed model.safetensors bytes; accuracy on the held-out split through `compressor.load`.
- `digits-cnn`: the same passes on the digits CNN (wider codebooks for the convolutions).
- `minilm`: recipes/minilm-deep-compression.yaml (pruning + weight sharing + recovery); ratio, retrieval accuracy
  on the shipped text pairs and min cosine of mean-pooled embeddings against float32 MiniLM.
- `structured`: recipes/minilm-ffn-prune-onnx.yaml against the unpruned float32 ONNX export: parameters, and
  ONNX Runtime latency at batch 8, sequence 128, the two sessions alternating in one process.

Each compressed size is also given after lzma (a transport copy; the artifact itself stays memory-mappable).
Prints JSON. Targets (issue #5): digits-mlp >= 40x with <= 0.5 points drop; MiniLM >= 8x with <= 1 point retrieval
drop; the structured model has fewer parameters and is faster than the unpruned one.

Usage: python benchmarks/deep_compression.py [--only digits-mlp,digits-cnn,minilm,structured] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import statistics
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("digits-mlp", "digits-cnn", "minilm", "structured")
TARGETS = {"digits-mlp": {"min_ratio": 40, "max_drop": 0.5}, "minilm": {"min_ratio": 8, "max_drop": 1.0}}

CNN_PASSES = """
passes:
  - prune: {sparsity: {conv1: 0.3, conv2: 0.45, fc1: 0.47, fc2: 0.35}}
  - recover: {steps: 600, lr: 1.0e-3}
  - prune: {sparsity: {conv1: 0.6, conv2: 0.9, fc1: 0.94, fc2: 0.7}}
  - recover: {steps: 1500, lr: 1.0e-3}
  - share: {bits: {Conv2d: 5, Linear: 4}, include_bias: true}
  - recover: {steps: 2000, lr: 3.0e-4}
"""


def run(recipe_text: str | Path, out: Path) -> Path:
    """Run a recipe (a file, or YAML text) without its evaluation; returns the artifact directory."""
    from compressor.log import Reporter
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    if isinstance(recipe_text, Path):
        recipe = load_recipe(recipe_text)
    else:
        path = out.parent / f"{out.name}.yaml"
        path.write_text(recipe_text)
        recipe = load_recipe(path)
    recipe = recipe.model_copy(update={"evaluate": None, "gates": None})
    run_recipe(recipe, out, Reporter(quiet=True))
    return out


def weights_bytes(artifact: Path) -> int:
    manifest = json.loads((artifact / "manifest.json").read_text())
    return sum((artifact / w).stat().st_size for w in manifest["model"]["weights"])


def lzma_bytes(artifact: Path) -> int:
    manifest = json.loads((artifact / "manifest.json").read_text())
    return sum(len(lzma.compress((artifact / w).read_bytes(), preset=9)) for w in manifest["model"]["weights"])


def digits(name: str, compressed_recipe: str | Path, tmp: Path) -> dict[str, Any]:
    import compressor
    from compressor import zoo

    dense = run(f"name: {name}-fp32\nmodel: {{source: zoo, name: {name}}}\n", tmp / f"{name}-fp32")
    start = time.perf_counter()
    small = run(compressed_recipe, tmp / f"{name}-dc")
    seconds = time.perf_counter() - start
    before = zoo.digits_accuracy(compressor.load(dense), name)
    after = zoo.digits_accuracy(compressor.load(small), name)
    fp32, packed = weights_bytes(dense), weights_bytes(small)
    return {"fp32_bytes": fp32, "compressed_bytes": packed, "ratio": round(fp32 / packed, 2),
            "lzma_transport_bytes": lzma_bytes(small), "ratio_lzma": round(fp32 / lzma_bytes(small), 2),
            "accuracy_fp32": round(before, 2), "accuracy_compressed": round(after, 2),
            "accuracy_drop": round(before - after, 2), "recipe_seconds": round(seconds, 1)}


def text_embeddings(module: Any, tok: Any, texts: list[str]) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 32):
            enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
            hidden = module(**enc).last_hidden_state.float()
            mask = enc["attention_mask"][..., None].float()
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)).numpy())
    return np.concatenate(out)


def retrieval(emb: np.ndarray, pairs: int) -> float:
    q = emb[:pairs] / np.linalg.norm(emb[:pairs], axis=1, keepdims=True)
    p = emb[pairs:] / np.linalg.norm(emb[pairs:], axis=1, keepdims=True)
    return float((np.argmax(q @ p.T, axis=1) == np.arange(pairs)).mean() * 100)


def texts() -> tuple[list[str], int]:
    from compressor.data.datasets import builtin_text_pairs

    rows = builtin_text_pairs()
    return [r["query"] for r in rows] + [r["passage"] for r in rows], len(rows)


def minilm(tmp: Path) -> dict[str, Any]:
    import compressor
    from transformers import AutoTokenizer

    dense = run("name: minilm-fp32\nmodel: {source: zoo, name: minilm}\n", tmp / "minilm-fp32")
    start = time.perf_counter()
    small = run(ROOT / "recipes" / "minilm-deep-compression.yaml", tmp / "minilm-dc")
    seconds = time.perf_counter() - start
    tok = AutoTokenizer.from_pretrained(str(dense))
    all_texts, pairs = texts()
    ref = text_embeddings(compressor.load(dense), tok, all_texts)
    got = text_embeddings(compressor.load(small), tok, all_texts)
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    fp32, packed = weights_bytes(dense), weights_bytes(small)
    before, after = retrieval(ref, pairs), retrieval(got, pairs)
    return {"fp32_bytes": fp32, "compressed_bytes": packed, "ratio": round(fp32 / packed, 2),
            "lzma_transport_bytes": lzma_bytes(small), "retrieval_fp32": round(before, 2),
            "retrieval_compressed": round(after, 2), "retrieval_drop": round(before - after, 2),
            "min_cosine": round(float(cos.min()), 5), "mean_cosine": round(float(cos.mean()), 5),
            "recipe_seconds": round(seconds, 1)}


def structured(tmp: Path, rounds: int, calls: int, threads: int) -> dict[str, Any]:
    import onnxruntime as ort
    from transformers import AutoTokenizer


    dense = run("name: minilm-onnx\nmodel: {source: zoo, name: minilm}\nexport: {onnx: {}}\n", tmp / "minilm-onnx")
    start = time.perf_counter()
    pruned = run(ROOT / "recipes" / "minilm-ffn-prune-onnx.yaml", tmp / "minilm-ffn")
    seconds = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    sessions = {name: ort.InferenceSession(str(path / "model.onnx"), sess_options=options,
                                           providers=["CPUExecutionProvider"])
                for name, path in (("unpruned", dense), ("pruned_ffn_25", pruned))}
    tok = AutoTokenizer.from_pretrained(str(dense))
    all_texts, pairs = texts()

    def onnx_embeddings(sess: Any) -> np.ndarray:
        out = []
        for i in range(0, len(all_texts), 32):
            enc = dict(tok(all_texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="np"))
            hidden = sess.run(None, {a.name: enc[a.name] for a in sess.get_inputs()})[0]
            mask = enc["attention_mask"][..., None].astype(np.float32)
            out.append((hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))
        return np.concatenate(out)

    emb = {name: onnx_embeddings(s) for name, s in sessions.items()}
    enc = dict(tok(all_texts[pairs:pairs + 8], padding="max_length", truncation=True, max_length=128,
                   return_tensors="np"))
    feeds = {name: {a.name: enc[a.name] for a in s.get_inputs()} for name, s in sessions.items()}
    for name, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[name])
    per_round: dict[str, list[float]] = {n: [] for n in sessions}
    order = list(sessions)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            this = []
            for _ in range(calls):
                t0 = time.perf_counter()
                sessions[name].run(None, feeds[name])
                this.append((time.perf_counter() - t0) * 1000)
            per_round[name].append(statistics.median(this))
    ratios = [a / b for a, b in zip(per_round["unpruned"], per_round["pruned_ffn_25"])]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    manifest = json.loads((pruned / "manifest.json").read_text())
    dense_manifest = json.loads((dense / "manifest.json").read_text())
    ref, got = emb["unpruned"], emb["pruned_ffn_25"]
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return {
        "parameters_unpruned": dense_manifest["model"]["parameters"],
        "parameters_pruned": manifest["model"]["parameters"],
        "onnx_bytes_unpruned": (dense / "model.onnx.data").stat().st_size,
        "onnx_bytes_pruned": (pruned / "model.onnx.data").stat().st_size,
        "p50_ms_unpruned": round(statistics.median(per_round["unpruned"]), 2),
        "p50_ms_pruned": round(statistics.median(per_round["pruned_ffn_25"]), 2),
        "speedup": round(statistics.median(per_round["unpruned"]) / statistics.median(per_round["pruned_ffn_25"]), 3),
        "speedup_round_iqr": [round(q[0], 3), round(q[2], 3)],
        "retrieval_unpruned": round(retrieval(ref, pairs), 2),
        "retrieval_pruned": round(retrieval(got, pairs), 2),
        "min_cosine": round(float(cos.min()), 5),
        "config": {"batch": 8, "sequence_length": 128, "threads": threads, "rounds": rounds, "calls": calls},
        "recipe_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=textwrap.dedent(__doc__ or ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-dc-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ.setdefault("COMPRESSOR_CACHE", str(tmp / "cache"))
        if "digits-mlp" in parts:
            result["digits-mlp"] = digits("digits-mlp", ROOT / "recipes" / "digits-deep-compression.yaml", tmp)
        if "digits-cnn" in parts:
            text = f"name: digits-cnn-dc\nmodel: {{source: zoo, name: digits-cnn}}\n{CNN_PASSES}"
            result["digits-cnn"] = digits("digits-cnn", text, tmp)
        if "minilm" in parts:
            result["minilm"] = minilm(tmp)
        if "structured" in parts:
            result["structured"] = structured(tmp, args.rounds, args.calls, args.threads)
    met: dict[str, bool] = {}
    if "digits-mlp" in result:
        r = result["digits-mlp"]
        met["digits-mlp"] = r["ratio"] >= 40 and r["accuracy_drop"] <= 0.5
    if "minilm" in result:
        r = result["minilm"]
        met["minilm"] = r["ratio"] >= 8 and r["retrieval_drop"] <= 1.0
    if "structured" in result:
        r = result["structured"]
        met["structured"] = r["parameters_pruned"] < r["parameters_unpruned"] and r["speedup"] > 1.0
    result["targets"] = TARGETS
    result["target_met"] = met
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
