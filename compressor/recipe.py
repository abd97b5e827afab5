"""The recipe schema and its loader.

Everything a user can get wrong in a recipe is caught here, before any model is loaded, and reported with
file:line:col, the key path, what was wrong and what would work. This module must stay free of torch:
``compress validate`` runs it alone.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    TypeAdapter,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .cpu import Target
from .errors import Problem, RecipeError
from .schema import Strict, resolve_path
from .sources import model_specs
from .sources.hf import HFModel
from .sources.python import InputSpec, PythonModel
from .sources.zoo import ZOO_MODELS, ZooModel
from .yamlpos import Located, load_yaml

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
_BYTES: TypeAdapter[ByteSize] = TypeAdapter(ByteSize)


# --------------------------------------------------------------------------------------------- model sources

# Every source kind's schema (compressor/sources/<kind>.py), told apart by `source:`.
ModelSpec = Annotated[Union[model_specs()], Field(discriminator="source")]  # type: ignore[valid-type]

# ------------------------------------------------------------------------------------ export, evaluate, gates


class SafetensorsExport(Strict):
    """safetensors export settings."""

    max_shard_size: ByteSize = Field(
        ByteSize(2_000_000_000),
        ge=4096,
        description="Largest shard file, as bytes or a string such as `500MB` or `2GiB`; larger models are "
        "split into model-0000i-of-0000N.safetensors with model.safetensors.index.json.",
    )


class OnnxExport(Strict):
    """ONNX export settings: Hugging Face models through optimum-onnx, any other module through torch.onnx."""

    opset: int = Field(18, ge=13, le=23, description="ONNX opset version.")
    atol: float = Field(
        1e-4, ge=0, description="Absolute tolerance of the check against torch: after export, ONNX Runtime runs the "
        "example inputs and every output must be within atol + rtol * |torch value| of torch's, or the run fails."
    )
    rtol: float = Field(1e-3, ge=0, description="Relative tolerance of that check.")
    dynamic_axes: bool = Field(
        True, description="Batch (and, for token inputs, sequence) dimensions are dynamic; false fixes the example "
        "inputs' shapes."
    )


class ExportSpec(Strict):
    """Which artifact formats to write."""

    safetensors: SafetensorsExport = Field(
        default_factory=SafetensorsExport, description="safetensors export (always written)."
    )
    onnx: OnnxExport | None = Field(
        None, description="Also write model.onnx with its weights in model.onnx.data, aligned for memory mapping "
        "(`onnx: {}` for the defaults)."
    )


BUILTIN_DATA = ("digits", "digits-train", "text-pairs", "calibration-text")


class DataSpec(Strict):
    """Data for accuracy and fidelity: a built-in set, a JSONL/CSV file or a Python function (at most one)."""

    builtin: Literal["digits", "digits-train", "text-pairs", "calibration-text"] | None = Field(
        None,
        description="A data set shipped with compressor: `digits` (scikit-learn digits, held-out split; digits "
        "models), `digits-train` (its training split), `text-pairs` (240 query/passage pairs; text encoders, "
        "scored by top-1 retrieval) or `calibration-text` (256 unlabeled sentences on other topics). Unset with "
        "no `path`/`function`: chosen from the model, or fidelity on the example inputs if none fits.",
    )
    path: str | None = Field(
        None,
        description="A JSONL or CSV file, relative to the recipe. Rows are `{query, passage}` pairs (text "
        "encoders, retrieval), `{text, label}` (text classifiers), or `{label, <input>: [numbers]}` / CSV columns "
        "`label,f0,f1,...` (tensor models). `compress run` copies it into the artifact (`eval/`), so "
        "`compress eval` needs nothing else.",
    )
    function: str | None = Field(
        None,
        description="`module:function` (module importable from the recipe's directory) returning an iterable "
        "of batches: dicts of input tensors for forward(), plus an optional `labels` tensor of class indices.",
    )
    limit: PositiveInt | None = Field(None, description="Use only the first N examples (quick checks).")
    batch_size: PositiveInt = Field(32, description="Batch size for the accuracy and fidelity passes.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `data: digits`, `data: eval.jsonl` and `data: mymod:batches` are shorthand for the mapping forms.
        if isinstance(data, str):
            if data in BUILTIN_DATA:
                return {"builtin": data}
            if data.lower().endswith((".jsonl", ".csv")):
                return {"path": data}
            if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", data):
                return {"function": data}
            raise ValueError(f"{data!r} is not a built-in data set ({', '.join(BUILTIN_DATA)}), a .jsonl/.csv "
                             "file or a module:function")
        return data

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [k for k in ("builtin", "path", "function") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of builtin, path and function, not {' and '.join(given)}")
        if self.path is not None and not self.path.lower().endswith((".jsonl", ".csv")):
            raise ValueError(f"path {self.path!r}: only .jsonl and .csv files are read")
        if self.function is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.function):
            raise ValueError(f"function {self.function!r}: write it as module:function, e.g. mydata:batches")
        return self


class CalibrationSpec(DataSpec):
    """Calibration data for int8 ONNX quantization (`quantize` with mode dynamic or static): a built-in set, a
    JSONL/CSV file or a Python function, as for `evaluate.data`. Unset: the digits training split for digits
    models, `calibration-text` for text encoders, else the example inputs. Labels, if any, are not used."""

    limit: PositiveInt | None = Field(128, description="Use only the first N examples (calibration needs few).")


class TrainingDataSpec(DataSpec):
    """Training data for the `recover` pass: a built-in set, a JSONL/CSV file or a Python function, as for
    `evaluate.data`. Unset: the digits training split for digits models, `calibration-text` for text encoders, else
    the example inputs. Labels are used when the data has them; the uncompressed model's outputs always are."""

    batch_size: PositiveInt = Field(64, description="Examples per training step.")


class SpeedSpec(Strict):
    """How speed is measured. Baseline and artifact alternate (A B B A ...) so machine noise cancels."""

    batch_sizes: list[PositiveInt] = Field([1, 8], min_length=1, description="Batch sizes for latency runs.")
    sequence_lengths: list[PositiveInt] = Field(
        [128], min_length=1, description="Sequence lengths for text models (inputs padded/truncated to each)."
    )
    warmup: int = Field(3, ge=0, le=1000, description="Untimed calls per model before each configuration.")
    rounds: PositiveInt = Field(
        10, le=10000, description="Alternating rounds per configuration; each model runs `calls` timed calls a round."
    )
    calls: PositiveInt = Field(3, le=10000, description="Timed calls per model per round.")
    load_runs: int = Field(
        3, ge=0, le=100,
        description="Fresh processes per model for load timing, cold (files evicted from the page cache) and "
        "warm each; 0 skips load timing.",
    )
    threads: PositiveInt | None = Field(
        None, description="torch / ONNX Runtime intra-op threads for every timed run (default: torch's default)."
    )


class EvaluateSpec(Strict):
    """Evaluation of the artifact against the uncompressed model, on the same data, device and threads."""

    devices: list[Literal["cpu", "cuda"]] = Field(
        ["cpu"], min_length=1,
        description="Devices to measure on (`all` = cpu and cuda). Without a GPU, cuda is skipped with a notice "
        "(see `require_cuda`).",
    )
    require_cuda: bool = Field(False, description="Fail (exit 1) instead of skipping when CUDA is not available.")
    data: DataSpec = Field(
        default_factory=DataSpec,
        description="Accuracy and fidelity data: the mapping below, or shorthand `digits`, `text-pairs`, "
        "`file.jsonl`, `file.csv` or `module:function`.",
    )
    speed: SpeedSpec = Field(default_factory=SpeedSpec, description="Speed measurement settings (see below).")

    @model_validator(mode="before")
    @classmethod
    def _all_devices(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("devices") == "all":
            return {**data, "devices": ["cpu", "cuda"]}
        return data


class Threshold(Strict):
    """A gate threshold, optionally limited to one device and artifact format."""

    value: float = Field(description="The threshold.")
    device: Literal["cpu", "cuda"] | None = Field(None, description="Device the gate applies to (all if unset).")
    format: Literal["safetensors", "onnx"] | None = Field(None, description="Artifact format (all if unset).")
    target: Target | None = Field(
        None, description="int8 ONNX: the CPU family whose (emulated) arithmetic the gate applies to "
        "(x86-avx2, x86-vnni, arm64). Unset: accuracy, fidelity and size gates apply to every target the artifact "
        "was quantized for, and to the row measured on this machine.")

    @model_validator(mode="after")
    def _target_fits(self) -> Threshold:
        if self.target is not None and (self.device == "cuda" or self.format == "safetensors"):
            raise ValueError(f"target {self.target} names a CPU family of an int8 ONNX artifact; it cannot go with "
                             f"{'device cuda' if self.device == 'cuda' else 'format safetensors'} (drop one of them)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _bare_number(cls, data: Any) -> Any:
        # `min_speedup: 1.5` is shorthand for `min_speedup: {value: 1.5}`.
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return {"value": data}
        if not isinstance(data, dict):
            raise ValueError(f"expected a number, or a mapping such as {{value: 1.5, device: cpu}}; got {data!r}")
        return data


class GatesSpec(Strict):
    """Release gates: a missed gate makes the run exit with code 3 (artifacts are kept)."""

    max_accuracy_drop: Threshold | None = Field(
        None, description="Largest drop of the task metric (baseline minus artifact), in percentage points."
    )
    min_fidelity: Threshold | None = Field(
        None, description="Smallest cosine similarity of artifact to baseline outputs, over every example (the "
        "minimum, not the mean)."
    )
    min_speedup: Threshold | None = Field(
        None, description="Smallest speedup (baseline p50 latency / artifact p50 latency), at the worst of the "
        "measured batch sizes and sequence lengths."
    )
    max_size_bytes: Threshold | None = Field(
        None, description="Largest size of the artifact's model files, in bytes (`50MB`, `1.5GiB` accepted)."
    )
    min_compression: Threshold | None = Field(
        None, description="Smallest ratio of baseline model bytes to artifact model bytes."
    )
    max_load_ms: Threshold | None = Field(
        None, description="Longest cold load (open to ready to run, files evicted from the page cache; median of "
        "`evaluate.speed.load_runs` fresh processes), in ms."
    )

    @model_validator(mode="after")
    def _sensible_values(self) -> GatesSpec:
        for name in ("min_speedup", "max_size_bytes", "min_compression", "max_load_ms"):
            threshold = getattr(self, name)
            if threshold is not None and threshold.value <= 0:
                raise ValueError(f"{name}: {threshold.value:g} can never be measured; use a positive number")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop.value < 0:
            raise ValueError(f"max_accuracy_drop: {self.max_accuracy_drop.value:g} points would demand a better model "
                             "than the baseline; use 0 for no drop at all")
        if self.min_fidelity is not None and not -1 <= self.min_fidelity.value <= 1:
            raise ValueError(f"min_fidelity: {self.min_fidelity.value:g} is not a cosine similarity; use a number "
                             "in [-1, 1], such as 0.995")
        return self

    @model_validator(mode="before")
    @classmethod
    def _sizes(cls, data: Any) -> Any:
        # Sizes read better as `50MB` than 50000000; ByteSize understands both.
        if isinstance(data, dict) and isinstance(data.get("max_size_bytes"), (str, dict)):
            raw = data["max_size_bytes"]
            value = raw.get("value") if isinstance(raw, dict) else raw
            if isinstance(value, str):
                try:
                    size = int(_BYTES.validate_python(value))
                except ValidationError:
                    raise ValueError(f"max_size_bytes: {value!r} is not a size; write e.g. 50000000, 50MB or "
                                     "1.5GiB") from None
                data = {**data, "max_size_bytes": {**raw, "value": size} if isinstance(raw, dict) else size}
        return data


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
                keys = tuple(int(t[1:-1]) if t.startswith("[") else t
                             for t in re.findall(r"\[\d+\]|[^.\[\]]+", problem.path))
                problem.line, problem.col = self._located.where(keys)
        return RecipeError(error.problems)


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
            Problem(f"a recipe is a mapping of keys, not a {_kind(located.data)}", file=file, line=1, col=1, hint=_EXAMPLE)
        )
    base = base_dir if base_dir is not None else Path.cwd()
    problems: list[Problem] = []
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(located.data, context={"base_dir": base})
    except ValidationError as exc:
        problems += _problems(exc, located, Recipe, ())
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
    from .passes.base import get_pass

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


def _kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), type(value).__name__)


def _validate_passes(raw: list[Any], located: Located, problems: list[Problem]) -> list[PassStep]:
    from .passes.base import get_pass

    steps: list[PassStep] = []
    classes: list[Any] = []
    for i, item in enumerate(raw):
        where = located.where(("passes", i))
        if not (isinstance(item, dict) and len(item) == 1):
            got = f"a mapping with {len(item)} keys" if isinstance(item, dict) else f"a {_kind(item)}"
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
                Problem(f"the parameters of {name!r} must be a mapping, not a {_kind(params)}", file=located.file,
                        line=vw[0], col=vw[1], path=f"passes[{i}].{name}",
                        hint=f"valid parameters: {', '.join(cls.Config.model_fields)}; see `compress passes`")
            )
            continue
        try:
            config = cls.Config.model_validate(params)
        except ValidationError as exc:
            problems += _problems(exc, located, cls.Config, ("passes", i, name))
            continue
        steps.append(PassStep(name=str(name), index=i, config=config))
        classes.append(cls)
    if len(steps) == len(raw):
        _check_order(steps, classes, located, problems)
    return steps


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
            order = names[:j] + [names[i]] + [n for k, n in enumerate(names[j:], j) if k != i]
            fix = (f"keep a single {names[i]!r}" if names[i] == names[j]
                   else f"an order that works: {' -> '.join(order)}")
            where = located.where(("passes", i, names[i]), key=True)
            problems.append(
                Problem(f"{names[i]!r} cannot come after {names[j]!r} (passes[{j}]): {reason}", file=located.file,
                        line=where[0], col=where[1], path=f"passes[{i}]",
                        hint=fix)
            )
            return


# ------------------------------------------------------------------------------------ pydantic error mapping


def _problems(exc: ValidationError, located: Located, root: type[BaseModel], prefix: tuple[Any, ...]) -> list[Problem]:
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
        return f"expected a mapping of keys, got {_kind(value)} {_show(value)}", described
    msg = err["msg"].removeprefix("Value error, ")
    if not kind.startswith("value_error"):
        msg = f"{msg[0].lower()}{msg[1:]}, got {_show(value)}"
    return msg, described


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
