"""Generation with a causal language model exported with its KV cache, on ONNX Runtime and numpy alone.

The graph has optimum's `text-generation-with-past` layout: inputs ``input_ids``, ``attention_mask`` (past and
new tokens), ``position_ids`` and ``past_key_values.<layer>.key|value`` (batch, kv heads, past length, head
size); outputs ``logits`` and ``present.<layer>.key|value``. The first step gets an empty cache (past length 0);
every later step feeds the presents back as the past, so each new token costs one position of compute.

This module imports nothing of compressor's (tests/test_layers.py checks it), so that it can travel into bundles
beside their runner; the exporter's check steps through it, and generation elsewhere is meant to go through it too,
so that nothing disagrees on how.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["OrtDecoder", "generate", "is_decoder", "position_ids", "sample"]

PAST = "past_key_values."
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def is_decoder(session: Any) -> bool:
    """Whether an ONNX Runtime session's model has the KV-cache decoder layout."""
    names = {i.name for i in session.get_inputs()}
    return "input_ids" in names and any(n.startswith(PAST) for n in names)


def position_ids(attention_mask: np.ndarray, new: int) -> np.ndarray:
    """The positions of the last ``new`` tokens: real tokens count from 0; left padding gets position 0 (it is
    masked, so its position does not matter)."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    positions[attention_mask == 0] = 0
    return positions[:, -new:].astype(np.int64)


def sample(logits: np.ndarray, rng: np.random.Generator | None, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> np.ndarray:
    """The next token of every row of ``logits`` (batch, vocab): the argmax when ``rng`` is None (greedy), else
    a draw after temperature, top-k (0: all) and nucleus top-p filtering."""
    if rng is None:
        return logits.argmax(axis=-1).astype(np.int64)
    scaled = logits.astype(np.float64) / max(temperature, 1e-6)
    out = np.empty(scaled.shape[0], dtype=np.int64)
    for row, values in enumerate(scaled):
        order = np.argsort(-values, kind="stable")
        if top_k > 0:
            order = order[:top_k]
        probs = np.exp(values[order] - values[order[0]])
        probs /= probs.sum()
        if top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        out[row] = order[rng.choice(len(order), p=probs)]
    return out


class OrtDecoder:
    """Step and generate with a KV-cache decoder session (see the module docstring)."""

    def __init__(self, session: Any) -> None:
        if not is_decoder(session):
            raise ValueError("the model has no past_key_values inputs: it was not exported for generation with a "
                             "KV cache")
        self.session = session
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith(PAST)]
        self.output_names = [o.name for o in session.get_outputs()]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """A cache holding no positions, in the shape and float type the graph declares."""
        past = {}
        for name in self.past_names:
            info = self.inputs[name]
            dims = [d if isinstance(d, int) else 0 for d in info.shape]
            dims[0] = batch
            past[name] = np.zeros(dims, dtype=_DTYPES.get(info.type, np.float32))
        return past

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray]
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run new tokens ``input_ids`` (batch, new) given the cache ``past``; ``attention_mask`` covers past and
        new tokens. Returns (logits of the new tokens as float32, the cache including them)."""
        feed: dict[str, np.ndarray] = {"input_ids": input_ids.astype(np.int64)}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = attention_mask.astype(np.int64)
        if "position_ids" in self.inputs:
            feed["position_ids"] = position_ids(attention_mask, input_ids.shape[1])
        feed.update(past)
        outputs = dict(zip(self.output_names, self.session.run(None, feed)))
        present = {PAST + n.removeprefix("present."): v for n, v in outputs.items() if n.startswith("present.")}
        return np.asarray(outputs["logits"], dtype=np.float32), present

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray | None, max_new_tokens: int, *,
                 rng: np.random.Generator | None = None, eos_token_id: int | None = None,
                 on_tokens: Callable[[np.ndarray], None] | None = None, **sampling: Any) -> np.ndarray:
        """New tokens (batch, up to ``max_new_tokens``) after the prompts: see :func:`generate`."""
        return generate(self, input_ids, attention_mask, max_new_tokens, rng=rng, eos_token_id=eos_token_id,
                        on_tokens=on_tokens, **sampling)


def generate(decoder: Any, input_ids: np.ndarray, attention_mask: np.ndarray | None, max_new_tokens: int, *,
             rng: np.random.Generator | None = None, eos_token_id: int | None = None,
             on_tokens: Callable[[np.ndarray], None] | None = None, **sampling: Any) -> np.ndarray:
    """New tokens (batch, up to ``max_new_tokens``) after the prompts ``input_ids`` (left-padded where they
    differ in length; ``attention_mask`` 0 marks padding), with any ``decoder`` that has ``empty_past(batch)``
    and ``step(input_ids, attention_mask, past) -> (logits, past)`` as OrtDecoder has (the evaluator steps torch
    models the same way). Greedy unless ``rng`` is given (then ``sampling`` takes temperature, top_k, top_p).
    Stops early once every row has produced ``eos_token_id``; ``on_tokens`` is called with each step's tokens
    (streaming)."""
    mask = np.ones_like(input_ids) if attention_mask is None else attention_mask.astype(np.int64)
    logits, past = decoder.step(input_ids, mask, decoder.empty_past(input_ids.shape[0]))
    tokens: list[np.ndarray] = []
    done = np.zeros(input_ids.shape[0], dtype=bool)
    for _ in range(max_new_tokens):
        nxt = sample(logits[:, -1], rng, **sampling)
        if eos_token_id is not None:
            nxt = np.where(done, eos_token_id, nxt)
            done |= nxt == eos_token_id
        tokens.append(nxt)
        if on_tokens is not None:
            on_tokens(nxt)
        if done.all() or len(tokens) == max_new_tokens:
            break
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
        logits, past = decoder.step(nxt[:, None], mask, past)
    return np.stack(tokens, axis=1) if tokens else np.zeros((input_ids.shape[0], 0), dtype=np.int64)
