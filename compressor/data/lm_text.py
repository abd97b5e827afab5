"""Evaluation text of causal language models: documents tokenized into one stream (each followed by the end of
text token) and cut into windows of ``window + 1`` tokens, the first ``window`` of which are the input and the
last ``window`` the next tokens to predict.

Where the text comes from (``evaluate.data``):

- unset or ``held-out-text``: the zoo LM's held-out documents (compressor.tinylm: English prose CPython ships,
  never trained or calibrated on; for another model they are merely text it was not compressed on);
- ``calibration-text``: the shipped calibration sentences;
- ``path``: a user's ``.txt`` file (paragraphs separated by blank lines are documents) or ``.jsonl`` file of
  ``{"text": ...}`` rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from .datasets import CALIBRATION_TEXTS, EvalData, _field, _read_jsonl, read_text_documents, tokenizer_for

__all__ = ["build_lm_text", "lm_windows"]


def lm_windows(ids: torch.Tensor, window: int, max_tokens: int) -> torch.Tensor:
    """(windows, window + 1) consecutive slices of the token stream ``ids``, overlapping by one token so that
    every token after the first is predicted once; at most ``max_tokens`` tokens predicted."""
    count = min((ids.numel() - 1) // window, max(1, max_tokens // window))
    if count < 1:
        raise UsageError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {window + 1}; "
                         "give more text, or a smaller evaluate.generation.window")
    return torch.stack([ids[i * window:i * window + window + 1] for i in range(count)])


def build_lm_text(spec: Any, generation: Any, *, artifact: Path, data_file: Path | None) -> EvalData:
    """EvalData of a causal LM: batches of ``{"input_ids": (n, window + 1)}`` windows, metric ``next_token_top1``
    and the documents as ``texts``. ``spec`` is ``evaluate.data``, ``generation`` ``evaluate.generation``."""
    if spec.path is not None and data_file is None:  # `compress eval`: the artifact's copy (compress run's eval/)
        data_file = artifact / "eval" / Path(spec.path).name
        if not data_file.is_file():
            raise UsageError(f"the evaluation text {spec.path} is not in the artifact ({artifact}/eval/); re-run "
                             "`compress run`, which copies it there")
    name, docs = _documents(spec, data_file)
    tok = tokenizer_for(artifact)
    if tok is None:
        raise UsageError(f"the artifact {artifact} has no tokenizer files; a causal language model is evaluated on "
                         "text, so its directory must hold its tokenizer")
    eos = tok.eos_token_id
    stream: list[int] = []
    for ids in tok(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        stream += ids + ([eos] if eos is not None else [])
        if len(stream) > generation.max_tokens + generation.window + 1:
            break
    windows = lm_windows(torch.tensor(stream, dtype=torch.long), generation.window, generation.max_tokens)
    if spec.limit is not None:
        windows = windows[: spec.limit]
    batch = max(1, min(spec.batch_size, generation.batch_windows))
    batches = [{"input_ids": windows[i:i + batch]} for i in range(0, len(windows), batch)]
    return EvalData(name=f"{name} ({len(windows) * generation.window:,} tokens in windows of {generation.window})",
                    metric="next_token_top1", batches=batches, texts=docs[:64])


def _documents(spec: Any, data_file: Path | None) -> tuple[str, list[str]]:
    if spec.function is not None:
        raise UsageError(f"evaluate.data.function {spec.function}: a causal language model is evaluated on text; "
                         "give a .txt or .jsonl file of {\"text\": ...} rows as evaluate.data.path")
    if data_file is not None:
        return data_file.name, read_text_documents(data_file)
    if spec.builtin in (None, "held-out-text"):
        from ..tinylm import held_out_texts

        return "held-out-text (built in, CPython's prose)", held_out_texts()
    if spec.builtin == "train-text":
        from ..tinylm import training_texts

        return "train-text (built in, the zoo LM's training documents)", training_texts()
    if spec.builtin == "calibration-text":
        return "calibration-text (built in)", [_field("calibration-text (built in)", r, "text", str)
                                                for r in _read_jsonl(CALIBRATION_TEXTS)]
    raise UsageError(f"evaluate.data.builtin {spec.builtin}: not text a language model can be scored on; use "
                     "held-out-text, calibration-text or a .txt/.jsonl file")
