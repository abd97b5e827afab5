"""Pydantic validation errors turned into recipe problems: the YAML line:col of each, the key path, what was
wrong in words and what would work (close key names, valid values)."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ValidationError

from ..errors import Problem
from ..yamlpos import Located

__all__ = ["validation_problems", "kind_of"]


def validation_problems(exc: ValidationError, located: Located, root: type[BaseModel],
                        prefix: tuple[Any, ...]) -> list[Problem]:
    """One Problem per pydantic error of validating the YAML at ``prefix`` against ``root``: line:col, key path,
    message and hint; one per key path."""
    base_data = _get(located.data, prefix)
    out: list[Problem] = []
    seen: set[tuple[Any, ...]] = set()
    for err in exc.errors(include_url=False):
        data_path, model_cls = _walk(base_data, root, tuple(err["loc"]))
        full = prefix + data_path
        kind = err["type"]
        if (full, kind) in seen:
            continue
        seen.add((full, kind))
        message, hint = _describe(err, data_path, model_cls, base_data)
        if kind == "extra_forbidden":
            line, col = located.where(full, key=True)
        elif kind == "missing":
            line, col = located.where(full[:-1])
        else:
            line, col = located.where(full)
        out.append(Problem(message, file=located.file, line=line, col=col, path=_dotted(full), hint=hint))
    return out


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


def _dotted(path: tuple[Any, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional/Union/Annotated."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [t for a in typing.get_args(annotation) for t in _unwrap(a)]
    return [annotation]


def _walk(data: Any, root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
    """Map a pydantic error location onto the data's key path, and find the model class at the end.

    pydantic puts discriminator tags (e.g. 'hf') and union member names into ``loc``; the data has no such
    keys, so they are skipped.
    """
    path: list[Any] = []
    current_type: Any = root
    cur = data
    parent_model: Any = root
    for elem in loc:
        candidates = _unwrap(current_type)
        models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if isinstance(cur, dict) and elem not in cur and models:
            tagged = [m for m in models if getattr(m, "__name__", None) == elem or
                      ("source" in m.model_fields and _literal_values(m.model_fields["source"].annotation) == (elem,))]
            if tagged:
                current_type = tagged[0]
                continue
        path.append(elem)
        if models and isinstance(elem, str):
            model = models[0]
            if len(models) > 1 and isinstance(cur, dict):
                model = next((m for m in models if "source" in m.model_fields and
                              cur.get("source") in _literal_values(m.model_fields["source"].annotation)), models[0])
            parent_model = model
            field = model.model_fields.get(elem)
            current_type = field.annotation if field is not None else None
        else:
            args = [a for c in candidates for a in typing.get_args(c)]
            current_type = args[-1] if args else None
        cur = cur.get(elem) if isinstance(cur, dict) else (cur[elem] if isinstance(cur, list) and isinstance(elem, int) and elem < len(cur) else None)
    return tuple(path), parent_model


def _literal_values(annotation: Any) -> tuple[Any, ...]:
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()


def _describe(err: dict[str, Any], path: tuple[Any, ...], model: Any, data: Any) -> tuple[str, str]:
    kind, value = err["type"], err.get("input")
    key = path[-1] if path else ""
    fields = getattr(model, "model_fields", {})
    field = fields.get(key) if isinstance(key, str) else None
    described = f"{key}: {field.description}" if field is not None and field.description else ""
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(key), list(fields), n=3)
        hint = (f"did you mean {' or '.join(repr(c) for c in close)}? " if close else "") + f"valid keys: {', '.join(fields)}"
        return f"unknown key {key!r}", hint
    if kind == "missing":
        return f"missing required key {key!r}", described
    if kind == "literal_error":
        allowed = [str(v) for v in _literal_values(field.annotation if field else None)] or []
        allowed = allowed or [a.strip(" '") for a in err["msg"].removeprefix("Input should be ").replace(" or ", ",").split(",")]
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = (f"did you mean {close[0]!r}? " if close else "") + f"valid values: {', '.join(allowed)}"
        return f"{_show(value)} is not a valid value", hint
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = ", ".join(("hf", "python", "zoo"))
        if kind == "union_tag_not_found":
            return "missing required key 'source'", f"valid sources: {tags}"
        tag = err.get("ctx", {}).get("tag", value)
        close = difflib.get_close_matches(str(tag), ["hf", "python", "zoo"], n=1)
        return f"unknown source {tag!r}", (f"did you mean {close[0]!r}? " if close else "") + f"valid sources: {tags}"
    if kind == "model_type" or kind == "dict_type":
        return f"expected a mapping of keys, got {kind_of(value)} {_show(value)}", described
    msg = err["msg"].removeprefix("Value error, ")
    if not kind.startswith("value_error"):
        msg = f"{msg[0].lower()}{msg[1:]}, got {_show(value)}"
    return msg, described


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def kind_of(value: Any) -> str:
    """A YAML value's kind in words (list, string, number, boolean, mapping)."""
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), type(value).__name__)
