"""Load an artifact directory back into an nn.Module: memory-mapped, zero-copy, never unpickling.

The architecture is rebuilt from the manifest (transformers config, zoo name or python factory) with parameters
on the meta device, so nothing is allocated twice; then every parameter is *assigned* a view on the memory-mapped
safetensors file. Files are checked against the manifest sizes and their headers parsed strictly first, so a
truncated or corrupt artifact is refused with a clear error instead of crashing later.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .encodings import encoding_from_json
from .errors import ArtifactError
from .export.safetensors import read_header
from .manifest import check_files, read_manifest

__all__ = ["load", "load_tensors", "load_tensors_cuda", "load_example_inputs", "build_architecture"]


def load(artifact_dir: str | Path, *, device: str | torch.device = "cpu", verify_hashes: bool = False,
         int8: str = "dequantize", tp_rank: int | None = None, tp_world: int | None = None) -> nn.Module:
    """Return the artifact's model in eval mode.

    On CPU its tensors are views on the memory-mapped files (nothing is read until used). On CUDA the shards are
    read by parallel threads, each staging tensors through pinned memory and copying them to the GPU without
    blocking, so disk reads overlap with host-to-device transfers. ``verify_hashes`` also recomputes every file's
    sha256 and checks the structure of an ONNX model beside the weights (reads everything; off by default so that
    loading stays lazy: sizes, safetensors headers and the confinement rule are always checked). ``int8`` says what happens to weights
    stored as int8 (the `quantize` pass): ``"dequantize"`` turns them into float32 on load; ``"keep"`` keeps the
    int8 tensor as the parameter and dequantizes it on the fly at every use (a parametrization), so the model
    holds a quarter of the memory.

    A tensor-parallel artifact (the `shard` pass) loads whole by default, its rank files joined again. With
    ``tp_rank`` and ``tp_world``, inside an initialised torch.distributed process group of that size (gloo on CPU,
    nccl on CUDA, ``device`` this rank's device), only that rank's file and the replicated tensors are mapped and the
    module runs tensor-parallel (torch.distributed.tensor.parallel). Raises ArtifactError for missing, truncated,
    corrupt or foreign files.
    """
    if int8 not in ("dequantize", "keep"):
        raise ValueError(f"int8={int8!r}: use 'dequantize' or 'keep'")
    root = Path(artifact_dir)
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ArtifactError(f"cannot load onto {dev}: compressor.load supports cpu and cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"cannot load onto {dev}: CUDA is not available on this machine")
    manifest = read_manifest(root)
    check_files(root, manifest, hashes=verify_hashes)
    info = manifest.get("model", {})
    if not isinstance(info.get("weights"), list) or not all(isinstance(w, str) for w in info["weights"]):
        raise ArtifactError(f"{root}: manifest.json has no list of weight files (model.weights)")
    strangers = [w for w in info["weights"] if w not in manifest["files"]]
    if strangers:
        raise ArtifactError(f"{root}: manifest.json names weight files it does not list (and so never checked): "
                            f"{', '.join(map(repr, strangers[:3]))}")
    sharded = manifest.get("tensor_parallel")
    if (tp_rank is None) != (tp_world is None):
        raise ValueError("give both tp_rank and tp_world, or neither")
    if tp_rank is not None:
        if not sharded:
            raise ArtifactError(f"{root} is not a tensor-parallel artifact (its recipe has no `shard` pass)")
        if int8 != "dequantize":
            raise ValueError("int8='keep' is not supported with tensor parallelism")
        from .tp import load_rank

        return load_rank(root, manifest, int(tp_rank), int(tp_world), dev)  # type: ignore[arg-type]
    if sharded:
        from .tp import assemble

        stored = assemble(root, manifest)
        if dev.type != "cpu":
            stored = {k: v.to(dev) for k, v in stored.items()}
        module = build_architecture(root, manifest)
    elif dev.type == "cpu":
        stored = load_tensors(root, info["weights"])
        module = build_architecture(root, manifest)
    else:
        # The shards stream to the GPU while this thread builds the (empty) architecture.
        from concurrent.futures import ThreadPoolExecutor

        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=1) as pool:
            # The stream is per thread: capture the caller's here, not in the pool thread.
            pending = pool.submit(load_tensors_cuda, root, info["weights"], dev, stop, torch.cuda.current_stream(dev))
            try:
                module = build_architecture(root, manifest)
            except BaseException:
                stop.set()  # do not finish reading a model that cannot be built
                raise
            stored = pending.result()
    encodings = dict(info.get("encodings", {}))
    kept: dict[str, tuple[torch.Tensor, bool]] = {}
    if int8 == "keep":
        tied = set(info.get("aliases", {})) | set(info.get("aliases", {}).values())
        for name, spec in list(encodings.items()):
            if isinstance(spec, dict) and spec.get("kind") == "int8" and name not in tied \
                    and f"{name}.__q" in stored and f"{name}.__scale" in stored:
                kept[name] = (stored.pop(f"{name}.__scale"), bool(spec.get("per_channel", True)))
                stored[name] = stored.pop(f"{name}.__q")  # the int8 tensor becomes the parameter itself
                del encodings[name]
    state = _decode(stored, encodings)
    _restructure(module, info, state, root)
    for alias, target in info.get("aliases", {}).items():
        state[alias] = state[target]
    if dev.type != "cpu":
        # Parameters are on meta and get CUDA tensors assigned below; buffers built by constructors must follow.
        for sub in module.modules():
            for name, buf in list(sub._buffers.items()):
                if buf is not None and not buf.is_meta:
                    sub._buffers[name] = buf.to(dev)
    for name in kept:  # int8 tensors cannot require grad; assign=True copies this flag from the meta parameter
        try:
            module.get_parameter(name).requires_grad_(False)
        except AttributeError:
            pass
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{root}: the stored tensors do not fit the model's architecture: {exc}") from None
    _retie(module, info.get("aliases", {}))
    leftover = [n for n, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise ArtifactError(f"{root}: no stored values for {', '.join(leftover[:5])}")
    if kept:
        _dequantize_on_the_fly(module, kept)
    from .model import install_bridges

    try:
        install_bridges(module, info.get("dtype_bridges", {}))
    except (KeyError, AttributeError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{root}: manifest.json has a malformed model.dtype_bridges entry ({exc!r})") from None
    return module.eval()


def load_tensors(root: Path, files: list[str]) -> dict[str, torch.Tensor]:
    """All tensors of the given safetensors files, as views on private (copy-on-write) memory maps."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for rel in files:
        if not rel.endswith(".safetensors"):
            continue
        path = root / rel
        read_header(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    out[name] = f.get_tensor(name)
        except Exception as exc:  # safetensors' own checks, stricter in places than ours
            raise ArtifactError(f"{rel}: safetensors cannot read it: {exc}") from None
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
    import os
    from concurrent.futures import ThreadPoolExecutor

    from safetensors import safe_open

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
    caller = caller or torch.cuda.current_stream(device)

    def work(assigned: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
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
                    handles[rel] = safe_open(str(root / rel), framework="pt")
                src = handles[rel].get_tensor(name)  # an mmap view: nothing read yet
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

    result: dict[str, torch.Tensor] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for part in pool.map(work, plan):
            result.update(part)
    return result


def load_example_inputs(artifact_dir: str | Path) -> dict[str, torch.Tensor]:
    """The example inputs saved with the artifact (keyword arguments for the model's forward)."""
    root = Path(artifact_dir)
    manifest = read_manifest(root)
    rel = manifest.get("model", {}).get("example_inputs")
    if not rel:
        raise ArtifactError(f"{root} has no example inputs recorded in its manifest")
    return load_tensors(root, [rel])


def _decode(stored: dict[str, torch.Tensor], encodings: dict[str, Any]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    claimed: set[str] = set()
    for name, spec in encodings.items():
        try:
            enc = encoding_from_json(spec)
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"tensor {name}: {exc}") from None
        parts = {k[len(name):]: v for k, v in stored.items() if k == name or k.startswith(name + ".__")}
        if "" not in parts and not parts:
            raise ArtifactError(f"tensor {name} is listed in the manifest but missing from the weight files")
        try:
            state[name] = enc.decode(parts)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ArtifactError(f"tensor {name} ({spec.get('kind')}) cannot be decoded: {exc}") from None
        claimed.update(name + suffix for suffix in parts)
    for name, tensor in stored.items():
        if name not in claimed:
            state[name] = tensor  # dense: stored as is
    return state


class _Int8Weight(nn.Module):
    """Parametrization: the stored int8 tensor times its scales, computed at every use."""

    def __init__(self, scale: torch.Tensor, per_channel: bool) -> None:
        super().__init__()
        self.per_channel = per_channel
        self.register_buffer("scale", scale)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.per_channel and q.dim() >= 1:
            return (q.reshape(q.shape[0], -1).float() * self.scale.float().reshape(-1, 1)).reshape(q.shape)
        return q.float() * self.scale.float()


def _dequantize_on_the_fly(module: nn.Module, kept: dict[str, tuple[torch.Tensor, bool]]) -> None:
    from torch.nn.utils import parametrize

    for name, (scale, per_channel) in kept.items():
        *path, leaf = name.split(".")
        owner = module.get_submodule(".".join(path))
        param = owner._parameters[leaf]
        # unsafe: the parametrization changes the dtype (int8 -> float32), which is the point.
        parametrize.register_parametrization(owner, leaf, _Int8Weight(scale.to(param.device), per_channel),
                                             unsafe=True)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters live on the meta device (no memory, no init cost).

    Buffers stay real: non-persistent ones (e.g. BERT's position_ids) are not in the file and must be computed
    by the module's own constructor.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_architecture(root: Path, manifest: dict[str, Any]) -> nn.Module:
    """An empty module of the artifact's architecture (parameters on meta), from its manifest."""
    source = manifest.get("source", {})
    kind = source.get("kind")
    with _parameters_on_meta():
        if kind == "hf" or (kind == "zoo" and source.get("name") == "minilm"):
            import transformers

            auto = getattr(transformers, source.get("auto_class", "AutoModel"), None)
            if auto is None:
                raise ArtifactError(f"transformers has no {source.get('auto_class')!r}; upgrade transformers")
            config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
            return auto.from_config(config)
        if kind == "zoo":
            from .zoo import build_digits

            return build_digits(source["name"])
        if kind == "python":
            from .sources.python import build_python

            return build_python(source["factory"], source.get("kwargs", {}), None)
    raise ArtifactError(f"{root}: unknown model source {kind!r} in the manifest")


def _restructure(module: nn.Module, info: dict[str, Any], state: dict[str, torch.Tensor], root: Path) -> None:
    """Give the modules structured pruning changed their pruned shapes (parameters on meta, filled by
    load_state_dict like every other): attention heads are removed with the module's own ``prune_heads``; resized
    Linear, Conv and BatchNorm modules get their recorded size attributes and tensors of the stored shapes."""
    heads, resized = info.get("pruned_heads", {}), info.get("resized", {})
    if not isinstance(heads, dict) or not isinstance(resized, dict):
        raise ArtifactError(f"{root}: manifest.json has a malformed model.pruned_heads or model.resized")
    named = dict(module.named_modules())
    with _parameters_on_meta():
        for name, removed in heads.items():
            attention = named.get(name)
            if not callable(getattr(attention, "prune_heads", None)) or not isinstance(removed, list) \
                    or not all(isinstance(h, int) for h in removed):
                raise ArtifactError(f"{root}: manifest.json prunes heads of {name!r}, which is not an attention "
                                    "module with prune_heads, or lists no head indices")
            attention.prune_heads(set(removed))
    named = dict(module.named_modules())  # prune_heads replaced the projections
    for name, sizes in resized.items():
        layer = named.get(name)
        if layer is None or not isinstance(sizes, dict) or not all(
                isinstance(getattr(layer, a, None), int) and isinstance(v, int) for a, v in sizes.items()):
            raise ArtifactError(f"{root}: manifest.json resizes {name!r} with {sizes!r}, which does not fit that "
                                "module of this model")
        for attr, value in sizes.items():
            setattr(layer, attr, value)
        for slot in (layer._parameters, layer._buffers):
            for key, tensor in list(slot.items()):
                target = state.get(f"{name}.{key}")
                if tensor is None or target is None or tensor.shape == target.shape:
                    continue
                empty = torch.empty(target.shape, dtype=tensor.dtype, device="meta")
                slot[key] = nn.Parameter(empty, requires_grad=tensor.requires_grad) if slot is layer._parameters \
                    else empty


def _retie(module: nn.Module, aliases: dict[str, str]) -> None:
    """Make tied tensors the same Parameter object again, as they were before export."""
    for alias, target in aliases.items():
        *path, leaf = alias.split(".")
        owner = module.get_submodule(".".join(path))
        *tpath, tleaf = target.split(".")
        value = getattr(module.get_submodule(".".join(tpath)), tleaf)
        if leaf in owner._parameters:
            owner._parameters[leaf] = value
        elif leaf in owner._buffers:
            owner._buffers[leaf] = value
