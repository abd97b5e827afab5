"""4-bit weights for causal language models: accuracy against the alternatives a user would pick, and decoding speed.

Part 1, accuracy: the zoo's tiny-lm (trained weights) at group size 128, as ONNX decoders with the KV cache, all
scored by compressor's own evaluator (compressor.evaluate.lm) on the held-out text against the float32 ONNX model:

- `float32`: `export: {onnx: {}}` through compressor's pipeline;
- `ort_rtn`: ONNX Runtime's `MatMulNBitsQuantizer` with its defaults (4 bits, block 128, asymmetric, round to
  nearest) applied to that float32 ONNX file: what a user of ONNX Runtime would pick instead;
- `nncf_data_free`: `nncf.compress_weights(onnx_model, mode=INT4_SYM, group_size=128)` on the same file: NNCF's
  data-free 4-bit default (embeddings and the last layer at its int8 backup precision);
- `recipe`: `recipes/tiny-lm-int4-onnx.yaml` through compressor's pipeline (evaluation off).

Printed per model: held-out perplexity and its increase over float32 with a 95% interval (a paired bootstrap over
the text's 128-token windows: how much the increase could differ on other text like it), next-token agreement, mean
KL, and the ONNX files' bytes. The claim: the recipe's perplexity increase is at most half of `ort_rtn`'s at the
same group size, and its files are no larger. `claim_half_of_rtn` is true or false where the bootstrap interval of
(recipe's increase - half of ort_rtn's) lies wholly on one side of zero, and "undecided" where it straddles zero:
the difference is then below what this text can resolve.

Part 2, speed: a Llama of about 100M parameters made from a config (benchmarks/causal_lm.py's LLAMA: hidden 768,
12 layers, vocabulary 32000, tied embeddings) with RANDOM weights (seed 0): speed only, its tokens mean nothing.
Its float32 ONNX export and its 4-bit export (`quantize: {mode: weight-only, bits: 4}`: round to nearest, the
embedding and LM head int8) decode alternately in one process (A B then B A, `--rounds` rounds after `--warmup`)
at batch 1 after a 32-token prompt; tokens/s and the median per-round ratio (with its spread), and the files' bytes.

Prints JSON with the CPU (its family decides ONNX Runtime's int8 kernels), threads and versions.

Usage: python benchmarks/int4_lm.py [--parts accuracy,speed] [--rounds N] [--warmup N] [--new-tokens N]
       [--threads N] [--llama-layers N]
Quick check: python benchmarks/int4_lm.py --rounds 1 --warmup 0 --new-tokens 8 --llama-layers 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from causal_lm import LLAMA, make_llama, onnx_bytes, onnx_decode, spread  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = 2000  # resamples of the evaluation windows for the perplexity intervals


def run(recipe_text: str, name: str, tmp: Path) -> tuple[Path, float]:
    """Run a recipe (evaluation off) into ``tmp/name``; (its model.onnx, seconds)."""
    from compressor.log import Reporter
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    recipe_file = tmp / f"{name}.yaml"
    recipe_file.write_text(recipe_text)
    recipe = load_recipe(recipe_file).model_copy(update={"evaluate": None, "gates": None})
    start = time.perf_counter()
    result = run_recipe(recipe, tmp / name, Reporter(quiet=True))
    return result.out_dir / "model.onnx", round(time.perf_counter() - start, 1)


def save(proto: Any, path: Path) -> Path:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    return path


def ort_rtn(src: Path, out: Path) -> Path:
    """ONNX Runtime's MatMulNBitsQuantizer, defaults (4 bits, block 128, asymmetric, RTN)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src), load_external_data=True))
    quantizer.process()
    return save(quantizer.model.model, out)


def nncf_data_free(src: Path, out: Path) -> Path:
    """NNCF's data-free 4-bit weight compression of the ONNX model (INT4_SYM, group 128, its defaults otherwise)."""
    import logging

    import nncf
    import onnx

    logging.getLogger("nncf").setLevel(logging.ERROR)
    model = onnx.load(str(src), load_external_data=True)
    with contextlib.redirect_stdout(sys.stderr):  # its progress bar: standard output holds the JSON alone
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=128)
    return save(compressed, out)


def accuracy(tmp: Path, threads: int) -> dict[str, Any]:
    from compressor.data.lm_text import build_lm_text
    from compressor.data.spec import DataSpec
    from compressor.evaluate.lm import lm_scores
    from compressor.evaluate.subjects import OrtModule
    from compressor.recipe.sections import GenerationSpec
    from compressor.tinylm import tiny_lm_path

    paths: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    paths["float32"], seconds["float32"] = run("name: fp32\nmodel: {source: zoo, name: tiny-lm}\n"
                                               "export: {onnx: {}}\n", "float32", tmp)
    for name, make in (("ort_rtn", ort_rtn), ("nncf_data_free", nncf_data_free)):
        start = time.perf_counter()
        paths[name] = make(paths["float32"], tmp / name / "model.onnx")
        seconds[name] = round(time.perf_counter() - start, 1)
    recipe = (ROOT / "recipes" / "tiny-lm-int4-onnx.yaml").read_text()
    paths["recipe"], seconds["recipe"] = run(recipe, "recipe", tmp)
    data = build_lm_text(DataSpec(builtin="held-out-text"), GenerationSpec(), artifact=tiny_lm_path(),
                         data_file=None)
    models = {"baseline" if k == "float32" else k: OrtModule(p, threads=threads) for k, p in paths.items()}
    _, lm, _ = lm_scores(models, data, "cpu")
    base = lm["baseline"]["perplexity"]
    nll = {key: window_nll(model, data) for key, model in models.items()}
    draws = np.random.default_rng(0).integers(0, len(nll["baseline"]), size=(BOOTSTRAP, len(nll["baseline"])))

    def increase(key: str) -> np.ndarray:
        """Bootstrap draws of ``key``'s perplexity increase (%) over float32 on resampled windows."""
        return 100 * (np.exp(nll[key][draws].mean(1) - nll["baseline"][draws].mean(1)) - 1)

    rows: dict[str, Any] = {}
    for key, path in paths.items():
        scores = lm["baseline" if key == "float32" else key]
        subject = "baseline" if key == "float32" else key
        rows[key] = {"perplexity": round(scores["perplexity"], 4),
                     "perplexity_increase_pct": round(100 * (scores["perplexity"] / base - 1), 4),
                     "increase_95pct_interval": [round(float(v), 4) for v in np.percentile(increase(subject),
                                                                                            [2.5, 97.5])],
                     "token_agreement_pct": scores.get("token_agreement"), "kl_mean": scores.get("kl_mean"),
                     "onnx_bytes": onnx_bytes(path), "seconds": seconds[key]}
    rtn, ours = rows["ort_rtn"], rows["recipe"]
    margin = np.percentile(increase("recipe") - 0.5 * increase("ort_rtn"), [2.5, 97.5])
    verdict: bool | str = bool(margin[1] < 0) if margin[1] < 0 or margin[0] > 0 else "undecided"
    return {"model": "tiny-lm (trained)", "group_size": 128, "text": data.name, "windows": len(nll["baseline"]),
            "bootstrap_draws": BOOTSTRAP, "subjects": rows,
            "recipe_minus_half_rtn_increase_95pct_interval": [round(float(v), 4) for v in margin],
            "claim_half_of_rtn": verdict,
            "recipe_bytes_over_rtn_bytes": round(ours["onnx_bytes"] / rtn["onnx_bytes"], 4),
            "recipe_no_larger": ours["onnx_bytes"] <= rtn["onnx_bytes"],
            "recipe_kl_over_rtn_kl": round(ours["kl_mean"] / rtn["kl_mean"], 4)}


def window_nll(model: Any, data: Any) -> np.ndarray:
    """Mean next-token negative log-likelihood of ``model`` on each window of ``data``, in the evaluator's order."""
    import torch
    import torch.nn.functional as F

    out = []
    for batch in data.batches:
        ids, targets = batch["input_ids"][:, :-1], batch["input_ids"][:, 1:]
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        logp = F.log_softmax(logits, dim=-1).gather(2, targets[..., None])[..., 0]
        out.append((-logp).mean(1).numpy())
    return np.concatenate(out).astype(np.float64)


def speed(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    import json as _json

    from compressor.decoding import OrtDecoder
    from compressor.ort import ort_session

    model_dir = make_llama(tmp / "llama-hf", args.llama_layers)
    source = f"{{source: hf, path: {_json.dumps(str(model_dir))}, auto_class: AutoModelForCausalLM}}"
    paths, seconds = {}, {}
    paths["onnx_fp32"], seconds["onnx_fp32"] = run(f"name: l32\nmodel: {source}\nexport: {{onnx: {{}}}}\n",
                                                   "llama-fp32", tmp)
    paths["onnx_int4"], seconds["onnx_int4"] = run(
        f"name: l4\nmodel: {source}\npasses:\n  - quantize: {{mode: weight-only, bits: 4}}\n"
        "export: {onnx: {}}\n", "llama-int4", tmp)
    decoders = {k: OrtDecoder(ort_session(p, threads=args.threads)) for k, p in paths.items()}
    ids = np.random.default_rng(0).integers(3, LLAMA["vocab_size"], size=(1, args.prompt_tokens), dtype=np.int64)
    tok_s: dict[str, list[float]] = {k: [] for k in decoders}
    order = list(decoders)
    for r in range(args.warmup + args.rounds):
        for key in order if r % 2 == 0 else order[::-1]:
            _, _, secs = onnx_decode(decoders[key], ids, args.new_tokens)
            if r >= args.warmup:
                tok_s[key].append(args.new_tokens / secs)
    sizes = {k: onnx_bytes(p) for k, p in paths.items()}
    ratio = [a / b for a, b in zip(tok_s["onnx_int4"], tok_s["onnx_fp32"])]
    return {"model": f"llama config, {args.llama_layers} layers, RANDOM weights (speed only)",
            "batch": 1, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "tokens_per_s": {k: spread(v, 1) for k, v in tok_s.items()},
            "int4_over_fp32": spread(ratio), "onnx_bytes": sizes,
            "fp32_bytes_over_int4_bytes": round(sizes["onnx_fp32"] / sizes["onnx_int4"], 3),
            "recipe_seconds": seconds,
            "claim_2_5x_faster_5x_smaller": bool(statistics.median(ratio) >= 2.5
                                                 and sizes["onnx_fp32"] >= 5 * sizes["onnx_int4"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="accuracy,speed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--llama-layers", type=int, default=LLAMA["num_hidden_layers"])
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(parts) - {"accuracy", "speed"} or args.rounds < 1 or args.new_tokens < 1:
        parser.error("parts are accuracy and/or speed; rounds and tokens must be >= 1")

    import nncf
    import onnxruntime
    import torch

    from compressor.cpu import machine_cpu

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict[str, Any] = {"cpu": machine_cpu(), "threads": args.threads,
                              "versions": {"onnxruntime": onnxruntime.__version__, "nncf": nncf.__version__,
                                           "torch": torch.__version__}}
    with tempfile.TemporaryDirectory(prefix="bench-int4-lm-") as tmp_name:
        tmp = Path(tmp_name)
        if "accuracy" in parts:
            result["accuracy"] = accuracy(tmp, args.threads)
        if "speed" in parts:
            result["speed"] = speed(tmp, args)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
