"""Model sources: where a recipe's model comes from, one module per kind (the recipe's ``model: {source: ...}``).

Each kind module (``sources/<kind>.py``) owns its kind end to end and provides:

- ``SPEC``: its recipe schema, a pydantic model whose ``source`` field is ``Literal["<kind>"]``;
- ``load(spec, base_dir, seed) -> Model``: the model for `compress run`;
- optionally ``lazy(spec, base_dir, seed) -> (Model on the meta device, {name: (file, header entry, data start)})``:
  the model without its values and where they are, for streaming a model larger than memory (ValueError: why not);
- ``architecture(root, source) -> nn.Module``: an artifact's empty module, from its manifest's ``source`` entry
  (called with parameters on the meta device);
- ``baseline(model, base_dir) -> (label, files, weight files)`` and ``baseline_module(model, base_dir)``: the
  uncompressed model for evaluation, from the recipe's ``model`` section as a dict;
- ``preimport_source(model, base_dir)`` and ``preimport_artifact(root, source)``: imports done before load
  timing starts.

Adding a kind is that module plus its line in ``KINDS``. Kind modules import torch only when used: the recipe
schema is built from their ``SPEC`` classes without loading any model.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import ArtifactError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..model import Model

__all__ = ["KINDS", "kind", "model_specs", "load_source", "lazy_source", "architecture", "baseline", "baseline_module",
           "preimport"]

# The registration: recipe tag (and manifest `source.kind`) -> the module that owns the kind.
KINDS = {
    "hf": "compressor.sources.hf",
    "python": "compressor.sources.python",
    "zoo": "compressor.sources.zoo",
}


def kind(tag: Any) -> ModuleType:
    """The module that owns the source kind ``tag``."""
    if tag not in KINDS:
        raise ArtifactError(f"unknown model source {tag!r}; expected {', '.join(KINDS)}")
    return importlib.import_module(KINDS[tag])


def model_specs() -> tuple[type, ...]:
    """The recipe schema of every kind, in registration order."""
    return tuple(kind(tag).SPEC for tag in KINDS)


def load_source(spec: Any, base_dir: Path, seed: int) -> Model:
    """Load the model a recipe's validated ``model`` section names. Heavy imports happen here."""
    return kind(spec.source).load(spec, base_dir, seed)


def lazy_source(spec: Any, base_dir: Path, seed: int, buffers: bool = False
                ) -> tuple[Model, dict[str, tuple[Path, dict[str, Any], int]]]:
    """The model a recipe's ``model`` section names on the meta device, and where each stored tensor's values are
    in its safetensors files; ValueError saying why when this source cannot be streamed. ``buffers``: the buffers
    its constructor computes (in no file) are built for real, for passes that run its layers."""
    owner = kind(spec.source)
    if not hasattr(owner, "lazy"):
        raise ValueError(f"a {spec.source} source builds its model in memory; streaming reads a Hugging Face "
                         "directory's safetensors files (source: hf)")
    return owner.lazy(spec, base_dir, seed, buffers)


def architecture(root: Path, source: dict[str, Any]) -> nn.Module:
    """The empty module of an artifact whose manifest records ``source`` (``{"kind": ..., ...}``)."""
    try:
        owner = kind(source.get("kind"))
    except ArtifactError as exc:
        raise ArtifactError(f"{root}: {exc} in the manifest") from None
    return owner.architecture(root, source)


def baseline(model: dict[str, Any], base_dir: Path) -> tuple[str, list[Path], list[Path]]:
    """(label, files, weight files) of the uncompressed model a recipe's ``model`` section names."""
    return kind(model.get("source")).baseline(model, base_dir)


def baseline_module(model: dict[str, Any], base_dir: Path) -> nn.Module:
    """The uncompressed model a recipe's ``model`` section names, loaded for evaluation."""
    return kind(model.get("source")).baseline_module(model, base_dir)


def preimport(model: dict[str, Any] | None = None, base_dir: Path | None = None, *, root: Path | None = None,
              source: dict[str, Any] | None = None) -> None:
    """Import what loading a baseline (``model``, ``base_dir``) or rebuilding an artifact (``root``, its
    manifest's ``source``) will import, so that load timing measures the model, not imports."""
    if model is not None:
        owner = kind(model.get("source"))
        owner.preimport_source(model, base_dir or Path.cwd())
    elif source is not None and source.get("kind") in KINDS:
        kind(source["kind"]).preimport_artifact(root, source)
