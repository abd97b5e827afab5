"""`hf` source: a local Hugging Face model directory, loaded with transformers (never from a hub)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from ..errors import CompressorError, Problem, RecipeError
from ..model import Model

__all__ = ["load_hf", "load_hf_module", "example_text_inputs", "EXAMPLE_SENTENCES", "is_copied_file"]

# Fixed sentences for example inputs: deterministic, varied length, no data files needed.
EXAMPLE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Model compression trades a little accuracy for a lot of speed and memory.",
)
_SKIP_DIRS = {"onnx", "openvino", ".git", ".cache", "__pycache__"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data", ".ot")


def is_copied_file(rel: Path) -> bool:
    """Files of a model directory that travel into the artifact: everything but weights and their indexes."""
    if any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts):
        return False
    name = rel.name
    return not (name.endswith(_WEIGHT_SUFFIXES) or name.endswith((".safetensors.index.json", ".bin.index.json")))


def load_hf_module(path: Path, auto_class: str) -> torch.nn.Module:
    """The model of a Hugging Face directory, loaded strictly (offline, safetensors only), in eval mode."""
    import transformers

    cls = getattr(transformers, auto_class)
    try:
        module, info = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True, dtype="auto",
                                           output_loading_info=True)
    except Exception as exc:  # transformers and safetensors raise many types for a bad directory
        raise CompressorError(
            f"transformers could not load the model in {path} with {auto_class}: {type(exc).__name__}: {exc}"
        ) from exc
    # transformers fills missing weights with random values and only warns; an artifact of random weights
    # must never pass as the user's model.
    bad = {k: info.get(k) or [] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(str(x) for x in v[:5])}" for k, v in bad.items() if v)
        raise RecipeError(
            Problem(f"the weights in {path} do not match the {auto_class} architecture of its config.json ({detail})",
                    path="model.path",
                    hint="use the auto_class the checkpoint was saved with, or a directory whose weights are complete")
        )
    return module.eval()


def load_hf(path: Path, auto_class: str, max_length: int, *, source: dict[str, Any], task: str | None = None) -> Model:
    """Load a Hugging Face model directory with transformers, offline, safetensors only."""
    module = load_hf_module(path, auto_class)
    config = module.config
    inputs = example_text_inputs(path, module, max_length)
    if task is None:
        task = "text-embedding" if auto_class == "AutoModel" else auto_class.removeprefix("AutoModelFor").lower()
    source = dict(source, auto_class=auto_class, model_type=config.model_type,
                  architectures=list(config.architectures or []))
    return Model(module=module, source=source, example_inputs=inputs, task=task, files_dir=path)


def example_text_inputs(path: Path, module: torch.nn.Module, max_length: int) -> dict[str, torch.Tensor]:
    """Tokenized example sentences, padded to ``max_length``; random token ids if there is no tokenizer."""
    accepted = set(inspect.signature(module.forward).parameters)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:  # noqa: BLE001 - no or broken tokenizer files raise OSError, ValueError, even TypeError
        tokenizer = None
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        enc = tokenizer(list(EXAMPLE_SENTENCES), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        return {k: v for k, v in enc.items() if k in accepted}
    vocab = int(getattr(module.config, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (len(EXAMPLE_SENTENCES), max_length), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {k: v for k, v in inputs.items() if k in accepted}
