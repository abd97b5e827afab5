"""Writing a tensor-parallel artifact: one safetensors file per rank holding its slices, one of the replicated
tensors (stored once), and the plan file the loader reads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..manifest import PLAN_FILE, REPLICATED_FILE, rank_file
from ..passes.tp_plan import TPPlan, split_specs
from ..safetensors_io import Layout
from .safetensors import WeightFiles

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["RankFiles", "write_rank_files"]


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


class RankFiles(WeightFiles):
    """Tensor-parallel weight files: one per rank holding its slices of the split tensors, one of the replicated
    tensors (stored once), and the plan file the loader reads; planned before any value is written (WeightFiles),
    each file's tensors in ``use_order`` (``Layout``)."""

    def __init__(self, stored: dict[str, torch.Tensor], plan: TPPlan, encodings: dict[str, dict[str, Any]],
                 aliases: dict[str, str], use_order: Sequence[str] | None = None) -> None:
        # Not WeightFiles.__init__: the layouts are per rank, and ``pieces`` below routes each tensor's slices.
        self.plan, self.aliases = plan, aliases
        self.specs = split_specs(plan, list(stored), encodings, aliases=aliases)
        world = plan.world
        ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
        replicated: dict[str, torch.Tensor] = {}
        for name, tensor in stored.items():  # meta tensors: only the slices' shapes are needed here
            if name not in self.specs:
                replicated[name] = tensor
                continue
            for r, piece in enumerate(self._split(name, tensor)):
                ranks[r][name] = piece
        self.layouts = {rank_file(r, world): Layout.of(ranks[r], {"format": "pt", "tp_rank": str(r),
                                                                   "tp_world": str(world)}, use_order)
                        for r in range(world)}
        self.layouts[REPLICATED_FILE] = Layout.of(replicated, {"format": "pt", "tp_world": str(world)}, use_order)
        self.home: dict[str, str] = {}  # WeightFiles' single home per tensor: not how rank files route
        self.total = sum(t.numel() * t.element_size() for t in stored.values())

        def nbytes(ts: dict[str, torch.Tensor]) -> int:
            return sum(t.numel() * t.element_size() for t in ts.values())

        self.entry = {"world": world, "plan": PLAN_FILE, "family": plan.family,
                      "ranks": [rank_file(r, world) for r in range(world)], "replicated": REPLICATED_FILE,
                      "sharded_bytes": sum(nbytes(r) for r in ranks), "replicated_bytes": nbytes(replicated),
                      "bytes_per_rank": [nbytes(r) for r in ranks]}

    def _split(self, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        spec = self.specs[name]
        return _pieces(tensor, spec["dim"], spec["parts"], self.plan.world, spec["uneven"])

    def pieces(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name not in self.specs:
            return [(REPLICATED_FILE, tensor)]
        world = self.plan.world
        return [(rank_file(r, world), piece) for r, piece in enumerate(self._split(name, tensor))]

    def finish(self, out_dir: Path) -> tuple[list[str], dict[str, Any] | None]:
        body = {**self.plan.to_json(), "tensors": dict(sorted(self.specs.items())),
                "aliases": dict(sorted(self.aliases.items())), "ranks": self.entry["ranks"],
                "replicated": REPLICATED_FILE}
        (out_dir / PLAN_FILE).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        return list(self.layouts), self.entry


def write_rank_files(stored: dict[str, torch.Tensor], out_dir: Path, plan: TPPlan,
                     encodings: dict[str, dict[str, Any]], aliases: dict[str, str]) -> tuple[list[str], dict[str, Any]]:
    """Write one safetensors file per rank (its slices) and one of replicated tensors (stored once), plus the
    plan file. Returns (the safetensors file names, the manifest's `tensor_parallel` entry)."""
    files, entry = RankFiles(stored, plan, encodings, aliases).fill(out_dir, stored)
    assert entry is not None
    return files, entry
