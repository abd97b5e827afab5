"""Writing a tensor-parallel artifact: one safetensors file per rank holding its slices, one of the replicated
tensors (stored once), and the plan file the loader reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..manifest import PLAN_FILE, REPLICATED_FILE, rank_file
from ..passes.tp_plan import TPPlan, split_specs
from .safetensors import write_safetensors

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["write_rank_files"]


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
