"""`quantize`: int8 weights with float32 scales (weight-only), for torch/safetensors artifacts.

Each selected weight is replaced by its int8 grid value ``q * scale`` (symmetric, per output channel by default),
so the module computes exactly what the artifact stores; on disk the weight is an int8 tensor plus its scales.
Compute stays in float: `compressor.load` dequantizes on load.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..encodings import Int8
from ..errors import Problem, RecipeError
from .base import Context, Pass, PassConfig, PassResult, register_pass

if TYPE_CHECKING:  # pragma: no cover
    from ..model import Model


class QuantizeConfig(PassConfig):
    """Settings of the `quantize` pass."""

    mode: Literal["weight-only"] = Field(
        "weight-only",
        description="weight-only: int8 weights with float32 scales, float compute (torch and safetensors "
        "artifacts; about 4x smaller).",
    )
    per_channel: bool = Field(
        True, description="One scale per output channel (row of the weight); false: one scale per tensor."
    )
    modules: list[str] = Field(
        default_factory=lambda: ["Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d"],
        description="Modules whose `weight` is quantized: class names or glob patterns on module names.",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Modules kept in float: glob patterns on module names (e.g. `classifier`, `*.output.dense`). "
        "Each must match something.",
    )
    min_elements: int = Field(
        1024, ge=1, description="Weights with fewer elements stay in float (their scales would cost more than "
        "they save)."
    )


@register_pass
class QuantizePass(Pass):
    """Quantize weights to int8."""

    name = "quantize"
    Config = QuantizeConfig
    summary = "Store weights as int8 with float32 scales (per channel), computing in float."
    must_not_follow = {
        "cast": "quantize needs float32 weights, and cast has already narrowed them; quantize alone (int8 "
        "weights, float32 compute) or cast alone",
        "quantize": "the weights are already on an int8 grid; keep one quantize",
    }

    def apply(self, model: Model, ctx: Context) -> PassResult:
        import torch

        config: QuantizeConfig = self.config  # type: ignore[assignment]
        modules = dict(model.module.named_modules())
        matched = {pattern: False for pattern in config.exclude}

        def selected(name: str, module: torch.nn.Module) -> bool:
            kind = type(module).__name__
            if not any(fnmatch.fnmatchcase(kind, p) or fnmatch.fnmatchcase(name, p) for p in config.modules):
                return False
            for pattern in config.exclude:
                if fnmatch.fnmatchcase(name, pattern):
                    matched[pattern] = True
                    return False
            return True

        names_by_tensor: dict[int, str] = {}
        for n, t in model.module.state_dict(keep_vars=True).items():
            names_by_tensor.setdefault(id(t), n)
        chosen = [(name, m) for name, m in modules.items() if name and selected(name, m)]
        unmatched = [p for p, hit in matched.items() if not hit]
        if unmatched:
            sample = ", ".join(n for n in list(modules)[1:8])
            raise RecipeError(Problem(f"exclude pattern(s) {', '.join(repr(p) for p in unmatched)} match no "
                                      "module this pass would quantize", path=f"passes[{self.index}].quantize.exclude",
                                      hint=f"module names look like: {sample}, ..."))
        encoding = Int8(per_channel=config.per_channel)
        touched: list[str] = []
        skipped: dict[str, str] = {}
        for mod_name, module in chosen:
            weight = module._parameters.get("weight")
            if weight is None or id(weight) not in names_by_tensor:
                continue
            full = names_by_tensor[id(weight)]
            if full in touched:
                continue  # a tied weight, already done through its first owner
            if weight.dtype != torch.float32:
                skipped[full] = f"dtype {weight.dtype} (only float32 is quantized)"
            elif weight.dim() < 2 or weight.numel() < config.min_elements:
                skipped[full] = f"{weight.numel()} elements (< min_elements {config.min_elements})"
            else:
                with torch.no_grad():
                    weight.copy_(encoding.decode(encoding.encode(weight)))
                model.encodings[full] = encoding
                touched.append(full)
        if not touched:
            raise RecipeError(Problem("no weight was quantized: no module matched, or every match was skipped ("
                                      + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3]) + ")",
                                      path=f"passes[{self.index}].quantize",
                                      hint="check `modules` against the model's module and class names"))
        ctx.info(f"quantized {len(touched)} weights to int8 ({'per channel' if config.per_channel else 'per tensor'});"
                 f" {len(skipped)} left in float")
        return PassResult(touched=touched, details={"format": "int8", "per_channel": config.per_channel,
                                                    "tensors_quantized": len(touched),
                                                    "left_in_float": dict(sorted(skipped.items()))})
