"""`python` source: ``package.module:function`` returning an nn.Module, with optional safetensors weights, end to
end: its recipe schema, building it for a run, rebuilding an artifact's module, and the baseline for evaluation.
Torch is imported only when used."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, PositiveInt, ValidationInfo, field_validator, model_validator

from ..errors import CompressorError, Problem, RecipeError, UsageError
from ..schema import Strict, context_path, resolve_path
from ..usercode import import_factory

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..model import Model

__all__ = ["InputSpec", "PythonModel", "load", "architecture", "baseline", "baseline_module", "preimport_source",
           "preimport_artifact", "load_python_module", "make_inputs", "build_python"]


class InputSpec(Strict):
    """One example input of a ``python`` model: random values of this shape and dtype."""

    shape: list[PositiveInt] = Field(min_length=1, description="Tensor shape, batch first, e.g. [2, 64].")
    dtype: Literal["float32", "float16", "bfloat16", "int64", "int32", "bool"] = Field(
        "float32", description="Tensor dtype."
    )
    low: float = Field(0.0, description="Smallest value (integers: inclusive).")
    high: float = Field(1.0, description="Largest value (integers: exclusive).")

    @model_validator(mode="after")
    def _range(self) -> InputSpec:
        if not self.high > self.low:
            raise ValueError(f"high ({self.high}) must be greater than low ({self.low})")
        return self


class PythonModel(Strict):
    """A Python function that returns an ``nn.Module``, optionally with weights from a safetensors file."""

    source: Literal["python"] = Field(description="`python`: a function that builds the model.")
    factory: str = Field(
        description="`package.module:function` returning an nn.Module; the recipe's directory is on the "
        "import path while it is imported.",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the factory.")
    weights: str | None = Field(
        None,
        description="Optional safetensors file loaded into the module (strict: names and shapes must match); "
        "relative to the recipe's directory.",
    )
    inputs: dict[str, InputSpec] = Field(
        min_length=1,
        description="Example inputs by forward() argument name, used for export, calibration and speed runs.",
    )

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", value):
            raise ValueError(f"expected `package.module:function` (e.g. `mymodels.nets:build`), got {value!r}")
        return value

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        p = context_path(value, info)
        if not p.is_file():
            raise ValueError(f"no such file: {p}; give a .safetensors file or leave `weights` out")
        if p.suffix != ".safetensors":
            raise ValueError(f"{p.name} is not a .safetensors file; pickled checkpoints are never loaded")
        return value


SPEC = PythonModel
DOC_SECTIONS = [("`model.inputs.<name>` (python source)", InputSpec)]  # for the recipe reference


def make_inputs(specs: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random example inputs from ``InputSpec``s."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        dtype = getattr(torch, spec.dtype)
        if dtype.is_floating_point:
            t = torch.rand(spec.shape, generator=gen) * (spec.high - spec.low) + spec.low
            out[name] = t.to(dtype)
        elif dtype == torch.bool:
            out[name] = torch.rand(spec.shape, generator=gen) < 0.5
        else:
            out[name] = torch.randint(int(spec.low), int(spec.high), spec.shape, generator=gen, dtype=dtype)
    return out


def build_python(factory: str, kwargs: dict[str, Any], search: Path | None) -> nn.Module:
    """Call the factory and check that it returned an nn.Module."""
    from torch import nn

    func = import_factory(factory, search)
    try:
        module = func(**kwargs)
    except TypeError as exc:
        raise RecipeError(Problem(f"{factory}(**kwargs) failed: {exc}", path="model.kwargs",
                                  hint="check the factory's parameters against `kwargs`")) from exc
    except (Exception, SystemExit) as exc:  # sys.exit() in user code is its failure, not the run's success
        raise CompressorError(f"the model factory {factory} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise RecipeError(Problem(f"{factory} returned {type(module).__name__}, not a torch.nn.Module",
                                  path="model.factory"))
    return module


def load_python_module(spec: PythonModel, base_dir: Path) -> nn.Module:
    """Build the module with the factory (imported from ``base_dir`` first) and load its weights, in eval mode."""
    module = build_python(spec.factory, spec.kwargs, base_dir)
    if spec.weights:
        from safetensors.torch import load_file

        path = resolve_path(spec.weights, base_dir)
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise CompressorError(f"cannot read the weights file {path}: {exc}") from exc
        try:
            result = module.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise RecipeError(Problem(f"{path.name} does not fit the module built by {spec.factory}: {exc}",
                                      path="model.weights")) from None
        from ..model import find_aliases

        # A tied tensor is stored once (safetensors' save_model, our own artifacts): its alias is not missing.
        tied = find_aliases(module)
        missing = [k for k in result.missing_keys if not (k in tied and tied[k] in state)]
        if missing or result.unexpected_keys:
            raise RecipeError(
                Problem(
                    f"{path.name} does not fit the module built by {spec.factory}: "
                    f"missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}",
                    path="model.weights",
                    hint="the file's tensor names must equal the module's state_dict() names",
                )
            )
    return module.eval()


def load(spec: PythonModel, base_dir: Path, seed: int) -> Model:
    """Build the module, load its weights if given, make example inputs (random, from ``seed``)."""
    from ..model import Model

    module = load_python_module(spec, base_dir)
    inputs = make_inputs(spec.inputs, seed)
    source = {"kind": "python", "factory": spec.factory, "kwargs": spec.kwargs}
    return Model(module=module, source=source, example_inputs=inputs)


def architecture(root: Path, source: dict[str, Any]) -> nn.Module:
    """An artifact's module, built again by its factory (importable from the working directory or PYTHONPATH)."""
    return build_python(source["factory"], source.get("kwargs", {}), None)


def baseline(model: dict[str, Any], base_dir: Path) -> tuple[str, list[Path], list[Path]]:
    """(label, files, weight files) of the uncompressed model a recipe's `python` section names."""
    weights = [resolve_path(model["weights"], base_dir)] if model.get("weights") else []
    missing = [w for w in weights if not w.is_file()]
    if missing:
        raise UsageError(f"the baseline's weights file {missing[0]} does not exist; give the original model "
                         "with --baseline RECIPE.yaml (its recipe file), or run from the recipe's directory")
    return f"python: {model['factory']}", list(weights), weights


def baseline_module(model: dict[str, Any], base_dir: Path) -> nn.Module:
    """The uncompressed model, built and loaded for evaluation."""
    return load_python_module(PythonModel.model_validate(model, context={"base_dir": base_dir}), base_dir)


def preimport_source(model: dict[str, Any], base_dir: Path) -> None:
    """Import the factory's module (the user's code and what it imports) before timing starts."""
    _import_module_of(model.get("factory", ""), base_dir)


def preimport_artifact(root: Path, source: dict[str, Any]) -> None:
    """Import the factory's module before timing starts."""
    _import_module_of(source.get("factory", ""), None)


def _import_module_of(factory: str, search: Path | None) -> None:
    import importlib
    import sys

    module = factory.partition(":")[0]
    if not module:
        return
    added = search is not None and str(search) not in sys.path
    if added:
        sys.path.insert(0, str(search))
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - the timed load will fail with its own clear error
        pass
    finally:
        if added:
            sys.path.remove(str(search))
