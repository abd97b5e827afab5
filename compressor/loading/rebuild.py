"""Rebuilding the module an artifact describes: the empty architecture (parameters on the meta device, nothing
allocated twice), structured-pruning shapes, decoding of encoded tensors, ties, and int8 kept as int8."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..encodings import encoding_from_json
from ..errors import ArtifactError
from ..manifest import Manifest, ModelEntry
from ..model import build_empty, parameters_on_meta, skip_init_on_meta

DECODE_THREADS = min(4, os.cpu_count() or 1)

__all__ = ["decode", "dequantize_on_the_fly", "keep_packed", "build_architecture", "restructure",
           "retie"]


def decode(stored: dict[str, torch.Tensor], encodings: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's state from the stored tensors: each encoded tensor decoded from its parts, dense ones as is.
    Tensors whose decoding reads positions (sparse ones; numpy, one core a call) decode on ``DECODE_THREADS``
    threads while this one decodes the rest (whose torch kernels use every core already: on threads too they only
    slowed each other, a codebook MiniLM 51-56 -> 63-64 ms). An error is the first tensor's in the manifest's order,
    as decoding one at a time gives."""
    state: dict[str, torch.Tensor] = {}
    claimed: set[str] = set()
    jobs: list[tuple[str, Any, dict[str, torch.Tensor]]] = []
    for name, spec in encodings.items():
        try:
            enc = encoding_from_json(spec)
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"tensor {name}: {exc}") from None
        parts = {k[len(name):]: v for k, v in stored.items()
                 if k == name or k.startswith(name + ".__") or k[len(name):] in enc.plain_suffixes and k.startswith(name)}
        if "" not in parts and not parts:
            raise ArtifactError(f"tensor {name} is listed in the manifest but missing from the weight files")
        jobs.append((name, enc, parts))
        claimed.update(name + suffix for suffix in parts)

    def one(job: tuple[str, Any, dict[str, torch.Tensor]]) -> torch.Tensor | Exception:
        name, enc, parts = job
        try:
            return enc.decode(parts)
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError, OverflowError) as exc:
            # (TypeError: a shape torch cannot even allocate, e.g. [2**32, 2**32], from a hostile manifest)
            return ArtifactError(f"tensor {name} ({enc.kind}) cannot be decoded: {exc}")
        except Exception as exc:  # noqa: BLE001 - raised below, in the manifest's order like the others
            return exc

    spread = [job for job in jobs if job[1].positions]
    threads = min(DECODE_THREADS, len(spread))
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="compressor-decode") as pool:
            pending = {job[0]: pool.submit(one, job) for job in spread}
            here = {job[0]: one(job) for job in jobs if job[0] not in pending}
            values = [pending[name].result() if name in pending else here[name] for name, _, _ in jobs]
    else:
        values = [one(job) for job in jobs]
    for (name, _, _), value in zip(jobs, values):
        if isinstance(value, Exception):
            raise value
        state[name] = value
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


def dequantize_on_the_fly(module: nn.Module, kept: dict[str, tuple[torch.Tensor, bool]]) -> None:
    """Give each kept int8 parameter a parametrization that dequantizes it at every use."""
    from torch.nn.utils import parametrize

    for name, (scale, per_channel) in kept.items():
        *path, leaf = name.split(".")
        owner = module.get_submodule(".".join(path))
        param = owner._parameters[leaf]
        # unsafe: the parametrization changes the dtype (int8 -> float32), which is the point.
        parametrize.register_parametrization(owner, leaf, _Int8Weight(scale.to(param.device), per_channel),
                                             unsafe=True)


class _IntGroupWeight(nn.Module):
    """Parametrization: a packed low-bit tensor (compressed-tensors ``weight_packed``, int32) unpacked and scaled per
    group at every use, by the same decoder that ``int4="dequantize"`` applies once."""

    def __init__(self, encoding: Any, parts: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.encoding = encoding
        self.register_buffer("scale", parts["_scale"])
        self.register_buffer("zero_point", parts.get("_zero_point"))

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        parts = {"_packed": packed, "_scale": self.scale}
        if self.zero_point is not None:
            parts["_zero_point"] = self.zero_point
        return self.encoding.decode(parts)


def keep_packed(module: nn.Module, kept: dict[str, tuple[Any, dict[str, torch.Tensor]]], device: torch.device
                ) -> None:
    """Make each kept low-bit tensor's parameter its packed int32 words (an eighth of float32 at 4 bits), with a
    parametrization that dequantizes at every use. Runs before the state is assigned: the packed parameter has
    another shape than the float one, which load_state_dict would refuse."""
    from torch.nn.utils import parametrize

    for name, (encoding, parts) in kept.items():
        *path, leaf = name.split(".")
        owner = module.get_submodule(".".join(path))
        owner._parameters[leaf] = nn.Parameter(parts["_packed"].to(device), requires_grad=False)
        rest = {k: v.to(device) for k, v in parts.items() if k != "_packed"}
        # unsafe: the parametrization changes shape and dtype (packed int32 -> float32 matrix), which is the point.
        parametrize.register_parametrization(owner, leaf, _IntGroupWeight(encoding, rest), unsafe=True)


def build_architecture(root: Path, manifest: Manifest) -> nn.Module:
    """An empty module of the artifact's architecture (parameters on meta), built by the source kind its manifest
    records (compressor.sources). The `hf` and `zoo` kinds (transformers modules, the digits MLPs) build with no
    torch function mode in the way of the constructors' torch calls (``build_empty``); a user's build function
    (`python`) runs once, with ``parameters_on_meta``, since a retry would repeat whatever it does."""
    from ..sources import architecture

    source = manifest.source
    if not source:
        raise ArtifactError(f"{root}: manifest.json records no model source")
    if source.get("kind") in ("hf", "zoo"):
        return build_empty(lambda: architecture(root, source))
    with parameters_on_meta():
        return architecture(root, source)


def restructure(module: nn.Module, info: ModelEntry, state: dict[str, torch.Tensor], root: Path) -> None:
    """Give the modules structured pruning changed their pruned shapes (parameters on meta, filled by
    load_state_dict like every other): attention heads are removed with the module's own ``prune_heads``; resized
    Linear, Conv and BatchNorm modules get their recorded size attributes and tensors of the stored shapes."""
    heads, resized = info.pruned_heads, info.resized  # their types were checked when the manifest was read
    if not heads and not resized:
        return
    named = dict(module.named_modules())
    with parameters_on_meta():
        for name, removed in heads.items():
            attention = named.get(name)
            if not callable(getattr(attention, "prune_heads", None)):
                raise ArtifactError(f"{root}: manifest.json prunes heads of {name!r}, which is not an attention "
                                    "module with prune_heads, or lists no head indices")
            attention.prune_heads(set(removed))
    named = dict(module.named_modules())  # prune_heads replaced the projections
    for name, sizes in resized.items():
        layer = named.get(name)
        if layer is None or not all(isinstance(getattr(layer, a, None), int) for a in sizes):
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


def retie(module: nn.Module, aliases: dict[str, str]) -> None:
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
