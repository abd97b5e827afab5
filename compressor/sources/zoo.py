"""`zoo` source: the reference models bundled with compressor, end to end: its recipe schema, loading for a run,
rebuilding an artifact's module, and the baseline for evaluation. `minilm` is a Hugging Face model shipped as a
Python package, handled as the `hf` kind handles a directory; the digits models are trained (deterministically,
cached) at first use. Torch is imported only when used."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..schema import Strict

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..model import Model

__all__ = ["ZooModel", "ZOO_MODELS", "load", "load_zoo", "hf_zoo_path", "architecture", "baseline", "baseline_module",
           "preimport_source", "preimport_artifact"]

ZOO_MODELS = ("minilm", "digits-mlp", "digits-cnn", "tiny-lm")
# Zoo models that are Hugging Face directories, handled as the `hf` kind handles one: {name: (auto class, task)}.
_HF = {"minilm": ("AutoModel", "text-embedding"), "tiny-lm": ("AutoModelForCausalLM", "text-generation")}


class ZooModel(Strict):
    """A reference model bundled with compressor."""

    source: Literal["zoo"] = Field(description="`zoo`: a reference model bundled with compressor.")
    name: Literal["minilm", "digits-mlp", "digits-cnn", "tiny-lm"] = Field(
        description="`minilm` (all-MiniLM-L6-v2 text encoder), `digits-mlp` (64-300-100-10 MLP), `digits-cnn` "
        "(small CNN) or `tiny-lm` (a 2M-parameter Llama-architecture causal language model with its own tokenizer, "
        "see compressor.tinylm); the digits models and tiny-lm are trained at first use (digits: seconds, on "
        "scikit-learn's digits; tiny-lm: about four minutes on two cores, on the English prose CPython ships) and "
        "cached."
    )


SPEC = ZooModel


def load(spec: ZooModel, base_dir: Path, seed: int) -> Model:
    """The zoo model a recipe names (``base_dir`` and ``seed`` are unused: the zoo is fixed)."""
    return load_zoo(spec.name)


def load_zoo(name: str) -> Model:
    """Load a zoo model by name: ``minilm``, ``digits-mlp`` or ``digits-cnn``."""
    import torch

    from .. import zoo
    from ..model import Model

    if name in _HF:
        from .hf import load_hf

        source: dict[str, Any] = {"kind": "zoo", "name": name}
        if name == "tiny-lm":
            from ..tinylm import corpus_sha256

            source["corpus_sha256"] = corpus_sha256()  # the text it was trained and is evaluated on
        auto_class, task = _HF[name]
        return load_hf(hf_zoo_path(name), auto_class, 128, source=source, task=task)
    module = zoo.digits_model(name)
    _, x_test, _, _ = zoo.digits_split(name)
    inputs = {"x": torch.from_numpy(x_test[:8]).clone()}
    return Model(module=module, source={"kind": "zoo", "name": name}, example_inputs=inputs, task="classification")


def hf_zoo_path(name: str) -> Path:
    """The directory of a zoo model that is a Hugging Face model (tiny-lm is trained now if not cached)."""
    if name == "tiny-lm":
        from ..tinylm import tiny_lm_path

        return tiny_lm_path()
    from ..zoo import minilm_path

    return minilm_path()


def architecture(root: Path, source: dict[str, Any]) -> nn.Module:
    """An artifact's empty module: MiniLM from the config.json copied into the artifact, a digits model by name."""
    if source.get("name") in _HF:
        from .hf import hf_architecture

        return hf_architecture(root, source.get("auto_class", _HF[source["name"]][0]))
    from ..zoo import build_digits

    return build_digits(source["name"])


def baseline(model: dict[str, Any], base_dir: Path) -> tuple[str, list[Path], list[Path]]:
    """(label, files, weight files) of the zoo model; a digits model is trained and cached first, so that timed
    loads only read the cache."""
    from .. import zoo

    if model["name"] in _HF:
        from .hf import model_files

        files, weights = model_files(hf_zoo_path(model["name"]))
        return f"zoo: {model['name']}", files, weights
    zoo.digits_model(model["name"])
    weights = [zoo.digits_cache_path(model["name"])]
    return f"zoo: {model['name']}", list(weights), weights


def baseline_module(model: dict[str, Any], base_dir: Path) -> nn.Module:
    """The zoo model, loaded for evaluation."""
    from .. import zoo

    if model["name"] in _HF:
        from .hf import load_hf_module

        return load_hf_module(hf_zoo_path(model["name"]), model.get("auto_class", _HF[model["name"]][0]))
    return zoo.digits_model(model["name"])


def preimport_source(model: dict[str, Any], base_dir: Path) -> None:
    """Import what loading the model will import, so that load timing measures the model."""
    if model.get("name") in _HF:
        from .hf import preimport_transformers

        preimport_transformers(hf_zoo_path(model["name"]) / "config.json")


def preimport_artifact(root: Path, source: dict[str, Any]) -> None:
    """Import what rebuilding the artifact will import."""
    if source.get("name") in _HF:
        from .hf import preimport_transformers

        preimport_transformers(root / "config.json")
