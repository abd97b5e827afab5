"""Importing the user's own code named in a recipe (`module:function`): a model factory, an evaluation data
function. Failures name the recipe key; the user's module failing (sys.exit() in it included) is the user's
failure, said in one paragraph, never mistaken for ours."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CompressorError, Problem, RecipeError

__all__ = ["import_factory"]


def import_factory(spec: str, search: Path | None = None, key: str = "model.factory") -> Callable[..., Any]:
    """Import ``package.module:function``; ``search`` is put first on sys.path while importing. ``key`` is the
    recipe key named in errors."""
    module_name, _, func_name = spec.partition(":")
    added = search is not None and str(search) not in sys.path
    if added:
        sys.path.insert(0, str(search))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        where = f"{search} and " if search else ""
        raise RecipeError(
            Problem(f"cannot import {module_name!r}: {exc}", path=key,
                    hint=f"the module is looked up in {where}sys.path (for `compress run`, the recipe's "
                         "directory; for `compress eval`, the working directory); install it or set PYTHONPATH")
        ) from exc
    except (Exception, SystemExit) as exc:  # the user's module itself is broken (or exits): say so, with its message
        raise CompressorError(f"importing {module_name!r} for {key} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if added:
            sys.path.remove(str(search))
    func = getattr(module, func_name, None)
    if not callable(func):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise RecipeError(
            Problem(f"{module_name!r} has no function {func_name!r}", path=key,
                    hint=f"callables in that module: {', '.join(public[:20]) or 'none'}")
        )
    return func
