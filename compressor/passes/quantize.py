"""`quantize`: int8 weights (weight-only, torch/safetensors) or int8 compute in ONNX Runtime (dynamic, static).

weight-only: each selected weight is replaced by its int8 grid value ``q * scale`` (symmetric, per output channel
by default), so the module computes exactly what the artifact stores; on disk the weight is an int8 tensor plus
its scales. Compute stays in float: `compressor.load` dequantizes on load (or keeps int8).

dynamic / static: int8 matrix products in ONNX Runtime, applied to the exported ONNX model
(compressor.export.onnx_quant); the torch module and the safetensors artifact stay float.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from ..cpu import TARGETS, Target
from ..encodings import Int8
from ..errors import Problem, RecipeError
from ..data.spec import CalibrationSpec
from .base import Context, Pass, PassConfig, PassResult, register_pass

if TYPE_CHECKING:  # pragma: no cover
    from ..model import Model


class QuantizeConfig(PassConfig):
    """Settings of the `quantize` pass."""

    mode: Literal["weight-only", "dynamic", "static"] = Field(
        "weight-only",
        description="weight-only: int8 weights with float32 scales, float compute (torch and safetensors "
        "artifacts; about 4x smaller). dynamic: the ONNX artifact computes matrix products in int8, activations "
        "quantized at run time per tensor (ONNX Runtime's MatMulInteger / DynamicQuantizeMatMul); the fast CPU "
        "mode for transformers. static: QDQ format, activation scales fixed from calibration data (`method`); "
        "the usual mode for CNNs. dynamic and static need `export: {onnx: {}}` and leave the safetensors "
        "artifact in float.",
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
    smooth: Literal["auto", "off"] | float = Field(
        "auto",
        description="dynamic/static: outlier smoothing (SmoothQuant). Each int8 matrix product's input is divided "
        "per channel by s = max|x|^a / max|w|^(1-a) and its weight rows multiplied by s, an exact rewrite that "
        "moves activation outliers into the weights. `auto` picks a per input from 0 (off) to 0.95 by the "
        "smallest output error on the calibration data; a number in (0, 1] fixes a; `off` disables it.",
    )
    calibration: CalibrationSpec = Field(
        default_factory=CalibrationSpec,
        description="dynamic/static: data for activation ranges, smoothing and the fidelity check (same forms as "
        "`evaluate.data`; default: the digits training split or the shipped calibration sentences).",
    )
    method: Literal["minmax", "percentile", "entropy"] = Field(
        "minmax",
        description="static: how activation ranges are set from calibration data: minmax (observed range), "
        "percentile (clip at `percentile`), entropy (KL-divergence-minimizing clip).",
    )
    percentile: float = Field(99.999, gt=90, le=100, description="static, method percentile: the percentile kept.")
    target_fidelity: float | None = Field(
        None, gt=0, le=1,
        description="dynamic/static: minimum cosine similarity to the float ONNX model, per calibration example "
        "(mean-pooled embeddings for text encoders), on the worst of `targets`. Below it, matrix products move to "
        "float compute (weights stay int8 on disk): each product's harm is scored once, then products are taken by "
        "regained fidelity (the cheaper first on ties), each confirmed on the whole calibration set, until it is met "
        "or `max_float` is reached, and any product the target holds without goes back to int8 (static models "
        "instead rebuild with the few worst products tried per step). Not reached: the report and the result line "
        "say so (`strict` fails the run). Unset: no fallback.",
    )
    max_float: float = Field(
        0.25, ge=0, le=1, description="dynamic/static: at most this fraction of the quantizable matrix products "
        "may move to float compute for `target_fidelity`."
    )
    targets: list[Target] = Field(
        default_factory=lambda: list(TARGETS), min_length=1,
        description="dynamic/static: the CPU families the int8 model must be accurate on. x86-avx2: x86 without "
        "VNNI (AVX2 or AVX-512BW), whose int8 kernel adds adjacent products in saturating 16-bit integers; "
        "x86-vnni: AVX-512 VNNI, AVX-VNNI or AMX (exact 32-bit sums); arm64 (exact). With x86-avx2 among them "
        "the int8 weights are chosen so that no adjacent pair can saturate, and the model then computes the same "
        "integers on every family. Every fidelity-driven choice is scored by the worst target, the evaluator "
        "reports each target's emulated arithmetic, and `compress pack` builds bundles only for these. Default: "
        "all of them, since an artifact travels.",
    )
    strict: bool = Field(
        False, description="dynamic/static: when `target_fidelity` cannot be reached, fail the run (exit 1) "
        "instead of shipping the closest model (which the report and the result line then flag)."
    )

    @field_validator("smooth", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false (and `on`/`yes` as true): take the words the user wrote.
        if isinstance(value, bool):
            return "auto" if value else "off"
        return value

    @model_validator(mode="after")
    def _mode_fields(self) -> QuantizeConfig:
        onnx_only = {"smooth", "calibration", "method", "percentile", "target_fidelity", "max_float", "targets",
                     "strict"}
        if self.mode == "weight-only":
            wrong = sorted(onnx_only & self.model_fields_set)
            if wrong:
                raise ValueError(f"{', '.join(wrong)} only apply to mode dynamic or static (int8 ONNX); mode "
                                 "weight-only quantizes the stored weights alone")
        elif self.mode == "dynamic" and self.model_fields_set & {"method", "percentile"}:
            raise ValueError("method/percentile set activation ranges from calibration, which only mode static "
                             "has; dynamic measures them at run time")
        if "strict" in self.model_fields_set and self.strict and self.target_fidelity is None:
            raise ValueError("strict fails the run when target_fidelity is not reached; set target_fidelity too")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets {self.targets} name a family twice")
        if "percentile" in self.model_fields_set and self.method != "percentile":
            raise ValueError(f"percentile applies to method percentile; method is {self.method}")
        if isinstance(self.smooth, float) and not 0 < self.smooth <= 1:
            raise ValueError(f"smooth {self.smooth}: a fixed smoothing strength must be in (0, 1]; or `auto`/`off`")
        return self


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

    @classmethod
    def recipe_problem(cls, config: Any, recipe: Any) -> tuple[str, str, str] | None:
        """(message, recipe path, hint) when this pass cannot work with the rest of ``recipe``."""
        if config.mode != "weight-only" and recipe.export.onnx is None:
            return (f"mode {config.mode} quantizes the ONNX artifact, but this recipe exports no ONNX", "mode",
                    "add `export: {onnx: {}}`, or use mode weight-only for a safetensors-only artifact")
        return None

    def check(self, model: Model) -> None:
        from ..errors import Problem, RecipeError

        mode = self.config.mode  # type: ignore[attr-defined]
        if mode != "weight-only" and model.task == "text-generation":
            raise RecipeError(Problem(
                f"mode {mode} (int8 compute in ONNX Runtime) does not support causal language models yet: its "
                "calibration runs the graph without the KV cache it is exported with",
                path=f"passes[{self.index}].quantize.mode",
                hint="use mode weight-only (int8 weights, float compute) for a causal language model"))

    def apply(self, model: Model, ctx: Context) -> PassResult:
        import torch

        config: QuantizeConfig = self.config  # type: ignore[assignment]
        if config.mode != "weight-only":
            # int8 compute exists only in the ONNX artifact: the exporter applies it after the float export has
            # been checked against torch (compressor.export.onnx_quant).
            from ..model import QuantizePlan

            model.export.onnx_quantize = QuantizePlan(index=self.index, config=config)
            ctx.info(f"int8 {config.mode} quantization will be applied to the exported ONNX model")
            return PassResult(touched=[], details={"format": "int8", "mode": config.mode, "applies_to": "onnx"})
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
