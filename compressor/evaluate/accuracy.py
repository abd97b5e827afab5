"""Task metrics and fidelity: what the model computes, scored against labels and against the baseline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..data.datasets import EvalData

__all__ = ["primary_output", "run_outputs", "task_metric", "fidelity", "METRIC_LABELS"]

METRIC_LABELS = {
    "top1_accuracy": "top-1 accuracy (%)",
    "retrieval_top1": "top-1 retrieval accuracy (%)",
    "next_token_top1": "next-token top-1 (%)",
}


def primary_output(out: Any, batch: dict[str, torch.Tensor], task: str | None) -> torch.Tensor:
    """The tensor users consume: mean-pooled sentence embedding for text encoders, logits for classifiers,
    otherwise the first tensor the model returns."""
    if task == "text-embedding" and getattr(out, "last_hidden_state", None) is not None:
        hidden = out.last_hidden_state
        mask = batch.get("attention_mask")
        if mask is None:
            return hidden.float().mean(dim=1)
        # Mean over real tokens only, the pooling sentence-transformers uses for MiniLM.
        m = mask.to(hidden.device).unsqueeze(-1).float()
        return (hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"the model returned {type(out).__name__}, which holds no tensor to evaluate")


@torch.inference_mode()
def run_outputs(module: Any, data: EvalData, device: str, task: str | None) -> list[torch.Tensor]:
    """The primary output of every batch, as float32 on the CPU."""
    outs = []
    for batch in data.batches:
        moved = {k: v.to(device) for k, v in batch.items()}
        outs.append(primary_output(module(**moved), moved, task).float().cpu())
    return outs


def _cat(outputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([o.reshape(o.shape[0], -1) for o in outputs])


def task_metric(data: EvalData, outputs: list[torch.Tensor]) -> dict[str, Any] | None:
    """The data set's metric (percent) on these outputs, or None when the data has no labels."""
    if data.metric is None:
        return None
    flat = _cat(outputs)
    if data.metric == "top1_accuracy":
        assert data.labels is not None
        if flat.shape[0] != data.labels.shape[0]:
            raise UsageError(f"evaluation data {data.name}: the model gave {flat.shape[0]} outputs for "
                             f"{data.labels.shape[0]} labels; every example needs exactly one label")
        if data.labels.numel() and int(data.labels.max()) >= flat.shape[1]:
            raise UsageError(f"evaluation data {data.name}: label {int(data.labels.max())} is out of range for the "
                             f"model's output of {flat.shape[1]} values per example (the `logits`, or the first "
                             "tensor it returns); labels are class indices 0..classes-1")
        correct = int((flat.argmax(dim=-1) == data.labels).sum())
        n = int(data.labels.shape[0])
    else:  # retrieval_top1
        assert data.pairs is not None
        emb = F.normalize(flat, dim=-1)
        queries, passages = emb[: data.pairs], emb[data.pairs: 2 * data.pairs]
        hits = (queries @ passages.T).argmax(dim=1) == torch.arange(data.pairs)
        correct, n = int(hits.sum()), data.pairs
    return {"metric": data.metric, "label": METRIC_LABELS[data.metric], "value": 100.0 * correct / n,
            "correct": correct, "examples": n}


def fidelity(baseline: list[torch.Tensor], candidate: list[torch.Tensor], classifier: bool) -> dict[str, Any]:
    """How close the candidate's outputs are to the baseline's, example by example."""
    cosines, max_err, agree, n = [], 0.0, 0, 0
    for b, c in zip(baseline, candidate, strict=True):
        if b.shape != c.shape:
            raise ValueError(f"output shapes differ: baseline {list(b.shape)}, artifact {list(c.shape)}")
        fb, fc = b.reshape(b.shape[0], -1), c.reshape(c.shape[0], -1)
        cos = F.cosine_similarity(fb, fc, dim=1, eps=1e-12)
        # Equal rows are a perfect match even where cosine is undefined (all-zero outputs).
        cosines.append(torch.where((fb == fc).all(dim=1), torch.ones_like(cos), cos))
        if fb.numel():
            max_err = max(max_err, float(torch.nan_to_num((fb - fc).abs(), nan=float("inf")).max()))
        if classifier and b.dim() == 2:
            agree += int((b.argmax(-1) == c.argmax(-1)).sum())
        else:
            classifier = False  # agreement is defined for (examples, classes) outputs only
        n += b.shape[0]
    cos = torch.cat(cosines)
    # Non-finite outputs make cosine NaN; report them as the worst possible value rather than hide them.
    cos = torch.nan_to_num(cos, nan=-1.0)
    out: dict[str, Any] = {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "max_abs_err": max_err,
                           "examples": n}
    out["top1_agreement"] = 100.0 * agree / n if classifier else None
    return out
