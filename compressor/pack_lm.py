"""What `compress pack` adds for a causal language model: the generation settings bundle.json records for run.py
(end-of-text token, the model's positions), and the prefill inputs (prompt, positions, empty KV cache) on which a
converted or narrowed decoder is checked against the artifact's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .manifest import Manifest

__all__ = ["generation_settings", "prefill_inputs"]


def generation_settings(artifact: Path, manifest: Manifest, tokenizer: dict[str, Any] | None,
                        inputs: list[str]) -> dict[str, Any]:
    """bundle.json's `generation`, which run.py's generation needs: the end-of-text token id (the model's
    generation_config.json, else its config.json, else the tokenizer's) and the model's positions (None where the
    config names none). ArtifactError for a causal language model without tokenizer files or KV-cache inputs."""
    from .decoding import PAST

    if tokenizer is None:
        raise ArtifactError(f"{artifact}: a causal language model without its tokenizer files: its bundle could not "
                            "turn prompts into tokens. Export it from a model directory that has them")
    if "input_ids" not in inputs or not any(n.startswith(PAST) for n in inputs):
        raise ArtifactError(f"{artifact}: its ONNX model has no past_key_values inputs, so a bundle could not "
                            "generate with it; run its recipe again with this compressor (KV-cache export)")
    config, generation = (_json_file(artifact, name, manifest) for name in ("config.json", "generation_config.json"))
    eos = next((e for e in (generation.get("eos_token_id"), config.get("eos_token_id"), tokenizer.get("eos_id"))
                if e not in (None, [])), None)
    eos = eos[0] if isinstance(eos, list) and eos else eos  # Llama 3 lists several; decoding stops at one
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    return {"eos_token_id": eos if isinstance(eos, int) and not isinstance(eos, bool) else None,
            "max_positions": positions if isinstance(positions, int) and positions > 0 else None}


def _json_file(artifact: Path, name: str, manifest: Manifest) -> dict[str, Any]:
    """The artifact's copy of the source's JSON file ``name`` ({} when it has none)."""
    if name not in manifest.model.copied_files:
        return {}
    try:
        body = json.loads((artifact / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{artifact / name} cannot be read ({exc}); export the model again") from None
    return body if isinstance(body, dict) else {}


def prefill_inputs(session: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` (the artifact's example inputs, torch tensors by name) as a KV-cache decoder's first step takes
    them: the prompt with its positions and an empty cache. Unchanged for any other model."""
    import torch

    from .decoding import OrtDecoder, is_decoder, position_ids

    if not is_decoder(session):
        return inputs
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    feed = {"input_ids": ids, "attention_mask": mask,
            "position_ids": torch.from_numpy(position_ids(mask.numpy(), ids.shape[1]))}
    feed.update({name: torch.from_numpy(value) for name, value in OrtDecoder(session).empty_past(ids.shape[0]).items()})
    return feed
