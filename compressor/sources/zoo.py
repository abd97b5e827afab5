"""`zoo` source: the bundled reference models."""

from __future__ import annotations

import torch

from ..model import Model

__all__ = ["load_zoo"]


def load_zoo(name: str) -> Model:
    """Load a zoo model by name: ``minilm``, ``digits-mlp`` or ``digits-cnn``."""
    from .. import zoo

    if name == "minilm":
        from .hf import load_hf

        return load_hf(zoo.minilm_path(), "AutoModel", 128, source={"kind": "zoo", "name": name}, task="text-embedding")
    module = zoo.digits_model(name)
    _, x_test, _, _ = zoo.digits_split(name)
    inputs = {"x": torch.from_numpy(x_test[:8]).clone()}
    return Model(module=module, source={"kind": "zoo", "name": name}, example_inputs=inputs, task="classification")
