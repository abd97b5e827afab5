"""Load time and memory of an artifact: compressor.load (mmap, zero-copy) vs transformers.from_pretrained.

Each measurement runs in a fresh process, alternating A B A B so machine noise hits both alike. Prints JSON with
medians, spreads and ratios. Usage: python benchmarks/load_mmap.py [ARTIFACT_DIR] [--rounds N]
(default: builds recipes/minilm-fp16.yaml into a temporary directory first).
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
d, how = sys.argv[1], sys.argv[2]

def anon_mb():  # private anonymous memory: what a copy costs; mapped file pages are reclaimable and shared
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

import torch, transformers, compressor, compressor.loading
from transformers.models.bert import modeling_bert  # import cost paid before timing, for both
inputs = compressor.loading.load_example_inputs(d)
a0 = anon_mb()
t0 = time.perf_counter()
model = compressor.load(d) if how == "compressor" else transformers.AutoModel.from_pretrained(d).eval()
t1 = time.perf_counter()
a1 = anon_mb()
with torch.no_grad():
    model(**inputs)
t2 = time.perf_counter()
print(json.dumps({"load_ms": (t1 - t0) * 1e3, "first_inference_ms": (t2 - t1) * 1e3,
                  "anon_memory_after_load_mb": a1 - a0}))
"""


def measure(artifact: Path, how: str) -> dict[str, float]:
    return run_child(CHILD, str(artifact), how)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifact", nargs="?", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact
        if artifact is None:
            from compressor.pipeline import run_recipe
            from compressor.recipe import load_recipe

            artifact = Path(tmp) / "minilm-fp16"
            recipe = Path(__file__).resolve().parent.parent / "recipes" / "minilm-fp16.yaml"
            from compressor.log import Reporter

            # The artifact only; the recipe's evaluation is what this script measures more narrowly.
            parsed = load_recipe(recipe).model_copy(update={"evaluate": None, "gates": None})
            run_recipe(parsed, artifact, Reporter(quiet=True))
        runs: dict[str, list[dict[str, float]]] = {"compressor": [], "transformers": []}
        for _ in range(args.rounds):
            for how in runs:  # alternate A B A B
                runs[how].append(measure(artifact, how))
        result = {how: summarize(r) for how, r in runs.items()}
        result["ratios_transformers_over_compressor"] = {
            k: round(result["transformers"][k]["median"] / result["compressor"][k]["median"], 2)
            for k in ("load_ms", "first_inference_ms")
        }
        result["artifact"] = str(args.artifact or "recipes/minilm-fp16.yaml (temporary build)")
        result["rounds"] = args.rounds
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
