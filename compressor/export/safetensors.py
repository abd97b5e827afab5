"""safetensors export laid out for memory-mapped loading (the layout: compressor/safetensors_io.py).

An artifact's weight files are planned from the stored tensors' names, shapes and dtypes alone (``WeightFiles``),
created with their final headers, then filled one stored tensor at a time in any order and by any process: the
whole model at once, or a model larger than memory streamed tensor by tensor (compressor/stream.py). Either way
the bytes are the same.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..safetensors_io import Layout

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "layout_order",
    "write_safetensors",
    "shard_names",
    "plan_shards",
    "export_safetensors",
    "WeightFiles",
]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def layout_order(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names in file order (given no use order): 64-byte-multiple tensors first, then by element size, largest
    first; ties by name."""
    return list(Layout.of(tensors).spans)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` in the aligned layout (compressor/safetensors_io.py)."""
    layout = Layout.of(tensors, metadata)
    layout.create(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        for name in layout.spans:
            layout.write(fd, name, tensors[name])
    finally:
        os.close(fd)


def shard_names(count: int) -> list[str]:
    """File names for ``count`` shards, Hugging Face convention."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int,
                use_order: Sequence[str] | None = None) -> list[list[str]]:
    """Split names into shards of at most ``max_bytes`` each, in ``use_order`` (the rest after it, and all without
    one, in name order); a larger tensor gets its own shard."""
    shards: list[list[str]] = [[]]
    used = 0
    rank = {n: i for i, n in enumerate(use_order or ())}
    for name in sorted(tensors, key=lambda n: (rank.get(n, len(rank)), n)):
        size = _nbytes(tensors[name])
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


class WeightFiles:
    """An artifact's weight files, planned from the stored tensors (real or on the meta device) before any value is
    written: ``create`` writes every header, ``write`` puts one stored tensor's bytes in place, ``finish`` writes
    the index. This one: one file, or shards of at most ``max_shard_size`` bytes plus
    ``model.safetensors.index.json`` (Hugging Face's convention); compressor.export.tp splits per rank instead.
    ``use_order``: the stored names in the order a forward pass reads them, which the shards and each file's
    tensors follow (``Layout``); name order without it."""

    def __init__(self, stored: dict[str, torch.Tensor], max_shard_size: int,
                 metadata: dict[str, str] | None = None, use_order: Sequence[str] | None = None) -> None:
        shards = plan_shards(stored, max_shard_size, use_order)
        names = shard_names(len(shards))
        meta = {"format": "pt", **(metadata or {})}
        self.layouts = {file: Layout.of({n: stored[n] for n in members}, meta, use_order)
                        for file, members in zip(names, shards)}
        self.home = {n: file for file, members in zip(names, shards) for n in members}
        self.total = sum(_nbytes(t) for t in stored.values())

    def pieces(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(file, bytes to write there) for one stored tensor."""
        return [(self.home[name], tensor)]

    def create(self, out_dir: Path) -> None:
        """Write every file's header and size it."""
        for file, layout in self.layouts.items():
            layout.create(out_dir / file)

    @contextmanager
    def opened(self, out_dir: Path) -> Iterator[dict[str, int]]:
        """The created files, open for positional writes: {file: descriptor}."""
        fds: dict[str, int] = {}
        try:
            for file in self.layouts:
                fds[file] = os.open(out_dir / file, os.O_WRONLY)
            yield fds
        finally:
            for fd in fds.values():
                os.close(fd)

    def write(self, fds: dict[str, int], name: str, tensor: torch.Tensor) -> int:
        """Write one stored tensor (all its pieces) into the opened files; the bytes written."""
        written = 0
        for file, piece in self.pieces(name, tensor):
            self.layouts[file].write(fds[file], name, piece)
            written += piece.numel() * piece.element_size()
        return written

    def finish(self, out_dir: Path) -> tuple[list[str], dict[str, Any] | None]:
        """Write the index (when there are shards); (the files written, the manifest's tensor-parallel entry)."""
        names = list(self.layouts)
        if len(names) == 1:
            return names, None
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.home.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names + ["model.safetensors.index.json"], None

    def fill(self, out_dir: Path, stored: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, Any] | None]:
        """Create, write every stored tensor and finish: the whole model at once."""
        self.create(out_dir)
        with self.opened(out_dir) as fds:
            for name, tensor in stored.items():
                self.write(fds, name, tensor)
        return self.finish(out_dir)


def export_safetensors(stored: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int,
                       metadata: dict[str, str] | None = None, use_order: Sequence[str] | None = None) -> list[str]:
    """Write stored tensors as one file or as shards plus ``model.safetensors.index.json``; returns file names."""
    return WeightFiles(stored, max_shard_size, metadata, use_order).fill(out_dir, stored)[0]
