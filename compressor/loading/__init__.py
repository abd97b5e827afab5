"""Load an artifact directory back into an nn.Module: memory-mapped, zero-copy, never unpickling.

The architecture is rebuilt from the manifest (transformers config, zoo name or python factory) with parameters
on the meta device, so nothing is allocated twice; then every parameter is *assigned* a view on the memory-mapped
safetensors file. Files are checked against the manifest sizes and their headers parsed strictly first, so a
truncated or corrupt artifact is refused with a clear error instead of crashing later.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError
from ..manifest import Manifest, ModelEntry, check_files, read_manifest
from .rebuild import build_architecture, decode, dequantize_on_the_fly, keep_packed, restructure, retie
from .readahead import read_module_ahead
from .tensors import Maps, load_example_inputs, load_tensors, load_tensors_cuda

__all__ = ["load", "load_tensors", "load_tensors_cuda", "load_example_inputs", "build_architecture"]


def load(artifact_dir: str | Path, *, device: str | torch.device = "cpu", verify_hashes: bool = False,
         int8: str = "dequantize", int4: str = "dequantize", tp_rank: int | None = None,
         tp_world: int | None = None, read_ahead: bool = True) -> nn.Module:
    """Return the artifact's model in eval mode.

    On CPU its tensors are views on the memory-mapped files (nothing is read until used). On CUDA the shards are
    read by parallel threads, each staging tensors through pinned memory and copying them to the GPU without
    blocking, so disk reads overlap with host-to-device transfers. ``verify_hashes`` also recomputes every file's
    sha256 and checks the structure of an ONNX model beside the weights (reads everything; off by default so that
    loading stays lazy: sizes, safetensors headers and the confinement rule are always checked). ``read_ahead``
    (CPU): a background thread reads the weights from disk in the order the model uses them, so a first forward
    pass computes while later layers are still being read instead of waiting on each page fault
    (``loading.readahead``); turn it off when only part of the model will be used.
    ``int8`` says what happens to weights stored as int8 (the `quantize` pass): ``"dequantize"`` turns them into float32 on load; ``"keep"`` keeps the
    int8 tensor as the parameter and dequantizes it on the fly at every use (a parametrization), so the model
    holds a quarter of the memory. ``int4`` does the same for weights `quantize` stored with ``bits: 4`` (the
    compressed-tensors ``pack-quantized`` layout: 4-bit groups, and the int8 rows beside them): ``"keep"`` makes the
    packed int32 words the parameter, an eighth of float32 at 4 bits, unpacked and scaled at every use. Tied tensors
    (an embedding shared with the LM head) are dequantized either way.

    A tensor-parallel artifact (the `shard` pass) loads whole by default, its rank files joined again. With
    ``tp_rank`` and ``tp_world``, inside an initialised torch.distributed process group of that size (gloo on CPU,
    nccl on CUDA, ``device`` this rank's device), only that rank's file and the replicated tensors are mapped and the
    module runs tensor-parallel (torch.distributed.tensor.parallel). Raises ArtifactError for missing, truncated,
    corrupt or foreign files.
    """
    if int8 not in ("dequantize", "keep"):
        raise ValueError(f"int8={int8!r}: use 'dequantize' or 'keep'")
    if int4 not in ("dequantize", "keep"):
        raise ValueError(f"int4={int4!r}: use 'dequantize' or 'keep'")
    if (tp_rank is None) != (tp_world is None):
        raise ValueError("give both tp_rank and tp_world, or neither")
    root = Path(artifact_dir)
    dev = _device(device)
    manifest = read_manifest(root)
    check_files(root, manifest, hashes=verify_hashes)
    info = _model_entry(root, manifest)
    if tp_rank is not None:
        if manifest.tensor_parallel is None:
            raise ArtifactError(f"{root} is not a tensor-parallel artifact (its recipe has no `shard` pass)")
        if int8 != "dequantize" or int4 != "dequantize":
            raise ValueError("int8='keep' and int4='keep' are not supported with tensor parallelism")
        from .tp import load_rank

        return load_rank(root, manifest, int(tp_rank), int(tp_world), dev,  # type: ignore[arg-type]
                         read_ahead=read_ahead)
    maps: Maps = {}
    module, stored = _architecture_and_tensors(root, manifest, info, dev, maps)
    encodings = dict(info.encodings)
    kept = _keep_int8(stored, encodings, info) if int8 == "keep" else {}
    packed = _keep_intgroup(stored, encodings, info) if int4 == "keep" else {}
    state = decode(stored, encodings)
    restructure(module, info, state, root)
    if packed:
        keep_packed(module, packed, dev)
    _assign(module, state, info, kept, root, dev, packed=set(packed))
    if kept:
        dequantize_on_the_fly(module, kept)
    from ..model import install_bridges

    try:
        install_bridges(module, info.dtype_bridges)
    except (KeyError, AttributeError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{root}: manifest.json has a malformed model.dtype_bridges entry ({exc!r})") from None
    if read_ahead and dev.type == "cpu":
        read_module_ahead(module, maps)
    return module.eval()


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ArtifactError(f"cannot load onto {dev}: compressor.load supports cpu and cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"cannot load onto {dev}: CUDA is not available on this machine")
    return dev


def _model_entry(root: Path, manifest: Manifest) -> ModelEntry:
    """The manifest's `model` entry, its weight files checked to be files the manifest lists (and so checked)."""
    info = manifest.model
    strangers = [w for w in info.weights if w not in manifest.files]
    if strangers:
        raise ArtifactError(f"{root}: manifest.json names weight files it does not list (and so never checked): "
                            f"{', '.join(map(repr, strangers[:3]))}")
    return info


def _architecture_and_tensors(root: Path, manifest: Manifest, info: ModelEntry, dev: torch.device,
                              maps: Maps) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The empty architecture and the stored tensors on ``dev`` (``maps``: the memory maps, for read_ahead)."""
    if manifest.tensor_parallel is not None:
        from .tp import assemble

        stored = assemble(root, manifest)
        if dev.type != "cpu":
            stored = {k: v.to(dev) for k, v in stored.items()}
        return build_architecture(root, manifest), stored
    if dev.type == "cpu":
        return build_architecture(root, manifest), load_tensors(root, info.weights, maps)
    # The shards stream to the GPU while this thread builds the (empty) architecture.
    from concurrent.futures import ThreadPoolExecutor

    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        # The stream is per thread: capture the caller's here, not in the pool thread.
        pending = pool.submit(load_tensors_cuda, root, info.weights, dev, stop, torch.cuda.current_stream(dev))
        try:
            module = build_architecture(root, manifest)
        except BaseException:
            stop.set()  # do not finish reading a model that cannot be built
            raise
        return module, pending.result()


def _keep_int8(stored: dict[str, torch.Tensor], encodings: dict[str, Any], info: ModelEntry
               ) -> dict[str, tuple[torch.Tensor, bool]]:
    """int8="keep": each int8 tensor (not tied) becomes the parameter itself; returns {name: (scale, per_channel)}
    and takes those tensors out of ``encodings``."""
    kept: dict[str, tuple[torch.Tensor, bool]] = {}
    tied = set(info.aliases) | set(info.aliases.values())
    for name, spec in list(encodings.items()):
        if isinstance(spec, dict) and spec.get("kind") == "int8" and name not in tied \
                and f"{name}.__q" in stored and f"{name}.__scale" in stored:
            kept[name] = (stored.pop(f"{name}.__scale"), bool(spec.get("per_channel", True)))
            stored[name] = stored.pop(f"{name}.__q")  # the int8 tensor becomes the parameter itself
            del encodings[name]
    return kept


def _keep_intgroup(stored: dict[str, torch.Tensor], encodings: dict[str, Any], info: ModelEntry
                   ) -> dict[str, tuple[Any, dict[str, torch.Tensor]]]:
    """int4="keep": each low-bit group tensor (not tied) is taken out of ``stored`` and ``encodings``; returns
    {name: (its encoding, its stored parts by suffix)}."""
    from ..encodings import IntGroup, encoding_from_json

    kept: dict[str, tuple[Any, dict[str, torch.Tensor]]] = {}
    tied = set(info.aliases) | set(info.aliases.values())
    for name, spec in list(encodings.items()):
        if not isinstance(spec, dict) or spec.get("kind") != IntGroup.kind or name in tied:
            continue
        try:
            encoding = encoding_from_json(spec)
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"tensor {name}: {exc}") from None
        parts = {s: stored[name + s] for s in IntGroup.plain_suffixes if name + s in stored}
        try:
            encoding.integers(parts)  # every part present and of its shape, before anything is assigned
        except (ValueError, KeyError) as exc:
            raise ArtifactError(f"tensor {name} ({IntGroup.kind}) cannot be decoded: {exc}") from None
        for suffix in parts:
            del stored[name + suffix]
        del encodings[name]
        kept[name] = (encoding, parts)
    return kept


def _assign(module: nn.Module, state: dict[str, torch.Tensor], info: ModelEntry,
            kept: dict[str, tuple[torch.Tensor, bool]], root: Path, dev: torch.device,
            packed: frozenset[str] | set[str] = frozenset()) -> None:
    """Assign every parameter its stored tensor (no copy), then tie what was tied. The ``packed`` tensors already
    hold their parameters (``keep_packed``), so they are not in ``state``."""
    for alias, target in info.aliases.items():
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
        missing, unexpected = _put(module, state)
    except RuntimeError as exc:
        raise ArtifactError(f"{root}: the stored tensors do not fit the model's architecture: {exc}") from None
    if packed:  # strict, less the packed parameters and their parametrizations' buffers
        prefixes = tuple(f"{n.rpartition('.')[0]}.parametrizations.{n.rpartition('.')[2]}." for n in packed)
        missing = [k for k in missing if not k.startswith(prefixes)]
    if missing or unexpected:
        raise ArtifactError(f"{root}: the stored tensors do not fit the model's architecture: missing "
                            f"{missing[:5]}, unexpected {unexpected[:5]}")
    retie(module, info.aliases)
    leftover = [n for n, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise ArtifactError(f"{root}: no stored values for {', '.join(leftover[:5])}")


def _put(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Assign each parameter and persistent buffer its tensor in ``state`` (no copy), as
    ``load_state_dict(assign=True)`` does; returns (missing keys, unexpected keys). Modules with their own loading
    logic or hooks get torch's own load_state_dict; the rest, nearly always every module, are assigned directly,
    which takes a fraction of the time. RuntimeError for a tensor of the wrong shape."""
    plain = nn.Module._load_from_state_dict
    custom = [m for m in module.modules() if type(m)._load_from_state_dict is not plain
              or m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks]
    if custom or module._state_dict_pre_hooks:
        result = module.load_state_dict(state, strict=False, assign=True)
        return list(result.missing_keys), list(result.unexpected_keys)
    missing: list[str] = []
    used: set[str] = set()

    def take(key: str, current: torch.Tensor) -> torch.Tensor | None:
        value = state.get(key)
        if value is None:
            missing.append(key)
        elif value.shape != current.shape:
            raise RuntimeError(f"size mismatch for {key}: the file holds {tuple(value.shape)}, the model has "
                               f"{tuple(current.shape)}")
        else:
            used.add(key)
        return value

    def visit(owner: nn.Module, prefix: str) -> None:
        for name, param in owner._parameters.items():
            if param is not None and (value := take(prefix + name, param)) is not None:
                owner._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)
        for name, buf in owner._buffers.items():
            if buf is not None and name not in owner._non_persistent_buffers_set \
                    and (value := take(prefix + name, buf)) is not None:
                owner._buffers[name] = value
        for name, child in owner._modules.items():
            if child is not None:
                visit(child, f"{prefix}{name}.")

    visit(module, "")
    return missing, [k for k in state if k not in used]
