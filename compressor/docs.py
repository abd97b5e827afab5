"""Reference text generated from the schema itself, so the docs and `compress passes` never drift from the code."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

__all__ = ["type_name", "fields", "pass_table", "recipe_reference"]


def type_name(annotation: Any) -> str:
    """A short readable name for a field's type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" (optional)" if type(None) in args else "")
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "mapping"
        return {"ByteSize": "bytes"}.get(annotation.__name__, annotation.__name__)
    return str(annotation)


def fields(model: type[BaseModel]) -> list[dict[str, str]]:
    """One row per field: name, type, default ('required' if none) and description."""
    rows = []
    for name, info in model.model_fields.items():
        if info.default is PydanticUndefined and info.default_factory is None:
            default = "required"
        elif info.default_factory is not None:
            value = info.default_factory()
            default = json.dumps(value.model_dump(mode="json") if isinstance(value, BaseModel) else value)
        else:
            default = json.dumps(info.default, default=str)
        rows.append({"name": name, "type": type_name(info.annotation), "default": default,
                     "description": info.description or ""})
    return rows


def pass_table(as_json: bool = False) -> str:
    """Text (or JSON) listing every registered pass and its parameters."""
    from .passes import available_passes

    data = {name: {"summary": cls.summary, "parameters": fields(cls.Config)} for name, cls in available_passes().items()}
    if as_json:
        return json.dumps(data, indent=2)
    lines = []
    for name, info in data.items():
        lines.append(f"{name}: {info['summary']}")
        for row in info["parameters"]:
            lines.append(f"  {row['name']} ({row['type']}, default {row['default']})")
            lines.append(f"      {row['description']}")
        lines.append("")
    return "\n".join(lines).rstrip()


def _table(model: type[BaseModel]) -> list[str]:
    out = ["| key | type | default | description |", "|---|---|---|---|"]
    for row in fields(model):
        desc, kind = (row[k].replace("|", "\\|") for k in ("description", "type"))
        out.append(f"| `{row['name']}` | {kind} | `{row['default']}` | {desc} |")
    return out


def recipe_reference() -> str:
    """Markdown reference of every recipe key, generated from the pydantic schema."""
    from . import recipe as r
    from .passes import available_passes

    sections: list[tuple[str, type[BaseModel]]] = [
        ("Top level", r.Recipe),
        ("`model` with `source: hf`", r.HFModel),
        ("`model` with `source: python`", r.PythonModel),
        ("`model.inputs.<name>` (python source)", r.InputSpec),
        ("`model` with `source: zoo`", r.ZooModel),
        ("`export`", r.ExportSpec),
        ("`export.safetensors`", r.SafetensorsExport),
        ("`evaluate`", r.EvaluateSpec),
        ("`gates`", r.GatesSpec),
        ("a gate threshold (a number, or this mapping)", r.Threshold),
    ]
    sections += [(f"pass `{name}`", cls.Config) for name, cls in available_passes().items()]
    out: list[str] = []
    for title, model in sections:
        out += [f"#### {title}", "", (model.__doc__ or "").strip().splitlines()[0], ""] + _table(model) + [""]
    return "\n".join(out).rstrip() + "\n"
