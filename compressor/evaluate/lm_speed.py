"""Generation speed of causal language models, every model stepping through the same loop with its KV cache
(compressor.evaluate.lm.TorchDecoder or the ONNX graph's), the models alternating (A B C, C B A, ...) so that
drifts in machine load hit them alike:

- time to first token: a prompt of each length in ``prompt_lengths`` (batch 1, real text), from nothing to the
  first new token chosen;
- decoding speed: after an untimed prompt, ``decode_tokens`` greedy steps at each batch size, in tokens per
  second (batch x steps / time).

Medians over rounds, with the spread of each artifact's per-round ratio to the baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .speed import percentile, summarize

__all__ = ["generation_speed", "check_prompt_lengths"]


def check_prompt_lengths(generation: Any, config: dict[str, Any] | None) -> None:
    """Refuse prompt lengths the model cannot take, before any work."""
    from ..errors import UsageError

    limit = (config or {}).get("max_position_embeddings") or (config or {}).get("n_positions")
    if not isinstance(limit, int):
        return
    longest = max(generation.prompt_lengths + [generation.window,
                                               generation.prompt_tokens + max(generation.new_tokens,
                                                                              generation.decode_tokens)])
    if longest > limit:
        raise UsageError(f"evaluate.generation: sequences of up to {longest} tokens (window, prompt_lengths, or "
                         f"prompt_tokens plus new/decode tokens) exceed the model's {limit} positions; use shorter "
                         "ones")


def _first_token(decoder: Any, ids: np.ndarray) -> float:
    start = time.perf_counter()
    logits, _ = decoder.step(ids, np.ones_like(ids), decoder.empty_past(ids.shape[0]))
    logits[:, -1].argmax(axis=-1)
    return (time.perf_counter() - start) * 1000


def _decode(decoder: Any, ids: np.ndarray, steps: int) -> float:
    """Tokens per second of ``steps`` greedy steps after the prompt ``ids`` (not timed)."""
    mask = np.ones_like(ids)
    logits, past = decoder.step(ids, mask, decoder.empty_past(ids.shape[0]))
    start = time.perf_counter()
    for _ in range(steps):
        nxt = logits[:, -1].argmax(axis=-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        logits, past = decoder.step(nxt, mask, past)
    return ids.shape[0] * steps / (time.perf_counter() - start)


def _alternate(decoders: dict[str, Any], run: Callable[[Any], float], warmup: int, rounds: int
               ) -> dict[str, list[float]]:
    order = list(decoders)
    for key in order:
        for _ in range(warmup):
            run(decoders[key])
    values: dict[str, list[float]] = {key: [] for key in order}
    for r in range(rounds):
        for key in order if r % 2 == 0 else reversed(order):
            values[key].append(run(decoders[key]))
    return values


def _entries(values: dict[str, list[float]], higher_is_better: bool, **where: Any) -> dict[str, dict[str, Any]]:
    """Per model: the summary and, for artifacts, the speedup over the baseline with its per-round spread."""
    base = values.get("baseline")  # absent when a candidate is timed alone (compressor.evaluate.apart)
    out = {}
    for key, vals in values.items():
        entry: dict[str, Any] = {**where, **summarize(vals)}
        if key != "baseline" and base is not None:
            ratios = [(v / b if higher_is_better else b / v) for b, v in zip(base, vals) if b > 0 and v > 0]
            median_b, median_v = percentile(base, 50), percentile(vals, 50)
            entry["speedup"] = (median_v / median_b if higher_is_better else median_b / median_v) \
                if median_b > 0 and median_v > 0 else None
            entry["speedup_q25"], entry["speedup_q75"] = percentile(ratios, 25), percentile(ratios, 75)
        out[key] = entry
    return out


def generation_speed(decoders: dict[str, Any], stream: np.ndarray, generation: Any, *, warmup: int, rounds: int,
                     log: Any, device: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{model key: {"ttft": [per prompt length], "decode": [per batch size]}}; ``stream`` is the evaluation
    text's tokens (prompts are cut from it)."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {k: {"ttft": [], "decode": []} for k in decoders}
    warm = min(warmup, 1)  # one untimed run per model and configuration
    for length in generation.prompt_lengths:
        ids = np.resize(stream, length)[None, :].astype(np.int64)
        values = _alternate(decoders, lambda d: _first_token(d, ids), warm, rounds)
        for key, entry in _entries(values, False, prompt_tokens=length).items():
            out[key]["ttft"].append(entry)
        _say(log, device, f"time to first token at {length} tokens", out, "ttft", "ms")
    for batch in generation.decode_batch_sizes:
        rows = [np.resize(np.roll(stream, -i * generation.prompt_tokens), generation.prompt_tokens)
                for i in range(batch)]
        ids = np.stack(rows).astype(np.int64)
        values = _alternate(decoders, lambda d: _decode(d, ids, generation.decode_tokens), warm, rounds)
        for key, entry in _entries(values, True, batch_size=batch, new_tokens=generation.decode_tokens).items():
            out[key]["decode"].append(entry)
        _say(log, device, f"decoding at batch {batch}", out, "decode", "tokens/s")
    return out


def _say(log: Any, device: str, what: str, out: dict[str, Any], kind: str, unit: str) -> None:
    parts = []
    for key, entries in out.items():
        entry = entries[kind][-1]
        speedup = f" ({entry['speedup']:.2f}x)" if entry.get("speedup") else ""
        parts.append(f"{key} {entry['median']:.1f} {unit}{speedup}")
    log.info(f"{device}: {what}: " + ", ".join(parts))
