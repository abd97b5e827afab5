"""The evaluation settings an artifact records: its recipe's `evaluate` and `gates` sections, read back from the
manifest for `compress eval` (and any Python caller evaluating an artifact again)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..manifest import Manifest
from ..recipe import EvaluateSpec, GatesSpec

__all__ = ["recorded_settings"]


def recorded_settings(artifact: Path, manifest: Manifest, *, gates: bool = True, limit: int | None = None
                      ) -> tuple[EvaluateSpec, GatesSpec | None]:
    """The recipe's evaluation settings and gates (None when ``gates`` is False or the recipe has none);
    ``limit`` keeps only the first N examples of the data. UsageError when this version cannot read them."""
    recipe = manifest.recipe
    try:
        spec = EvaluateSpec.model_validate(recipe.get("evaluate") or {})
        thresholds = GatesSpec.model_validate(recipe["gates"]) if gates and recipe.get("gates") else None
    except ValueError as exc:
        raise UsageError(f"{artifact}/manifest.json: its recipe's evaluate/gates sections are not valid for this "
                         f"compressor version: {exc}") from None
    if limit is not None:
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"limit": limit})})
    return spec, thresholds
