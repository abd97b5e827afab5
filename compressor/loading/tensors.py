"""Reading an artifact's safetensors files: private memory maps on CPU (zero-copy views, nothing read until
used), threaded pinned-memory streaming onto CUDA, and the example inputs."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError
from ..memory import available_memory
from ..safetensors_io import PAGE, map_file, read_header
from ..manifest import read_manifest

__all__ = ["load_tensors", "in_use_order", "read_ahead", "load_tensors_cuda", "load_example_inputs", "CUDA_CHUNK_BYTES",
           "CUDA_THREADS", "READ_AHEAD_SHARE"]


def load_tensors(root: Path, files: list[str], maps: dict[int, Path] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the given safetensors files, as views on private (copy-on-write) memory maps. ``maps``, when
    given, receives each map's address and file ({storage address: path}) for ``read_ahead``."""
    out: dict[str, torch.Tensor] = {}
    for rel in files:
        if rel.endswith(".safetensors"):
            tensors, address = map_file(root / rel)
            if maps is not None and address is not None:
                maps[address] = root / rel
            out.update(tensors)
    return out


READ_AHEAD_SHARE = 0.5  # of the memory available: beyond it, read-ahead would evict what it read before use
READ_AHEAD_WINDOW = 64 << 20  # bytes queued beyond the tensor being read
_MERGE_GAP = 1 << 20
_MADV_POPULATE_READ = 22  # Linux 5.14+: fault the range in (reading it), without copying it anywhere


def in_use_order(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's parameters and buffers (a DTensor's local shard), module by module in registration order: the
    order a forward pass of a layered model first touches them, closely enough for reading ahead."""
    import sys

    dtensors = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists (and none is paid for)
    local = dtensors.DTensor if dtensors is not None else ()
    return [t.to_local() if local and isinstance(t, local) else t for sub in module.modules()
            for t in (*sub._parameters.values(), *sub._buffers.values()) if t is not None]


def read_ahead(tensors: Iterable[torch.Tensor], maps: dict[int, Path]) -> threading.Thread | None:
    """Read, in a background thread and in the order given, the file bytes behind those ``tensors`` that are
    views on the memory maps ``maps`` (from ``load_tensors``); returns the thread, or None when there is nothing
    to read, the platform cannot, or it would not fit in memory.

    A memory-mapped model reads its file one page fault at a time as the first forward pass reaches each weight,
    so the disk idles while a layer computes, and the layer waits while the disk reads. Given the tensors in the
    order the model uses them, the thread keeps the disk busy ahead of the computation: it queues the reads of the
    next ``READ_AHEAD_WINDOW`` bytes (``posix_fadvise(WILLNEED)``) and maps the current tensor's pages in
    (``madvise(MADV_POPULATE_READ)``, which waits for them). Queuing everything at once would not do: the I/O
    scheduler sorts a deep queue by disk position, and the first layer would wait behind the last. Nothing is
    copied: the pages are the page cache's, shared by the private maps until written."""
    if not maps or not hasattr(os, "posix_fadvise"):
        return None
    spans: list[tuple[Path, int, int, int]] = []  # (file, start, end, address of start)
    for tensor in tensors:
        base = tensor.untyped_storage().data_ptr()
        path = maps.get(base)
        if path is None or tensor.numel() == 0:
            continue  # decoded, copied or computed: not a view on a file
        lo = tensor.data_ptr() - base
        hi = lo + tensor.numel() * tensor.element_size()
        last = spans[-1] if spans else None
        if last and last[0] == path and 0 <= lo - last[2] <= _MERGE_GAP:
            spans[-1] = (path, last[1], max(hi, last[2]), last[3])  # adjacent in use and in the file: one span
        else:
            spans.append((path, lo, hi, tensor.data_ptr()))
    total = sum(hi - lo for _, lo, hi, _ in spans)
    room, _ = available_memory()
    if not spans or (room is not None and total > READ_AHEAD_SHARE * room):
        return None
    thread = threading.Thread(target=_read_in_order, args=(spans,), name="compressor-read-ahead", daemon=True)
    thread.start()
    return thread


def _read_in_order(spans: list[tuple[Path, int, int, int]]) -> None:
    import ctypes

    fds: dict[Path, int] = {}
    libc = ctypes.CDLL(None, use_errno=True)
    populate = getattr(libc, "madvise", None)
    queued = done = 0
    ahead = 0
    try:
        for path, lo, hi, address in spans:
            while ahead < len(spans) and queued - done < READ_AHEAD_WINDOW:
                apath, alo, ahi, _ = spans[ahead]
                if apath not in fds:
                    fds[apath] = os.open(apath, os.O_RDONLY)
                os.posix_fadvise(fds[apath], alo, ahi - alo, os.POSIX_FADV_WILLNEED)
                queued += ahi - alo
                ahead += 1
            if populate is not None:
                page = address & ~(PAGE - 1)
                if populate(ctypes.c_void_p(page), ctypes.c_size_t(address + hi - lo - page),
                            ctypes.c_int(_MADV_POPULATE_READ)) != 0:
                    populate = None  # an older kernel: the window's advice alone keeps the disk busy
            done += hi - lo
    except OSError:
        pass  # advice only: the page faults still read whatever was not read ahead
    finally:
        for fd in fds.values():
            os.close(fd)


CUDA_CHUNK_BYTES = 64 << 20  # pinned staging per buffer: two per thread, whatever the tensor sizes
CUDA_THREADS = 4


def load_tensors_cuda(root: Path, files: list[str], device: torch.device, stop: threading.Event | None = None,
                      caller: torch.cuda.Stream | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the given safetensors files, on a CUDA device.

    The tensors of all shards are spread over up to ``CUDA_THREADS`` threads, balanced by bytes (so a single-file
    artifact is read in parallel too). Each thread copies its tensors, in chunks of at most ``CUDA_CHUNK_BYTES``,
    from the memory-mapped file into one of two pinned staging buffers (this is where the disk is read), queues a
    non-blocking copy of the chunk to the GPU on its own stream, and reads the next chunk while that transfer runs;
    a buffer is reused only after the copy that last used it has finished (an event). GPU memory comes from the
    caller's stream (``caller``, default: this thread's current stream), so the model's tensors live in its pool.
    ``stop`` aborts between tensors.
    """
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    plan = _balanced(root, files)
    work = partial(_copy_to_cuda, root, device, stop, caller or torch.cuda.current_stream(device))
    result: dict[str, torch.Tensor] = {}
    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        for part in pool.map(work, plan):
            result.update(part)
    return result


def _balanced(root: Path, files: list[str]) -> list[list[tuple[str, str]]]:
    """The tensors of ``files`` as (file, name) lists for up to CUDA_THREADS threads, balanced by bytes."""
    import os

    items: list[tuple[int, str, str]] = []
    for rel in files:
        if rel.endswith(".safetensors"):
            header, _ = read_header(root / rel)
            for name, info in header.items():
                if name != "__metadata__":
                    items.append((info["data_offsets"][1] - info["data_offsets"][0], rel, name))
    workers = max(1, min(CUDA_THREADS, os.cpu_count() or 1, len(items)))
    plan: list[list[tuple[str, str]]] = [[] for _ in range(workers)]
    load_per = [0] * workers
    for nbytes, rel, name in sorted(items, reverse=True):  # largest first onto the least-loaded thread
        i = load_per.index(min(load_per))
        plan[i].append((rel, name))
        load_per[i] += nbytes
    return plan


def _copy_to_cuda(root: Path, device: torch.device, stop: threading.Event | None, caller: torch.cuda.Stream,
                  assigned: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """One thread of load_tensors_cuda: its tensors through two pinned buffers onto ``device``."""
    out: dict[str, torch.Tensor] = {}
    stream = torch.cuda.Stream(device)
    handles: dict[str, Any] = {}
    current = "?"
    try:
        staging = [torch.empty(CUDA_CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        done: list[torch.cuda.Event | None] = [None, None]
        k = 0
        for rel, name in assigned:
            if stop is not None and stop.is_set():
                break
            current = rel
            if rel not in handles:
                handles[rel] = map_file(root / rel)[0]
            src = handles[rel][name]  # an mmap view: nothing read yet
            with torch.cuda.stream(caller):
                dst = torch.empty(src.shape, dtype=src.dtype, device=device)
            stream.wait_stream(caller)  # the block may have been in use by the caller's queued work
            src_bytes = src.reshape(-1).view(torch.uint8)
            dst_bytes = dst.reshape(-1).view(torch.uint8)
            for start in range(0, src_bytes.numel(), CUDA_CHUNK_BYTES):
                n = min(CUDA_CHUNK_BYTES, src_bytes.numel() - start)
                if done[k] is not None:
                    done[k].synchronize()  # the copy that last read this buffer has finished
                staging[k][:n].copy_(src_bytes[start:start + n])  # page faults: the disk read
                with torch.cuda.stream(stream):
                    dst_bytes[start:start + n].copy_(staging[k][:n], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                done[k] = event
                k ^= 1
            dst.record_stream(stream)  # freed later on the caller's stream: wait for this copy first
            out[name] = dst
        stream.synchronize()
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"{current}: reading it onto {device} failed: {type(exc).__name__}: {exc}") from None
    finally:
        handles.clear()
    return out


def load_example_inputs(artifact_dir: str | Path) -> dict[str, torch.Tensor]:
    """The example inputs saved with the artifact (keyword arguments for the model's forward)."""
    root = Path(artifact_dir)
    manifest = read_manifest(root)
    rel = manifest.model.example_inputs
    if not rel:
        raise ArtifactError(f"{root} has no example inputs recorded in its manifest")
    return load_tensors(root, [rel])
