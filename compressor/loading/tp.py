"""Loading a tensor-parallel artifact: its plan, the whole model again from every rank's file, or one rank's
module running on torch.distributed's tensor parallelism."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ArtifactError, UsageError
from ..manifest import PLAN_FILE, Manifest, confined
from ..model import parameters_on_meta
from .rebuild import build_architecture, decode
from .readahead import read_module_ahead
from .tensors import Maps, load_tensors

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = ["read_plan", "assemble", "load_rank"]


def read_plan(root: Path, manifest: Manifest) -> dict[str, Any]:
    """The artifact's plan file, checked for the keys the loader needs."""
    entry = manifest.tensor_parallel
    try:
        if entry is not None and entry.plan != PLAN_FILE:
            raise ValueError(f"the manifest names the plan {entry.plan!r}, not {PLAN_FILE}")
        plan = json.loads(confined(root, PLAN_FILE).read_text())
        world = int(plan["world"])
        if len(plan["ranks"]) != world or not isinstance(plan["tensors"], dict):
            raise ValueError("ranks and world disagree")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{root}: the tensor-parallel plan {PLAN_FILE} is missing or malformed ({exc})") from None
    listed = manifest.files
    for name in [*plan["ranks"], plan.get("replicated")]:
        # Only files of this artifact, listed (and so hashed) in its manifest: never a path that leads elsewhere.
        if not isinstance(name, str) or name not in listed:
            raise ArtifactError(f"{root}: the tensor-parallel plan names {name!r}, which is not a file of this "
                                "artifact's manifest")
        confined(root, name)
    return plan


def assemble(root: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Every stored tensor whole again (the unsharded model), from all ranks' files and the replicated file."""
    import torch


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


def load_rank(root: Path, manifest: Manifest, rank: int, world: int, device: torch.device,
              read_ahead: bool = True) -> nn.Module:
    """Rank ``rank``'s tensor-parallel module: only its file and the replicated file are mapped; the modules of
    the plan are parallelized by torch.distributed.tensor.parallel on a 1-D DeviceMesh of the default process
    group, and their parameters are DTensors built from the local slices (no rank ever holds a whole split
    tensor). The module is for running: a fused parameter (GPT-2's c_attn, each rank holding its q, k and v
    slices) is a correct local shard but not a Shard(0) of the stored tensor, so gather state with
    ``compressor.load(dir)``, not ``full_tensor()``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    plan = read_plan(root, manifest)
    _check_group(root, plan, rank, world)
    maps: Maps = {}
    stored = load_tensors(root, [plan["ranks"][rank], plan["replicated"]], maps)
    state = decode(stored, dict(manifest.model.encodings))
    aliases = plan.get("aliases", {})
    for alias, target in aliases.items():
        state[alias] = state[target]
    module = build_architecture(root, manifest)
    styles = _styles(root, module, plan, state)
    mesh = init_device_mesh(device.type, (world,))
    parallelize_module(module, mesh, styles)
    _fill(root, module, state, aliases, mesh, rank, device)
    for name, attrs in plan.get("attributes", {}).items():
        target = module.get_submodule(name)
        for attr, value in attrs.items():
            if not isinstance(getattr(target, attr, None), int):
                raise ArtifactError(f"{root}: the plan sets {name}.{attr}, which this model does not have")
            setattr(target, attr, int(value))
    from ..model import install_bridges

    install_bridges(module, manifest.model.dtype_bridges)
    if read_ahead and device.type == "cpu":  # this rank's slices, in the order its forward uses them
        read_module_ahead(module, maps)
    return module.eval()


def _check_group(root: Path, plan: dict[str, Any], rank: int, world: int) -> None:
    """UsageError unless the plan's world, the initialised process group and ``rank``/``world`` agree."""
    import torch.distributed as dist

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


def _styles(root: Path, module: nn.Module, plan: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """{module name: its parallel style} for parallelize_module. GPT-2's Conv1D modules are replaced by Linear
    ones first (their stored weights transposed in ``state``): the styles take nn.Linear."""
    from torch import nn
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    named = dict(module.named_modules())
    styles: dict[str, Any] = {}
    with parameters_on_meta():
        for name, entry in plan["modules"].items():
            style, kind = entry["style"], entry["kind"]
            if name not in named:
                raise ArtifactError(f"{root}: the plan splits {name!r}, which this model does not have")
            if kind == "conv1d":
                # A Conv1D computes x @ W + b with W (in, out): a Linear with the transposed weight.
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
    return styles


def _fill(root: Path, module: nn.Module, state: dict[str, torch.Tensor], aliases: dict[str, str], mesh: Any,
          rank: int, device: torch.device) -> None:
    """Give the parallelized module this rank's values: a DTensor from the local slice for every split parameter,
    the tensor itself for the rest; tied parameters share one Parameter, as before export."""
    from torch import nn
    from torch.distributed.tensor import DTensor

    shared: dict[str, nn.Parameter] = {}
    params = list(module.named_parameters(remove_duplicate=False))
    # Split parameters first: a tensor tied to a split one (an LM head's bias held by its parent too) takes the
    # same DTensor, not a whole copy.
    params.sort(key=lambda item: not isinstance(item[1], DTensor))
    for full_name, param in params:
        owner_name, _, leaf = full_name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        key = aliases.get(full_name, full_name)
        if key in shared:  # tied (e.g. LM head and embedding)
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
