"""`python` source: ``package.module:function`` returning an nn.Module, with optional safetensors weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import CompressorError, Problem, RecipeError
from ..model import Model, find_aliases
from ..usercode import import_factory

if TYPE_CHECKING:  # pragma: no cover
    from ..recipe import PythonModel, Recipe

__all__ = ["load_python", "load_python_module", "make_inputs", "build_python"]


def make_inputs(specs: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random example inputs from ``InputSpec``s."""
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

        p = Path(spec.weights).expanduser()
        path = p if p.is_absolute() else base_dir / p
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise CompressorError(f"cannot read the weights file {path}: {exc}") from exc
        try:
            result = module.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise RecipeError(Problem(f"{path.name} does not fit the module built by {spec.factory}: {exc}",
                                      path="model.weights")) from None
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


def load_python(spec: PythonModel, recipe: Recipe) -> Model:
    """Build the module, load its weights if given, make example inputs."""
    module = load_python_module(spec, recipe.base_dir)
    inputs = make_inputs(spec.inputs, recipe.seed)
    source = {"kind": "python", "factory": spec.factory, "kwargs": spec.kwargs}
    return Model(module=module, source=source, example_inputs=inputs)
