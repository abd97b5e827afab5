"""Tensor parallelism: the plan (which module is split how), the per-rank files, and loading one rank into
torch.distributed's own tensor parallelism (``parallelize_module`` with column-, row-wise styles on a DeviceMesh).

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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ArtifactError, Problem, RecipeError, UsageError
from .manifest import confined

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = ["TPPlan", "derive_plan", "user_plan", "split_specs", "write_rank_files", "assemble", "load_rank",
           "PLAN_FILE", "rank_file", "REPLICATED_FILE", "check_divisible", "read_plan", "world_sizes"]

PLAN_FILE = "tensor_parallel.json"
REPLICATED_FILE = "model-tp-replicated.safetensors"


def rank_file(rank: int, world: int) -> str:
    """The safetensors file holding rank ``rank``'s slices."""
    return f"model-tp-rank{rank:02d}-of-{world:02d}.safetensors"


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
    from .passes.select import matches

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


def _pieces(t: torch.Tensor, dim: int, parts: int, world: int, uneven: bool) -> list[torch.Tensor]:
    """Rank r's slice: for each fused part, its r-th chunk along ``dim``, concatenated (torch.chunk sizes; empty
    chunks for ranks past the end, as DTensor's Shard)."""
    import torch

    fused = torch.chunk(t, parts, dim=dim) if parts > 1 else (t,)
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for part in fused:
        chunks = list(torch.chunk(part, world, dim=dim))
        if not uneven and (len(chunks) != world or any(c.shape[dim] != chunks[0].shape[dim] for c in chunks)):
            raise ValueError(f"cannot split {part.shape[dim]} evenly {world} ways")
        while len(chunks) < world:
            shape = list(part.shape)
            shape[dim] = 0
            chunks.append(part.new_empty(shape))
        for r in range(world):
            per_rank[r].append(chunks[r])
    return [torch.cat(p, dim=dim).contiguous() if len(p) > 1 else p[0].contiguous() for p in per_rank]


def write_rank_files(stored: dict[str, torch.Tensor], out_dir: Path, plan: TPPlan,
                     encodings: dict[str, dict[str, Any]], aliases: dict[str, str]) -> tuple[list[str], dict[str, Any]]:
    """Write one safetensors file per rank (its slices) and one of replicated tensors (stored once), plus the
    plan file. Returns (the safetensors file names, the manifest's `tensor_parallel` entry)."""
    from .export.safetensors import write_safetensors

    specs = split_specs(plan, list(stored), encodings, aliases=aliases)
    world = plan.world
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    replicated: dict[str, torch.Tensor] = {}
    for name, tensor in stored.items():
        spec = specs.get(name)
        if spec is None:
            replicated[name] = tensor
            continue
        for r, piece in enumerate(_pieces(tensor, spec["dim"], spec["parts"], world, spec["uneven"])):
            ranks[r][name] = piece
    files = []
    for r in range(world):
        write_safetensors(out_dir / rank_file(r, world), ranks[r], {"format": "pt", "tp_rank": str(r),
                                                                    "tp_world": str(world)})
        files.append(rank_file(r, world))
    write_safetensors(out_dir / REPLICATED_FILE, replicated, {"format": "pt", "tp_world": str(world)})
    files.append(REPLICATED_FILE)
    body = {**plan.to_json(), "tensors": dict(sorted(specs.items())), "aliases": dict(sorted(aliases.items())),
            "ranks": [rank_file(r, world) for r in range(world)], "replicated": REPLICATED_FILE}
    (out_dir / PLAN_FILE).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")

    def nbytes(ts: dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in ts.values())

    entry = {"world": world, "plan": PLAN_FILE, "family": plan.family, "ranks": body["ranks"],
             "replicated": REPLICATED_FILE, "sharded_bytes": sum(nbytes(r) for r in ranks),
             "replicated_bytes": nbytes(replicated), "bytes_per_rank": [nbytes(r) for r in ranks]}
    return files, entry


def read_plan(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The artifact's plan file, checked for the keys the loader needs."""
    entry = manifest.get("tensor_parallel") or {}
    try:
        if entry.get("plan", PLAN_FILE) != PLAN_FILE:
            raise ValueError(f"the manifest names the plan {entry.get('plan')!r}, not {PLAN_FILE}")
        plan = json.loads(confined(root, PLAN_FILE).read_text())
        world = int(plan["world"])
        if len(plan["ranks"]) != world or not isinstance(plan["tensors"], dict):
            raise ValueError("ranks and world disagree")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{root}: the tensor-parallel plan {PLAN_FILE} is missing or malformed ({exc})") from None
    listed = manifest.get("files", {})
    for name in [*plan["ranks"], plan.get("replicated")]:
        # Only files of this artifact, listed (and so hashed) in its manifest: never a path that leads elsewhere.
        if not isinstance(name, str) or name not in listed:
            raise ArtifactError(f"{root}: the tensor-parallel plan names {name!r}, which is not a file of this "
                                "artifact's manifest")
        confined(root, name)
    return plan


def assemble(root: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every stored tensor whole again (the unsharded model), from all ranks' files and the replicated file."""
    import torch

    from .loading import load_tensors

    plan = read_plan(root, manifest)
    out = load_tensors(root, [plan["replicated"]])
    per_rank = [load_tensors(root, [f]) for f in plan["ranks"]]
    for name, spec in plan["tensors"].items():
        try:
            pieces = [r[name] for r in per_rank]
        except KeyError:
            raise ArtifactError(f"{root}: a rank file lacks its slice of {name}") from None
        dim, parts = int(spec["dim"]), int(spec["parts"])
        if parts == 1:
            out[name] = torch.cat(pieces, dim=dim)
        else:  # each rank holds its chunk of every fused part: regroup part by part
            split = [torch.chunk(p, parts, dim=dim) for p in pieces]
            out[name] = torch.cat([torch.cat([s[j] for s in split], dim=dim) for j in range(parts)], dim=dim)
    return out


def load_rank(root: Path, manifest: dict[str, Any], rank: int, world: int, device: torch.device) -> nn.Module:
    """Rank ``rank``'s tensor-parallel module: only its file and the replicated file are mapped; the modules of
    the plan are parallelized by torch.distributed.tensor.parallel on a 1-D DeviceMesh of the default process
    group, and their parameters are DTensors built from the local slices (no rank ever holds a whole split
    tensor). The module is for running: a fused parameter (GPT-2's c_attn, each rank holding its q, k and v
    slices) is a correct local shard but not a Shard(0) of the stored tensor, so gather state with
    ``compressor.load(dir)``, not ``full_tensor()``."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from .loading import _decode, _parameters_on_meta, build_architecture, load_tensors

    plan = read_plan(root, manifest)
    if int(plan["world"]) != world:
        raise UsageError(f"{root} is sharded for tensor_parallel = {plan['world']}, not {world}")
    if not dist.is_available() or not dist.is_initialized():
        raise UsageError("compressor.load(..., tp_rank=..., tp_world=...) runs inside an initialised process group: "
                         "call torch.distributed.init_process_group first (gloo on CPU, nccl on CUDA), or use "
                         "`compress eval ARTIFACT --tp N`, which starts one")
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise UsageError(f"tp_rank={rank}, tp_world={world} do not match the process group (rank "
                         f"{dist.get_rank()} of {dist.get_world_size()})")
    if not 0 <= rank < world:
        raise UsageError(f"tp_rank={rank} is outside 0..{world - 1}")
    info = manifest.get("model", {})
    stored = load_tensors(root, [plan["ranks"][rank], plan["replicated"]])
    state = _decode(stored, dict(info.get("encodings", {})))
    aliases = plan.get("aliases", {})
    for alias, target in aliases.items():
        state[alias] = state[target]
    module = build_architecture(root, manifest)
    named = dict(module.named_modules())
    styles: dict[str, Any] = {}
    with _parameters_on_meta():
        for name, entry in plan["modules"].items():
            style, kind = entry["style"], entry["kind"]
            if name not in named:
                raise ArtifactError(f"{root}: the plan splits {name!r}, which this model does not have")
            if kind == "conv1d":
                # parallelize_module's styles take nn.Linear: a Conv1D computes x @ W + b with W (in, out), which
                # is a Linear with the transposed weight.
                conv = named[name]
                linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None)
                parent, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(parent) if parent else module, leaf, linear)
                state[f"{name}.weight"] = state[f"{name}.weight"].t()
            if style == "colwise":
                styles[name] = ColwiseParallel()
            elif style == "rowwise":
                styles[name] = RowwiseParallel()
            elif style == "vocab":
                styles[name] = RowwiseParallel(input_layouts=Replicate()) if kind == "embedding" \
                    else ColwiseParallel(output_layouts=Replicate())
    mesh = init_device_mesh(device.type, (world,))
    parallelize_module(module, mesh, styles)
    shared: dict[str, nn.Parameter] = {}
    params = list(module.named_parameters(remove_duplicate=False))
    # Split parameters first: a tensor tied to a split one (an LM head's bias held by its parent too) takes the
    # same DTensor, not a whole copy.
    params.sort(key=lambda item: not isinstance(item[1], DTensor))
    for full_name, param in params:
        owner_name, _, leaf = full_name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        key = aliases.get(full_name, full_name)
        if key in shared:  # tied (e.g. LM head and embedding): the same Parameter, as before export
            owner.register_parameter(leaf, shared[key])
            continue
        local = state.get(full_name)
        if local is None:
            raise ArtifactError(f"{root}: no stored values for {full_name} in rank {rank}'s files")
        local = local.to(device)
        if isinstance(param, DTensor):
            value = DTensor.from_local(local, mesh, param.placements, run_check=False, shape=param.shape,
                                       stride=param.stride())
        else:
            value = local
        shared[key] = nn.Parameter(value, requires_grad=False)
        owner.register_parameter(leaf, shared[key])
    for full_name, buf in list(module.named_buffers()):
        owner_name, _, leaf = full_name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if full_name in state:
            owner._buffers[leaf] = state[full_name].to(device)
        elif buf is not None:
            owner._buffers[leaf] = buf.to(device)
    for name, attrs in plan.get("attributes", {}).items():
        target = module.get_submodule(name)
        for attr, value in attrs.items():
            if not isinstance(getattr(target, attr, None), int):
                raise ArtifactError(f"{root}: the plan sets {name}.{attr}, which this model does not have")
            setattr(target, attr, int(value))
    from .model import install_bridges

    install_bridges(module, info.get("dtype_bridges", {}))
    return module.eval()
