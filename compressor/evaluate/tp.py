"""`compress eval ARTIFACT --tp N`: run a tensor-parallel artifact on N processes and compare it with itself
loaded whole.

Each process joins a torch.distributed process group (gloo on CPU, NCCL on CUDA, one GPU per rank), loads only its
rank file and the replicated tensors with ``compressor.load(dir, tp_rank=r, tp_world=N)``, and runs the evaluation
inputs; rank 0 hands its outputs back. The parent loads the same artifact whole (the rank files joined) and
compares: fidelity (cosine, max abs error), the task metric of both, and, per rank, which artifact files the
process mapped and their bytes (from /proc/self/maps, so the claim "each rank maps only its own file" is measured).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import CompressorError, UsageError
from ..log import Reporter
from ..manifest import TP_REPORT, Manifest

__all__ = ["evaluate_tp", "tp_summary_lines", "DEFAULT_MIN_COSINE"]

DEFAULT_MIN_COSINE = 0.9999


def _mapped_files(root: Path) -> list[str] | None:
    """Files under ``root`` this process has memory-mapped (Linux), relative to it; None where unknown."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    prefix = str(root.resolve()) + os.sep
    found = {line.split(maxsplit=5)[5] for line in lines if len(line.split(maxsplit=5)) == 6}
    return sorted(p[len(prefix):] for p in found if p.startswith(prefix))


def _worker(rank: int, world: int, artifact: str, backend: str, rendezvous: str, work: str, task: str | None,
            threads: int, new_tokens: int) -> None:
    """One rank: join the group, load this rank's slices, run every batch (and, for a causal LM, generate greedy
    continuations of the prompts, every rank stepping together); rank 0 saves the outputs."""
    import torch
    import torch.distributed as dist

    from ..loading import load

    from .accuracy import primary_output

    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world)
    try:
        start = time.perf_counter()
        model = load(artifact, tp_rank=rank, tp_world=world, device=device)
        loaded = time.perf_counter()
        mapped = _mapped_files(Path(artifact))
        batches = torch.load(Path(work) / "batches.pt", weights_only=True)
        outputs = []
        with torch.inference_mode():
            for batch in batches:
                moved = {k: v.to(device) for k, v in batch.items()}
                outputs.append(primary_output(model(**moved), moved, task).float().cpu())
        tokens = _generate(model, device, Path(work), new_tokens) if new_tokens else None
        ran = time.perf_counter()
        if rank == 0:
            torch.save(outputs, Path(work) / "outputs.pt")
            if tokens is not None:
                torch.save(torch.from_numpy(tokens), Path(work) / "tokens.pt")
        sizes = {f: (Path(artifact) / f).stat().st_size for f in (mapped or [])}
        stats = {"rank": rank, "load_seconds": round(loaded - start, 3), "run_seconds": round(ran - loaded, 3),
                 "mapped_files": mapped, "bytes_mapped": sum(sizes.values()) if mapped is not None else None}
        (Path(work) / f"rank{rank}.json").write_text(json.dumps(stats))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _generate(model: Any, device: Any, work: Path, new_tokens: int) -> Any:
    """Greedy tokens after the prompts saved in ``work`` (compressor.evaluate.lm's loop, the model's own cache)."""
    import torch

    from ..decoding import generate
    from .lm import TorchDecoder

    prompts = torch.load(work / "prompts.pt", weights_only=True).numpy()
    return generate(TorchDecoder(model, str(device)), prompts, None, new_tokens)


def evaluate_tp(artifact: Path, world: int, *, device: str = "cpu", spec: Any = None,
                min_cosine: float = DEFAULT_MIN_COSINE, log: Reporter | None = None) -> dict[str, Any]:
    """Run ``artifact`` tensor-parallel on ``world`` processes and compare with it loaded whole; writes
    tp-report.json into the artifact and returns the report (``passed`` False when the minimum cosine is below
    ``min_cosine``)."""
    from ..data.datasets import build_data
    from ..loading import load, load_example_inputs
    from ..recipe import EvaluateSpec
    from .accuracy import fidelity, run_outputs, task_metric
    from .report import _atomic_write, clean_json

    log = log or Reporter()
    artifact = artifact.resolve()
    manifest, plan = _checked(artifact, world, device)
    backend = "nccl" if device == "cuda" else "gloo"
    spec = spec or EvaluateSpec()
    task = manifest.task
    lm = task == "text-generation"
    if lm:  # next-token logits over windows of the text, and greedy continuations
        data, prompts = _lm_data(artifact, spec)
    else:
        data = build_data(spec.data, artifact=artifact, manifest=manifest,
                          example_inputs=load_example_inputs(artifact), base_dir=artifact)
        prompts = None
    new_tokens = spec.generation.new_tokens if lm else 0
    with log.step(f"running {artifact.name} on {world} ranks ({backend}) over {data.name}"
                  + (f", generating {len(prompts)} x {new_tokens} tokens" if lm else "")):
        sharded, ranks, seconds, tokens = _run_ranks(artifact, world, backend, data, task, prompts, new_tokens)
    with log.step("running the same artifact loaded whole"):
        whole_device = "cuda" if device == "cuda" else "cpu"
        whole = load(artifact, device=whole_device)
        reference = run_outputs(whole, data, whole_device, task)
        greedy = _compare_greedy(whole, whole_device, prompts, new_tokens, tokens) if lm else None
    classifier = data.metric == "top1_accuracy" or str(task or "").endswith("classification")
    fid = fidelity(reference, sharded, classifier)
    metric_whole, metric_tp = task_metric(data, reference), task_metric(data, sharded)
    weights = {f: (artifact / f).stat().st_size for f in [*plan["ranks"], plan["replicated"]]}
    rank_bytes = sum(weights[f] for f in plan["ranks"])
    for r, stats in enumerate(ranks):
        own = {plan["ranks"][r], plan["replicated"]}
        mapped = stats["mapped_files"]
        stats["maps_only_own_files"] = None if mapped is None else set(mapped) <= own
        # What the issue bounds: a rank's slices are 1/N of the split weights (a little more on the first ranks when
        # a vocabulary does not divide evenly).
        stats["own_file_share"] = round(weights[plan["ranks"][r]] / rank_bytes, 6)
    report = {
        "artifact": str(artifact),
        "tensor_parallel": world,
        "backend": backend,
        "device": device,
        "data": data.name,
        "family": plan.get("family"),
        "fidelity": fid,
        "metric": {"whole": metric_whole, "tensor_parallel": metric_tp},
        "min_cosine": min_cosine,
        "passed": fid["cos_min"] >= min_cosine and (greedy is None or greedy["exact"] == greedy["prompts"]),
        "greedy": greedy,
        "seconds": round(seconds, 2),
        "files": weights,
        "ranks": ranks,
    }
    _atomic_write(artifact / TP_REPORT, (json.dumps(clean_json(report), indent=2) + "\n").encode())
    return report


def _lm_data(artifact: Path, spec: Any) -> tuple[Any, Any]:
    """A causal LM's evaluation text as model inputs (each window but its last token) and its prompts."""
    import torch

    from ..data.lm_text import build_lm_text
    from .lm import prompt_batch

    from ..data.datasets import EvalData, tokenizer_for
    from ..loading import load_example_inputs
    from .lm_speed import check_prompt_lengths
    from .runner import artifact_config

    if tokenizer_for(artifact) is None:  # no text without a tokenizer: the example prompts
        example = load_example_inputs(artifact)
        ids, mask = example["input_ids"], example.get("attention_mask")
        rows = [r[m.bool()] if mask is not None else r for r, m in zip(ids, mask if mask is not None else ids)]
        width = min(min(len(r) for r in rows), spec.generation.prompt_tokens)
        windows = torch.stack([r[:width] for r in rows])
        batch = {"input_ids": windows, "attention_mask": torch.ones_like(windows)}
        return EvalData(name="example inputs", metric=None, batches=[batch]), windows
    check_prompt_lengths(spec.generation, artifact_config(artifact))
    data = build_lm_text(spec.data, spec.generation, artifact=artifact, data_file=None if spec.data.path is None
                         else _copied(artifact, spec.data.path))
    prompts = torch.from_numpy(prompt_batch(data, spec.generation.prompts, spec.generation.prompt_tokens))
    for batch in data.batches:
        ids = batch.pop("input_ids")[:, :-1]
        batch.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    data.metric = None  # the comparison is whole against sharded, logits and continuations
    return data, prompts


def _copied(artifact: Path, path: str) -> Path:
    """The artifact's copy of the recipe's evaluation text (`compress run` puts it in eval/)."""
    copied = artifact / "eval" / Path(path).name
    if not copied.is_file():
        raise UsageError(f"the evaluation text {path} is not in the artifact ({artifact}/eval/); re-run "
                         "`compress run`, which copies it there")
    return copied


def _compare_greedy(whole: Any, device: str, prompts: Any, new_tokens: int, tokens: Any) -> dict[str, Any]:
    """The whole model's greedy continuations against the ranks': how many are identical, token for token."""
    from ..decoding import generate
    from .lm import TorchDecoder

    expected = generate(TorchDecoder(whole, device), prompts.numpy(), None, new_tokens)
    got = tokens.numpy()
    same = (expected.shape == got.shape) and bool((expected == got).all())
    exact = int((expected == got).all(axis=1).sum()) if expected.shape == got.shape else 0
    return {"prompts": int(prompts.shape[0]), "prompt_tokens": int(prompts.shape[1]), "new_tokens": new_tokens,
            "exact": exact, "identical": same}


def _checked(artifact: Path, world: int, device: str) -> tuple[Manifest, dict[str, Any]]:
    """The manifest and plan of a tensor-parallel artifact whose bytes match its manifest, sharded for ``world``
    ranks, with ``world`` GPUs here for ``device`` cuda."""
    import torch

    from ..loading.tp import read_plan
    from ..manifest import check_files, read_manifest

    manifest = read_manifest(artifact)
    check_files(artifact, manifest, hashes=True)  # every byte is read anyway: check it is the recorded one
    if manifest.tensor_parallel is None:
        raise UsageError(f"{artifact} is not a tensor-parallel artifact; --tp needs one written by a recipe with a "
                         "`shard` pass")
    plan = read_plan(artifact, manifest)
    if int(plan["world"]) != world:
        raise UsageError(f"{artifact} is sharded for {plan['world']} ranks; run with --tp {plan['world']}")
    if device == "cuda" and (not torch.cuda.is_available() or torch.cuda.device_count() < world):
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise UsageError(f"--tp {world} on cuda needs {world} GPUs (one per rank, NCCL); this machine has "
                         f"{found}. Run it on CPU (gloo) with --device cpu")
    return manifest, plan


def _run_ranks(artifact: Path, world: int, backend: str, data: Any, task: str | None, prompts: Any,
               new_tokens: int) -> tuple[list[Any], list[dict[str, Any]], float, Any]:
    """Run the data through ``world`` spawned ranks: (rank 0's gathered outputs, each rank's stats, seconds, the
    greedy tokens after ``prompts`` or None)."""
    import torch
    import torch.multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // world)
    with tempfile.TemporaryDirectory(prefix="compress-tp-") as work:
        torch.save(data.batches, Path(work) / "batches.pt")
        if prompts is not None:
            torch.save(prompts, Path(work) / "prompts.pt")
        start = time.perf_counter()
        try:
            # A file in this run's own directory: no port to race other runs for.
            rendezvous = f"file://{Path(work) / 'rendezvous'}"
            mp.start_processes(_worker, args=(world, str(artifact), backend, rendezvous, work, task, threads, new_tokens),
                               nprocs=world, join=True, start_method="spawn")
        except mp.ProcessRaisedException as exc:
            raise CompressorError(f"a tensor-parallel rank failed:\n{exc}") from None
        except mp.ProcessExitedException as exc:
            raise CompressorError(f"a tensor-parallel rank died: {exc}") from None
        seconds = time.perf_counter() - start
        sharded = torch.load(Path(work) / "outputs.pt", weights_only=True)
        ranks = [json.loads((Path(work) / f"rank{r}.json").read_text()) for r in range(world)]
        tokens = torch.load(Path(work) / "tokens.pt", weights_only=True) if prompts is not None else None
    return sharded, ranks, seconds, tokens


def tp_summary_lines(report: dict[str, Any]) -> list[str]:
    """Human summary of a tensor-parallel evaluation."""
    fid = report["fidelity"]
    lines = [f"tp {report['tensor_parallel']} ({report['backend']}, {report['device']}): cos min {fid['cos_min']:.7f}, "
             f"max abs err {fid['max_abs_err']:.3g} vs the artifact loaded whole "
             f"({'pass' if report['passed'] else 'FAIL'}: min cosine >= {report['min_cosine']})"]
    greedy = report.get("greedy")
    if greedy:
        lines.append(f"greedy continuations: {greedy['exact']}/{greedy['prompts']} identical to the whole model's "
                     f"({greedy['new_tokens']} tokens after {greedy['prompt_tokens']}-token prompts)")
    whole, tp = report["metric"]["whole"], report["metric"]["tensor_parallel"]
    if whole and tp:
        lines.append(f"{whole['label']}: whole {whole['value']:.2f}, tensor-parallel {tp['value']:.2f}")
    for r in report["ranks"]:
        mapped = r["mapped_files"]
        which = ", ".join(mapped) if mapped is not None else "unknown"
        size = f"{r['bytes_mapped'] / 1e6:.2f} MB" if r["bytes_mapped"] is not None else "?"
        lines.append(f"rank {r['rank']}: mapped {size} ({which}); its slices are {r['own_file_share']:.2%} of the split "
                     f"weights; load {r['load_seconds']:.2f}s, run {r['run_seconds']:.2f}s")
    return lines
