"""int8 ONNX MiniLM on this CPU and, emulated, on every other CPU family: float32 ONNX vs this project's int8
(recipes/minilm-int8-onnx.yaml) vs ONNX Runtime's plain `quantize_dynamic` (int8 weights per channel) vs Optimum's
ORTQuantizer with its `avx2` and `avx512_vnni` dynamic per-channel configurations.

One process, one thread setting, the sessions alternating A B C ..., ... C B A at batch 8 and sequence length 128
(the shipped passages padded to 128 tokens). Prints JSON: the CPU (model name, kernel flags, int8 target family),
latency medians and ratios to float32 (with the spread of the per-round ratios), file sizes and ratios, and
fidelity to float32 (min / mean cosine of mean-pooled embeddings over the 480 texts of the shipped text pairs, and
their top-1 retrieval accuracy) as measured here and under each family's int8 arithmetic (x86-avx2: adjacent
products summed in saturating int16; x86-vnni, arm64: exact), emulated with compressor.export.int8_emulate.

Usage: python benchmarks/minilm_int8.py [--rounds N] [--calls N] [--threads N]
Targets (issue #14): int8 at least 1.3x faster than float32 ONNX on an AVX2-only CPU and 1.8x on a VNNI CPU, min
cosine >= 0.995 on every family, at least 3.8x smaller.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TARGET = {"speedup_avx2": 1.3, "speedup_vnni": 1.8, "min_cosine": 0.995, "smaller": 3.8}


def build(tmp: Path) -> dict[str, Path]:
    """The float32 export, this project's int8, ONNX Runtime's plain int8 and Optimum's two int8, each an ONNX
    file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    from compressor.log import Reporter
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "minilm-int8-onnx.yaml")
    ours = recipe.model_copy(update={"evaluate": None, "gates": None})
    run_recipe(ours, tmp / "int8", Reporter(quiet=True))
    fp32 = ours.model_copy(update={"name": "minilm-fp32-onnx"})
    fp32._steps = []  # the same export without the quantize pass
    run_recipe(fp32, tmp / "fp32", Reporter(quiet=True))
    (tmp / "plain").mkdir()
    quantize_dynamic(tmp / "fp32" / "model.onnx", tmp / "plain" / "model.onnx", weight_type=QuantType.QInt8,
                     per_channel=True, op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True},
                     use_external_data_format=True)
    paths = {"fp32": tmp / "fp32" / "model.onnx", "compressor_int8": tmp / "int8" / "model.onnx",
             "ort_quantize_dynamic": tmp / "plain" / "model.onnx"}
    for name, config in (("optimum_avx2", AutoQuantizationConfig.avx2(is_static=False, per_channel=True)),
                         ("optimum_avx512_vnni", AutoQuantizationConfig.avx512_vnni(is_static=False,
                                                                                     per_channel=True))):
        quantizer = ORTQuantizer.from_pretrained(tmp / "fp32", file_name="model.onnx")
        quantizer.quantize(save_dir=tmp / name, quantization_config=config)
        paths[name] = next((tmp / name).glob("*.onnx"))
    return paths


def emulated(path: Path, threads: int, tmp: Path) -> dict[str, Any]:
    """Sessions computing ``path``'s int8 products in each CPU family's arithmetic (compressor.cpu), keyed by
    family; families this CPU computes natively are left out (the measured session is theirs)."""
    import onnx

    from compressor.cpu import ARITHMETIC, TARGETS, local_target
    from compressor.export.int8_emulate import emulate
    from compressor.export.onnx import save_aligned

    model = onnx.load(str(path), load_external_data=True)
    if not any(n.op_type == "MatMulInteger" for n in model.graph.node):
        return {}
    out: dict[str, Any] = {}
    by_arithmetic: dict[str, Any] = {}
    for target in TARGETS:
        arithmetic = ARITHMETIC[target]
        if target == local_target() or arithmetic == ARITHMETIC[local_target()]:
            continue
        if arithmetic not in by_arithmetic:
            where = tmp / f"emulated-{path.parent.name}-{arithmetic}"
            where.mkdir()
            save_aligned(emulate(model, arithmetic), where)
            by_arithmetic[arithmetic] = session(where / "model.onnx", threads)
        out[target] = by_arithmetic[arithmetic]
    return out


def size(path: Path) -> int:
    """Bytes of an ONNX model and its external data files."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    files = {path}
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add(path.parent / entry.value)
    return sum(f.stat().st_size for f in files)


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def feed(sess: Any, enc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}


def embeddings(sess: Any, tok: Any, texts: list[str]) -> np.ndarray:
    out = []
    for i in range(0, len(texts), 32):
        enc = dict(tok(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="np"))
        hidden = sess.run(None, feed(sess, enc))[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        out.append((hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))
    return np.concatenate(out)


def retrieval(emb: np.ndarray, pairs: int) -> float:
    q = emb[:pairs] / np.linalg.norm(emb[:pairs], axis=1, keepdims=True)
    p = emb[pairs:] / np.linalg.norm(emb[pairs:], axis=1, keepdims=True)
    return float((np.argmax(q @ p.T, axis=1) == np.arange(pairs)).mean() * 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from compressor.cpu import TARGETS, machine_cpu
    from compressor.data.datasets import builtin_text_pairs

    rows = builtin_text_pairs()
    texts = [r["query"] for r in rows] + [r["passage"] for r in rows]
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        paths = build(Path(tmp))
        tok = AutoTokenizer.from_pretrained(str(paths["fp32"].parent))
        sessions = {name: session(p, args.threads) for name, p in paths.items()}
        sizes = {name: size(p) for name, p in paths.items()}
        emb = {name: embeddings(s, tok, texts) for name, s in sessions.items()}
        here = machine_cpu()["target"]
        per_target: dict[str, dict[str, np.ndarray]] = {}
        for name, path in paths.items():
            if name == "fp32":
                continue
            per_target[name] = {here: emb[name]}
            for target, emulated_session in emulated(path, args.threads, Path(tmp)).items():
                per_target[name][target] = embeddings(emulated_session, tok, texts)
            for target in TARGETS:  # a family with this CPU's arithmetic computes what was measured here
                per_target[name].setdefault(target, emb[name])
        enc = dict(tok([r["passage"] for r in rows[:8]], padding="max_length", truncation=True, max_length=128,
                       return_tensors="np"))
        feeds = {name: feed(s, enc) for name, s in sessions.items()}
        for name, s in sessions.items():
            for _ in range(3):
                s.run(None, feeds[name])
        times: dict[str, list[float]] = {n: [] for n in sessions}
        per_round: dict[str, list[float]] = {n: [] for n in sessions}
        order = list(sessions)
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                this = []
                for _ in range(args.calls):
                    start = time.perf_counter()
                    sessions[name].run(None, feeds[name])
                    this.append((time.perf_counter() - start) * 1000)
                times[name] += this
                per_round[name].append(statistics.median(this))
    ref = emb["fp32"]
    fp32_p50 = statistics.median(times["fp32"])
    result: dict[str, Any] = {"cpu": machine_cpu(),
                              "config": {"batch": 8, "sequence_length": 128, "threads": args.threads,
                                         "rounds": args.rounds, "calls": args.calls}}

    def cosines(got: np.ndarray) -> np.ndarray:
        return (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))

    for name in sessions:
        got = emb[name]
        cos = cosines(got)
        ratios = [a / b for a, b in zip(per_round["fp32"], per_round[name])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        result[name] = {
            "p50_ms": round(statistics.median(times[name]), 2),
            "speedup_vs_fp32": round(fp32_p50 / statistics.median(times[name]), 3),
            "speedup_round_iqr": [round(q[0], 3), round(q[2], 3)],
            "bytes": sizes[name],
            "smaller_than_fp32": round(sizes["fp32"] / sizes[name], 3),
            "min_cosine": round(float(cos.min()), 5),
            "mean_cosine": round(float(cos.mean()), 5),
            "retrieval_top1": round(retrieval(got, len(rows)), 2),
        }
        if name in per_target:
            result[name]["by_target"] = {
                target: {"min_cosine": round(float(cosines(e).min()), 5),
                         "retrieval_top1": round(retrieval(e, len(rows)), 2),
                         "how": "measured on this CPU" if target == here or e is emb[name] else "emulated"}
                for target, e in per_target[name].items()}
    ours = result["compressor_int8"]
    result["target"] = dict(TARGET)
    speed_key = "speedup_vnni" if here == "x86-vnni" else "speedup_avx2"
    result["target_met"] = {speed_key: ours["speedup_vs_fp32"] >= TARGET[speed_key],
                            "min_cosine_every_target": min(t["min_cosine"] for t in ours["by_target"].values())
                            >= TARGET["min_cosine"],
                            "smaller": ours["smaller_than_fp32"] >= TARGET["smaller"]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
