"""The tensor-parallel plan the `shard` pass makes: which module is split how over the ranks, and how each stored
tensor follows (the rank files are written by export/tp.py and loaded by loading/tp.py).

Styles, in the Megatron sense:
- ``colwise``: the output features are split; each rank computes its slice of the output (no communication);
- ``rowwise``: the input features are split; each rank computes a partial sum, all-reduced to the full output
  (the bias is added once, after the reduction);
- ``vocab``: the vocabulary dimension of an Embedding (rows) or an LM head (output features) is split, possibly
  unevenly (torch.chunk sizes, as DTensor's Shard); the output is made whole again (all-reduce / all-gather);
- ``replicate``: every rank holds the whole tensor (norms, position embeddings, biases of rowwise layers).

A colwise layer followed by a rowwise one (attention q/k/v -> output projection, FFN up -> down) needs one
all-reduce per block. Attention modules are told their local head count (``attributes``), because the q/k/v
outputs of each rank hold only its heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import Problem, RecipeError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["TPPlan", "derive_plan", "user_plan", "split_specs", "check_divisible", "world_sizes"]


@dataclass
class TPPlan:
    """How a model is split over ``world`` ranks: a style per module (absent: replicated), how many fused parts a
    colwise tensor has (GPT-2's c_attn holds q, k and v: 3), and the attributes each rank's modules get."""

    world: int
    family: str
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {style, kind, parts}
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> {attribute: local value}
    constraints: list[tuple[str, int, str]] = field(default_factory=list)  # (dimension, size, where): size % world

    def to_json(self) -> dict[str, Any]:
        return {"world": self.world, "family": self.family, "modules": self.modules, "attributes": self.attributes}


def _kind(m: nn.Module) -> str | None:
    from torch import nn

    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Embedding):
        return "embedding"
    if type(m).__name__ == "Conv1D" and hasattr(m, "nf"):  # transformers' GPT-2 layer: weight (in, out)
        return "conv1d"
    return None


def _at(m: nn.Module, path: str) -> str | None:
    """The kind of ``m``'s submodule at ``path`` (dotted), or None when there is none or it is of no kind."""
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return _kind(m)


def _out_in(m: nn.Module) -> tuple[int, int]:
    """(output features, input features) of a Linear or Conv1D; (rows, columns) of an Embedding."""
    kind = _kind(m)
    w = m.weight
    return (w.shape[1], w.shape[0]) if kind == "conv1d" else (w.shape[0], w.shape[1])


def _add(plan: TPPlan, named: dict[str, nn.Module], name: str, style: str, parts: int = 1) -> None:
    m = named[name]
    plan.modules[name] = {"style": style, "kind": _kind(m), "parts": parts}
    out, inp = _out_in(m)
    if style == "colwise":
        plan.constraints.append((f"output features of {name}" + (f" ({parts} fused parts)" if parts > 1 else ""),
                                 out // parts, name))
    elif style == "rowwise":
        plan.constraints.append((f"input features of {name}", inp, name))


def derive_plan(module: nn.Module, world: int, where: str = "shard") -> TPPlan:
    """The plan for a Hugging Face BERT-, GPT-2- or Llama-style model, from its module structure; RecipeError
    when the architecture is not one of those (give `plan:` for other models)."""
    named = dict(module.named_modules())
    config = getattr(module, "config", None)
    plan = TPPlan(world=world, family="")
    for name, m in named.items():
        stem = f"{name}." if name else ""
        inner = getattr(m, "self", None)
        # BERT family: attention.self.{query,key,value} -> attention.output.dense; intermediate -> output.
        if all(_at(m, f"self.{p}") == "linear" for p in ("query", "key", "value")) \
                and isinstance(getattr(inner, "num_attention_heads", None), int) and _at(m, "output.dense") == "linear":
            plan.family = plan.family or "bert"
            heads = inner.num_attention_heads
            plan.constraints.append(("num_attention_heads", heads, f"{stem}self"))
            for p in ("query", "key", "value"):
                _add(plan, named, f"{stem}self.{p}", "colwise")
            _add(plan, named, f"{stem}output.dense", "rowwise")
            plan.attributes[f"{stem}self"] = {"num_attention_heads": heads // world,
                                             "all_head_size": inner.all_head_size // world}
        if _at(m, "intermediate.dense") == "linear" and _at(m, "output.dense") == "linear":
            _add(plan, named, f"{stem}intermediate.dense", "colwise")
            _add(plan, named, f"{stem}output.dense", "rowwise")
            plan.constraints.append(("intermediate_size", m.intermediate.dense.out_features, f"{stem}intermediate"))
        # GPT-2: attn.c_attn (q, k, v fused, Conv1D) -> attn.c_proj; mlp.c_fc -> mlp.c_proj.
        if _at(m, "c_attn") == "conv1d" and _at(m, "c_proj") == "conv1d" and isinstance(getattr(m, "num_heads", None),
                                                                                        int):
            if getattr(m, "is_cross_attention", False):
                raise RecipeError(Problem(f"{name} is a cross-attention block; the GPT-2 plan covers self-attention "
                                          "only", path=where, hint="give a `plan:` for this model"))
            plan.family = plan.family or "gpt2"
            plan.constraints.append(("n_head", m.num_heads, name))
            _add(plan, named, f"{stem}c_attn", "colwise", parts=3)
            _add(plan, named, f"{stem}c_proj", "rowwise")
            plan.attributes[name] = {"num_heads": m.num_heads // world, "split_size": m.split_size // world}
        if _at(m, "c_fc") == "conv1d" and _at(m, "c_proj") == "conv1d":
            _add(plan, named, f"{stem}c_fc", "colwise")
            _add(plan, named, f"{stem}c_proj", "rowwise")
            plan.constraints.append(("n_inner", _out_in(m.c_fc)[0], name))
        # Llama: self_attn.{q,k,v}_proj -> o_proj; mlp.{gate,up}_proj -> down_proj.
        if all(_at(m, p) == "linear" for p in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                and isinstance(getattr(m, "head_dim", None), int):
            plan.family = plan.family or "llama"
            plan.constraints.append(("num_attention_heads", m.q_proj.out_features // m.head_dim, name))
            plan.constraints.append(("num_key_value_heads", m.k_proj.out_features // m.head_dim, name))
            for p in ("q_proj", "k_proj", "v_proj"):
                _add(plan, named, f"{stem}{p}", "colwise")
            _add(plan, named, f"{stem}o_proj", "rowwise")
        if all(_at(m, p) == "linear" for p in ("gate_proj", "up_proj", "down_proj")):
            for p in ("gate_proj", "up_proj"):
                _add(plan, named, f"{stem}{p}", "colwise")
            _add(plan, named, f"{stem}down_proj", "rowwise")
            plan.constraints.append(("intermediate_size", m.gate_proj.out_features, name))
    if not plan.family:
        raise RecipeError(Problem(
            f"no tensor-parallel plan is known for {type(module).__name__}", path=where,
            hint="the built-in plans cover Hugging Face BERT-, GPT-2- and Llama-style models; give `plan:` "
                 "({module pattern: colwise | rowwise | vocab | replicate}) for this one"))
    # Vocabulary-parallel embedding and LM head, where the model has them.
    get_in = getattr(module, "get_input_embeddings", None)
    get_out = getattr(module, "get_output_embeddings", None)
    ids = {id(m): n for n, m in named.items()}
    for getter in (get_in, get_out):
        layer = getter() if callable(getter) else None
        if layer is not None and id(layer) in ids and _kind(layer) in ("embedding", "linear"):
            _add(plan, named, ids[id(layer)], "vocab")
    model_type = getattr(config, "model_type", None)
    if model_type and model_type != plan.family:
        plan.family = f"{plan.family} ({model_type})"
    return plan


def user_plan(module: nn.Module, world: int, mapping: dict[str, str], where: str) -> TPPlan:
    """A plan from ``{module pattern: style}`` (class names or globs, first match wins) over the Linear,
    Embedding and Conv1D modules; each pattern must match something."""
    from .select import matches

    named = dict(module.named_modules())
    plan = TPPlan(world=world, family="user plan")
    used = {k: False for k in mapping}
    for name, m in named.items():
        if _kind(m) is None:
            continue
        for pattern, style in mapping.items():
            if matches(pattern, name, type(m).__name__):
                used[pattern] = True
                if style != "replicate":
                    if style == "vocab" and _kind(m) == "conv1d":
                        raise RecipeError(Problem(f"{name} is a Conv1D; vocab applies to embeddings and LM heads",
                                                  path=f"{where}.plan.{pattern}"))
                    if _kind(m) == "embedding" and style != "vocab":
                        raise RecipeError(Problem(f"{name} is an Embedding: split it with `vocab` (its rows) or "
                                                  f"keep it whole with `replicate`, not {style}",
                                                  path=f"{where}.plan.{pattern}"))
                    _add(plan, named, name, style)
                break
    missing = [p for p, hit in used.items() if not hit]
    if missing:
        raise RecipeError(Problem(f"plan pattern(s) {', '.join(repr(p) for p in missing)} match no Linear, Embedding "
                                  "or Conv1D module", path=f"{where}.plan",
                                  hint="patterns are class names or globs on module names, e.g. 'blocks.*.fc1'"))
    return plan


def world_sizes(sizes: list[int]) -> str:
    """A hint naming the world sizes that divide every one of ``sizes``."""
    works = [n for n in range(2, 65) if all(s % n == 0 for s in sizes)]
    return (f"tensor_parallel sizes that divide every split dimension of this model: {', '.join(map(str, works))}"
            if works else "no tensor_parallel size divides every split dimension of this model")


def check_divisible(plan: TPPlan, where: str) -> None:
    """RecipeError naming the dimensions that the world size does not divide (model dimensions such as
    num_attention_heads first, then module features), and the sizes that work."""
    bad = [(dim, size, at) for dim, size, at in plan.constraints if size % plan.world]
    if not bad:
        return
    named = {(d, s): at for d, s, at in bad if d.isidentifier()}  # config-style names say the most
    if named:
        said = " and ".join(f"{d} = {s}" for d, s in named)
        at = next(iter(named.values()))
    else:
        dim, size, at = bad[0]
        said = f"{dim} = {size}"
    verb = "are" if len(named) > 1 else "is"
    raise RecipeError(Problem(f"{said} {verb} not divisible by tensor_parallel = {plan.world} (first at {at}): each "
                              "rank must hold an equal share", path=f"{where}.tensor_parallel",
                              hint=world_sizes([s for _, s, _ in plan.constraints])))


def split_specs(plan: TPPlan, stored_names: list[str], encodings: dict[str, dict[str, Any]], where: str = "shard",
                aliases: dict[str, str] | None = None) -> dict[str, dict]:
    """How each stored tensor part is split: {stored name: {dim, parts, uneven}}; parts absent are replicated.

    A colwise Linear splits weight rows and bias; rowwise splits weight columns (its bias is replicated); Conv1D
    stores (in, out), so the dims swap. A per-channel int8 weight's scales (one per stored row) follow when the
    rows are split and are replicated otherwise. A tied tensor (``aliases``: alias -> stored name) is split once,
    as its split owner needs; owners that would split it differently are refused."""
    aliases = aliases or {}
    out: dict[str, dict[str, Any]] = {}
    owner: dict[str, str] = {}

    def put(stored: str, spec: dict[str, Any], name: str) -> None:
        if stored in out and out[stored] != spec:
            raise RecipeError(Problem(f"{name} and {owner[stored]} are the same (tied) tensor but would be split "
                                      "differently", path=where, hint="give both modules the same style in `plan`"))
        out[stored], owner[stored] = spec, name

    for module, entry in plan.modules.items():
        style, kind, parts = entry["style"], entry["kind"], entry["parts"]
        if style == "replicate":
            continue
        out_dim = 1 if kind == "conv1d" else 0
        weight_dim = out_dim if style in ("colwise", "vocab") else 1 - out_dim
        uneven = style == "vocab"
        for leaf, dim in (("weight", weight_dim), ("bias", 0 if style != "rowwise" else None)):
            if dim is None:
                continue
            name = f"{module}.{leaf}"
            target = aliases.get(name, name)
            spec = encodings.get(target, {"kind": "dense"})
            split = {"dim": dim, "parts": parts, "uneven": uneven}
            if spec.get("kind") in ("dense", "cast"):  # stored under the tensor's own name, as is
                if target in stored_names:
                    put(target, split, name)
            elif spec.get("kind") == "int8":
                put(f"{target}.__q", split, name)
                if dim == 0 and spec.get("per_channel", True):
                    put(f"{target}.__scale", {**split, "dim": 0}, name)
            else:
                raise RecipeError(Problem(f"{name} is stored as {spec.get('kind')}, which cannot be split over ranks",
                                          path=where, hint="shard dense, cast or int8 (`quantize`) weights"))
    return out
