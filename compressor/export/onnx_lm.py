"""Causal language models in ONNX: exported with their KV cache (optimum-onnx's `text-generation-with-past`) and
checked against torch the way they are used, on the prompt (prefill) and on decode steps that feed the cache back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CompressorError

if TYPE_CHECKING:  # pragma: no cover
    from ..model import Model

__all__ = ["GENERATION_TASK", "OPTIMUM_TASK", "is_causal_lm", "check_spec", "prompts", "check_decoder"]

GENERATION_TASK = "text-generation"  # the Model.task of causal language models
OPTIMUM_TASK = "text-generation-with-past"
DECODE_STEPS = 4


def is_causal_lm(model: Model) -> bool:
    """Whether the model generates text token by token (exported with its KV cache)."""
    return model.task == GENERATION_TASK


PROMPT_TOKENS = 32


def check_spec(model: Model, spec: Any) -> None:
    """RecipeError when ``export.onnx`` cannot export this model for generation; called before the passes run."""
    if is_causal_lm(model) and not spec.dynamic_axes:
        from ..errors import Problem, RecipeError

        raise RecipeError(Problem("a causal language model is exported with its KV cache, whose length grows with "
                                  "every token: it needs dynamic axes", path="export.onnx.dynamic_axes",
                                  hint="remove `dynamic_axes: false`"))


def prompts(model: Model, rows: int = 2) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of the first ``rows`` example inputs: each row's real tokens (padding on either
    side dropped), cut to the shortest row and to at most PROMPT_TOKENS: prompts of equal length, no padding, with
    room for the decode steps."""
    import torch

    ids = model.example_inputs["input_ids"][:rows]
    mask = model.example_inputs.get("attention_mask")
    real = [row[m.bool()] for row, m in zip(ids, mask[:rows])] if mask is not None else list(ids)
    length = max(1, min(min(len(r) for r in real), PROMPT_TOKENS))
    ids = torch.stack([r[:length] for r in real]).clone()
    return ids, torch.ones_like(ids)


def check_decoder(model: Model, path: Path, atol: float, rtol: float, steps: int = DECODE_STEPS, *,
                  relative: float | None = None) -> dict[str, Any]:
    """Prefill the example prompts and decode ``steps`` greedy tokens in torch (its own cache) and in ONNX Runtime
    (the graph's cache fed back); the logits of every step must agree within ``atol + rtol * |torch|`` (with
    ``relative``, a float16 graph: within ``atol + relative * max |torch|`` of the step). Returns the manifest's
    `check` entry: the worst error of each step."""
    from ..decoding import OrtDecoder
    from ..ort import ort_session

    try:
        decoder = OrtDecoder(ort_session(path))
    except Exception as exc:  # noqa: BLE001 - a graph ONNX Runtime cannot load is this run's failure
        raise CompressorError(f"ONNX Runtime cannot load the exported decoder: {type(exc).__name__}: {exc}") from exc
    ids, mask = prompts(model)
    errors: list[float] = []
    try:
        return _compare_steps(model, decoder, ids, mask, atol, rtol, steps, relative, errors)
    except CompressorError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime refusing a feed is this export's failure
        raise CompressorError(f"ONNX Runtime cannot run the exported decoder on the example prompts: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _compare_steps(model: Model, decoder: Any, ids: Any, mask: Any, atol: float, rtol: float, steps: int,
                   relative: float | None, errors: list[float]) -> dict[str, Any]:
    import numpy as np
    import torch

    with torch.no_grad():
        out = model.module(input_ids=ids, attention_mask=mask, use_cache=True)
        logits, past = decoder.step(ids.numpy(), mask.numpy(), decoder.empty_past(ids.shape[0]))
        for step in range(steps + 1):
            expected = out.logits.float().numpy()
            err = np.abs(logits - expected)
            errors.append(float(err.max()))
            limit = atol + (relative * float(np.abs(expected).max()) if relative is not None
                            else rtol * np.abs(expected))
            bad = err > limit
            if bad.any() or not np.isfinite(logits).all():
                where = "the prompt (prefill)" if step == 0 else f"decode step {step}"
                raise CompressorError(
                    f"the ONNX decoder does not match torch on {where}: logits differ by up to {errors[-1]:.3g} "
                    f"({int(bad.sum())} of {bad.size} values beyond "
                    + (f"atol {atol:g} + {relative:.0%} of the largest logit" if relative is not None
                       else f"atol {atol:g} + rtol {rtol:g} x |value|")
                    + "); the artifact would generate something else than the model")
            if step == steps:
                break
            nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model.module(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values,
                               use_cache=True)
            logits, past = decoder.step(nxt.numpy(), mask.numpy(), past)
    return {"max_abs_err": {"logits": max(errors)}, "atol": atol, "rtol": rtol, "relative": relative,
            "prefill_max_abs_err": errors[0], "decode_max_abs_err": errors[1:],
            "inputs": {"input_ids": list(ids.shape)}, "decode_steps": steps}
