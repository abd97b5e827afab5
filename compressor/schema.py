"""The base of every recipe section, and the one rule for paths a recipe names. Torch-free: recipes are validated
without loading any model."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationInfo

__all__ = ["Strict", "resolve_path", "context_path"]


class Strict(BaseModel):
    """Base for recipe sections: unknown keys are errors, values are immutable after parsing."""

    # allow_inf_nan=False: `.nan` and `.inf` are YAML floats, and a NaN threshold compares false with everything.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def resolve_path(path: str, base: Path | str | None) -> Path:
    """A path as a recipe gives it: ``~`` expanded, and a relative path taken from ``base`` (the recipe file's
    directory) when one is known."""
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() or base is None else Path(base) / p


def context_path(path: str, info: ValidationInfo) -> Path:
    """:func:`resolve_path` against the ``base_dir`` a recipe is validated with (pydantic's validation context)."""
    return resolve_path(path, (info.context or {}).get("base_dir"))
