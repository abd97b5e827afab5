"""Loading onto a GPU: compressor.load(device="cuda") (parallel shard threads, pinned double buffers, non-blocking
copies) against loading on the CPU and calling .to("cuda"), and against transformers' from_pretrained onto CUDA.

Each measurement runs in a fresh process, cold (the artifact's files evicted from the page cache first) or warm,
alternating the methods so machine noise hits all alike. Prints JSON with medians, spreads and ratios.
Usage: python benchmarks/load_cuda.py [--rounds N] [--shard-size 16MB]
(builds recipes/minilm-fp16.yaml, sharded, into a temporary directory). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_child, summarize  # noqa: E402

CHILD = r"""
import json, sys, time
d, how, cold = sys.argv[1], sys.argv[2], sys.argv[3] == "cold"
import torch, transformers, compressor, compressor.loading
from transformers.models.bert import modeling_bert  # import cost paid before timing, for every method
from compressor.evaluate import pagecache
from pathlib import Path
torch.zeros(1, device="cuda"); torch.cuda.synchronize()  # CUDA context created before timing
inputs = {k: v.cuda() for k, v in compressor.loading.load_example_inputs(d).items()}
if cold:
    pagecache.evict(p for p in Path(d).iterdir() if p.is_file())
t0 = time.perf_counter()
if how == "compressor-cuda":
    model = compressor.load(d, device="cuda")
elif how == "compressor-cpu-then-to":
    model = compressor.load(d).to("cuda")
else:
    model = transformers.AutoModel.from_pretrained(d, dtype="auto", device_map="cuda").eval()
torch.cuda.synchronize()
t1 = time.perf_counter()
with torch.inference_mode():
    model(**inputs)
torch.cuda.synchronize()
t2 = time.perf_counter()
print(json.dumps({"load_ms": (t1 - t0) * 1e3, "first_inference_ms": (t2 - t1) * 1e3,
                  "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}))
"""

METHODS = ("compressor-cuda", "compressor-cpu-then-to", "transformers-device-map")


def measure(artifact: Path, how: str, mode: str) -> dict[str, float]:
    return run_child(CHILD, str(artifact), how, mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shard-size", default="16MB")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device available"}))
        return
    from pydantic import ByteSize, TypeAdapter

    from compressor.log import Reporter
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "minilm-fp16"
        recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "minilm-fp16.yaml")
        export = recipe.export.model_copy(update={"safetensors": recipe.export.safetensors.model_copy(
            update={"max_shard_size": TypeAdapter(ByteSize).validate_python(args.shard_size)})})
        recipe = recipe.model_copy(update={"evaluate": None, "gates": None, "export": export})
        run_recipe(recipe, artifact, Reporter(quiet=True))
        shards = len(json.loads((artifact / "manifest.json").read_text())["model"]["weights"])
        result: dict[str, object] = {"gpu": torch.cuda.get_device_name(0), "shards": shards, "rounds": args.rounds}
        for mode in ("cold", "warm"):
            runs: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
            for i in range(args.rounds):
                for how in METHODS if i % 2 == 0 else reversed(METHODS):
                    runs[how].append(measure(artifact, how, mode))
            stats = {how: summarize(r) for how, r in runs.items()}
            base = stats["compressor-cuda"]["load_ms"]["median"]
            stats["load_ratio_vs_compressor_cuda"] = {how: round(stats[how]["load_ms"]["median"] / base, 2)
                                                      for how in METHODS}
            result[mode] = stats
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
