"""Load time of an artifact: compressor.load against transformers' from_pretrained, safetensors and torch.load, warm
and cold, to ready and to the end of the first forward pass (issue #20).

Subjects (built into a temporary directory first, or `--keep DIR`):
- `minilm`: all-MiniLM-L6-v2 (the zoo's), float32 safetensors, written by `compress run` with no passes;
- `minilm-fp16`: the same cast to float16;
- `minilm-codebook`: recipes/minilm-deep-compression.yaml's `share` pass (4-bit k-means codebooks) without its
  recovery, which moves centroids but not the layout: the loader decodes the same encodings
  (`--deep-compression DIR` measures a built artifact instead);
- `minilm-sparse`: magnitude pruning to 50 % (the `sparse` encoding);
- `llama-0.25b`, `llama-1b`: config-sized Llamas (benchmarks/_common.py, random weights), cast to float16;
- `llama-0.25b-bf16`, `llama-1b-bf16`: the same cast to bfloat16 (torch's CPU float16 matrix product has no fast
  kernel on CPUs without avx512_fp16 or AMX: a float16 forward pass there can take longer than the disk's read).

Loaders, each in a fresh process with torch, transformers, compressor and the model's modeling code imported
before the clock starts:
- `compressor`: compressor.load(artifact) (Llamas: also with `read_ahead=False`, to show what reading ahead gives);
- `from_pretrained`: AutoModel / AutoModelForCausalLM.from_pretrained(artifact, torch_dtype="auto") (the same
  weights file: an artifact directory is a Hugging Face directory);
- `load_file`: safetensors.torch.load_file (safetensors 0.8: tensors on a private map of the file, read in part
  when it returns: `resident_at_end` below);
- `safe_open`: safetensors.safe_open, get_tensor for every name (the same);
- `torch_load_mmap`: torch.load(mmap=True, weights_only=True) of the same state dict saved by torch.save;
- `read`: the weight files' bytes, read in order through one 16 MB buffer with the next 64 MB always queued
  (posix_fadvise(WILLNEED)): the disk's own time as fast as one process gets it, the cold yardstick.
Each run also records the private anonymous memory added by the time the weights are ready (`anon_mb_at_ready`: a
copy's cost; mapped pages are the page cache's). Module loaders run a first forward pass (MiniLM: the artifact's example inputs; Llama: 16 tokens, batch 1).

Cold runs evict the subject's files with posix_fadvise(DONTNEED) and check with mincore what stayed resident
(`resident_after_evict`), after `--pause` seconds of rest; warm runs read them first. Loaders alternate within each
round (A B .. B A). Each ratio is given as the ratio of medians and as the median of the ratios within rounds.

Targets: warm, compressor.load at most 0.5x from_pretrained (MiniLM, llama-0.25b); cold, compressor.load to the end
of the first forward at most 1.3x the fastest loader that reads every byte (both Llamas): `read`, and `load_file`
or `safe_open` only where the page cache holds every byte of the weights when they return (`resident_at_end`,
by mincore; safetensors 0.8 returns lazily mapped tensors after reading about 70 % of a 1.1B Llama's bytes, each
tensor's first read-ahead window); the codebook and sparse MiniLM cold at most 2x the float16
one (to the end of the first forward). Prints JSON with the CPU.

Usage: python benchmarks/load.py [--only minilm,llama-0.25b,...] [--rounds 3] [--keep DIR] [--deep-compression DIR]
       [--as-avx2]
Quick check: python benchmarks/load.py --only llama-tiny --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fresh_memory_rate, make_llama, spread  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# --as-avx2: the libraries' own switches down to AVX2, for a machine that has more (no AVX2-only CPU was lent). A
# float16 matrix product then has no fast kernel, as on such a CPU, and the first forward pass is bound by the cores.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
FULL_READ = 0.99  # of the weight files in the page cache when the clock stops: a loader that read every byte
KEYS = ("ready_ms", "first_forward_end_ms", "anon_mb_at_ready")  # what each measuring child reports
MINILM = "name: {name}\nmodel: {{source: zoo, name: minilm}}\npasses:\n{passes}"
LLAMA = "name: {name}\nmodel: {{source: hf, path: {path}, auto_class: AutoModelForCausalLM}}\npasses:\n{passes}"
SUBJECTS: dict[str, dict[str, Any]] = {
    "minilm": {"recipe": MINILM, "passes": "  []\n", "loaders": ["compressor", "from_pretrained", "load_file",
                                                                "safe_open", "torch_load_mmap", "read"]},
    "minilm-fp16": {"recipe": MINILM, "passes": "  - cast: {dtype: float16}\n", "loaders": ["compressor", "read"]},
    "minilm-codebook": {"recipe": MINILM, "loaders": ["compressor", "read"], "passes": (
        "  - share:\n      modules: [Linear, Embedding, LayerNorm]\n"
        "      bits: {\"pooler.*\": 2, LayerNorm: 8, Embedding: 4, Linear: 4}\n      init: density\n"
        "      include_bias: true\n")},
    "minilm-sparse": {"recipe": MINILM, "passes": "  - prune: {sparsity: 0.5}\n", "loaders": ["compressor", "read"]},
}
for _size in ("tiny", "0.25b", "1b"):
    SUBJECTS[f"llama-{_size}"] = {"recipe": LLAMA, "size": _size, "passes": "  - cast: {dtype: float16}\n",
                                  "loaders": ["compressor", "compressor-no-read-ahead", "from_pretrained",
                                              "load_file", "safe_open", "torch_load_mmap", "read"]}
    # The same weights in bfloat16: the dtype CPUs without float16 kernels compute fast (this loader's own time,
    # apart from a float16 forward pass that is slower than the disk)
    SUBJECTS[f"llama-{_size}-bf16"] = {"recipe": LLAMA, "size": _size, "passes": "  - cast: {dtype: bfloat16}\n",
                                       "loaders": ["compressor", "load_file", "safe_open", "read"]}
DEFAULT = ["minilm", "minilm-fp16", "minilm-codebook", "minilm-sparse", "llama-0.25b", "llama-1b", "llama-0.25b-bf16",
           "llama-1b-bf16"]

CHILD = r"""
import json, os, sys, time
from pathlib import Path
d, loader, mode, llama, pt = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1", Path(sys.argv[5])
import torch, transformers, safetensors.torch, compressor, compressor.loading
from compressor.evaluate import pagecache
from compressor.evaluate.subjects import preimport
preimport({"kind": "artifact", "path": str(d)})  # what the evaluator's load probe imports before its clock
if llama:
    from transformers.models.llama import modeling_llama
    inputs = {"input_ids": torch.arange(1, 17)[None]}
else:
    from transformers.models.bert import modeling_bert
    inputs = compressor.loading.load_example_inputs(d)
weights = [d / w for w in json.loads((d / "manifest.json").read_text())["model"]["weights"]
           if w.endswith(".safetensors")]  # one file, or the shards of a large model
files = [p for p in d.rglob("*") if p.is_file()] + ([pt] if pt.is_file() else [])
resident = None
if mode == "cold":
    pagecache.evict(files)
    resident = pagecache.resident_fraction(files)
else:
    pagecache.warm(files)
def anon_mb():  # private anonymous memory: what a copy costs (mapped file pages are the page cache's, shared)
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
a0 = anon_mb()
t0 = time.perf_counter()
model = None
if loader == "compressor":
    model = compressor.load(d)
elif loader == "compressor-no-read-ahead":
    model = compressor.load(d, read_ahead=False)
elif loader == "from_pretrained":
    auto = transformers.AutoModelForCausalLM if llama else transformers.AutoModel
    model = auto.from_pretrained(str(d), torch_dtype="auto").eval()
elif loader == "load_file":
    state = {k: v for w in weights for k, v in safetensors.torch.load_file(str(w)).items()}
elif loader == "safe_open":
    state = {}
    for w in weights:
        with safetensors.safe_open(str(w), "pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
elif loader == "torch_load_mmap":
    state = torch.load(str(pt), mmap=True, weights_only=True)
elif loader == "read":
    # The disk's own time, as fast as one process gets it: each file read in order through one reused buffer (the
    # time of faulting in a copy is not the disk's), the next 64 MB always queued ahead (WILLNEED, in pieces the
    # kernel takes whole: compressor.loading.readahead.advice_limit). The fastest way found (docs/benchmarks.md):
    # one WILLNEED over the whole file reads only its first piece (Linux drops the rest silently) and took 4-5x
    # as long, the kernel's sequential read-ahead alone 1.3x.
    from compressor.loading.readahead import advice_limit
    buf = memoryview(bytearray(16 << 20))
    for w in weights:
        fd, size, piece = os.open(w, os.O_RDONLY), w.stat().st_size, advice_limit(w)
        at = queued = 0
        while at < size:
            while queued < min(size, at + (64 << 20)):
                os.posix_fadvise(fd, queued, min(piece, size - queued), os.POSIX_FADV_WILLNEED)
                queued += piece
            at += os.preadv(fd, [buf], at)
        os.close(fd)
t1 = time.perf_counter()
anon = anon_mb() - a0
if model is not None:
    with torch.inference_mode():
        model(**inputs)
t2 = time.perf_counter()
# What the loader had read when the clock stopped: safetensors' load_file and safe_open return lazily mapped
# tensors after reading about each tensor's first read-ahead window, not every byte.
read = pagecache.resident_fraction(weights) if mode == "cold" else None
print(json.dumps({"ready_ms": (t1 - t0) * 1e3, "first_forward_end_ms": (t2 - t0) * 1e3 if model is not None
                  else None, "anon_mb_at_ready": anon, "resident_after_evict": resident, "resident_at_end": read}))
"""


def build(subject: str, root: Path, deep_compression: Path | None) -> Path:
    """The subject's artifact directory (built once; kept under ``root``)."""
    spec = SUBJECTS[subject]
    out = root / subject
    if subject == "minilm-codebook" and deep_compression:
        return deep_compression
    if (out / "manifest.json").is_file() and ("torch_load_mmap" not in spec["loaders"]
                                              or (root / f"{subject}.pt").is_file()):
        return out
    path = ""
    if "size" in spec:
        src = root / f"llama-{spec['size']}-source"
        if not (src / "config.json").is_file():
            make_llama(src, spec["size"])
        path = json.dumps(str(src))
    if (out / "manifest.json").is_file():  # built, but not its torch.save copy
        _save_pt(out, root / f"{subject}.pt")
        return out
    recipe = root / f"{subject}.yaml"
    recipe.write_text(spec["recipe"].format(name=subject, path=path, passes=spec["passes"]))
    subprocess.run([sys.executable, "-m", "compressor", "run", str(recipe), "-o", str(out), "-q"], check=True,
                   stdout=subprocess.DEVNULL)
    if "torch_load_mmap" in spec["loaders"]:
        _save_pt(out, root / f"{subject}.pt")
    return out


def _save_pt(artifact: Path, pt: Path) -> None:
    """The artifact's state dict saved by torch.save for torch.load, outside the artifact (its manifest does not
    list it)."""
    import torch
    from safetensors.torch import load_file

    weights = json.loads((artifact / "manifest.json").read_text())["model"]["weights"]
    torch.save({k: v for w in weights if w.endswith(".safetensors") for k, v in load_file(str(artifact / w)).items()},
               str(pt))


def measure(artifact: Path, pt: Path, loader: str, mode: str, llama: bool) -> dict[str, Any]:
    """One load in a fresh process."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(artifact), loader, mode, "1" if llama else "0", str(pt)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{artifact.name} {loader} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(DEFAULT), help=f"subjects, of {', '.join(SUBJECTS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="build the artifacts here and keep them (default: temporary)")
    parser.add_argument("--deep-compression", type=Path, help="a built minilm-deep-compression artifact to use as "
                        "minilm-codebook")
    parser.add_argument("--modes", default="warm,cold")
    parser.add_argument("--json", type=Path, help="also write the results here, after each subject")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds of rest before each cold run: a shared "
                        "virtual disk reads slower right after a burst of reads, which would charge one loader "
                        "for the one before it")
    parser.add_argument("--as-avx2", action="store_true", help="compute as a CPU with AVX2 and nothing newer "
                        "would: torch's, oneDNN's and MKL's own switches (AVX2_ONLY), set for every measured process. "
                        "The arithmetic's speed only, not the memory or the disk of such a machine")
    args = parser.parse_args()
    if args.as_avx2:
        os.environ.update(AVX2_ONLY)  # before torch is imported here or in any child
    subjects = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(subjects) - set(SUBJECTS):
        parser.error(f"subjects are {', '.join(SUBJECTS)}")
    modes = [m for m in args.modes.split(",") if m]

    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from compressor.cpu import machine_cpu

    started = time.perf_counter()
    result: dict[str, Any] = {"cpu": machine_cpu(), "versions": {"torch": torch.__version__,
                                                                "transformers": transformers.__version__},
                              "rounds": args.rounds, "fresh_memory_mb_per_s": {"start": fresh_memory_rate()},
                              "subjects": {}}
    # The kernels torch picks on this machine (AVX2 with --as-avx2, whatever flags the CPU lists)
    result["cpu"]["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    if args.as_avx2:
        result["cpu"]["as_avx2"] = AVX2_ONLY
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            artifact = build(subject, root, args.deep_compression)
            llama = subject.startswith("llama")
            loaders = SUBJECTS[subject]["loaders"]
            runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {ld: [] for ld in loaders} for m in modes}
            for mode in modes:
                for i in range(args.rounds):
                    for loader in loaders if i % 2 == 0 else loaders[::-1]:  # alternate, A B .. B A
                        if mode == "cold":
                            time.sleep(args.pause)
                        runs[mode][loader].append(measure(artifact, root / f"{subject}.pt", loader, mode, llama))
            weights = json.loads((artifact / "manifest.json").read_text())["model"]["weights"]
            result["subjects"][subject] = {
                "weights_bytes": sum((artifact / w).stat().st_size for w in weights if w.endswith(".safetensors")),
                **{mode: {loader: spread(r, KEYS) for loader, r in by.items()} for mode, by in runs.items()}}
            if args.json:  # what is measured so far survives a later failure
                args.json.write_text(json.dumps(result, indent=2))
    result["ratios"] = _ratios(result["subjects"])
    result["fresh_memory_mb_per_s"]["end"] = fresh_memory_rate()
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def _ratios(subjects: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each as a ratio of medians with its limit."""
    def med(subject: str, mode: str, loader: str, key: str) -> dict[str, Any]:
        return (((subjects.get(subject) or {}).get(mode) or {}).get(loader) or {}).get(key) or {}

    out: dict[str, Any] = {}

    def ratio(name: str, a: dict[str, Any], b: dict[str, Any], limit: float | None) -> None:
        """``limit`` None: shown for comparison, not one of the issue's targets (no ``at_most``, no ``met``)."""
        if a and b and b["median"]:
            r = a["median"] / b["median"]
            # Runs of one round were back to back: their ratios cancel the drift of a shared disk between rounds.
            paired = statistics.median(x / y for x, y in zip(a["each"], b["each"]))
            out[name] = {"ratio_of_medians": round(r, 2), "median_of_paired_ratios": round(paired, 2)}
            if limit is not None:
                out[name].update(at_most=limit, met=max(r, paired) <= limit)

    for s in ("minilm", "llama-0.25b", "llama-1b", "llama-tiny", "llama-0.25b-bf16", "llama-1b-bf16",
              "llama-tiny-bf16"):
        ratio(f"{s}: warm ready, compressor / from_pretrained", med(s, "warm", "compressor", "ready_ms"),
              med(s, "warm", "from_pretrained", "ready_ms"), 0.5)
        # The disk's time: the fastest, by median, of the loaders that had read every byte when they were ready
        # (in every cold run: `read`; load_file and safe_open only where a safetensors release reads them all).
        cold = (subjects.get(s) or {}).get("cold") or {}
        readers = [med(s, "cold", r, "ready_ms") for r in ("read", "load_file", "safe_open")
                   if (cold.get(r) or {}).get("resident_at_end", 0) >= FULL_READ]
        readers = [r for r in readers if r]
        ratio(f"{s}: cold to first forward end, compressor / fastest full read",
              med(s, "cold", "compressor", "first_forward_end_ms"),
              min(readers, key=lambda r: r["median"]) if readers else {},
              # The target is the Llamas' (float16: a forward pass a disk can keep up with); MiniLM's float32
              # forward pass takes longer than its file's read, which its row shows
              1.3 if s.startswith("llama") else None)
        ratio(f"{s}: cold to first forward end, compressor / compressor without read-ahead",
              med(s, "cold", "compressor", "first_forward_end_ms"),
              med(s, "cold", "compressor-no-read-ahead", "first_forward_end_ms"), 1.0)
    for s in ("minilm-codebook", "minilm-sparse"):
        ratio(f"{s}: cold to first forward end, over minilm-fp16", med(s, "cold", "compressor", "first_forward_end_ms"),
              med("minilm-fp16", "cold", "compressor", "first_forward_end_ms"), 2.0)
    return out


if __name__ == "__main__":
    main()
