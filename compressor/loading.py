"""Load an artifact directory back into an nn.Module: memory-mapped, zero-copy, never unpickling.

The architecture is rebuilt from the manifest (transformers config, zoo name or python factory) with parameters
on the meta device, so nothing is allocated twice; then every parameter is *assigned* a view on the memory-mapped
safetensors file. Files are checked against the manifest sizes and their headers parsed strictly first, so a
truncated or corrupt artifact is refused with a clear error instead of crashing later.
"""

from __future__ import annotations

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

__all__ = ["load", "load_tensors", "load_example_inputs", "build_architecture"]


def load(artifact_dir: str | Path, *, verify_hashes: bool = False) -> nn.Module:
    """Return the artifact's model in eval mode, its tensors views on the memory-mapped files.

    ``verify_hashes`` also recomputes every file's sha256 (reads everything; off by default so that loading
    stays lazy). Raises ArtifactError for missing, truncated, corrupt or foreign files.
    """
    root = Path(artifact_dir)
    manifest = read_manifest(root)
    check_files(root, manifest, hashes=verify_hashes)
    info = manifest.get("model", {})
    if not isinstance(info.get("weights"), list) or not all(isinstance(w, str) for w in info["weights"]):
        raise ArtifactError(f"{root}: manifest.json has no list of weight files (model.weights)")
    stored = load_tensors(root, info["weights"])
    state = _decode(stored, info.get("encodings", {}))
    for alias, target in info.get("aliases", {}).items():
        state[alias] = state[target]
    module = build_architecture(root, manifest)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{root}: the stored tensors do not fit the model's architecture: {exc}") from None
    _retie(module, info.get("aliases", {}))
    leftover = [n for n, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise ArtifactError(f"{root}: no stored values for {', '.join(leftover[:5])}")
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
        state[name] = enc.decode(parts)
        claimed.update(name + suffix for suffix in parts)
    for name, tensor in stored.items():
        if name not in claimed:
            state[name] = tensor  # dense: stored as is
    return state


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
