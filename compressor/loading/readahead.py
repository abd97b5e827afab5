"""Reading a memory-mapped model's weights from disk ahead of its first forward pass, in the order it uses them.

A memory-mapped model reads its file one page fault at a time as the first forward pass reaches each weight, so
the disk idles while a layer computes, and the layer waits while the disk reads. ``read_ahead`` keeps the disk
busy ahead of the computation from a background thread. It queues the reads into the page cache and waits for
them one byte per 4 MB, so nothing is copied; the model's private maps share those pages until written.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..memory import available_memory
from .pages import MADV_WILLNEED, PAGE, Missing, Span, advise, looks_cached

if TYPE_CHECKING:
    from .tensors import Maps

__all__ = ["in_use_order", "read_ahead", "read_module_ahead", "READ_AHEAD_SHARE", "READ_AHEAD_WINDOW"]

READ_AHEAD_SHARE = 0.5  # of the memory available: beyond it, read-ahead would evict what it read before use
READ_AHEAD_WINDOW = 64 << 20  # bytes queued beyond the tensor being read
_MERGE_GAP = 1 << 20
_LOOKUP_ROWS = 4096  # more distinct rows than this in one lookup: the whole table is queued instead
_READ_STEP = 4 << 20  # bytes the thread waits for at a time (reading the last of them) before queuing more
_ADVICE_FLOOR = 128 << 10  # the kernel's default read-ahead, where the device's own limit cannot be found


def in_use_order(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's parameters and buffers (a DTensor's local shard) that a forward pass reads whole, in the order
    a layered model first touches them, closely enough for reading ahead: module by module in registration order.

    Left out: the tables only looked up by row, an ``nn.Embedding``'s weight that no other module uses (a tied LM
    head does). A forward pass reads the rows of its tokens from them: the page faults of a lookup bring those (and
    the kernel's read-around of them), not a whole table for a few tokens. Advising such a table random (one page
    per fault) was measured and dropped: a prompt's rows were then read one page fault at a time, each waiting
    behind the queued read-ahead, and the first layer of a 1.1B model started 0.4-0.7 s late."""
    import sys

    dtensors = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists (and none is paid for)
    local = dtensors.DTensor if dtensors is not None else ()
    uses: dict[int, int] = {}
    ordered: list[tuple[torch.Tensor, bool]] = []
    for sub in module.modules():
        for name, t in (*sub._parameters.items(), *sub._buffers.items()):
            if t is not None:
                uses[id(t)] = uses.get(id(t), 0) + 1
                ordered.append((t, isinstance(sub, torch.nn.Embedding) and name == "weight"))
    return [t.to_local() if local and isinstance(t, local) else t for t, table in ordered
            if not (table and uses[id(t)] == 1)]


def read_ahead(tensors: Iterable[torch.Tensor], maps: Maps,
               hooks: _Hooks | None = None) -> threading.Thread | None:
    """Read, in a background thread and in the order given, the file bytes behind those ``tensors`` that are
    views on the memory maps ``maps`` (from ``load_tensors``); returns the thread, or None when there is nothing
    to read (the page cache holds pages sampled over the tensors' bytes: a warm load, whose first forward pass
    would only compete with the thread for the cores and the memory map's lock) or the platform cannot. ``hooks``:
    removed by the thread when it finishes. The thread reads
    nothing when the bytes exceed ``READ_AHEAD_SHARE`` of the memory available (later reads would evict earlier
    ones before their use); it checks that itself, since reading /proc and the cgroup's files takes a millisecond
    a warm load need not wait for.

    The thread waits for the spans in order, 4 MB at a time (``pread`` of each step's last byte), and keeps the next
    ``READ_AHEAD_WINDOW`` bytes queued (``posix_fadvise(WILLNEED)``, in pieces the kernel takes whole:
    ``advice_limit``). Tensors next to each other both in use and in the file make one span: in a file laid out in
    use order (compressor's), nearly the whole file, read from start to end. Queuing everything at once would not
    do: the I/O scheduler sorts a deep queue by disk position, and the first layer would wait behind the last."""
    if not maps or not hasattr(os, "posix_fadvise"):
        return None
    spans: list[Span] = []
    for tensor in tensors:
        span = _span(tensor, maps)
        if span is None:
            continue  # decoded, copied or computed: not a view on a file
        path, lo, hi, _ = span
        last = spans[-1] if spans else None
        if last and last[0] == path and 0 <= lo - last[2] <= _MERGE_GAP:
            spans[-1] = (path, last[1], max(hi, last[2]), last[3])  # adjacent in use and in the file: one span
        else:
            spans.append(span)
    if not spans or looks_cached(spans):
        return None
    thread = threading.Thread(target=_read_in_order, args=(spans, hooks or _Hooks()),
                              name="compressor-read-ahead", daemon=True)
    with _RUNNING_LOCK:
        _RUNNING.add(thread)
    thread.start()
    return thread


_RUNNING: set[threading.Thread] = set()  # read-ahead threads not yet finished
_RUNNING_LOCK = threading.Lock()
_EXITING = threading.Event()


@atexit.register
def _stop_before_exit() -> None:
    """Stop the read-ahead threads before the interpreter's teardown, each within a step: a daemon thread left in a
    system call when teardown begins is one way for a process to abort at exit. (A tensor-parallel rank in the test
    suite that finished while its thread may still have been reading ended once with SIGABRT; the cause is not
    proven, and the test passed in 11 runs alone.)"""
    _EXITING.set()
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for thread in running:
        thread.join(5.0)


def read_module_ahead(module: torch.nn.Module, maps: Maps) -> threading.Thread | None:
    """``read_ahead`` of the module's tensors in the order it uses them (``in_use_order``), and, while that thread
    reads, the rows that a lookup table it leaves out gives a forward pass are queued the moment the lookup is
    called (``_queue_rows``, a forward pre-hook the thread removes when it finishes); returns the thread, or None.

    A warm load returns at once: pages sampled over the maps' bytes are in the page cache, or, where they are not,
    pages sampled over those bytes less the lookup tables' (ordering the tensors and finding their spans took
    0.6 ms of MiniLM's 11 ms warm load, only to find them cached too). The second sample is for a model used
    before: its page cache holds only the rows its lookups read, and MiniLM's word table is half its file. A table
    tied to an LM head is left out of that sample too; a forward pass reads it whole, so after any use it is
    cached."""
    if not maps or looks_cached(_spans_between(maps, [])):
        return None
    tables, lookups = _tables(module, maps)
    if tables and looks_cached(_spans_between(maps, tables)):
        return None
    ordered = in_use_order(module)
    read = {id(t) for t in ordered}
    hooks = _Hooks()
    thread = read_ahead(ordered, maps, hooks)
    if thread is None:
        return None
    for table, weight in lookups:
        if id(weight) not in read:  # a tied table is read ahead whole; its lookups need no rows queued
            hooks.add(table, weight.data_ptr())
    return thread


def _tables(module: torch.nn.Module, maps: Maps) -> tuple[list[torch.Tensor],
                                                            list[tuple[torch.nn.Module, torch.Tensor]]]:
    """The weights of the module's ``nn.Embedding`` tables that are views on ``maps`` (what ``in_use_order`` may
    leave out), and of those the ones looked up by ``nn.Embedding``'s own forward (2-D, contiguous), with their
    modules: the lookups whose rows ``_queue_rows`` can queue."""
    tables: list[torch.Tensor] = []
    lookups: list[tuple[torch.nn.Module, torch.Tensor]] = []
    for sub in module.modules():
        weight = sub._parameters.get("weight") if isinstance(sub, torch.nn.Embedding) else None
        if weight is None or _span(weight, maps) is None:
            continue
        tables.append(weight)
        # nn.Embedding's own lookup only: a subclass may index by something else (OPT's positions: the mask)
        if type(sub).forward is torch.nn.Embedding.forward and type(weight) is torch.nn.Parameter \
                and weight.dim() == 2 and weight.is_contiguous():
            lookups.append((sub, weight))
    return tables, lookups


def _spans_between(maps: Maps, holes: list[torch.Tensor]) -> list[Span]:
    """The maps' whole files as spans, less the bytes of the ``holes`` (views on them)."""
    cut: dict[int, list[tuple[int, int]]] = {}
    for tensor in holes:
        span = _span(tensor, maps)
        if span is not None:
            cut.setdefault(span[3] - span[1], []).append((span[1], span[2]))
    spans: list[Span] = []
    for address, (path, size) in maps.items():
        at = 0
        for lo, hi in sorted(cut.get(address, [])):
            if lo > at:
                spans.append((path, at, lo, address + at))
            at = max(at, hi)
        if at < size:
            spans.append((path, at, size, address + at))
    return spans


_READING: set[int] = set()  # the tables (by address) whose rows a running read-ahead thread leaves to their lookups


class _Hooks:
    """The lookup hooks of one read-ahead thread, which removes them when it finishes (``close``); one added after
    that is not registered at all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = False
        self.added: list[tuple[int, Any]] = []

    def add(self, table: torch.nn.Module, address: int) -> None:
        with self.lock:
            if not self.closed:
                _READING.add(address)
                hook = _LookupHook(address)
                handle = table.register_forward_pre_hook(hook)
                hook.key = handle.id
                self.added.append((address, handle))

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for address, handle in self.added:
                _READING.discard(address)
                handle.remove()


class _LookupHook:
    """The forward pre-hook on one table: ``_queue_rows`` while its thread reads. A copy of it (in a deep copy of
    the model made meanwhile, whose table lies elsewhere) or one left after its thread finished removes itself
    from its table at its first call: nothing else would, and a Python hook left on a module is in the way of
    tools that refuse one. Integers only: the module still copies and pickles."""

    def __init__(self, address: int) -> None:
        self.address = address
        self.key = -1  # its handle's id: its key in the table's _forward_pre_hooks

    def __call__(self, table: torch.nn.Module, args: tuple[Any, ...]) -> None:
        try:
            weight = table._parameters.get("weight")
            mine = self.address in _READING and weight is not None and weight.device.type == "cpu" \
                and weight.data_ptr() == self.address
        except Exception:  # noqa: BLE001 - advice, in the way of the lookup: never its caller's problem
            mine = False
        if not mine:
            table._forward_pre_hooks.pop(self.key, None)  # _call_impl iterates over a copy of the hooks
            return
        _queue_rows(self.address, table, args)


def _queue_rows(address: int, table: torch.nn.Module, args: tuple[Any, ...]) -> None:
    """Queue the reads of the rows of ``table`` (mapped at ``address``) that the indices in ``args[0]`` name
    (``madvise(WILLNEED)``, which does not wait), all at once. A lookup's page faults would otherwise each wait,
    one after the other, behind the reads the read-ahead thread keeps queued: a 16-token prompt's first layer
    started up to 0.27 s late on a 0.25B Llama. Advice only: it never raises, and does nothing once the thread has
    finished, for a weight no longer the mapped one (moved, replaced) or for indices the lookup refuses. Its only
    state is integers, so the module still copies and pickles."""
    try:
        weight = table.weight
        ids = args[0] if args else None
        if address not in _READING or weight.device.type != "cpu" or weight.data_ptr() != address \
                or not isinstance(ids, torch.Tensor) or ids.device.type != "cpu" or ids.is_floating_point() \
                or ids.is_complex():
            return
        rows = torch.unique(ids.detach().reshape(-1))
        if rows.numel() == 0 or int(rows[0]) < 0 or int(rows[-1]) >= weight.shape[0]:
            return
        row_bytes = weight.stride(0) * weight.element_size()
        if rows.numel() > _LOOKUP_ROWS:
            advise(address, weight.shape[0] * row_bytes, MADV_WILLNEED)
            return
        lo = hi = -1
        for row in rows.tolist():  # ascending: nearby rows in one call
            at = address + row * row_bytes
            if lo >= 0 and at - hi > PAGE:
                advise(lo, hi - lo, MADV_WILLNEED)
                lo = -1
            if lo < 0:
                lo = at
            hi = at + row_bytes
        advise(lo, hi - lo, MADV_WILLNEED)
    except Exception:  # noqa: BLE001 - advice: the lookup itself reads its rows either way
        return


def _span(tensor: torch.Tensor, maps: Maps) -> Span | None:
    """(file, start, end, address) of a tensor that is a view on one of ``maps``, else None."""
    if tensor.numel() == 0 or tensor.device.type != "cpu":
        return None
    at, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    for base, (path, length) in maps.items():  # a handful of files: a scan costs nothing beside the advice
        if base <= at and at + nbytes <= base + length:
            return path, at - base, at - base + nbytes, at
    return None


def advice_limit(path: Path) -> int:
    """The most bytes one ``posix_fadvise(WILLNEED)`` reads on the device holding ``path``: Linux reads at most
    the larger of the device's read-ahead and its largest request (``read_ahead_kb``, ``max_sectors_kb``) and
    drops the rest of the range silently. At least 128 KiB (the kernel's default read-ahead) where sysfs cannot
    say."""
    try:
        dev = os.stat(path).st_dev
        block = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
        queue = block / "queue" if (block / "queue").is_dir() else block.parent / "queue"  # a partition's disk
        kb = max(int((queue / name).read_text()) for name in ("read_ahead_kb", "max_sectors_kb"))
    except (OSError, ValueError):
        return _ADVICE_FLOOR
    return max(_ADVICE_FLOOR, min(kb << 10, READ_AHEAD_WINDOW))


def _pieces(spans: list[Span]) -> Iterable[tuple[Path, int, int]]:
    """The spans' byte ranges cut to at most their device's advice limit."""
    limits: dict[Path, int] = {}
    for path, lo, hi, _ in spans:
        if path not in limits:
            limits[path] = advice_limit(path)
        for at in range(lo, hi, limits[path]):
            yield path, at, min(hi, at + limits[path])


def _read_in_order(spans: list[Span], hooks: _Hooks) -> None:
    """The thread: reads ``spans`` in order, then removes the lookup ``hooks`` that only matter while it reads."""
    try:
        _read_spans(spans)
    finally:
        hooks.close()
        with _RUNNING_LOCK:
            _RUNNING.discard(threading.current_thread())


def _read_spans(spans: list[Span]) -> None:
    """Bring the spans' bytes into the page cache in order, the next ``READ_AHEAD_WINDOW`` bytes always queued.

    The queued reads (``posix_fadvise(WILLNEED)``) bring the bytes; the thread waits for them a step at a time by
    reading each step's last byte, which paces the queue. The model's map then finds them in the page cache (its
    first forward pass takes minor faults only). Not ``madvise(MADV_POPULATE_READ)`` over the map itself, which
    this thread did first: while it populated, the forward pass on the same address space computed 2-3x slower in
    some states of the machine (a cold 1.1B Llama to the end of its first forward pass, six alternating rounds:
    3.5-3.9 s populating, 1.3-1.6 s reading, 1.4-1.6 s with no thread at all; docs/benchmarks.md). Nor reading
    every step whole through a buffer, which came next: the copy took CPU time from a forward pass whose kernels
    are slow (float16 on a CPU without avx512_fp16: 1.96 s against 1.66 s for a cold 1.1B Llama)."""
    room, _ = available_memory()
    if room is not None and sum(hi - lo for _, lo, hi, _ in spans) > READ_AHEAD_SHARE * room:
        return
    fds: dict[Path, int] = {}

    def fd_of(path: Path) -> int:
        if path not in fds:
            fds[path] = os.open(path, os.O_RDONLY)
        return fds[path]

    queued = done = 0
    pieces = iter(_pieces(spans))
    last = memoryview(bytearray(1))
    missing = Missing(_READ_STEP)
    try:
        for path, lo, hi, address in spans:
            at = lo
            while at < hi and not _EXITING.is_set():
                while queued - done < READ_AHEAD_WINDOW:
                    piece = next(pieces, None)
                    if piece is None:
                        break
                    os.posix_fadvise(fd_of(piece[0]), piece[1], piece[2] - piece[1], os.POSIX_FADV_WILLNEED)
                    queued += piece[2] - piece[1]
                n = min(_READ_STEP, hi - at)
                # The step's last byte alone: it waits for the queued read that brings it in, which paces the
                # queue, without copying the step out of the page cache as reading it whole did (CPU time the
                # first forward pass wants when its kernels are slow)
                if os.preadv(fd_of(path), [last], at + n - 1) <= 0:
                    break  # shorter than its header says: the model's own page fault will say so
                # What the advice did not bring (the kernel drops it silently: memory pressure, a file system
                # without read-ahead) is read here, through a buffer
                for start, end in missing.ranges(address + at - lo, n):
                    missing.read(fd_of(path), at + start, at + end)
                at += n
                done += n
    except OSError:
        pass  # reading ahead only: the page faults still read whatever was not read ahead
    finally:
        for fd in fds.values():
            os.close(fd)
