"""Loading onto a GPU (issue #20): compressor.load(device="cuda") (shard threads, pinned double buffers,
non-blocking copies) against loading on the CPU and calling .to("cuda"), transformers' from_pretrained onto CUDA,
and safetensors' load_file onto CUDA (reads every byte and copies it to the GPU: the yardstick).

Subjects (built into a temporary directory first, or `--keep DIR`):
- `minilm-fp16`: the zoo's MiniLM cast to float16, sharded at `--shard-size` (16MB: several shards, read in parallel);
- `llama-0.25b`, `llama-1b` (and `llama-tiny`, a check of the script): config-sized Llamas (benchmarks/_common.py,
  random weights) cast to float16, as benchmarks/load.py builds them.

Each measurement runs in a fresh process with torch, transformers, compressor and the model's modeling code imported
and the CUDA context created before the clock starts; cold runs evict the artifact's files from the page cache
first (`resident_after_evict` says what stayed). Loaders alternate within each round (A B .. B A). Times: to ready
(weights on the GPU, synchronized) and to the end of the first forward pass; `peak_gpu_mb` is torch's peak
allocation. Prints JSON with medians, spreads and ratios (of medians, and the median of the ratios within rounds).

Usage: python benchmarks/load_cuda.py [--only minilm-fp16,llama-0.25b,llama-1b] [--rounds 3] [--json PATH]
`--device cpu` runs the same script on the CPU (a check of the script itself where there is no GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_llama, spread  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("ready_ms", "first_forward_end_ms", "peak_gpu_mb")  # what each measuring child reports
LOADERS = ("compressor", "compressor-cpu-then-to", "from_pretrained", "load_file")
SUBJECTS = ("minilm-fp16", "llama-tiny", "llama-0.25b", "llama-1b")

CHILD = r"""
import json, sys, time
from pathlib import Path
d, loader, mode, dev = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
llama = (d / "config.json").is_file() and json.loads((d / "config.json").read_text()).get("model_type") == "llama"
import torch, transformers, safetensors.torch, compressor, compressor.loading
from compressor.evaluate import pagecache
if llama:
    from transformers.models.llama import modeling_llama  # import cost paid before timing, for every loader
    inputs = {"input_ids": torch.arange(1, 17)[None]}
else:
    from transformers.models.bert import modeling_bert
    inputs = compressor.loading.load_example_inputs(d)
cuda = dev == "cuda"
def sync():
    if cuda:
        torch.cuda.synchronize()
if cuda:
    torch.zeros(1, device="cuda"); sync()  # the CUDA context exists before the clock starts
inputs = {k: v.to(dev) for k, v in inputs.items()}
weights = [d / w for w in json.loads((d / "manifest.json").read_text())["model"]["weights"]
           if w.endswith(".safetensors")]
files = [p for p in d.rglob("*") if p.is_file()]
resident = None
if mode == "cold":
    pagecache.evict(files)
    resident = pagecache.resident_fraction(files)
else:
    pagecache.warm(files)
t0 = time.perf_counter()
model = None
if loader == "compressor":
    model = compressor.load(d, device=dev)
elif loader == "compressor-cpu-then-to":
    model = compressor.load(d).to(dev)
elif loader == "from_pretrained":
    auto = transformers.AutoModelForCausalLM if llama else transformers.AutoModel
    model = auto.from_pretrained(str(d), dtype="auto", device_map=dev).eval()
elif loader == "load_file":
    state = {k: v for w in weights for k, v in safetensors.torch.load_file(str(w), device=dev).items()}
sync()
t1 = time.perf_counter()
if model is not None:
    with torch.inference_mode():
        model(**inputs)
    sync()
t2 = time.perf_counter()
print(json.dumps({"ready_ms": (t1 - t0) * 1e3, "first_forward_end_ms": (t2 - t0) * 1e3 if model is not None
                  else None, "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
                  "resident_after_evict": resident}))
"""


def build(subject: str, root: Path, shard_size: str) -> Path:
    """The subject's float16 artifact (built once under ``root``)."""
    out = root / subject
    if (out / "manifest.json").is_file():
        return out
    recipe = root / f"{subject}.yaml"
    if subject == "minilm-fp16":
        recipe.write_text(f"name: minilm-fp16\nmodel: {{source: zoo, name: minilm}}\npasses:\n"
                          f"  - cast: {{dtype: float16}}\nexport: {{safetensors: {{max_shard_size: {shard_size}}}}}\n")
    else:
        src = root / f"{subject}-source"
        if not (src / "config.json").is_file():
            make_llama(src, subject.removeprefix("llama-"))
        recipe.write_text(f"name: {subject}\nmodel: {{source: hf, path: {json.dumps(str(src))}, "
                          f"auto_class: AutoModelForCausalLM}}\npasses:\n  - cast: {{dtype: float16}}\n")
    subprocess.run([sys.executable, "-m", "compressor", "run", str(recipe), "-o", str(out), "-q"], check=True,
                   stdout=subprocess.DEVNULL, cwd=ROOT)
    return out


def measure(artifact: Path, loader: str, mode: str, device: str) -> dict[str, Any]:
    """One load in a fresh process."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(artifact), loader, mode, device], capture_output=True,
                         text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{artifact.name} {loader} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="minilm-fp16,llama-0.25b,llama-1b", help=f"of {', '.join(SUBJECTS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="cold,warm")
    parser.add_argument("--shard-size", default="16MB", help="minilm-fp16's shard size")
    parser.add_argument("--keep", type=Path, help="build the artifacts here and keep them (default: temporary)")
    parser.add_argument("--json", type=Path, help="also write the results here, after each subject")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    subjects = [s for s in args.only.split(",") if s]
    if set(subjects) - set(SUBJECTS):
        parser.error(f"subjects are {', '.join(SUBJECTS)}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device available"}))
        return
    sys.path.insert(0, str(ROOT))
    from compressor.cpu import machine_cpu

    started = time.perf_counter()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                              "cpu": machine_cpu(), "torch": torch.__version__, "rounds": args.rounds,
                              "subjects": {}}
    with tempfile.TemporaryDirectory(prefix="bench-load-cuda-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            artifact = build(subject, root, args.shard_size)
            weights = [w for w in json.loads((artifact / "manifest.json").read_text())["model"]["weights"]
                       if w.endswith(".safetensors")]  # not the index of a sharded model
            entry: dict[str, Any] = {"weights_bytes": sum((artifact / w).stat().st_size for w in weights),
                                     "shards": len(weights)}
            for mode in [m for m in args.modes.split(",") if m]:
                runs: dict[str, list[dict[str, Any]]] = {ld: [] for ld in LOADERS}
                for i in range(args.rounds):
                    for loader in LOADERS if i % 2 == 0 else LOADERS[::-1]:
                        runs[loader].append(measure(artifact, loader, mode, args.device))
                entry[mode] = {loader: spread(r, KEYS) for loader, r in runs.items()}
                entry[mode]["ratios"] = _ratios(entry[mode])
            result["subjects"][subject] = entry
            if args.json:  # what is measured so far survives a later failure
                args.json.write_text(json.dumps(result, indent=2))
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def _ratios(by: dict[str, Any]) -> dict[str, Any]:
    """compressor's time over each other loader's: to ready, and to the end of the first forward pass (load_file's
    ready: it reads every byte onto the GPU and builds no model)."""
    out: dict[str, Any] = {}

    def ratio(name: str, a: dict[str, Any] | None, b: dict[str, Any] | None) -> None:
        if a and b and b["median"]:
            paired = statistics.median(x / y for x, y in zip(a["each"], b["each"]))
            out[name] = {"ratio_of_medians": round(a["median"] / b["median"], 2),
                         "median_of_paired_ratios": round(paired, 2)}

    mine = by["compressor"]
    for other in ("compressor-cpu-then-to", "from_pretrained"):
        ratio(f"ready, compressor / {other}", mine.get("ready_ms"), by[other].get("ready_ms"))
        ratio(f"first forward end, compressor / {other}", mine.get("first_forward_end_ms"),
              by[other].get("first_forward_end_ms"))
    ratio("ready, compressor / load_file", mine.get("ready_ms"), by["load_file"].get("ready_ms"))
    ratio("first forward end, compressor / load_file ready", mine.get("first_forward_end_ms"),
          by["load_file"].get("ready_ms"))
    return out


if __name__ == "__main__":
    main()
