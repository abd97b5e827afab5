"""Which tensors a pass works on: modules chosen by class name or name pattern, minus exclusions, each pattern
required to match something (a typo must not silently compress nothing)."""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

from ..errors import Problem, RecipeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..model import Model

__all__ = ["select_tensors", "matches", "per_module"]


def matches(pattern: str, name: str, kind: str) -> bool:
    """A pattern matches a module by its dotted name or its class name (globs allowed)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(kind, pattern)


def select_tensors(model: Model, modules: list[str], exclude: list[str], where: str,
                   attrs: tuple[str, ...] = ("weight",), defaults: bool = False) -> dict[str, torch.Tensor]:
    """Float tensors ``attrs`` of the modules matching ``modules`` and no ``exclude`` pattern, by state-dict name
    (tied duplicates once, under their stored name). RecipeError (at ``where``) for a pattern that matches no
    module, or for a selection that is empty. ``defaults``: ``modules`` is the pass's default list (Linear, Conv1d,
    ...), of which a model need not have every kind."""
    named = list(model.module.named_modules())
    stored = set(model.tensors())
    hit = {p: False for p in modules}
    hit_exclude = {p: False for p in exclude}
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, module in named:
        kind = type(module).__name__
        chosen = False
        for pattern in modules:
            if matches(pattern, name, kind):
                hit[pattern] = chosen = True
        if not chosen:
            continue
        excluded = False
        for pattern in exclude:
            if matches(pattern, name, kind):
                hit_exclude[pattern] = excluded = True
        if excluded:
            continue
        for attr in attrs:
            tensor = module._parameters.get(attr)
            full = f"{name}.{attr}" if name else attr
            if tensor is None or not tensor.is_floating_point() or id(tensor) in seen or full not in stored:
                continue
            seen.add(id(tensor))
            out[full] = tensor
    missing = [p for p, h in hit.items() if not h and not defaults]
    field = "modules"
    if not missing:
        missing, field = [p for p, h in hit_exclude.items() if not h], "exclude"
    if missing:
        sample = ", ".join(n for n, _ in named[1:7])
        kinds = ", ".join(sorted({type(m).__name__ for _, m in named[1:]})[:6])
        raise RecipeError(Problem(
            f"pattern(s) {', '.join(repr(p) for p in missing)} match no module of this model",
            path=f"{where}.{field}",
            hint=f"patterns match module names (like {sample}) or class names (like {kinds}); globs allowed"))
    if not out:
        raise RecipeError(Problem(
            "the selection holds no tensor to work on (every matching module is excluded or has no float weight)",
            path=f"{where}.modules", hint="widen `modules` or narrow `exclude`"))
    return out


def per_module(model: Model, selected: dict[str, torch.Tensor], mapping: dict[str, Any], where: str,
               field: str) -> dict[str, tuple[torch.Tensor, Any]]:
    """Each selected tensor with the value of the first ``mapping`` key that matches its module (by name or class
    name); tensors matching no key are left out. RecipeError (at ``where``.``field``) for a key that matches
    none."""
    kinds = {n: type(m).__name__ for n, m in model.module.named_modules()}
    used = {key: False for key in mapping}
    out: dict[str, tuple[torch.Tensor, Any]] = {}
    for name, tensor in selected.items():
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        for key, value in mapping.items():
            if matches(key, module_name, kinds.get(module_name, "")):
                used[key] = True
                out[name] = (tensor, value)
                break
    unused = [k for k, u in used.items() if not u]
    if unused:
        example = next(iter(selected)).rsplit(".", 1)[0]
        raise RecipeError(Problem(f"{field} key(s) {', '.join(repr(k) for k in unused)} match no selected module",
                                  path=f"{where}.{field}", hint=f"keys match module names or class names, e.g. {example}"))
    return out
