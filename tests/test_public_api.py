"""The public API: every name a module lists in ``__all__`` exists and is defined there (not re-exported from
elsewhere by accident), public functions have docstrings, and every pass config survives the JSON round trip the
manifest puts it through (`compress eval` validates the stored configs again)."""

from __future__ import annotations

import importlib
import inspect

import pytest

from test_layers import _modules

# Names a module re-exports on purpose: the package's front door, and the recipe's schema sections that live
# beside it.
REEXPORTS = {
    "compressor": {"load", "load_recipe", "__version__"},
    "compressor.loading": {"load_tensors", "load_tensors_cuda", "load_example_inputs", "build_architecture"},
    "compressor.recipe": {"HFModel", "PythonModel", "ZooModel", "InputSpec", "ZOO_MODELS", "Strict", "ExportSpec",
                          "GenerationSpec", "SafetensorsExport", "OnnxExport", "EvaluateSpec", "DataSpec", "SpeedSpec", "GatesSpec",
                          "Threshold"},
    "compressor.evaluate": {"evaluate_artifact"},
    "compressor.encodings": {"Encoding", "IntGroup", "dtype_from_name", "dtype_name"},  # every kind, from one place
    "compressor.passes": None,  # the registry's front door
    "compressor.passes.base": {"PassReport"},  # the contract's return type; its home is the manifest
}


def _public_modules() -> list[str]:
    return [m for m in sorted(_modules()) if m not in ("compressor.__main__", "compressor.bundle_runner")]


@pytest.mark.parametrize("name", _public_modules())
def test_all_names_exist_are_defined_here_and_documented(name):
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        return
    allowed = REEXPORTS.get(name, set())
    for public in exported:
        assert hasattr(module, public), f"{name}.__all__ names {public}, which it does not define"
        value = getattr(module, public)
        home = getattr(value, "__module__", None)
        if allowed is not None and public not in allowed and (inspect.isfunction(value) or inspect.isclass(value)):
            assert home == name, f"{name}.{public} is defined in {home}: import it from there, or list it here"
        if inspect.isfunction(value) or inspect.isclass(value):
            assert (value.__doc__ or "").strip(), f"{name}.{public} has no docstring"


def test_every_pass_config_survives_a_json_round_trip():
    """The manifest stores each pass as the recipe gave it (`recipe.passes`) and the config's values through JSON:
    for every config of the shipped recipes (and every default that is valid alone), what the user set, written
    as JSON and validated again, gives the same config. (Validators tell what a user wrote from a default, e.g.
    `importance` only applies to structured pruning, so the dump round-trips with ``exclude_unset``.)"""
    import json

    from pydantic import ValidationError

    from compressor.passes import available_passes
    from compressor.recipe import load_recipe
    from conftest import ROOT

    configs = []
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        for step, raw in zip(recipe.steps, recipe.passes):
            configs.append((step.name, step.config, json.loads(json.dumps(raw))[step.name] or {}))
    for name, cls in available_passes().items():
        try:
            configs.append((name, cls.Config(), {}))
        except ValidationError:
            pass  # needs a parameter (prune: sparsity or a pattern); the recipes cover it
    assert {name for name, _, _ in configs} == set(available_passes()), "a pass with no config to round-trip"
    for name, config, stored in configs:
        cls = type(config)
        assert cls.model_validate(stored) == config, name  # the manifest's copy of the recipe
        given = json.loads(json.dumps(config.model_dump(mode="json", exclude_unset=True)))
        again = cls.model_validate(given)
        assert again == config and again.model_dump(mode="json") == config.model_dump(mode="json"), name
