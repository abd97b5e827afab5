"""Evaluating models that do not fit in memory together: the baseline first, alone, its outputs recorded; then each
candidate alone, compared with the record.

Together, the evaluator holds the baseline and every candidate at once (their latencies are taken alternating, so
that drifts in machine load hit them alike). When that would not fit but one model at a time would, each model is
loaded, measured and released in turn: accuracy and fidelity are the same numbers (the comparison reads the
baseline's recorded outputs; a causal LM's logits are recorded in a scratch directory inside the artifact directory,
removed afterwards), while speed ratios compare medians taken one after the other, unpaired. The report says so
(`memory`). When even one model at a time would not fit, the evaluation is refused before anything is loaded.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..log import Reporter

__all__ = ["memory_plan", "measure_apart", "measure_lm_apart"]

_PER_MODEL = 1.3  # a loaded model beside its file's bytes: the module, its outputs and the runtime's working memory


def memory_plan(subjects: list[Any], log: Reporter) -> dict[str, Any] | None:
    """None when every subject fits in memory together; else how they are measured instead ({"mode": "apart", ...}).
    UsageError (exit 2) when even one at a time will not fit."""
    from ..budget import FIXED_BYTES, MARGIN, Estimate, check_fits, fits
    from ..memory import human_bytes

    base = subjects[0].size_bytes  # a torch candidate decodes to at most the baseline's dtype
    held = [2 * s.files_bytes if s.format == "onnx" else max(s.size_bytes, base) for s in subjects]
    together, apart = Estimate(sum(held)), Estimate(max(held))
    together.phases.append(("all models together", int((FIXED_BYTES + _PER_MODEL * sum(held)) * MARGIN)))
    apart.phases.append(("one model at a time", int((FIXED_BYTES + _PER_MODEL * max(held)) * MARGIN)))
    if fits(together):
        return None
    check_fits(apart, "evaluating", f"Together they would need about {human_bytes(together.peak)}.")
    log.warn(f"the models do not fit in memory together (about {human_bytes(together.peak)}); measuring them one "
             f"after the other (about {human_bytes(apart.peak)}): the same accuracy and fidelity, speed ratios from "
             "unpaired runs")
    return {"mode": "apart", "together_bytes": together.peak, "apart_bytes": apart.peak,
            "note": "the models did not fit in memory together: measured one after the other, the baseline's "
                    "outputs recorded first; speed ratios compare unpaired runs"}


def _alone(run: Any, subject: Any, device: str) -> Any:
    from .subjects import load_module

    run.log.info(f"{device}: loading {subject.label} alone")
    return load_module(subject.spec, device, run.spec.speed.threads)


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def measure_apart(run: Any, device: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(outputs, task metric, fidelity, latency) of every subject by key, each model loaded alone in turn."""
    from .accuracy import fidelity, run_outputs, task_metric
    from .speed import latency_inputs, measure_latency

    outputs: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    latency: dict[str, list[dict[str, Any]]] = {}
    speed = run.spec.speed
    configs = [(b, s) for b in speed.batch_sizes for s in run.seq_lens] if run.measure_speed else []
    for subject in run.subjects:
        model = _alone(run, subject, device)
        with run.log.step(f"{device}: {subject.label}: accuracy on {run.data.name}, latency in {len(configs)} "
                          "configuration(s)"):
            outputs[subject.key] = run_outputs(model, run.data, device, run.task)
            metrics[subject.key] = task_metric(run.data, outputs[subject.key])
            latency[subject.key] = []
            for batch_size, seq_len in configs:
                inputs = latency_inputs(run.example_inputs, batch_size, seq_len, run.tokenizer, run.data.texts, 0)
                entry = measure_latency({subject.key: model}, inputs, device, warmup=speed.warmup,
                                        rounds=speed.rounds, calls=speed.calls)[subject.key]
                latency[subject.key].append({"batch_size": batch_size, "seq_len": seq_len, **entry})
        del model
        _release(device)
    for entries in (latency[c.key] for c in run.candidates):
        for base, entry in zip(latency["baseline"], entries):
            entry["speedup"] = base["p50_ms"] / entry["p50_ms"] if entry["p50_ms"] > 0 else None
            entry["speedup_q25"] = entry["speedup_q75"] = None  # unpaired runs: no per-round spread
    fids = {c.key: fidelity(outputs["baseline"], outputs[c.key], run.classifier) for c in run.candidates}
    return outputs, metrics, fids, latency


class _Recorded:
    """A causal LM's logits, recorded call by call into ``scratch`` (``model`` given) or read back in the same
    order (``model`` None); the inputs are checked to be the recorded ones."""

    def __init__(self, scratch: Path, model: Any = None) -> None:
        self.scratch, self.model, self.calls = scratch, model, 0

    batches = 0  #: how many calls the recording will take (its disk space is checked after the first)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        from types import SimpleNamespace

        path = self.scratch / f"{self.calls}.npz"
        self.calls += 1
        if self.model is not None:
            from .lm import next_token_logits

            logits = next_token_logits(self.model, input_ids, str(input_ids.device))
            if self.calls == 1:
                _check_disk(self.scratch, logits.numel() * 4 * max(self.batches, 1))
            try:
                np.savez(path, ids=input_ids.cpu().numpy(), logits=logits.numpy())
            except OSError as exc:
                from ..errors import CompressorError

                raise CompressorError(f"recording the baseline's logits in {self.scratch} failed: {exc}") from exc
            return SimpleNamespace(logits=logits)
        with np.load(path) as saved:
            if not np.array_equal(saved["ids"], input_ids.cpu().numpy()):
                raise AssertionError("the baseline's recorded logits are for other inputs; please report this bug")
            return SimpleNamespace(logits=torch.from_numpy(saved["logits"]).to(input_ids.device))


def _check_disk(scratch: Path, needed: int) -> None:
    """Refuse (exit 2) a recording that the disk under ``scratch`` cannot hold, before writing it."""
    from ..errors import UsageError
    from ..memory import human_bytes

    free = shutil.disk_usage(scratch).free
    if needed > 0.9 * free:
        raise UsageError(f"measuring one model at a time records the baseline's logits ({human_bytes(needed)}) in "
                         f"{scratch.parent}, whose disk has {human_bytes(free)} free; free some space, or evaluate "
                         "on fewer tokens (evaluate.generation.max_tokens)")


def _clean_stale(parent: Path) -> None:
    """Remove scratch directories of earlier evaluations whose process is gone (killed, out of memory)."""
    for old in parent.glob(".eval-apart-*"):
        try:
            pid = int(old.name.split("-")[2])
            os.kill(pid, 0)  # still running: not ours to remove
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def measure_lm_apart(run: Any, device: str, scratch_parent: Path) -> tuple[dict[str, Any], dict[str, Any],
                                                                           dict[str, Any]]:
    """(task metric, fidelity, ``lm`` entry) of every subject by key on ``device``, each model loaded alone in turn,
    the baseline's logits recorded in a scratch directory inside ``scratch_parent`` (removed afterwards)."""
    from .lm import compare_continuations, decoder_for, generate_continuations, lm_scores, prompt_batch
    from .lm_speed import generation_speed

    gen = run.spec.generation
    prompts = prompt_batch(run.data, gen.prompts, gen.prompt_tokens)
    stream = torch.cat([b["input_ids"][:, :-1].reshape(-1) for b in run.data.batches]).numpy()
    metrics: dict[str, Any] = {}
    fids: dict[str, Any] = {}
    lm: dict[str, Any] = {}
    _clean_stale(scratch_parent)
    scratch = Path(tempfile.mkdtemp(prefix=f".eval-apart-{os.getpid()}-", dir=scratch_parent))
    try:
        base_tokens = None
        for subject in run.subjects:
            model = _alone(run, subject, device)
            key = subject.key
            scored = {"baseline": _Recorded(scratch, model)} if key == "baseline" else \
                {"baseline": _Recorded(scratch), key: model}
            scored["baseline"].batches = len(run.data.batches)
            with run.log.step(f"{device}: {subject.label}: perplexity, agreement and KL on {run.data.name}"):
                m, entries, f = lm_scores(scored, run.data, device)
            metrics[key], lm[key] = m[key], entries[key]
            fids.update(f)
            decoder = decoder_for(model, device)
            with run.log.step(f"{device}: {subject.label}: greedy continuations, {len(prompts)} prompts"):
                tokens = generate_continuations(decoder, prompts, gen.new_tokens)
            if base_tokens is None:
                base_tokens = tokens
            else:
                lm[key]["greedy"] = compare_continuations(base_tokens, tokens, prompts)
            if run.measure_speed:
                speed = run.spec.speed
                with run.log.step(f"{device}: {subject.label}: time to first token and decoding speed, alone"):
                    timed = generation_speed({key: decoder}, stream, gen, warmup=speed.warmup, rounds=speed.rounds,
                                             log=run.log, device=device)
                lm[key].update(timed[key])
            del model, decoder, scored
            _release(device)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for subject in run.candidates:
        for kind, better in (("ttft", False), ("decode", True)):
            for base, entry in zip(lm["baseline"].get(kind, []), lm[subject.key].get(kind, [])):
                b, v = base["median"], entry["median"]
                entry["speedup"] = ((v / b) if better else (b / v)) if b > 0 and v > 0 else None
                entry["speedup_q25"] = entry["speedup_q75"] = None  # unpaired runs: no per-round spread
    return metrics, fids, lm
