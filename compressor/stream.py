"""Streaming a model larger than memory, tensor by tensor, from the source's safetensors files into the artifact's.

The passes run once over the model on the meta device (names, shapes, dtypes and encodings; no values) and decide
everything there; the artifact's weight files are laid out from that before any value is read. Then each tensor is
read from the source with positional reads, given each pass's encoding in turn (the value ``decode(encode(value))``:
exactly what the pass does to a loaded model), encoded as stored, written at its place and released. Memory is
bounded by the largest tensor, not by the model, and the bytes equal those of a run that loads the model whole.

Under torchrun the tensors are divided between the processes (contiguous runs of equal bytes), each reading only
its own from the source and writing them at their places in the shared files; rank 0 lays the files out first and
writes the index, the manifest and the rest after every rank is done. The artifact is the one a single process
writes, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .encodings import Encoding
    from .export.safetensors import WeightFiles
    from .log import Reporter
    from .model import Model
    from .recipe import Recipe

__all__ = ["Group", "Source", "stream_problems", "history_of", "fill"]


@dataclass
class Source:
    """Where a streamed model's values are ({state-dict name: (safetensors file, header entry, data start)}, from
    compressor.sources.lazy_source), and how many tensors are read, encoded and written at once."""

    where: dict[str, tuple[Path, dict[str, Any], int]]
    workers: int = 1

    def read(self, name: str, history: dict[str, list[Encoding]]) -> Any:
        """One tensor's value as the passes that ran so far left it (each encoding in ``history`` replayed), for a
        pass that needs values (compressor/passes/layerwise.py). A new CPU tensor; the caller releases it."""
        from .encodings import encode_named
        from .errors import CompressorError
        from .intgroup import IntGroup
        from .safetensors_io import read_tensor

        file, entry, data_start = self.where[name]
        fd = os.open(file, os.O_RDONLY)
        try:
            value = read_tensor(fd, entry, data_start, f"{name} in {file}")
        finally:
            os.close(fd)
        for enc in history.get(name, []):
            if isinstance(enc, IntGroup):  # its computed integers are kept for the write that follows the encode
                raise CompressorError(f"{name} was quantized by an earlier pass, and a later one reads its values; "
                                      "quantize once, in the last pass that changes values")
            value = enc.decode(encode_named(enc, value, name))
        return value


class Group:
    """This process's place in a torchrun launch (``RANK``/``WORLD_SIZE``, gloo), or a group of one."""

    def __init__(self, rank: int = 0, world: int = 1, owned: bool = False) -> None:
        self.rank, self.world = rank, world
        self.owned = owned  # whether this group started torch.distributed's default process group

    @classmethod
    def from_env(cls) -> Group:
        """The launch's group, joining torch.distributed's default process group when ``WORLD_SIZE`` > 1."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        owned = not dist.is_initialized()
        if owned:
            from datetime import timedelta

            # gloo whatever the devices: the processes exchange a path and a few numbers and wait for each other.
            # The wait between the files' creation and the last write covers a whole share of the model: hours for
            # a large one, where gloo's default gives up after 30 minutes.
            dist.init_process_group("gloo", timeout=timedelta(hours=12))
        return cls(dist.get_rank(), dist.get_world_size(), owned)

    def share(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def total(self, value: int) -> int:
        """The sum of ``value`` over the ranks."""
        if self.world == 1:
            return value
        import torch
        import torch.distributed as dist

        box = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(box)
        return int(box.item())

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group, when this group started it (a caller's own group stays theirs)."""
        if self.world > 1 and self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def stream_problems(recipe: Recipe, passes: list[Any]) -> list[str]:
    """Why this recipe cannot stream (sentences naming the recipe key); empty when it can (the source may still
    say no when its files are read: compressor.sources.lazy_source)."""
    problems = []
    if recipe.model.source != "hf":
        problems.append(f"model.source is {recipe.model.source}: streaming reads a Hugging Face directory's "
                        "safetensors files (source: hf)")
    if recipe.export.onnx is not None:
        problems.append("export.onnx traces the whole graph in memory")
    for pass_ in passes:
        why = pass_.stream_problem()
        if why:
            problems.append(f"passes[{pass_.index}] ({pass_.name}): {why}")
        if pass_.needs_original:
            problems.append(f"passes[{pass_.index}] ({pass_.name}) keeps a copy of the whole original model")
    return problems


def history_of(before: dict[str, Encoding], model: Model) -> list[str]:
    """The tensors a pass gave a new encoding (compared with the encodings ``before`` it ran)."""
    return [name for name, enc in model.encodings.items() if before.get(name) is not enc]


def fill(model: Model, source: Source, history: dict[str, list[Encoding]], files: WeightFiles, out_dir: Path,
         group: Group, log: Reporter) -> tuple[list[str], dict[str, Any] | None]:
    """Write the artifact's weight files from the source, one tensor at a time (``source.workers`` at once: reading,
    encoding and writing one tensor overlaps another's); this rank's share under torchrun. ``history`` holds each
    tensor's encodings, pass by pass. Returns what ``WeightFiles.finish`` does (rank 0)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    where, workers = source.where, source.workers
    names = list(model.tensors())
    sizes = [where[n][1]["data_offsets"][1] - where[n][1]["data_offsets"][0] for n in names]
    mine = _share(sizes, group)
    # Every rank writes at offsets from its own plan: one made by other library versions on another machine would
    # scatter bytes silently. The plans are compared before the first byte.
    plan = hashlib.sha256(b"".join(f.encode() + layout.header for f, layout in files.layouts.items())).hexdigest()
    if group.share(plan) != plan:
        from .errors import CompressorError

        raise CompressorError(f"rank {group.rank} plans other files than rank 0 (different compressor, torch or "
                              "transformers versions on the machines?); install the same versions everywhere")
    if group.rank == 0:
        files.create(out_dir)
    group.barrier()
    total = sum(sizes[i] for i in mine)
    done, written, shown, start = 0, 0, 0.0, time.perf_counter()
    expected = model.tensors()
    threads = torch.get_num_threads()
    scratch = threading.local()  # each worker's read buffer, reused: see _write_one
    if workers > 1:
        torch.set_num_threads(max(1, threads // workers))  # the workers share the cores, not each take them all
    try:
        # One process writes every byte: it hashes the files as it goes (ranks write parts; rank 0 hashes after)
        with files.opened(out_dir, digest=group.world == 1) as fds, _sources(where) as fd_of, \
                ThreadPoolExecutor(workers) as pool:
            def one(i: int) -> tuple[int, int]:
                return sizes[i], _write_one(names[i], model, where, history, files, fds, fd_of, expected[names[i]],
                                            scratch)

            for size, wrote in pool.map(one, mine):
                done += size
                written += wrote
                if total and done / total >= shown + 0.1:
                    shown = done / total
                    log.info(f"streamed {done / 1e9:.2f} of {total / 1e9:.2f} GB read ({shown:.0%}) in "
                             f"{time.perf_counter() - start:.0f}s" + (f" on rank {group.rank}" if group.world > 1 else ""))
    finally:
        torch.set_num_threads(threads)
    planned = sum(hi - lo for layout in files.layouts.values() for lo, hi in layout.spans.values())
    written = group.total(written)  # a collective: every rank gets here, or torchrun stops them all
    if written != planned:
        from .errors import CompressorError

        raise CompressorError(f"the ranks wrote {written:,} bytes of weights where the files hold "
                              f"{planned:,}; please report this bug")
    return files.finish(out_dir) if group.rank == 0 else (list(files.layouts), None)


def _write_one(name: str, model: Model, where: dict[str, tuple[Path, dict[str, Any], int]],
               history: dict[str, list[Encoding]], files: WeightFiles, fds: dict[str, int], fd_of: dict[Path, int],
               want: Any, scratch: threading.local) -> int:
    """Read one tensor, replay each pass's encoding on it, and write its stored parts at their places; the bytes
    written. The tensor is read into this thread's buffer in ``scratch`` (grown to the largest tensor so far), not
    into fresh memory: a fresh allocation's page faults took longer than the reads (2.1-2.7 s against 0.8 s for the
    1.1B Llama's 4.5 GB). Nothing outlives this call that could still be a view on it: the parts are written
    before it returns."""
    import torch

    from .encodings import encode_named
    from .safetensors_io import read_tensor

    file, entry, data_start = where[name]
    need = entry["data_offsets"][1] - entry["data_offsets"][0]
    if getattr(scratch, "buf", None) is None or scratch.buf.numel() < need:
        scratch.buf = None  # the smaller one goes before the larger comes
        scratch.buf = torch.empty(need, dtype=torch.uint8)
    value = read_tensor(fd_of[file], entry, data_start, f"{name} in {file}", into=scratch.buf)
    steps, final = history.get(name, []), model.encodings[name]
    stored = None
    for k, enc in enumerate(steps):
        parts = encode_named(enc, value, name)
        value = None  # the value as read goes before its decoded successor comes: one copy of a large table at a time
        if k == len(steps) - 1 and enc is final and enc.reproduces(parts):
            # Encoding its effective value would give these very parts back: not decoded for that (each part's size
            # is still checked against the planned layout when it is written).
            stored = parts
            break
        value = enc.decode(parts)
        del parts
    if stored is None:
        if value.dtype != want.dtype or value.shape != want.shape:
            raise AssertionError(f"{name} streamed as {value.dtype} {tuple(value.shape)}, planned as "
                                 f"{want.dtype} {tuple(want.shape)}; please report this bug")
        stored = encode_named(final, value, name)
        del value
    written = 0
    for suffix, part in stored.items():
        written += files.write(fds, name + suffix, part)
    return written


def _share(sizes: list[int], group: Group) -> list[int]:
    """This rank's tensors (indices into ``sizes``): a contiguous run, the runs of about equal bytes."""
    if group.world == 1:
        return list(range(len(sizes)))
    total, acc, out = sum(sizes) or 1, 0, []
    for i, size in enumerate(sizes):
        if min(group.world - 1, acc * group.world // total) == group.rank:
            out.append(i)
        acc += size
    return out


@contextmanager
def _sources(where: dict[str, tuple[Path, dict[str, Any], int]]) -> Iterator[dict[Path, int]]:
    fds: dict[Path, int] = {}
    try:
        for file, _, _ in where.values():
            if file not in fds:
                fds[file] = os.open(file, os.O_RDONLY)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)
