"""safetensors export laid out for memory-mapped loading (the layout: compressor/safetensors_io.py).

An artifact's weight files are planned from the stored tensors' names, shapes and dtypes alone (``WeightFiles``),
created with their final headers, then filled one stored tensor at a time in any order and by any process: the
whole model at once, or a model larger than memory streamed tensor by tensor (compressor/stream.py). Either way
the bytes are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
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

    #: {file: (sha256, bytes)} of each file written whole by this process while open (``opened(digest=True)``)
    digests: dict[str, tuple[str, int]] = {}
    _digesting: _Digests | None = None

    @contextmanager
    def opened(self, out_dir: Path, digest: bool = False) -> Iterator[dict[str, int]]:
        """The created files, open for positional writes: {file: descriptor}. ``digest``: hash each file while it
        is written (every byte of it by this process), into ``digests`` when the block ends without error."""
        fds: dict[str, int] = {}
        self.digests = {}
        try:
            for file in self.layouts:
                fds[file] = os.open(out_dir / file, os.O_WRONLY)
            if digest:
                self._digesting = _Digests(out_dir, self.layouts)
            yield fds
            if self._digesting is not None:
                self.digests = self._digesting.result()
        finally:
            try:
                if self._digesting is not None:
                    self._digesting.stop()
                    self._digesting = None
            finally:
                for fd in fds.values():
                    os.close(fd)

    def write(self, fds: dict[str, int], name: str, tensor: torch.Tensor) -> int:
        """Write one stored tensor (all its pieces) into the opened files; the bytes written."""
        written = 0
        for file, piece in self.pieces(name, tensor):
            self.layouts[file].write(fds[file], name, piece)
            written += piece.numel() * piece.element_size()
            if self._digesting is not None:
                self._digesting.written(file, name)
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
        with self.opened(out_dir, digest=True) as fds:
            for name, tensor in stored.items():
                self.write(fds, name, tensor)
        return self.finish(out_dir)


class _Digests:
    """sha256 of files whose tensors are written in any order, in a background thread that follows the writers:
    it hashes each file's header, then its tensors' bytes in file order (read back from the page cache) as far as
    they are written. Hashing after the last write instead took 1.8 s for a 2 GB shard on one core, when the cores
    had time to spare while the tensors were read and converted."""

    _BLOCK = 8 << 20

    def __init__(self, out_dir: Path, layouts: dict[str, Layout]) -> None:
        self.paths = {file: out_dir / file for file in layouts}
        self.spans = {file: list(layout.spans.items()) for file, layout in layouts.items()}
        self.hashes = {file: hashlib.sha256(layout.header) for file, layout in layouts.items()}
        self.sizes = {file: layout.size for file, layout in layouts.items()}
        self.next = dict.fromkeys(layouts, 0)  # each file's first span not yet taken to hash
        self.done: dict[str, set[str]] = {file: set() for file in layouts}
        self.touched: set[str] = set(layouts)  # files written to since the thread last looked (all: headers)
        self.complete: set[str] = set()  # files hashed to their end
        self.changed = threading.Condition()
        self.stopped = False  # nothing more will be written
        self.aborted = False  # nor hashed: the write failed
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="compressor-sha256", daemon=True)
        self.thread.start()

    def written(self, file: str, name: str) -> None:
        """``name``'s bytes are in ``file``."""
        with self.changed:
            self.done[file].add(name)
            self.touched.add(file)
            self.changed.notify()

    def result(self) -> dict[str, tuple[str, int]]:
        """Once every tensor is written: {file: (sha256, bytes)} of the files hashed to their end (every file,
        unless the thread failed on one: the manifest hashes the rest itself)."""
        with self.changed:
            self.stopped = True
            self.changed.notify()
        self.thread.join()
        return {file: (self.hashes[file].hexdigest(), self.sizes[file]) for file in self.complete}

    def stop(self) -> None:
        """End the thread without hashing what is left (after ``result``, or when the writing failed)."""
        with self.changed:
            self.stopped = self.aborted = True
            self.changed.notify()
        self.thread.join()

    def _ready(self) -> list[tuple[str, int, int, bool]]:
        """(file, first byte, end, whether it is the file's end) of the written spans next in the files written to
        since the last call, marked as taken; called locked."""
        out = []
        for file in self.touched:
            spans, k = self.spans[file], self.next[file]
            if file in self.complete or (k == len(spans) and k):
                continue
            while k < len(spans) and spans[k][0] in self.done[file]:
                k += 1
            if k > self.next[file] or not spans:  # a file without tensors is its header alone
                lo = spans[self.next[file]][1][0] if spans else self.sizes[file]
                out.append((file, lo, spans[k - 1][1][1] if spans else lo, k == len(spans)))
                self.next[file] = k
        self.touched.clear()
        return out

    def _run(self) -> None:
        buf = bytearray(self._BLOCK)
        view = memoryview(buf)
        fds: dict[str, int] = {}
        try:
            while True:
                with self.changed:
                    ready = self._ready()
                    while not ready and not self.stopped:
                        self.changed.wait()
                        ready = self._ready()
                if not ready or self.aborted:
                    return  # stopped, and nothing more was written; or aborted
                for file, lo, hi, last in ready:
                    if lo < hi and file not in fds:
                        fds[file] = os.open(self.paths[file], os.O_RDONLY)
                    while lo < hi and not self.aborted:
                        got = os.preadv(fds[file], [view[:min(self._BLOCK, hi - lo)]], lo)
                        if got <= 0:
                            raise OSError(f"{self.paths[file]}: ended at byte {lo} while being hashed")
                        self.hashes[file].update(view[:got])  # releases the GIL: the writers go on
                        lo += got
                    if last and lo == hi:
                        self.complete.add(file)  # a shard at a time: one descriptor open per file being hashed
                        if file in fds:
                            os.close(fds.pop(file))
        except BaseException as exc:  # noqa: BLE001 - reported by result(): the manifest hashes the files instead
            self.failed = exc
        finally:
            for fd in fds.values():
                os.close(fd)


def export_safetensors(stored: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int,
                       metadata: dict[str, str] | None = None, use_order: Sequence[str] | None = None) -> list[str]:
    """Write stored tensors as one file or as shards plus ``model.safetensors.index.json``; returns file names."""
    return WeightFiles(stored, max_shard_size, metadata, use_order).fill(out_dir, stored)[0]
