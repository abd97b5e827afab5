"""The recipe: its top level, its loader and the checks of its passes (each pass's config, their order).

Everything a user can get wrong in a recipe is caught here, before any model is loaded, and reported with
file:line:col, the key path, what was wrong and what would work. The sections live beside it (`sections.py`:
export, evaluate, gates; `compressor/sources/<kind>.py`: the model; `compressor/data/spec.py`: data), and
`problems.py` turns pydantic's errors into those reports. The package must stay free of torch:
``compress validate`` runs it alone.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ..data.spec import DataSpec
from ..errors import Problem, RecipeError
from ..schema import Strict, resolve_path
from ..sources import model_specs
from ..sources.hf import HFModel
from ..sources.python import InputSpec, PythonModel
from ..sources.zoo import ZOO_MODELS, ZooModel
from ..yamlpos import Located, load_yaml
from .problems import kind_of, validation_problems
from .sections import (EvaluateSpec, ExportSpec, GatesSpec, GenerationSpec, OnnxExport, SafetensorsExport, SpeedSpec,
                       Threshold)

__all__ = [
    "Recipe",
    "HFModel",
    "PythonModel",
    "ZooModel",
    "InputSpec",
    "ExportSpec",
    "SafetensorsExport",
    "OnnxExport",
    "EvaluateSpec",
    "GenerationSpec",
    "DataSpec",
    "SpeedSpec",
    "GatesSpec",
    "Threshold",
    "PassStep",
    "ZOO_MODELS",
    "Strict",
    "load_recipe",
    "parse_recipe",
]

MAX_RECIPE_BYTES = 1 << 20
# A recipe name becomes a directory name (artifacts/<name>/, a bundle's top folder): portable, never a path.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"


# --------------------------------------------------------------------------------------------- model sources

# Every source kind's schema (compressor/sources/<kind>.py), told apart by `source:`.
ModelSpec = Annotated[Union[model_specs()], Field(discriminator="source")]  # type: ignore[valid-type]

# ---------------------------------------------------------------------------------------------------- recipe


class PassStep(BaseModel):
    """One validated entry of ``passes``: the pass name and its config object."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    index: int
    config: Any  # a PassConfig subclass instance


class Recipe(Strict):
    """A compression recipe: which model, which passes in which order, what to export and check."""

    name: str = Field(
        description="Recipe name; the default output directory is `artifacts/<name>/`. Letters, digits, "
        "'.', '_' and '-'.",
    )
    description: str = Field("", description="Free text, copied into the manifest.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed for every random choice (example inputs, sampling).")
    model: ModelSpec = Field(description="Where the model comes from (`source`: hf, python or zoo).")
    # Items are checked by _validate_passes (registry lookup, per-pass config, order), not by pydantic.
    passes: list[Any] = Field(
        default_factory=list,
        description="Ordered compression passes; each item is `{pass_name: {params}}`. See `compress passes`.",
    )
    export: ExportSpec = Field(default_factory=ExportSpec, description="Artifact formats to write.")
    evaluate: EvaluateSpec | None = Field(None, description="Evaluation against the uncompressed model.")
    gates: GatesSpec | None = Field(None, description="Release gates checked after evaluation.")

    @field_validator("name")
    @classmethod
    def _name_form(cls, value: str) -> str:
        if not re.fullmatch(NAME_PATTERN, value):
            raise ValueError(f"{value!r} cannot name a directory portably; use letters, digits, '.', '_' and '-' "
                             "(first a letter or digit), e.g. 'minilm-fp16'")
        return value

    @model_validator(mode="after")
    def _gates_measurable(self) -> Recipe:
        # A gate that nothing would measure must fail now, not pass silently after minutes of work.
        if self.gates is None:
            return self
        spec = self.evaluate or EvaluateSpec()
        if self.gates.max_load_ms is not None and spec.speed.load_runs == 0:
            raise ValueError("gates.max_load_ms needs load timing, but evaluate.speed.load_runs is 0; set it to 1 "
                             "or more")
        exported = [f for f in type(self.export).model_fields if getattr(self.export, f) is not None]
        for name in GatesSpec.model_fields:
            gate = getattr(self.gates, name)
            if gate is not None and gate.device is not None and gate.device not in spec.devices:
                raise ValueError(f"gates.{name} applies to device {gate.device}, which evaluate.devices "
                                 f"({', '.join(spec.devices)}) does not measure; add it to evaluate.devices")
            if gate is not None and gate.format is not None and gate.format not in exported:
                raise ValueError(f"gates.{name} applies to format {gate.format}, which this recipe does not export "
                                 f"(export: {', '.join(exported)}); drop `format` or export {gate.format}")
        return self

    @property
    def evaluation(self) -> EvaluateSpec | None:
        """The evaluation to run: the `evaluate` section, or its defaults when only `gates` is given."""
        if self.evaluate is None and self.gates is None:
            return None
        return self.evaluate or EvaluateSpec()

    _steps: list[PassStep] = PrivateAttr(default_factory=list)
    _file: str = PrivateAttr("<recipe>")
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _located: Located | None = PrivateAttr(None)

    @property
    def steps(self) -> list[PassStep]:
        """The validated passes, in order."""
        return list(self._steps)

    @property
    def file(self) -> str:
        """The recipe file this was read from."""
        return self._file

    @property
    def base_dir(self) -> Path:
        """Directory that relative paths in the recipe are resolved against."""
        return self._base_dir

    def resolve(self, path: str) -> Path:
        """A recipe path, resolved against the recipe's directory."""
        return resolve_path(path, self._base_dir)

    def locate(self, error: RecipeError) -> RecipeError:
        """``error`` with this recipe's file and the line:col of each problem's key path (``model.factory``,
        ``passes[0].cast.keep``) filled in where a check after validation (a pass's model-dependent check, a
        factory that returns no module) raised it without them; the nearest key given, for keys the recipe left
        to their defaults."""
        for problem in error.problems:
            if problem.file is None:
                problem.file = self._file
            if problem.line is None and self._located is not None and problem.path:
                problem.line, problem.col = self._located.where(self._key_path(problem.path))
        return RecipeError(error.problems)

    def _key_path(self, dotted: str) -> tuple[Any, ...]:
        """``passes[0].shard.plan.transformer.h.*.attn`` as the recipe's keys: indices as ints, and the longest
        run of dotted parts that is one key of the recipe (a module pattern) kept whole."""
        assert self._located is not None
        tokens: list[Any] = [int(t[1:-1]) if t.startswith("[") else t
                             for t in re.findall(r"\[\d+\]|[^.\[\]]+", dotted)]
        keys: tuple[Any, ...] = ()
        i = 0
        while i < len(tokens):
            step = 1
            if isinstance(tokens[i], str):
                for j in range(len(tokens), i + 1, -1):
                    run = tokens[i:j]
                    if all(isinstance(t, str) for t in run) and keys + (".".join(run),) in self._located.values:
                        step = j - i
                        break
            keys += (".".join(tokens[i:i + step]) if step > 1 else tokens[i],)
            i += step
        return keys


# ---------------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a recipe file. Raises RecipeError (exit code 2) listing every problem found."""
    p = Path(path)
    shown = str(path)
    if not p.exists():
        raise RecipeError(Problem(f"no such recipe file: {p}", file=shown, hint="check the path; recipes/ has examples"))
    if p.is_dir():
        raise RecipeError(Problem(f"{p} is a directory; give a recipe .yaml file", file=shown))
    if not stat.S_ISREG(p.stat().st_mode):
        # A device (/dev/zero) never ends and a FIFO blocks until someone writes: neither is opened.
        raise RecipeError(Problem(f"{p} is not a regular file (a device, pipe or socket); give a recipe .yaml file",
                                  file=shown))
    with p.open("rb") as f:
        data = f.read(MAX_RECIPE_BYTES + 1)  # bounded, whatever the file claims its size is
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(Problem(f"more than {MAX_RECIPE_BYTES:,} bytes is too large for a recipe (limit 1 MiB); is "
                                  "this the right file?", file=shown))
    return parse_recipe(data, file=shown, base_dir=p.resolve().parent)


def parse_recipe(data: bytes | str, *, file: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """Validate recipe text. ``base_dir`` anchors relative paths (default: the current directory)."""
    if isinstance(data, bytes):
        if b"\x00" in data:
            raise RecipeError(Problem("this is a binary file, not a YAML recipe", file=file, line=1, hint=_EXAMPLE))
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise RecipeError(
                Problem(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})", file=file, line=line,
                        hint="a recipe is a UTF-8 YAML file")
            ) from None
    else:
        text = data
    located = load_yaml(text, file)
    if located.data is None:
        raise RecipeError(Problem("the recipe is empty", file=file, line=1, hint=_EXAMPLE))
    if not isinstance(located.data, dict):
        raise RecipeError(
            Problem(f"a recipe is a mapping of keys, not a {kind_of(located.data)}", file=file, line=1, col=1, hint=_EXAMPLE)
        )
    base = base_dir if base_dir is not None else Path.cwd()
    problems: list[Problem] = []
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(located.data, context={"base_dir": base})
    except ValidationError as exc:
        problems += validation_problems(exc, located, Recipe, ())
    raw_passes = located.data.get("passes")
    steps = _validate_passes(raw_passes, located, problems) if isinstance(raw_passes, list) else []
    if recipe is not None and not problems:
        _check_with_recipe(steps, recipe, located, problems)
    if problems:
        raise RecipeError(problems)
    assert recipe is not None
    recipe._steps, recipe._file, recipe._base_dir, recipe._located = steps, file, base, located
    return recipe


def _check_with_recipe(steps: list[PassStep], recipe: Recipe, located: Located, problems: list[Problem]) -> None:
    """Ask each pass whether it can work with the rest of the recipe (e.g. an ONNX-only mode without ONNX)."""
    from ..passes.base import get_pass

    for step in steps:
        check = getattr(get_pass(step.name), "recipe_problem", None)
        found = check(step.config, recipe) if check is not None else None
        if found is not None:
            message, key, hint = found
            where = located.where(("passes", step.index, step.name, key))
            problems.append(Problem(message, file=located.file, line=where[0], col=where[1],
                                    path=f"passes[{step.index}].{step.name}.{key}", hint=hint))


_EXAMPLE = (
    "a minimal recipe:\n"
    "  name: minilm-fp16\n"
    "  model: {source: zoo, name: minilm}\n"
    "  passes:\n"
    "    - cast: {dtype: float16}"
)


def _validate_passes(raw: list[Any], located: Located, problems: list[Problem]) -> list[PassStep]:
    from ..passes.base import get_pass

    steps: list[PassStep] = []
    classes: list[Any] = []
    for i, item in enumerate(raw):
        where = located.where(("passes", i))
        if not (isinstance(item, dict) and len(item) == 1):
            got = f"a mapping with {len(item)} keys" if isinstance(item, dict) else f"a {kind_of(item)}"
            problems.append(
                Problem(f"each pass is a mapping with exactly one key, the pass name; got {got}", file=located.file,
                        line=where[0], col=where[1], path=f"passes[{i}]",
                        hint="write it as `- cast: {dtype: float16}`; give each pass its own list item")
            )
            continue
        (name, params), = item.items()
        key_where = located.where(("passes", i, name), key=True)
        try:
            cls = get_pass(str(name))
        except KeyError as exc:
            problems.append(Problem(exc.args[0], file=located.file, line=key_where[0], col=key_where[1], path=f"passes[{i}]"))
            continue
        if params is None:
            params = {}
        if not isinstance(params, dict):
            vw = located.where(("passes", i, name))
            problems.append(
                Problem(f"the parameters of {name!r} must be a mapping, not a {kind_of(params)}", file=located.file,
                        line=vw[0], col=vw[1], path=f"passes[{i}].{name}",
                        hint=f"valid parameters: {', '.join(cls.Config.model_fields)}; see `compress passes`")
            )
            continue
        try:
            config = cls.Config.model_validate(params)
        except ValidationError as exc:
            problems += validation_problems(exc, located, cls.Config, ("passes", i, name))
            continue
        steps.append(PassStep(name=str(name), index=i, config=config))
        classes.append(cls)
    if len(steps) == len(raw):
        _check_order(steps, classes, located, problems)
    return steps


def _working_order(names: list[str], classes: dict[str, Any]) -> list[str] | None:
    """The passes in an order where none comes after one it must not follow, as close to the given order as
    possible (each place is filled by the first pass, in the given order, that may go there); None when there is
    none."""
    left, order = list(names), []
    while left:
        for k, name in enumerate(left):
            # `name` may go next when no pass still to place is one it must not come before.
            if not any(classes[other].must_not_follow.get(name) for other in left if other != name):
                order.append(left.pop(k))
                break
        else:
            return None
    return order


def _check_order(steps: list[PassStep], classes: list[Any], located: Located, problems: list[Problem]) -> None:
    names = [s.name for s in steps]
    for i, cls in enumerate(classes[:-1]):
        if getattr(cls, "must_be_last", None):
            where = located.where(("passes", i, names[i]), key=True)
            problems.append(Problem(f"{names[i]!r} must be the last pass, and {names[-1]!r} follows it: "
                                    f"{cls.must_be_last}", file=located.file, line=where[0], col=where[1],
                                    path=f"passes[{i}]", hint=f"move {names[i]!r} to the end of `passes`"))
            return
    for i, cls in enumerate(classes):
        for j in range(i):
            reason = cls.must_not_follow.get(names[j])
            if reason is None:
                continue
            by_name = dict(zip(names, classes))
            # The offending pass moved before the one it must not follow, and the rest reordered only as needed.
            order = _working_order(names[:j] + [names[i]] + [n for k, n in enumerate(names[j:], j) if k != i],
                                   by_name)
            if names[i] == names[j]:
                fix = f"keep a single {names[i]!r}"
            elif by_name[names[j]].must_not_follow.get(names[i]) is not None:
                # Neither order of the pair works (cast and int8 quantize): never suggest a second error.
                fix = f"{names[j]!r} and {names[i]!r} do not combine in either order: keep one of them"
            elif order is not None:
                fix = f"an order that works: {' -> '.join(order)}"
            else:
                fix = f"put {names[i]!r} before {names[j]!r}"
            where = located.where(("passes", i, names[i]), key=True)
            problems.append(
                Problem(f"{names[i]!r} cannot come after {names[j]!r} (passes[{j}]): {reason}", file=located.file,
                        line=where[0], col=where[1], path=f"passes[{i}]",
                        hint=fix)
            )
            return


