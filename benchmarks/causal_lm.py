"""Decode speed of causal language models with their KV cache: torch float32, this project's float32 ONNX export
and its weight-only int8 ONNX export, at batch 1 (and optionally larger batches), for two models:

- `tiny-lm`: the zoo's causal LM (compressor.tinylm, trained weights, its own tokenizer); the prompts are the
  held-out text's first tokens.
- `llama-100m`: a Llama of about 100M parameters made from a config (hidden 768, SwiGLU 2048, 12 layers, 12 query
  heads sharing 4 key/value heads, vocabulary 32000, tied embeddings) with RANDOM weights (fixed seed): its numbers
  are for speed only, its tokens mean nothing; the prompts are random token ids.

Both ONNX models come from recipes run through compressor's own pipeline (written into a temporary directory):
`export: {onnx: {}}` (the decoder with past key/values as inputs and outputs) and the same with
`passes: [{quantize: {mode: weight-only}}]`. ONNX decoding goes through compressor.decoding.OrtDecoder, torch
through the model's own cache (`past_key_values`, `use_cache=True`); torch and ONNX Runtime get the same number of
intra-op threads.

Measurement, per subject: a prompt of `--prompt-tokens` tokens is prefilled (timed separately, not part of the
speed), then `--new-tokens` greedy decode steps are timed, each feeding the previous token and the cache;
tokens/s = batch x new tokens / seconds. The three subjects alternate in one process, A B C then C B A, for
`--rounds` rounds after `--warmup` unrecorded ones. The claim is the ratios: the median of the per-round ratios
(with their spread), not the absolute tokens/s, which depend on the machine and its load. The greedy tokens of the
float32 ONNX decoder must equal torch's (so both compute the same thing); for int8, the number of leading tokens
equal to float32 ONNX's is given per prompt. The weight-only int8 graph stores int8 weights and their scales and
ONNX Runtime folds them back to float32 when the session loads, so it decodes with float32 arithmetic: expect
int8/fp32 near 1, its gain is the file size. Measure on a quiet machine: other processes on the cores stall
torch's OpenMP threads far more than ONNX Runtime's (the load average is recorded).

Prints JSON: the CPU, threads, versions, and per model its parameters, ONNX file sizes, recipe times and, per
batch size, tokens/s and ratios.

Usage: python benchmarks/causal_lm.py [--models tiny-lm,llama-100m] [--batch 1 8] [--rounds N] [--warmup N]
       [--prompt-tokens N] [--new-tokens N] [--threads N] [--llama-layers N]
Quick check: python benchmarks/causal_lm.py --rounds 1 --warmup 0 --new-tokens 8 --llama-layers 2
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

SUBJECTS = ("torch_fp32", "onnx_fp32", "onnx_int8")
RATIOS = (("onnx_fp32", "torch_fp32"), ("onnx_int8", "torch_fp32"), ("onnx_int8", "onnx_fp32"))
LLAMA = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
         "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 2048,
         "tie_word_embeddings": True}


def make_llama(where: Path, layers: int) -> Path:
    """A Llama of the LLAMA config (``layers`` layers) with random weights (seed 0), saved as a Hugging Face
    directory without a tokenizer (the `hf` source then makes its example inputs from random token ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**dict(LLAMA, num_hidden_layers=layers), bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(where), safe_serialization=True)
    return where


def run_recipes(model_yaml: str, name: str, tmp: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """Run the float32 ONNX export recipe and the weight-only int8 one (evaluation off); returns the ONNX files
    and each recipe's seconds."""
    from compressor.log import Reporter
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    passes = {"onnx_fp32": "", "onnx_int8": "passes:\n  - quantize: {mode: weight-only}\n"}
    paths, seconds = {}, {}
    for subject, extra in passes.items():
        recipe_file = tmp / f"{name}-{subject}.yaml"
        recipe_file.write_text(f"name: {name}-{subject}\nmodel: {model_yaml}\n{extra}export:\n  onnx: {{}}\n")
        recipe = load_recipe(recipe_file)
        recipe = recipe.model_copy(update={"evaluate": None, "gates": None})
        start = time.perf_counter()
        result = run_recipe(recipe, tmp / f"{name}-{subject}", Reporter(quiet=True))
        seconds[subject] = round(time.perf_counter() - start, 1)
        paths[subject] = result.out_dir / "model.onnx"
    return paths, seconds


def onnx_bytes(path: Path) -> int:
    """Bytes of an ONNX model and its external data files."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    files = {path}
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add(path.parent / entry.value)
    return sum(f.stat().st_size for f in files)


def torch_decode(module: Any, ids: np.ndarray, new: int) -> tuple[np.ndarray, float, float]:
    """(greedy tokens (batch, new + 1), prefill seconds, seconds of ``new`` decode steps) in torch with its cache."""
    import torch

    prompt = torch.from_numpy(ids)
    mask = torch.ones((ids.shape[0], ids.shape[1] + new), dtype=torch.int64)
    p = ids.shape[1]
    with torch.inference_mode():
        start = time.perf_counter()
        out = module(input_ids=prompt, attention_mask=mask[:, :p], use_cache=True)
        nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        prefill = time.perf_counter() - start
        tokens = [nxt]
        past = out.past_key_values
        start = time.perf_counter()
        for i in range(new):
            out = module(input_ids=nxt, attention_mask=mask[:, :p + i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens.append(nxt)
        seconds = time.perf_counter() - start
    return torch.cat(tokens, dim=1).numpy(), prefill, seconds


def onnx_decode(decoder: Any, ids: np.ndarray, new: int) -> tuple[np.ndarray, float, float]:
    """The same as torch_decode with compressor.decoding.OrtDecoder (the graph's cache fed back)."""
    mask = np.ones((ids.shape[0], ids.shape[1] + new), dtype=np.int64)
    p = ids.shape[1]
    start = time.perf_counter()
    logits, past = decoder.step(ids.astype(np.int64), mask[:, :p], decoder.empty_past(ids.shape[0]))
    nxt = logits[:, -1].argmax(axis=-1)[:, None]
    prefill = time.perf_counter() - start
    tokens = [nxt]
    start = time.perf_counter()
    for i in range(new):
        logits, past = decoder.step(nxt, mask[:, :p + i + 1], past)
        nxt = logits[:, -1].argmax(axis=-1)[:, None]
        tokens.append(nxt)
    seconds = time.perf_counter() - start
    return np.concatenate(tokens, axis=1), prefill, seconds


def prompts(name: str, model_dir: Path, batch: int, length: int, vocab: int) -> np.ndarray:
    """(batch, length) prompt ids: tiny-lm's from its held-out text (one document per row where they are long
    enough), random ids (seed 0) for the random-weight Llama."""
    if name != "tiny-lm":
        return np.random.default_rng(0).integers(3, vocab, size=(batch, length), dtype=np.int64)
    from transformers import AutoTokenizer

    from compressor.tinylm import held_out_texts

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    texts = held_out_texts()
    encoded = (tok(t, add_special_tokens=False, verbose=False)["input_ids"] for t in texts)
    rows = [ids[:length] for ids in encoded if len(ids) >= length]
    if len(rows) < batch:  # too few long documents: slices of the whole held-out text instead
        ids = tok("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
        rows = [ids[i * length:(i + 1) * length] for i in range(batch)]
    return np.asarray(rows[:batch], dtype=np.int64)


def spread(values: list[float], digits: int = 3) -> dict[str, Any]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": round(statistics.median(values), digits), "iqr": [round(q[0], digits), round(q[2], digits)],
            "min": round(min(values), digits), "max": round(max(values), digits)}


def bench_batch(name: str, model_dir: Path, runners: dict[str, Any], batch: int, args: argparse.Namespace,
                vocab: int) -> dict[str, Any]:
    """Alternating rounds of the three subjects at one batch size."""
    ids = prompts(name, model_dir, batch, args.prompt_tokens, vocab)
    tok_s: dict[str, list[float]] = {s: [] for s in SUBJECTS}
    prefill_ms: dict[str, list[float]] = {s: [] for s in SUBJECTS}
    tokens: dict[str, list[np.ndarray]] = {s: [] for s in SUBJECTS}
    for r in range(args.warmup + args.rounds):
        for subject in SUBJECTS if r % 2 == 0 else SUBJECTS[::-1]:
            got, prefill, seconds = runners[subject](ids)
            tokens[subject].append(got)
            if r >= args.warmup:
                tok_s[subject].append(batch * args.new_tokens / seconds)
                prefill_ms[subject].append(prefill * 1000)
    reference = tokens["torch_fp32"][0]
    same = {s: all(np.array_equal(t, reference) for t in tokens[s]) for s in SUBJECTS}
    # Per prompt: how many leading greedy tokens of int8 equal float32 ONNX's (after the first difference the two
    # continue different texts, so later positions say nothing).
    prefix = [int(np.argmax(a != b)) if (a != b).any() else len(a)
              for a, b in zip(tokens["onnx_int8"][0], tokens["onnx_fp32"][0])]
    return {
        "tokens_per_s": {s: spread(v, 1) for s, v in tok_s.items()},
        "ratios": {f"{a}/{b}": spread([x / y for x, y in zip(tok_s[a], tok_s[b])]) for a, b in RATIOS},
        "prefill_ms": {s: round(statistics.median(v), 2) for s, v in prefill_ms.items()},
        "greedy_onnx_fp32_equals_torch": same["onnx_fp32"],
        "greedy_torch_deterministic": same["torch_fp32"],
        "greedy_tokens_per_prompt": args.new_tokens + 1,
        "greedy_int8_tokens_equal_to_onnx_fp32_before_first_difference": prefix,
    }


def bench_model(name: str, model_dir: Path, model_yaml: str, args: argparse.Namespace, tmp: Path
                ) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from compressor.decoding import OrtDecoder
    from compressor.ort import ort_session

    paths, seconds = run_recipes(model_yaml, name, tmp)
    module = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32).eval()
    decoders = {s: OrtDecoder(ort_session(p, threads=args.threads)) for s, p in paths.items()}
    config = module.config
    if args.prompt_tokens + args.new_tokens + 1 > config.max_position_embeddings:
        raise SystemExit(f"{name} has {config.max_position_embeddings} positions: fewer prompt or new tokens")
    runners = {"torch_fp32": lambda ids: torch_decode(module, ids, args.new_tokens),
               **{s: (lambda ids, d=d: onnx_decode(d, ids, args.new_tokens)) for s, d in decoders.items()}}
    sizes = {s: onnx_bytes(p) for s, p in paths.items()}
    out: dict[str, Any] = {
        "random_weights": name != "tiny-lm",
        "parameters": sum(p.numel() for p in module.parameters()),
        "config": {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                   "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "tie_word_embeddings")},
        "onnx_bytes": sizes,
        "onnx_int8_smaller_than_fp32": round(sizes["onnx_fp32"] / sizes["onnx_int8"], 3),
        "recipe_seconds": seconds,
    }
    if name != "tiny-lm":
        out["note"] = ("random weights (seed 0) and random prompt ids: the speed is meaningful, the tokens are "
                       "not (near-tied logits can make greedy tokens differ between equally correct backends)")
    for batch in args.batch:
        out[f"batch_{batch}"] = bench_batch(name, model_dir, runners, batch, args, config.vocab_size)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-lm,llama-100m", help="comma-separated: tiny-lm, llama-100m")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (e.g. --batch 1 8)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of torch and ONNX Runtime alike")
    parser.add_argument("--llama-layers", type=int, default=LLAMA["num_hidden_layers"],
                        help="fewer layers for a quick check (the model is then smaller than 100M)")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - {"tiny-lm", "llama-100m"})
    if unknown or args.rounds < 1 or args.new_tokens < 1 or args.prompt_tokens < 1 or min(args.batch) < 1:
        parser.error(f"unknown models {unknown}" if unknown else "rounds, tokens and batch sizes must be >= 1")

    import onnxruntime
    import torch
    import transformers

    from compressor.cpu import machine_cpu
    from compressor.tinylm import tiny_lm_path

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already fixed by an earlier parallel call
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {
        "cpu": machine_cpu(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "config": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batch": args.batch,
                   "rounds": args.rounds, "warmup_rounds": args.warmup,
                   "order": "A B C then C B A, alternating per round, in one process",
                   "speed": "batch x new tokens / seconds of the decode steps (prefill excluded, reported apart)"},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "transformers": transformers.__version__},
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-causal-lm-") as tmp_name:
        tmp = Path(tmp_name)
        for name in models:
            if name == "tiny-lm":
                model_dir, model_yaml = tiny_lm_path(), "{source: zoo, name: tiny-lm}"
                key = name
            else:
                model_dir = make_llama(tmp / "llama-hf", args.llama_layers)
                model_yaml = (f"{{source: hf, path: {json.dumps(str(model_dir))}, "
                              "auto_class: AutoModelForCausalLM}")
                key = name if args.llama_layers == LLAMA["num_hidden_layers"] else f"llama-{args.llama_layers}layers"
            result["models"][key] = bench_model(key, model_dir, model_yaml, args, tmp)
    result["seconds"] = round(time.perf_counter() - started, 1)
    # Other processes on the cores make torch's OpenMP threads wait at every barrier (far more than ONNX Runtime's
    # pool): a 1-minute load average near or above the core count means the torch numbers are not to be trusted.
    result["load_average_1min"] = {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
