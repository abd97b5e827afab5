"""Memory and time of `compress run` on config-sized Llama models, against safetensors alone.

Builds Llama models from a transformers config (RANDOM weights, seed 0: memory and time are what is measured, the
tokens mean nothing) of about 0.25B parameters (hidden 1024, 16 layers, vocabulary 32000, untied) and, with
`--sizes 0.25b,1b`, about 1.1B (TinyLlama's shape: hidden 2048, 22 layers), saved as float32 safetensors. For
each size (`cast` float16; weight-only int8; weight-only int8 then `shard` tensor_parallel 2; and with `--recipes
int4` 4-bit round to nearest in groups of 128; evaluation off) it runs `compress run` in a fresh process and prints
the process's peak RSS (the kernel's accounting, ru_maxrss of the child), wall time and the bytes written, and the
same for the yardstick: a process that reads the source with safetensors alone and writes the same number of output
bytes (each tensor converted as the recipe does: float16 for cast, int8 for int8, 4-bit groups for int4) with
safetensors' `save_file`, one tensor at a time. The two alternate, `--repeat` times each (default 3): the
median wall time and the largest peak are reported, each run's time beside them. Each side's
start-up (its imports, measured alone) is printed too, with the ratio of the times after it.

Beside each measured peak: compressor's own estimate, made before it loads anything (compressor/budget.py),
which refuses a run that will not fit; it must not be below the measured peak.

The issue's targets (#19): peak RSS at most 1.5 GB for both sizes, the imports included, and wall time at most 1.5x
the yardstick's. `compress run` runs with `--stream always` (tensor by tensor from the meta device, compressor/stream.py)
unless `--stream never` asks for the whole-model run, for comparison. Both processes are started by a small launcher:
Linux counts a forked child's memory from before its exec in its peak, which would add this script's own size.

Prints JSON with the CPU, the machine's memory and the versions.

Usage: python benchmarks/streaming.py [--sizes 0.25b,1b] [--recipes cast,int8,int8-tp2] [--stream never] [--repeat 3]
       [--keep DIR]
Quick check: python benchmarks/streaming.py --sizes tiny
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SIZES, fresh_memory_rate, make_llama  # noqa: E402

RECIPES = {
    "cast": "  - cast: {dtype: float16}\n",
    "int8": "  - quantize: {mode: weight-only}\n",
    "int8-tp2": "  - quantize: {mode: weight-only}\n  - shard: {tensor_parallel: 2}\n",
    "int4": "  - quantize: {mode: weight-only, bits: 4, method: rtn}\n",  # NNCF's round to nearest, groups of 128
    # NNCF's AWQ and scale estimation on the built-in calibration text, one decoder layer at a time when streamed
    "int4-awq": "  - quantize: {mode: weight-only, bits: 4, symmetric: false, method: [awq, scale-estimation]}\n",
    # the same with mixed precision: the layers run twice, first for NNCF's sensitivities, ranked across the model
    "int4-awq-mixed": "  - quantize: {mode: weight-only, bits: 4, symmetric: false, method: [awq, scale-estimation], "
                      "ratio: 0.8}\n",
}

# The yardstick: read every tensor of the source with safetensors, convert it as the recipe would, write it.
YARDSTICK = r"""
import sys, torch
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
src, out, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
out.mkdir(parents=True, exist_ok=True)
for i, file in enumerate(sorted(src.glob("*.safetensors"))):
    with safe_open(str(file), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if how == "cast" and t.is_floating_point():
                t = t.to(torch.float16)
            elif how.startswith("int8") and t.dim() == 2:
                scale = t.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
                t = torch.round(t / scale).to(torch.int8)
            elif how.startswith("int4") and t.dim() == 2 and t.shape[1] % 256 == 0:  # groups of 128, two values a byte
                g = t.reshape(t.shape[0], -1, 128)
                scale = g.abs().amax(2, keepdim=True).clamp_min(1e-12) / 7
                q = (torch.round(g / scale).clamp(-8, 7) + 8).to(torch.uint8).reshape(t.shape[0], -1)
                save_file({name + ".scale": scale.half().reshape(t.shape[0], -1)},
                          str(out / f"{i}-{name}.s.safetensors"))
                t = q[:, 0::2] | (q[:, 1::2] << 4)
            save_file({name: t.contiguous()}, str(out / f"{i}-{name}.safetensors"))
"""


# Linux counts a forked child's memory from before its exec in the child's peak (ru_maxrss): a child of this
# process, which holds torch, would start at this process's size. A small launcher forks the measured command.
LAUNCH = ("import os, subprocess, sys, time; t = time.perf_counter(); p = subprocess.Popen(sys.argv[1:], "
          "stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); _, status, usage = os.wait4(p.pid, 0); "
          "s = time.perf_counter() - t; err = p.stderr.read(); "
          "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, s); sys.stderr.write(err[-600:])")


def measured(command: list[str]) -> dict[str, Any]:
    """Run ``command`` in a fresh process; its wall seconds, peak RSS (bytes) and exit code."""
    proc = subprocess.run([sys.executable, "-c", LAUNCH, *command], capture_output=True, text=True)
    code, peak, seconds = proc.stdout.split()
    out = {"seconds": round(float(seconds), 2), "peak_rss_bytes": int(peak), "exit": int(code)}
    if out["exit"] != 0:
        out["stderr_tail"] = proc.stderr[-600:]
    return out


def estimate(recipe_file: Path, streamed: bool) -> int:
    """compressor's own up-front estimate of the run's peak memory (compressor/budget.py), to set beside the
    measured peak: it must not be below it."""
    from compressor.budget import estimate_run, estimate_stream
    from compressor.safetensors_io import read_header
    from compressor.passes import get_pass
    from compressor.pipeline import _source_bytes
    from compressor.recipe import load_recipe

    recipe = load_recipe(recipe_file)
    passes = [get_pass(step.name)(step.config, step.index) for step in recipe.steps]
    if streamed:
        from compressor.sources import lazy_source

        spans = [v["data_offsets"][1] - v["data_offsets"][0] for f in Path(recipe.model.path).glob("*.safetensors")
                 for k, v in read_header(f)[0].items() if k != "__metadata__"]
        model, _ = lazy_source(recipe.model, recipe.base_dir, recipe.seed)  # on meta: what a layer-wise pass holds
        by_layer = max([p.stream_memory(model) for p in passes] or [0])
        return estimate_stream(sum(spans), spans, 2 if (os.cpu_count() or 1) > 1 else 1, by_layer=by_layer).peak
    return estimate_run(_source_bytes(recipe) or 0, passes, recipe.export.onnx is not None).peak


# What each side pays before it reads a byte: the imports (compress run: torch, transformers and the model's
# modeling code, to build its module on the meta device; the yardstick: torch and safetensors). Each ends as its
# run does: `compress` skips the interpreter's teardown (compressor.cli.console; 0.45 s with transformers), the
# yardstick does not.
STARTUP = {
    "compress_run": "import compressor.process; compressor.process.claim(); "
                    "from compressor.sources.hf import import_transformers; import compressor.pipeline, "
                    "compressor.stream; import_transformers().LlamaForCausalLM; import os; os._exit(0)",
    "safetensors_alone": "import torch, safetensors.torch",
}


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.25b")
    parser.add_argument("--recipes", default="cast,int8,int8-tp2", help=f"of {', '.join(RECIPES)}")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side, alternating (median wall time, "
                        "largest peak)")
    parser.add_argument("--stream", default="always", choices=["always", "never", "auto"],
                        help="compress run --stream (default always: the streaming this measures; never: the "
                        "whole-model run, for comparison)")
    parser.add_argument("--keep", type=Path, help="build the models here and keep them (default: a temporary dir)")
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if set(sizes) - set(SIZES) or set(recipes) - set(RECIPES):
        parser.error(f"sizes are {', '.join(SIZES)}; recipes are {', '.join(RECIPES)}")

    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from compressor.cpu import machine_cpu

    result: dict[str, Any] = {"cpu": machine_cpu(), "memory_total_bytes": os.sysconf("SC_PAGE_SIZE")
                              * os.sysconf("SC_PHYS_PAGES"), "versions": {"torch": torch.__version__,
                                                                         "transformers": transformers.__version__},
                              "targets": {"peak_rss_bytes": 1.5e9, "seconds_over_yardstick": 1.5},
                              "fresh_memory_mb_per_s": {"start": fresh_memory_rate()}, "sizes": {}}
    started = time.perf_counter()
    # The median of three starts of each side: at these sizes they are much of either's time.
    result["startup_seconds"] = {k: sorted(measured([sys.executable, "-c", code])["seconds"] for _ in range(3))[1]
                                 for k, code in STARTUP.items()}
    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp_name:
        tmp = Path(tmp_name)
        root = args.keep or tmp
        for size in sizes:
            src = root / f"llama-{size}"
            if not (src / "config.json").is_file():
                make_llama(src, size)
            import safetensors

            params = 0
            for file in src.glob("*.safetensors"):
                with safetensors.safe_open(str(file), "pt") as f:
                    for key in f.keys():
                        params += _numel(f.get_slice(key).get_shape())
            rows: dict[str, Any] = {}
            for recipe in recipes:
                recipe_file = tmp / f"{size}-{recipe}.yaml"
                recipe_file.write_text(f"name: {size}-{recipe}\nmodel: {{source: hf, path: {json.dumps(str(src))}, "
                                       f"auto_class: AutoModelForCausalLM}}\npasses:\n{RECIPES[recipe]}")
                out, yard_out = tmp / f"out-{size}-{recipe}", tmp / f"yard-{size}-{recipe}"
                runs, yards = [], []
                for _ in range(args.repeat):  # A B A B: both sides see the same drifts of a shared machine
                    for path in (out, yard_out):
                        subprocess.run(["rm", "-rf", str(path)], check=False)
                    runs.append(measured([sys.executable, "-m", "compressor", "run", str(recipe_file), "-o", str(out),
                                          "-q", "--stream", args.stream]))
                    runs[-1]["bytes_written"] = tree_bytes(out) if out.exists() else 0
                    yards.append(measured([sys.executable, "-c", YARDSTICK, str(src), str(yard_out), recipe]))
                    yards[-1]["bytes_written"] = tree_bytes(yard_out)
                run, yard = _median(runs), _median(yards)
                run["estimated_peak_bytes"] = estimate(recipe_file, args.stream != "never")
                start = result["startup_seconds"]
                work = (run["seconds"] - start["compress_run"]) / max(yard["seconds"] - start["safetensors_alone"],
                                                                       1e-3)
                rows[recipe] = {"stream": args.stream, "compress_run": run, "safetensors_alone": yard,
                                "seconds_over_yardstick": round(run["seconds"] / yard["seconds"], 2),
                                "seconds_over_yardstick_after_imports": round(work, 2),
                                "peak_rss_over_source_bytes": round(run["peak_rss_bytes"] / tree_bytes(src), 2),
                                "meets_targets": bool(run["exit"] == 0 and run["peak_rss_bytes"] <= 1.5e9
                                                      and run["seconds"] <= 1.5 * yard["seconds"])}
                for path in (out, yard_out):
                    subprocess.run(["rm", "-rf", str(path)], check=False)
            result["sizes"][size] = {"parameters": params, "source_bytes": tree_bytes(src), "recipes": rows}
    result["fresh_memory_mb_per_s"]["end"] = fresh_memory_rate()
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    result["self_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result, indent=2))


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's runs as one: the median wall time, the largest peak, every run's seconds, the first failure."""
    failed = [r for r in runs if r["exit"] != 0]
    out = dict(failed[0] if failed else runs[0])
    out["seconds"] = sorted(r["seconds"] for r in runs)[len(runs) // 2]
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    out["seconds_each"] = [r["seconds"] for r in runs]
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


if __name__ == "__main__":
    main()
