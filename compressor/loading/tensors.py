"""Reading an artifact's safetensors files: private memory maps on CPU (zero-copy views, nothing read until
used), threaded pinned-memory streaming onto CUDA, and the example inputs."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError
from ..safetensors_io import map_file, read_header
from ..manifest import read_manifest

Maps = dict[int, tuple[Path, int]]  # the memory maps of a load: {address: (file, bytes mapped)}

__all__ = ["Maps", "load_tensors", "load_tensors_cuda", "load_example_inputs", "CUDA_CHUNK_BYTES", "CUDA_THREADS"]


def load_tensors(root: Path, files: list[str], maps: Maps | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the given safetensors files, as views on private (copy-on-write) memory maps. ``maps``, when
    given, receives each map's address, file and length ({address: (path, bytes)}) for ``read_ahead``."""
    out: dict[str, torch.Tensor] = {}
    for rel in files:
        if rel.endswith(".safetensors"):
            tensors, mapped = map_file(root / rel)
            if maps is not None and mapped is not None:
                maps[mapped[0]] = (root / rel, mapped[1])
            out.update(tensors)
    return out


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


def _balanced(root: Path, files: list[str]) -> list[list[tuple[str, str, int]]]:
    """The tensors of ``files`` as (file, name, bytes) lists for up to CUDA_THREADS threads, balanced by bytes."""
    import os

    items: list[tuple[int, str, str]] = []
    for rel in files:
        if rel.endswith(".safetensors"):
            header, _ = read_header(root / rel)
            for name, info in header.items():
                if name != "__metadata__":
                    items.append((info["data_offsets"][1] - info["data_offsets"][0], rel, name))
    workers = max(1, min(CUDA_THREADS, os.cpu_count() or 1, len(items)))
    plan: list[list[tuple[str, str, int]]] = [[] for _ in range(workers)]
    load_per = [0] * workers
    for nbytes, rel, name in sorted(items, reverse=True):  # largest first onto the least-loaded thread
        i = load_per.index(min(load_per))
        plan[i].append((rel, name, nbytes))
        load_per[i] += nbytes
    return plan


def _copy_to_cuda(root: Path, device: torch.device, stop: threading.Event | None, caller: torch.cuda.Stream,
                  assigned: list[tuple[str, str, int]]) -> dict[str, torch.Tensor]:
    """One thread of load_tensors_cuda: its tensors through two pinned buffers onto ``device``."""
    out: dict[str, torch.Tensor] = {}
    stream = torch.cuda.Stream(device)
    handles: dict[str, Any] = {}
    current = "?"
    try:
        # Pinned memory is slow to allocate: no larger than this thread's largest tensor (a small model's threads
        # would otherwise pin 128 MB each).
        chunk = max(1, min(CUDA_CHUNK_BYTES, max((n for _, _, n in assigned), default=1)))
        staging = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        done: list[torch.cuda.Event | None] = [None, None]
        k = 0
        for rel, name, _ in assigned:
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
            for start in range(0, src_bytes.numel(), chunk):
                n = min(chunk, src_bytes.numel() - start)
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
