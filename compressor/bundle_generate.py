"""Text generation in a compressor bundle of a causal language model: prompts in, tokens out, streamed as they come.

`compress pack` copies this file as generate.py into the bundles of causal language models, beside run.py (the
command line and its exit-code contract) and decoding.py (the KV-cache decoding loop, shared with compressor's own
export check). It needs nothing but numpy and imports nothing of compressor (tests/test_layers.py checks it); run.py
hands it the tokenizer and the decoder. Everything a caller can get wrong (settings, prompts) raises PromptError with
a message saying what would work, which run.py turns into its exit code 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "PromptError", "Settings", "Prompts", "prepare", "TextStream", "result",
           "generate", "cli_settings"]

DEFAULT_MAX_NEW_TOKENS = 32


class PromptError(ValueError):
    """Prompts or settings the caller can fix (run.py: exit code 2)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class Settings:
    """How to generate: greedy (the most likely token at every step) unless ``sample``, then a draw seeded by
    ``seed`` after ``temperature``, ``top_k`` (0: every token) and nucleus ``top_p`` filtering."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sample: bool = False
    seed: int = 0
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0

    def check(self) -> Settings:
        """These settings, or PromptError naming the first that is out of range and what would work."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise PromptError(f"--max-new-tokens {self.max_new_tokens!r}: generate at least 1 token (default "
                              f"{DEFAULT_MAX_NEW_TOKENS})")
        if not _is_int(self.seed) or self.seed < 0:
            raise PromptError(f"--seed {self.seed!r}: a whole number from 0 up")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise PromptError(f"--top-k {self.top_k!r}: how many of the likeliest tokens to draw from, from 1 up "
                              "(0: all of them)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise PromptError(f"--top-p {self.top_p!r}: the probability mass to draw from, in (0, 1], e.g. 0.9 (1: "
                              "every token)")
        if not isinstance(self.temperature, (int, float)) or not (self.temperature > 0 and
                                                                  math.isfinite(self.temperature)):
            raise PromptError(f"--temperature {self.temperature!r}: a positive number (below 1 sharpens the "
                              "distribution, above 1 flattens it; for the likeliest tokens use greedy decoding)")
        if not self.sample and (self.seed, self.top_k, self.top_p, self.temperature) != (0, 0, 1.0, 1.0):
            raise PromptError("--seed, --top-k, --top-p and --temperature set how tokens are sampled, and decoding "
                              "is greedy unless asked: add --sample (Python: sample=True)")
        return self

    def sampling(self) -> dict[str, Any]:
        """The keyword arguments of decoding's OrtDecoder.generate: a seeded generator and the filters, or none
        (greedy)."""
        if not self.sample:
            return {}
        return {"rng": np.random.default_rng(self.seed), "temperature": float(self.temperature),
                "top_k": int(self.top_k), "top_p": float(self.top_p)}


@dataclass
class Prompts:
    """Prompts as the decoder takes them: token ids left-padded to the longest, and the mask of real tokens."""

    texts: list[str]
    rows: list[list[int]]  #: each prompt's own token ids
    input_ids: np.ndarray  #: (prompts, longest), int64, left-padded
    attention_mask: np.ndarray  #: 1 for real tokens, 0 for padding


def prepare(tokenizer: Any, texts: list[str], settings: Settings, *, pad_id: int,
            max_positions: int | None) -> Prompts:
    """Tokenize ``texts`` (a `tokenizers.Tokenizer` without padding or truncation: nothing of a prompt is cut) and
    left-pad them into one batch. No prompts, an empty one, or prompts that do not leave room for
    ``settings.max_new_tokens`` within the model's ``max_positions`` raise PromptError."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise PromptError('no prompt given; give at least one, e.g. python run.py "Once upon a time"')
    for i, text in enumerate(texts, 1):
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"prompt {i} is {'empty' if isinstance(text, str) else type(text).__name__}; give "
                              "text to continue")
    rows = [list(e.ids) for e in tokenizer.encode_batch(texts)]
    for i, row in enumerate(rows, 1):
        if not row:
            raise PromptError(f"prompt {i} gives no tokens; give text to continue")
    longest = max(range(len(rows)), key=lambda i: len(rows[i]))
    width = len(rows[longest])
    if max_positions and width + settings.max_new_tokens > max_positions:
        where = f"prompt {longest + 1} is {width} tokens long"
        if width >= max_positions:
            raise PromptError(f"{where}, and the model has {max_positions} positions in all; shorten it")
        raise PromptError(f"{where}, and with --max-new-tokens {settings.max_new_tokens} that is more than the "
                          f"model's {max_positions} positions; ask for at most {max_positions - width} new tokens "
                          "or shorten the prompt")
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return Prompts(texts, rows, ids, mask)


class TextStream:
    """Hands a one-prompt generation's text to ``write`` as its tokens come (the ``on_tokens`` callback of
    decoding's OrtDecoder.generate). Byte-level tokens can split a character: text is written once it decodes
    whole. Nothing is written after the end-of-text token."""

    def __init__(self, tokenizer: Any, write: Callable[[str], None], eos_id: int | None) -> None:
        self.tokenizer, self.write, self.eos_id = tokenizer, write, eos_id
        self.tokens: list[int] = []
        self.shown = ""
        self.ended = False

    def __call__(self, step: np.ndarray) -> None:
        token = int(step[0])
        if self.ended or token == self.eos_id:
            self.ended = True
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return  # a character still incomplete (or a decoder that rewrites earlier text): wait for more
        self.write(text[len(self.shown):])
        self.shown = text


def _until_eos(row: list[int], eos_id: int | None) -> list[int]:
    return row[: row.index(eos_id) + 1] if eos_id is not None and eos_id in row else row


def result(tokenizer: Any, prompts: Prompts, tokens: np.ndarray, settings: Settings,
           eos_id: int | None) -> dict[str, Any]:
    """What generation returns (and run.py prints): per prompt its tokens, the new tokens (up to and including
    the end-of-text token), their text, and why it stopped ("eos" or "length"); plus the settings used."""
    rows = [_until_eos([int(t) for t in row], eos_id) for row in np.asarray(tokens).tolist()]
    return {
        "prompts": prompts.texts,
        "prompt_tokens": prompts.rows,
        "tokens": rows,
        "text": [tokenizer.decode(row, skip_special_tokens=True) for row in rows],
        "stopped": ["eos" if eos_id is not None and eos_id in row else "length" for row in rows],
        "settings": {**asdict(settings), "eos_token_id": eos_id} if settings.sample else
        {"max_new_tokens": settings.max_new_tokens, "sample": False, "eos_token_id": eos_id},
    }


def generate(decoder: Any, tokenizer: Any, texts: list[str], settings: Settings, *, pad_id: int,
             eos_id: int | None, max_positions: int | None,
             on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Continue ``texts`` with ``decoder`` (decoding's OrtDecoder) as ``settings`` say, stopping at ``eos_id``;
    ``on_text`` gets a single prompt's new text as it comes. Returns :func:`result`'s document; PromptError for
    bad prompts or settings, whatever ONNX Runtime raises for a failing model."""
    settings.check()
    batch = prepare(tokenizer, texts, settings, pad_id=pad_id, max_positions=max_positions)
    stream = TextStream(tokenizer, on_text, eos_id) if on_text is not None and len(batch.rows) == 1 else None
    tokens = decoder.generate(batch.input_ids, batch.attention_mask, settings.max_new_tokens, eos_token_id=eos_id,
                              on_tokens=stream, **settings.sampling())
    return result(tokenizer, batch, tokens, settings, eos_id)


def cli_settings(args: Any) -> dict[str, Any]:
    """The keyword arguments of run.py's Bundle.generate from its command line (options not given: defaults)."""
    given = {name: getattr(args, name) for name in ("max_new_tokens", "seed", "top_k", "top_p", "temperature")}
    return {"sample": bool(args.sample), **{k: v for k, v in given.items() if v is not None}}
