"""`quantize`: int8 or 4-bit weights (weight-only) or int8 compute in ONNX Runtime (dynamic, static).

weight-only with ``bits: 4``: 4-bit integers in groups, chosen by NNCF (round to nearest, AWQ, scale estimation,
mixed precision); see compressor.passes.lowbit.

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
from ..encodings import Int8, encode_named
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
    bits: Literal[4, 8] = Field(
        8, description="weight-only: 8 (int8 per channel, float compute) or 4 (4-bit integers in groups of "
        "`group_size` inputs with float16 scales, chosen by NNCF's weight compression: Linear layers only; stored as "
        "compressed-tensors `pack-quantized` in safetensors and as ONNX Runtime's `MatMulNBits` in ONNX, which "
        "computes from the 4-bit weights directly). Embedding tables and the LM head follow `embeddings`.",
    )
    group_size: int = Field(
        128, description="bits 4: inputs that share one scale (16, 32, 64, 128 or 256). Smaller groups are more "
        "accurate and larger on disk (a float16 scale per group). A Linear whose input size it does not divide stays "
        "in float.",
    )
    symmetric: bool = Field(
        True, description="bits 4: integers in [-8, 7] times a scale; false: [0, 15] minus a zero point per group "
        "(asymmetric ranges fit skewed weights better, at a 4-bit zero point per group).",
    )
    ratio: float = Field(
        1.0, gt=0, le=1, description="bits 4: the fraction of the Linear layers (by size) at 4 bits; the rest, the "
        "layers NNCF finds most sensitive (its default criterion on the calibration data, `calibration`: the "
        "largest variance of a layer's input activations over its weights' 8-bit rounding error), are int8 per "
        "channel. "
        "Streamed, the decoder layers run twice: once for the sensitivities, once to compress.",
    )
    activations: Literal["int8", "float"] = Field(
        "int8", description="bits 4, ONNX: how ONNX Runtime's MatMulNBits multiplies. int8: activations quantized "
        "to int8 per block of inputs and integer products (its accuracy level 4), the fast CPU path, several times "
        "faster than float32 at batch 1; float: weights dequantized to float32 at every call (level 0), exactly "
        "the torch model's arithmetic but slower than float32 weights. The export is checked at level 0 against "
        "torch either way; the evaluator measures what int8 activations cost.",
    )
    embeddings: Literal["int8", "keep"] = Field(
        "int8", description="bits 4: embedding tables and the LM head (tied or not) as int8 per row with float16 "
        "scales, or kept in float. In a small language model they are most of the bytes.",
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
    method: str | list[str] | None = Field(
        None,
        description="static: how activation ranges are set from calibration data: minmax (observed range, the "
        "default), percentile (clip at `percentile`), entropy (KL-divergence-minimizing clip). weight-only bits 4: "
        "how the 4-bit weights are chosen, one or a list: rtn (round to nearest, data-free, the default), awq "
        "(activation-aware weight scaling, folded into the preceding layer), scale-estimation (group scales that "
        "minimise each layer's output error); awq and scale-estimation combine and calibrate on `calibration` "
        "(for a causal LM: windows of 128 tokens of its text). gptq is refused: NNCF offers it only for OpenVINO "
        "models (docs/decisions.md).",
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

    @property
    def static_method(self) -> str:
        """static: the activation range method (minmax unless `method` says otherwise)."""
        return self.method if isinstance(self.method, str) else "minmax"

    @property
    def weight_methods(self) -> list[str]:
        """bits 4: the weight methods, as a list (["rtn"] unless `method` says otherwise)."""
        if self.method is None:
            return ["rtn"]
        return [self.method] if isinstance(self.method, str) else list(self.method)

    @model_validator(mode="after")
    def _mode_fields(self) -> QuantizeConfig:
        from .lowbit import WEIGHT_METHODS

        onnx_only = {"smooth", "calibration", "method", "percentile", "target_fidelity", "max_float", "targets",
                     "strict"}
        four_bit = {"group_size", "symmetric", "ratio", "embeddings", "activations"}
        if self.bits == 4:
            if self.mode != "weight-only":
                raise ValueError(f"bits 4 is weight-only quantization; mode {self.mode} computes in int8 (bits 8)")
            wrong = sorted({"smooth", "percentile", "target_fidelity", "max_float", "targets", "strict",
                            "per_channel"} & self.model_fields_set)
            if wrong:
                raise ValueError(f"{', '.join(wrong)} do not apply to bits 4 (4-bit weights in groups)")
            if self.group_size not in (16, 32, 64, 128, 256):
                raise ValueError(f"group_size {self.group_size}: use 16, 32, 64, 128 or 256 (ONNX Runtime's "
                                 "MatMulNBits takes powers of two from 16)")
            methods = self.weight_methods
            unknown = [m for m in methods if m not in WEIGHT_METHODS]
            if unknown or not methods or len(set(methods)) != len(methods):
                raise ValueError(f"method {self.method!r}: give one or a list of {', '.join(WEIGHT_METHODS)}, each "
                                 "once")
            if "gptq" in methods:
                raise ValueError("method gptq: NNCF runs GPTQ on OpenVINO models only, not on the torch or ONNX "
                                 "models compressor quantizes; use [awq, scale-estimation], the data-aware pair it "
                                 "offers here")
            if "rtn" in methods and len(methods) > 1:
                raise ValueError(f"method {methods}: rtn is round to nearest alone; awq and scale-estimation "
                                 "replace it")
            if "calibration" in self.model_fields_set and methods == ["rtn"] and self.ratio == 1:
                raise ValueError("calibration is used by methods awq/scale-estimation and by ratio < 1; method "
                                 "rtn with ratio 1 is data-free")
            return self
        wrong4 = sorted(four_bit & self.model_fields_set)
        if wrong4:
            raise ValueError(f"{', '.join(wrong4)} only apply to bits 4")
        if self.method is not None and (not isinstance(self.method, str)
                                        or self.method not in ("minmax", "percentile", "entropy")):
            raise ValueError(f"method {self.method!r}: with bits 8 the method is static mode's activation range "
                             "method, minmax, percentile or entropy (rtn/awq/scale-estimation are for bits 4)")
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
        if "percentile" in self.model_fields_set and self.static_method != "percentile":
            raise ValueError(f"percentile applies to method percentile; method is {self.static_method}")
        if isinstance(self.smooth, float) and not 0 < self.smooth <= 1:
            raise ValueError(f"smooth {self.smooth}: a fixed smoothing strength must be in (0, 1]; or `auto`/`off`")
        return self


@register_pass
class QuantizePass(Pass):
    """Quantize weights to int8 or 4 bits."""

    name = "quantize"
    Config = QuantizeConfig
    summary = ("Store weights as int8 with float32 scales (per channel), or as 4-bit integers in groups (bits 4), "
               "computing in float.")
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

    def memory(self) -> tuple[float, float]:
        # measured on a 0.25B Llama, docs/decisions.md: int8 keeps the effective float weights beside their integers (1.25x after); 4-bit runs NNCF on a
        # copy of the module, which holds its own compressed state too.
        if self.config.mode == "weight-only" and self.config.bits == 4:
            # Data-aware methods (AWQ, scale estimation, ratio < 1) hold NNCF's statistics and traced graph as well:
            # 5.69 GB measured at 0.25B with AWQ + scale estimation (2026-12-03), against 3.95 GB for round to nearest.
            data_aware = self.config.weight_methods != ["rtn"] or self.config.ratio < 1
            return (3.9 if data_aware else 2.6), 1.15
        return 1.0, 1.25

    def runs_layers(self) -> bool:
        config: QuantizeConfig = self.config  # type: ignore[assignment]
        return config.mode == "weight-only" and config.bits == 4 and (config.weight_methods != ["rtn"]
                                                                      or config.ratio < 1)

    def stream_memory(self, model: Model) -> int:
        config: QuantizeConfig = self.config  # type: ignore[assignment]
        if not self.runs_layers():
            return 0
        from .layerwise import held_bytes
        from .lowbit import WINDOW, WINDOWS

        return held_bytes(model, config.calibration.limit or WINDOWS, WINDOW, twice=config.ratio < 1)

    def stream_problem(self) -> str | None:
        config: QuantizeConfig = self.config  # type: ignore[assignment]
        if config.mode != "weight-only":
            return f"mode {config.mode} quantizes the ONNX graph, which is exported whole"
        if not config.per_channel:  # per channel, rows are encoded in blocks (compressor/encodings.py)
            return "per_channel false scales each weight as a whole, holding several float copies of the largest"
        return None  # int8 by module type, name and size; each weight becomes Int8.decode(encode(value))

    def check(self, model: Model) -> None:
        from ..errors import Problem, RecipeError

        mode = self.config.mode  # type: ignore[attr-defined]
        config: QuantizeConfig = self.config  # type: ignore[assignment]
        if config.bits == 4 and model.task != "text-generation" and (
                config.ratio < 1 or set(config.weight_methods) & {"awq", "scale-estimation"}):
            raise RecipeError(Problem(
                f"method {config.weight_methods} / ratio {config.ratio} calibrate 4-bit weights on text, which "
                "compressor provides for causal language models; this model's task is " + model.task,
                path=f"passes[{self.index}].quantize.method", hint="use method rtn with ratio 1 (data-free)"))
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
        if config.bits == 4:
            from .lowbit import quantize_lowbit

            details = quantize_lowbit(model, config, self.index, ctx)
            model.export.lowbit_accuracy_level = 4 if config.activations == "int8" else 0
            touched = sorted({n for n, e in model.encodings.items() if e.kind == "intgroup"}
                             | set(details["rescaled_by_awq"]))
            ctx.info(f"quantized {details['tensors_4bit']} weights to 4 bits (groups of {config.group_size}, "
                     f"{'+'.join(details['method'])}), {details['tensors_8bit']} to int8 by sensitivity, "
                     f"{sum(1 for v in details['tables'].values() if v.startswith('int8'))} tables to int8")
            return PassResult(touched=touched, details=details)
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
                stored = encode_named(encoding, weight, full)
                with torch.no_grad():
                    weight.copy_(encoding.decode(stored))
                del stored
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
