"""`cast`: store and run float weights in float16 or bfloat16, keeping numerically sensitive modules in float32.

Kept modules (normalization layers by default, plus any named in ``keep``) stay in float32 and get a dtype bridge:
their inputs are cast up and their outputs back down, so the model runs as a whole in the narrow dtype. The root
module gets a bridge too, so callers can keep passing float32 inputs.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Literal

from typing import Any

from pydantic import Field, model_validator

from ..encodings import Cast
from ..errors import Problem, RecipeError
from .base import Context, Pass, PassConfig, PassResult, register_pass

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..model import Model


class CastConfig(PassConfig):
    """Settings of the `cast` pass."""

    dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="Narrow float dtype for weights and compute: float16 or bfloat16."
    )
    keep_norms: bool = Field(
        True,
        description="Keep normalization layers (LayerNorm, BatchNorm, GroupNorm, RMSNorm and any module whose "
        "class name ends in 'Norm') in float32: their statistics lose accuracy in 16 bits.",
    )
    keep: list[str] = Field(
        default_factory=list,
        description="More modules to keep in float32: glob patterns matched against module names "
        "(e.g. `embeddings.*`, `classifier`) or class names (e.g. `Embedding`). Each must match something.",
    )
    float32_io: bool = Field(
        True,
        description="ONNX artifact: its float inputs and outputs stay float32 (a Cast at each boundary), so callers "
        "feed the same arrays as to the float model; false: they are float16 too (dtype float16 only). With "
        "float16 the ONNX graph computes in float16; with bfloat16 it stores the weights in bfloat16 and computes "
        "in float32, since ONNX Runtime's CPU provider has no bfloat16 matrix kernels.",
    )

    @model_validator(mode="after")
    def _io(self) -> CastConfig:
        if not self.float32_io and self.dtype == "bfloat16":
            raise ValueError("float32_io false needs dtype float16: a bfloat16 ONNX graph computes in float32 "
                             "(ONNX Runtime has no bfloat16 CPU kernels), so its inputs and outputs are float32")
        return self


def _is_norm(module: nn.Module) -> bool:
    from torch import nn

    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._BatchNorm,
                  nn.modules.instancenorm._InstanceNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
    return isinstance(module, norm_types) or type(module).__name__.endswith(("Norm", "Norm1d", "Norm2d", "Norm3d"))


@register_pass
class CastPass(Pass):
    """Cast float weights to float16/bfloat16."""

    name = "cast"
    Config = CastConfig
    summary = "Cast float weights and compute to float16 or bfloat16, keeping sensitive modules in float32."
    must_not_follow = {
        "cast": "the weights are already rounded by the first cast; casting again only compounds the error. "
        "Keep one cast with the dtype you want",
        "quantize": "cast would store the int8-quantized weights as float16 again and lose the int8 encoding; "
        "use quantize alone (int8 weights) or cast alone",
    }

    @classmethod
    def recipe_problem(cls, config: Any, recipe: Any) -> tuple[str, str, str] | None:
        """(message, recipe path, hint) when this pass cannot work with the rest of ``recipe``."""
        if "float32_io" in config.model_fields_set and recipe.export.onnx is None:
            return ("float32_io sets the ONNX artifact's input and output dtype, but this recipe exports no ONNX",
                    "float32_io", "add `export: {onnx: {}}`, or drop float32_io (the torch model always takes and "
                    "returns the caller's dtype)")
        return None

    def _kept_roots(self, modules: dict[str, nn.Module]) -> list[str]:
        """The top-most modules that stay float32 (`keep`, `keep_norms`, and owners of a tensor tied to one);
        RecipeError for a keep pattern that matches nothing."""
        config: CastConfig = self.config  # type: ignore[assignment]
        matched = {pattern: False for pattern in config.keep}

        def wants_fp32(name: str, module: nn.Module) -> bool:
            hit = config.keep_norms and _is_norm(module)
            for pattern in config.keep:
                if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(type(module).__name__, pattern):
                    matched[pattern] = True
                    hit = True
            return hit

        kept_roots: list[str] = []  # top-most kept modules: everything under them stays float32 too
        for name, module in modules.items():
            if name and wants_fp32(name, module) and not any(_under(name, root) for root in kept_roots):
                kept_roots.append(name)
        # A tensor tied between a kept module and another one (an embedding shared with an output layer) must
        # have one dtype: keep wins, so the other owner is kept too.
        kept_ids = {id(t) for root in kept_roots for t in modules[root].state_dict(keep_vars=True).values()}
        for name, module in modules.items():
            own = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
            if name and not any(_under(name, r) for r in kept_roots) and any(id(t) in kept_ids for t in own):
                kept_roots.append(name)
        unmatched = [p for p, hit in matched.items() if not hit]
        if unmatched:
            sample = ", ".join(n for n in list(modules)[1:8])
            raise RecipeError(
                Problem(
                    f"keep pattern(s) {', '.join(repr(p) for p in unmatched)} match no module of this model",
                    path=f"passes[{self.index}].cast.keep",
                    hint=f"module names look like: {sample}, ...; class names also match (e.g. 'Embedding')",
                )
            )
        return kept_roots

    def memory(self) -> tuple[float, float]:
        # The narrow copy of each float tensor beside the float32 one (measured on a 0.25B Llama, docs/decisions.md); about half after.
        return 0.55, 0.5

    def stream_problem(self) -> str | None:
        return None  # decides by module names and types; each tensor becomes Cast(dtype).decode(encode(value))

    def apply(self, model: Model, ctx: Context) -> PassResult:
        import torch

        config: CastConfig = self.config  # type: ignore[assignment]
        dtype = getattr(torch, config.dtype)
        modules = dict(model.module.named_modules())
        kept_roots = self._kept_roots(modules)

        names_by_tensor: dict[int, str] = {}
        for n, t in model.module.state_dict(keep_vars=True).items():
            names_by_tensor.setdefault(id(t), n)  # first name of a tied tensor: the one that is stored
        touched: list[str] = []
        kept_tensors = 0
        for mod_name, module in modules.items():
            keep = any(_under(mod_name, root) for root in kept_roots)
            for store in (module._parameters, module._buffers):
                for key, tensor in store.items():
                    if tensor is None or not tensor.is_floating_point() or id(tensor) not in names_by_tensor:
                        continue
                    full = names_by_tensor[id(tensor)]
                    if full in model.aliases or full in touched:
                        continue
                    if keep:
                        kept_tensors += 1
                        continue
                    if tensor.dtype != dtype:
                        tensor.data = tensor.data.to(dtype)
                    model.encodings[full] = Cast(config.dtype)
                    touched.append(full)

        # The root runs in the narrow dtype and hands callers back the float dtype they passed in; kept modules
        # run in float32 and hand the rest of the model the narrow dtype, whatever their inputs were (token ids).
        bridges: dict[str, dict[str, str]] = {"": {"run": config.dtype}}
        bridges.update({root: {"run": "float32", "out": config.dtype}
                        for root in kept_roots if _has_float_tensors(modules[root])})
        model.dtype_bridges.update(bridges)
        model.install_bridges()
        # The ONNX exporter traces a float32 view of this model and narrows the checked graph the same way
        # (compressor.export.onnx_cast); it needs to know which modules stay float32.
        from ..model import CastPlan

        model.export.onnx_cast = CastPlan(index=self.index, dtype=config.dtype, float32_io=config.float32_io,
                                          kept_modules=list(kept_roots))
        ctx.info(f"cast {len(touched)} tensors to {config.dtype}; kept {kept_tensors} in float32 ({len(kept_roots)} modules)")
        return PassResult(
            touched=touched,
            details={
                "dtype": config.dtype,
                "tensors_cast": len(touched),
                "tensors_kept_float32": kept_tensors,
                "modules_kept_float32": len(kept_roots),
            },
        )


def _under(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def _has_float_tensors(module: nn.Module) -> bool:
    return any(t.is_floating_point() for t in module.state_dict().values())
