"""Causal language models: what the text says about a compressed model, against the baseline in the same run.

On the evaluation text (compressor.data.lm_text), every model's next-token distribution at every position:

- ``perplexity``: exp of the mean negative log-likelihood of the text's next tokens; ``next_token_top1``: the
  share (%) of positions where the most likely token is the text's (the task metric, so `max_accuracy_drop`
  applies too);
- against the baseline: ``token_agreement`` (%), the share of positions where the most likely token is the
  baseline's; ``kl_mean``, the mean KL divergence KL(baseline || model) in nats; and the cosine of the logits
  (fidelity, so `min_fidelity` applies);
- ``greedy``: greedy continuations of ``prompts`` prompts (``new_tokens`` each) compared token by token with the
  baseline's: how many match exactly, and the mean share of tokens before the first difference.

Every model steps through the same loop (compressor.decoding.generate): torch models through :class:`TorchDecoder`
with their own cache, ONNX decoders through their graph's. Logits are reduced batch by batch, so memory stays at a
batch of windows whatever the text's length.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.datasets import EvalData

__all__ = ["TorchDecoder", "decoder_for", "lm_scores", "next_token_logits", "greedy_continuations", "generate_continuations",
           "compare_continuations", "prompt_batch"]


class TorchDecoder:
    """A transformers causal LM stepped like compressor.decoding.OrtDecoder: numpy tokens in, float32 numpy
    logits out, the model's own KV cache carried between steps."""

    def __init__(self, module: Any, device: str) -> None:
        self.module, self.device = module, torch.device(device)

    def empty_past(self, batch: int) -> Any:
        """No cache yet: transformers creates it on the first step."""
        return None

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
        """Logits of the new tokens and the cache including them (positions as the ONNX decoder gets them)."""
        from ..decoding import position_ids

        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
        mask = torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64)).to(self.device)
        pos = torch.from_numpy(position_ids(attention_mask, input_ids.shape[1])).to(self.device)
        out = self.module(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                          use_cache=True)
        return out.logits.float().cpu().numpy(), out.past_key_values


def decoder_for(model: Any, device: str) -> Any:
    """The stepping interface of a loaded subject: the ONNX decoder of an OrtModule, else a TorchDecoder."""
    decoder = getattr(model, "decoder", None)
    return decoder if decoder is not None else TorchDecoder(model, device)


def next_token_logits(model: Any, ids: torch.Tensor, device: str) -> torch.Tensor:
    """A causal LM's logits for ``ids`` on ``device``, as float32 on the CPU; UsageError for a model without them."""
    from ..errors import UsageError

    with torch.inference_mode():
        out = model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device))
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise UsageError(f"{type(model).__name__} returns no next-token logits: it is not a causal language model, "
                         "and a causal LM is compared with one (give a causal LM as --baseline)")
    return logits.float().cpu()


class _Tally:
    """Sums over positions of one model's text scores (and, for a candidate, its scores against the baseline)."""

    def __init__(self) -> None:
        self.nll = self.kl = self.cos_sum = 0.0
        self.hits = self.agree = self.positions = 0
        self.cos_min, self.max_err = math.inf, 0.0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, base: torch.Tensor | None) -> None:
        flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        logp = F.log_softmax(flat, dim=-1)
        self.nll += float(-logp.gather(1, tgt[:, None]).sum())
        self.hits += int((flat.argmax(-1) == tgt).sum())
        self.positions += tgt.numel()
        if base is None:
            return
        if base.shape != logits.shape:
            from ..errors import UsageError

            raise UsageError(f"the baseline's logits have shape {list(base.shape)}, the artifact's "
                             f"{list(logits.shape)}: their vocabularies differ, so no token of one is a token of the "
                             "other; compare with the model the artifact was made from")
        base = base.reshape(-1, base.shape[-1])
        base_logp = F.log_softmax(base, dim=-1)
        self.kl += float((base_logp.exp() * (base_logp - logp)).sum())
        self.agree += int((flat.argmax(-1) == base.argmax(-1)).sum())
        cos = torch.nan_to_num(F.cosine_similarity(base, flat, dim=-1, eps=1e-12), nan=-1.0)
        self.cos_min, self.cos_sum = min(self.cos_min, float(cos.min())), self.cos_sum + float(cos.sum())
        self.max_err = max(self.max_err, float(torch.nan_to_num((base - flat).abs(), nan=math.inf).max()))

    def metric(self) -> dict[str, Any]:
        return {"metric": "next_token_top1", "label": "next-token top-1 (%)",
                "value": 100.0 * self.hits / self.positions}

    def lm(self, candidate: bool) -> dict[str, Any]:
        mean = self.nll / self.positions
        out: dict[str, Any] = {"perplexity": math.exp(min(mean, 700.0)), "nll_mean": mean, "tokens": self.positions}
        if candidate:
            out["token_agreement"] = 100.0 * self.agree / self.positions
            out["kl_mean"] = self.kl / self.positions
        return out

    def fidelity(self) -> dict[str, Any]:
        return {"cos_min": self.cos_min, "cos_mean": self.cos_sum / self.positions, "max_abs_err": self.max_err,
                "examples": self.positions, "top1_agreement": 100.0 * self.agree / self.positions,
                "over": "next-token logits at every position of the evaluation text"}


def lm_scores(models: dict[str, Any], data: EvalData, device: str) -> tuple[dict[str, Any], dict[str, Any],
                                                                            dict[str, Any]]:
    """(task metric, language-model scores, fidelity) of every model by key, on the windows of ``data``; the
    key ``baseline`` is the reference."""
    tallies = {key: _Tally() for key in models}
    for batch in data.batches:
        windows = batch["input_ids"]
        ids, targets = windows[:, :-1], windows[:, 1:]
        base = next_token_logits(models["baseline"], ids, device)
        tallies["baseline"].add(base, targets, None)
        for key, model in models.items():
            if key != "baseline":
                tallies[key].add(next_token_logits(model, ids, device), targets, base)
    metrics = {key: t.metric() for key, t in tallies.items()}
    lm = {key: t.lm(key != "baseline") for key, t in tallies.items()}
    fids = {key: t.fidelity() for key, t in tallies.items() if key != "baseline"}
    return metrics, lm, fids


def prompt_batch(data: EvalData, rows: int, tokens: int) -> np.ndarray:
    """(rows, tokens) prompts: the first ``tokens`` tokens of the first ``rows`` windows of the text (repeated
    when the text has fewer windows)."""
    windows = torch.cat([b["input_ids"] for b in data.batches])
    tokens = min(tokens, windows.shape[1])
    return windows[torch.arange(rows) % windows.shape[0], :tokens].numpy().astype(np.int64)


def greedy_continuations(decoders: dict[str, Any], prompts: np.ndarray, new_tokens: int
                         ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Each decoder's greedy tokens after ``prompts`` (one batch), and per candidate how they compare with the
    baseline's (``compare_continuations``)."""
    tokens = {key: generate_continuations(dec, prompts, new_tokens) for key, dec in decoders.items()}
    out = {key: compare_continuations(tokens["baseline"], got, prompts) for key, got in tokens.items()
           if key != "baseline"}
    return tokens, out


def generate_continuations(decoder: Any, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """One decoder's greedy tokens after ``prompts``."""
    from ..decoding import generate

    return generate(decoder, prompts, None, new_tokens)


def compare_continuations(base: np.ndarray, got: np.ndarray, prompts: np.ndarray) -> dict[str, Any]:
    """How a candidate's greedy continuations compare with the baseline's: ``exact`` continuations, the mean share
    of tokens before the first difference (%), and the share of equal tokens (%)."""
    n = min(base.shape[1], got.shape[1])
    equal = base[:, :n] == got[:, :n]
    prefix = np.where(equal.all(axis=1), n, equal.argmin(axis=1))
    return {"prompts": int(prompts.shape[0]), "prompt_tokens": int(prompts.shape[1]), "new_tokens": n,
            "exact": int(equal.all(axis=1).sum()), "prefix_matched": float(100.0 * prefix.mean() / n),
            "tokens_equal": float(100.0 * equal.mean())}
