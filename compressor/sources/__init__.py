"""Model sources: how a recipe's ``model:`` section becomes a ``Model`` (module + example inputs + metadata)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..model import Model
    from ..recipe import Recipe

__all__ = ["load_source"]


def load_source(recipe: Recipe) -> Model:
    """Load the model a recipe names. Heavy imports happen here, not at module import."""
    from ..recipe import HFModel, PythonModel, ZooModel

    spec = recipe.model
    if isinstance(spec, HFModel):
        from .hf import load_hf

        return load_hf(recipe.resolve(spec.path), spec.auto_class, spec.max_length, source={"kind": "hf", "path": spec.path})
    if isinstance(spec, PythonModel):
        from .python import load_python

        return load_python(spec, recipe)
    if isinstance(spec, ZooModel):
        from .zoo import load_zoo

        return load_zoo(spec.name)
    raise TypeError(f"unhandled model source {type(spec).__name__}")  # pragma: no cover - schema forbids it
