"""`prune`: magnitude pruning, unstructured (per layer or global) or N:M semi-structured.

Pruned weights become exact zeros in the module, and the tensor is stored sparse (``encodings.Sparse``: its
non-zero values plus their positions as a bitmask or relative indices, whichever is smaller). Zeros already there
(an earlier prune) have the smallest magnitude, so they stay pruned: prune -> recover -> prune is gradual pruning.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from ..encodings import Codebook, Int8, Sparse
from ..errors import Problem, RecipeError
from ..data.spec import CalibrationSpec
from .base import Context, Pass, PassConfig, PassResult, register_pass
from .select import matches, per_module, select_tensors
from .structured import (InputStats, NeuronGroup, consumer_input_stats, head_groups, module_sizes, neuron_groups,
                         prune_head_group, shrink_group)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..model import Model

_NM = re.compile(r"(\d+):(\d+)")
PRUNABLE = ["Linear", "Conv1d", "Conv2d", "Conv3d"]
PRUNE_MEMORY = (1.8, 1.0)  # (working, after) as in Pass.memory: measured on a 0.25B Llama, docs/decisions.md
STRUCTURED = ("neurons", "heads")


class PruneConfig(PassConfig):
    """Settings of the `prune` pass."""

    sparsity: float | dict[str, float] | None = Field(
        None,
        description="Fraction of each selected weight set to zero, in [0, 1) (0.9 keeps one weight in ten). A "
        "mapping gives per-layer-type targets: keys are class names or module-name globs, the first key that "
        "matches a weight wins (list specific ones first), and weights matching no key stay dense (`'*'` sets a "
        "default). Required for `pattern: unstructured`; an N:M pattern fixes it at 1 - N/M.",
    )
    pattern: str = Field(
        "unstructured",
        description="`unstructured`: any weight may go. `N:M` (e.g. `2:4`): in every group of M consecutive "
        "weights along the input dimension, the N largest stay (the layout sparse tensor cores accelerate). "
        "`neurons`: structured; whole hidden neurons go (FFN neurons of BERT- and Llama-style transformers, hidden "
        "units of MLPs, output channels of convolutions feeding a conv or, through `flatten(1)`, a Linear), least "
        "important first (see `importance`), and the producing and consuming layers physically shrink (batch norms "
        "in between too), so the model is smaller and faster in every runtime. `heads`: structured; whole "
        "attention heads of BERT-family models go (query/key/value rows and the output projection's columns, "
        "removed with the model's own `prune_heads`; each layer keeps at least one). `sparsity` is then the "
        "fraction of neurons or heads removed from each group.",
    )
    scope: Literal["layer", "global"] = Field(
        "layer",
        description="unstructured: `layer` prunes each weight to the target on its own; `global` ranks all "
        "selected weights together under one threshold (layers with small weights lose more; a single number "
        "`sparsity` only).",
    )
    modules: list[str] = Field(
        default_factory=lambda: list(PRUNABLE),
        description="Modules whose `weight` is pruned: class names or glob patterns on module names. Each must "
        "match something.",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Modules left dense: class names or module-name globs (e.g. `classifier`). Each must match "
        "something.",
    )
    importance: Literal["activation", "magnitude"] = Field(
        "activation",
        description="pattern neurons or heads: how units are ranked. `activation`: the consumer's column norms "
        "times the unit's RMS activation on `data` (what removing it takes from the output); `magnitude`: times its "
        "producer rows' norm, no data needed.",
    )
    reconstruct: bool = Field(
        True,
        description="pattern neurons or heads with importance activation: refit each Linear consumer's remaining "
        "input columns and bias by least squares on the `data` activations, so it reproduces the output it gave "
        "before the units went (MiniLM, a quarter of the FFN neurons: 7x less hidden-state error before recovery). "
        "Conv consumers are not refitted. It holds one float64 matrix of (consumer inputs + 1)^2 per group while "
        "pruning (MiniLM: 6 x 19 MB; a 7B Llama's 32 down projections: 31 GB): set false for models that large.",
    )
    data: CalibrationSpec = Field(
        default_factory=CalibrationSpec,
        description="pattern neurons or heads with importance activation: the data the activations are measured on (same "
        "forms as `evaluate.data`; default: the digits training split or the shipped calibration sentences).",
    )

    @field_validator("sparsity")
    @classmethod
    def _fractions(cls, value: Any) -> Any:
        targets = value.items() if isinstance(value, dict) else [("", value)] if value is not None else []
        for key, target in targets:
            where = f" for {key!r}" if key else ""
            if not 0 <= target < 1:
                raise ValueError(f"sparsity {target}{where} is not a fraction in [0, 1): it is the share of weights "
                                 "set to zero (0.9 keeps one in ten; 1 would remove them all)")
        if isinstance(value, dict) and not value:
            raise ValueError("sparsity is an empty mapping; give a number or {pattern: fraction}")
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        if value in STRUCTURED or value == "unstructured":
            return value
        found = _NM.fullmatch(value)
        if found is None:
            raise ValueError(f"pattern {value!r}: write `unstructured`, `neurons`, `heads` or N:M with integers, "
                             "e.g. `2:4`")
        n, m = int(found[1]), int(found[2])
        if not 0 < n < m <= 64:
            raise ValueError(f"pattern {value!r}: N:M needs 0 < N < M <= 64 (2:4 keeps 2 of every 4 weights)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        if "reconstruct" in self.model_fields_set and self.reconstruct and self.importance != "activation":
            raise ValueError("reconstruct refits layers on the activations of `data`; it needs importance "
                             "activation (or set reconstruct: false)")
        if self.pattern not in STRUCTURED and {"importance", "data", "reconstruct"} & self.model_fields_set:
            raise ValueError("importance and data rank neurons or heads for pattern neurons/heads; magnitude "
                             "pruning needs neither")
        if self.pattern in STRUCTURED:
            if self.sparsity is None:
                raise ValueError(f"set `sparsity`, the fraction of {self.pattern} removed (e.g. 0.25), for pattern "
                                 f"{self.pattern}")
            if self.scope != "layer":
                raise ValueError(f"pattern {self.pattern} prunes each group on its own; scope must be layer")
        elif self.pattern == "unstructured":
            if self.sparsity is None:
                raise ValueError("set `sparsity` (e.g. 0.9) for unstructured pruning, or an N:M `pattern`")
            if self.scope == "global" and isinstance(self.sparsity, dict):
                raise ValueError("scope global ranks every weight under one threshold, so sparsity must be one "
                                 "number; per-type targets need scope layer")
        else:
            if self.sparsity is not None:
                raise ValueError(f"pattern {self.pattern} fixes the sparsity at 1 - N/M; drop `sparsity`")
            if "scope" in self.model_fields_set:
                raise ValueError("scope applies to unstructured pruning; an N:M pattern works per group")
        return self

    @property
    def n_m(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern, else None."""
        found = _NM.fullmatch(self.pattern)
        return (int(found[1]), int(found[2])) if found else None


@register_pass
class PrunePass(Pass):
    """Magnitude pruning."""

    name = "prune"
    Config = PruneConfig
    summary = "Set the smallest-magnitude weights to zero (per layer, global or N:M) and store them sparse."
    must_not_follow = {
        "share": "shared weights take their values from a codebook; pruning now would leave centroids without "
        "members. Prune first, then share",
        "quantize": "the weights are on an int8 grid; prune first, then quantize",
        "cast": "prune in float32 first, then cast",
    }

    def _plan(self, model: Model) -> dict[str, tuple[torch.Tensor, float]]:
        """Each selected weight with its target sparsity (N:M: 1 - N/M)."""
        config: PruneConfig = self.config  # type: ignore[assignment]
        where = f"passes[{self.index}].prune"
        tensors = select_tensors(model, config.modules, config.exclude, where,
                                 defaults="modules" not in config.model_fields_set)
        n_m = config.n_m
        if n_m is not None:
            n, m = n_m
            for name, t in tensors.items():
                width = t[0].numel() if t.dim() > 1 else t.numel()
                if width % m:
                    raise RecipeError(Problem(
                        f"{name} has {width} weights per output row, not a multiple of M = {m}",
                        path=f"{where}.pattern",
                        hint=f"exclude that module, or choose an M dividing {width}"))
            return {name: (t, 1 - n / m) for name, t in tensors.items()}
        if not isinstance(config.sparsity, dict):
            return {name: (t, float(config.sparsity)) for name, t in tensors.items()}  # type: ignore[arg-type]
        return per_module(model, tensors, config.sparsity, where, "sparsity")

    def _groups(self, model: Model) -> list[tuple[NeuronGroup, float]]:
        """pattern neurons or heads: each group with the fraction of its units to remove."""
        config: PruneConfig = self.config  # type: ignore[assignment]
        where = f"passes[{self.index}].prune"
        unit = "neuron" if config.pattern == "neurons" else "head"
        groups = neuron_groups(model.module) if config.pattern == "neurons" else head_groups(model.module)
        if not groups:
            hint = ("it knows BERT-style (intermediate.dense -> output.dense) and Llama-style (gate/up -> down) "
                    "blocks and, through torch.fx, Linear/Conv -> activation/pooling -> Linear/Conv chains; use "
                    "unstructured or N:M pruning for other models") if unit == "neuron" else (
                    "it knows attention modules with Hugging Face's prune_heads (BERT, RoBERTa, MiniLM and the "
                    "like); use pattern neurons or unstructured pruning for other models")
            raise RecipeError(Problem(f"pattern {config.pattern} found no {unit} groups in this "
                                      f"{type(model.module).__name__}", path=f"{where}.pattern", hint=hint))
        explicit = "modules" in config.model_fields_set
        hit = {p: False for p in ([*config.modules] if explicit else []) + config.exclude}
        kinds = {n: type(m).__name__ for n, m in model.module.named_modules()}
        chosen: list[tuple[NeuronGroup, float]] = []
        used = {k: False for k in config.sparsity} if isinstance(config.sparsity, dict) else {}
        for group in groups:
            names = [*([group.attention] if group.attention else []), *group.members]
            if explicit:
                found = [p for p in config.modules if any(matches(p, n, kinds[n]) for n in names)]
                for p in found:
                    hit[p] = True
                if not found:
                    continue
            excluded = [p for p in config.exclude if any(matches(p, n, kinds[n]) for n in names)]
            for p in excluded:
                hit[p] = True
            if excluded:
                continue
            if isinstance(config.sparsity, dict):
                target = None
                for key, value in config.sparsity.items():
                    if any(matches(key, n, kinds[n]) for n in names):
                        used[key], target = True, value
                        break
                if target is None:
                    continue
            else:
                target = float(config.sparsity)  # type: ignore[arg-type]
            chosen.append((group, target))
        missing = [p for p, h in {**hit, **used}.items() if not h]
        if missing:
            sample = ", ".join(f"{g.producers[0]} -> {g.consumer}" for g in groups[:2])
            raise RecipeError(Problem(f"pattern(s) {', '.join(repr(p) for p in missing)} match no {unit} group",
                                      path=where, hint=f"{unit} groups of this model: {sample}, ..."))
        for group, _ in chosen:
            for n in group.members:
                for suffix in (".weight", ".bias"):
                    enc = model.encodings.get(n + suffix)
                    if enc is not None and enc.kind != "dense":
                        raise RecipeError(Problem(
                            f"{n + suffix} is already stored as {enc.kind}; structured pruning reshapes layers "
                            "and must come before passes that encode them", path=where,
                            hint=f"put `prune: {{pattern: {config.pattern}}}` first"))
        return chosen

    def memory(self) -> tuple[float, float]:
        # Scores, masks and sorted magnitudes beside the weights while it runs; the dense effective weights after.
        return PRUNE_MEMORY

    def check(self, model: Model) -> None:
        if self.config.pattern in STRUCTURED:  # type: ignore[attr-defined]
            self._groups(model)
        else:
            self._plan(model)

    def _apply_structured(self, model: Model, ctx: Context) -> PassResult:
        import torch

        config: PruneConfig = self.config  # type: ignore[assignment]
        chosen = self._groups(model)
        unit = config.pattern
        before = model.numel()
        per_group: dict[str, dict[str, int]] = {}
        named = dict(model.module.named_modules())
        stats: dict[str, InputStats] = {}
        data_name = None
        if config.importance == "activation":
            from .recover import training_batches

            batches, _, data_name = training_batches(model, config.data, ctx)
            stats = consumer_input_stats(model.module, [g for g, _ in chosen], batches, gram=config.reconstruct)
        with torch.no_grad():
            for group, target in chosen:
                remove = min(round(target * group.width), group.width - 1)  # a group keeps at least one unit
                if group.attention is not None:
                    model.pruned_heads[group.attention] = prune_head_group(model.module, group, remove,
                                                                           stats.get(group.consumer))
                    named = dict(model.module.named_modules())  # prune_heads replaced the Linear modules
                    per_group[group.attention] = {unit: group.width, "removed": remove}
                    continue
                shrink_group(model.module, group, remove, stats.get(group.consumer))
                per_group[group.consumer] = {unit: group.width, "removed": remove}
                for n in group.members:
                    model.resized[n] = module_sizes(named[n])
        # The module's tensors changed shape (and, for heads, identity): every encoding of a member is renewed.
        members = {n for g, _ in chosen for n in g.members}
        touched = [t for t in model.tensors() if t.rpartition(".")[0] in members]
        after = model.numel()
        removed = sum(v["removed"] for v in per_group.values())
        total = sum(v[unit] for v in per_group.values())
        ctx.info(f"removed {removed:,} of {total:,} {unit} in {len(per_group)} groups; "
                 f"{before:,} -> {after:,} parameters")
        return PassResult(touched=touched, details={
            "pattern": unit, "importance": config.importance, "data": data_name,
            "reconstructed": any(stats[g.consumer].gram is not None for g, _ in chosen if g.consumer in stats), f"{unit}_removed": removed,
            f"{unit}_before": total, "parameters_before": before, "parameters_after": after, "per_group": per_group})

    def apply(self, model: Model, ctx: Context) -> PassResult:
        import torch

        config: PruneConfig = self.config  # type: ignore[assignment]
        if config.pattern in STRUCTURED:
            return self._apply_structured(model, ctx)
        plan = self._plan(model)
        for name in plan:
            if isinstance(model.encodings[name], (Codebook, Int8)):  # pragma: no cover - must_not_follow stops it
                raise RecipeError(Problem(f"{name} is already shared or quantized", path=f"passes[{self.index}]"))
        with torch.no_grad():
            if config.n_m is not None:
                masks = {name: _n_m_mask(t, *config.n_m) for name, (t, _) in plan.items()}
            elif config.scope == "global":
                masks = _global_masks({n: t for n, (t, _) in plan.items()}, float(config.sparsity))  # type: ignore[arg-type]
            else:
                masks = {name: _layer_mask(t, target) for name, (t, target) in plan.items()}
            per_layer: dict[str, float] = {}
            for name, (tensor, _) in plan.items():
                # where(), not a multiply: a negative weight times 0 is -0.0, which storage would give back as +0.0.
                tensor.copy_(torch.where(masks[name], tensor, torch.zeros((), dtype=tensor.dtype)))
                model.encodings[name] = Sparse(list(tensor.shape))
                per_layer[name] = round(int((tensor == 0).sum()) / tensor.numel(), 6)
        pruned = sum(int((t == 0).sum()) for t, _ in plan.values())
        selected = sum(t.numel() for t, _ in plan.values())
        all_params = model.numel()
        zeros = sum(int((t == 0).sum()) for t in model.tensors().values() if t.is_floating_point())
        ctx.info(f"pruned {pruned:,} of {selected:,} weights ({pruned / max(selected, 1):.1%}) in {len(plan)} tensors")
        return PassResult(
            touched=list(plan),
            details={
                "pattern": config.pattern,
                "scope": config.scope if config.n_m is None else "group",
                "sparsity_selected": round(pruned / max(selected, 1), 6),
                "sparsity_overall": round(zeros / max(all_params, 1), 6),
                "sparsity_per_layer": per_layer,
            },
        )


def _layer_mask(tensor: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask dropping the ``round(sparsity * numel)`` smallest magnitudes (ties: lower index first)."""
    import torch

    flat = tensor.detach().abs().reshape(-1).float()
    drop = round(sparsity * flat.numel())
    mask = torch.ones_like(flat, dtype=torch.bool)
    if drop:
        mask[torch.argsort(flat, stable=True)[:drop]] = False
    return mask.reshape(tensor.shape)


def _global_masks(tensors: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    import torch

    flat = torch.cat([t.detach().abs().reshape(-1).float() for t in tensors.values()])
    drop = round(sparsity * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    if drop:
        keep[torch.argsort(flat, stable=True)[:drop]] = False
    out, at = {}, 0
    for name, t in tensors.items():
        out[name] = keep[at:at + t.numel()].reshape(t.shape)
        at += t.numel()
    return out


def _n_m_mask(tensor: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In each group of ``m`` consecutive weights of a row (the input dimension), keep the ``n`` largest."""
    import torch

    groups = tensor.detach().abs().float().reshape(tensor.shape[0], -1, m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return mask.reshape(tensor.shape)
