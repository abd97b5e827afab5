"""The evaluation steps of a causal language model (the runner's text-generation branch): text scores, greedy
continuations and generation speed of every subject, and the rows' ``lm`` entries and ratios."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["measure_lm", "lm_rows", "check_corpus"]


def measure_lm(run: Any, device: str, models: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any],
                                                                      dict[str, Any]]:
    """(task metric, fidelity, ``lm`` entry) of every subject by key on ``device``."""
    from .lm import decoder_for, greedy_continuations, lm_scores, prompt_batch
    from .lm_speed import generation_speed

    log, gen = run.log, run.spec.generation
    with log.step(f"{device}: perplexity, next-token agreement and KL on {run.data.name}"):
        metrics, lm, fids = lm_scores(models, run.data, device)
    for s in run.subjects:
        entry = lm[s.key]
        extra = (f", agreement {entry['token_agreement']:.2f} %, KL {entry['kl_mean']:.4g}"
                 if "token_agreement" in entry else "")
        log.info(f"{device}: {s.label}: perplexity {entry['perplexity']:.3f}{extra}")
    decoders = {key: decoder_for(m, device) for key, m in models.items()}
    prompts = prompt_batch(run.data, gen.prompts, gen.prompt_tokens)
    with log.step(f"{device}: greedy continuations, {len(prompts)} prompts x {gen.new_tokens} tokens"):
        _, greedy = greedy_continuations(decoders, prompts, gen.new_tokens)
    for key, entry in greedy.items():
        lm[key]["greedy"] = entry
        log.info(f"{device}: {key}: {entry['exact']}/{entry['prompts']} continuations identical, "
                 f"{entry['tokens_equal']:.1f} % of tokens")
    if run.measure_speed:
        stream = torch.cat([b["input_ids"][:, :-1].reshape(-1) for b in run.data.batches]).numpy()
        speed = run.spec.speed
        with log.step(f"{device}: time to first token and decoding speed, {len(models)} models alternating"):
            timed = generation_speed(decoders, stream, gen, warmup=speed.warmup, rounds=speed.rounds, log=log,
                                     device=device)
        for key, entry in timed.items():
            lm[key].update(entry)
    return metrics, fids, lm


def lm_rows(rows: list[dict[str, Any]], subjects: list[Any], lm: dict[str, Any]) -> None:
    """Put each subject's ``lm`` entry into its row (rows are in subject order), and the artifact's ratios."""
    base = lm["baseline"]
    for row, subject in zip(rows, subjects):
        entry = lm[subject.key]
        row["lm"] = entry
        if subject.role == "baseline":
            continue
        ratios = row.setdefault("ratios", {})
        ratios["perplexity_increase"] = 100.0 * (entry["perplexity"] / base["perplexity"] - 1.0)
        decode = [d["speedup"] for d in entry.get("decode") or [] if d.get("speedup") is not None]
        ttft = [d["speedup"] for d in entry.get("ttft") or [] if d.get("speedup") is not None]
        ratios["decode_speedup"] = min(decode) if decode else None
        ratios["ttft_speedup"] = min(ttft) if ttft else None


def check_corpus(manifest: Any, log: Any) -> None:
    """Warn when the zoo LM of this machine was trained on another corpus than the artifact's (another CPython
    release ships other prose): the baseline is then another model, and so is the held-out text."""
    recorded = manifest.source.get("corpus_sha256")
    if not recorded or manifest.source.get("kind") != "zoo":
        return
    from ..tinylm import corpus_sha256

    if recorded != corpus_sha256():
        log.warn(f"the artifact's tiny-lm was trained on a corpus with sha256 {recorded[:12]}..., this Python's is "
                 f"{corpus_sha256()[:12]}... (another CPython release): the baseline and the held-out text here are "
                 "not the artifact's, so the comparison is between different models; evaluate on the Python the "
                 "artifact was made with")
