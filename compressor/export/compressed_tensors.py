"""The ``quantization_config`` that makes a 4-bit safetensors artifact loadable by transformers and vLLM.

The IntGroup encoding already stores its tensors in compressed-tensors' ``pack-quantized`` layout
(``<module>.weight_packed``, ``weight_scale``, ``weight_zero_point``, ``weight_shape``). What the readers also need
is the scheme of every quantized module in the model's config.json: one config group per distinct scheme (bits,
group size, symmetry), targeting its modules by exact name, so modules left in float are simply not targeted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["quantization_config", "add_quantization_config", "tied_quantized"]


def quantization_config(encodings: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """compressed-tensors' quantization_config for the manifest's ``encodings`` (JSON forms by tensor name), or
    None when no tensor is an IntGroup."""
    schemes: dict[tuple[int, int | None, bool], list[str]] = {}
    for name, spec in sorted(encodings.items()):
        if spec.get("kind") != "intgroup" or not name.endswith(".weight"):
            continue
        key = (int(spec["bits"]), spec.get("group_size"), bool(spec.get("symmetric", True)))
        schemes.setdefault(key, []).append(name[: -len(".weight")])
    if not schemes:
        return None
    groups = {}
    for i, ((bits, group_size, symmetric), modules) in enumerate(sorted(schemes.items(), key=str)):
        groups[f"group_{i}"] = {
            "targets": [f"re:^{re.escape(m)}$" for m in modules],
            "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric,
                        "strategy": "channel" if group_size is None else "group", "group_size": group_size,
                        "dynamic": False, "observer": "minmax"},
            "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": [], "kv_cache_scheme": None}


def tied_quantized(encodings: dict[str, dict[str, Any]], aliases: dict[str, str]) -> list[str]:
    """IntGroup tensors that other names share (a tied embedding and LM head): transformers ties the LM head to the
    embedding's ``weight`` before compressed-tensors decompresses, so it cannot load them quantized."""
    return sorted({target for target in aliases.values()
                   if (encodings.get(target) or {}).get("kind") == "intgroup"})


def add_quantization_config(config_file: Path, encodings: dict[str, dict[str, Any]],
                            aliases: dict[str, str]) -> str:
    """Add the quantization_config to the artifact's copied config.json (in place); returns what was done, for
    the log: "" when there is nothing to add, else a sentence."""
    config = quantization_config(encodings)
    if config is None or not config_file.is_file():
        return ""
    tied = tied_quantized(encodings, aliases)
    if tied:
        return (f"config.json gets no quantization_config: {', '.join(tied)} is tied and quantized, which "
                "transformers cannot load through compressed-tensors (compressor.load and ONNX can); "
                "`embeddings: keep` makes the artifact loadable by transformers")
    asymmetric = sorted(n for n, e in encodings.items() if e.get("kind") == "intgroup" and not e.get("symmetric", True))
    if asymmetric:
        # compressed-tensors packs zero points along dim 0, but the modules transformers builds for it expect them
        # unpacked (a shape mismatch at load, compressed-tensors 0.20 / transformers 4.57).
        return (f"config.json gets no quantization_config: {len(asymmetric)} tensors have zero points, which "
                "transformers cannot load through compressed-tensors yet (compressor.load and ONNX can); "
                "`symmetric: true` makes the artifact loadable by transformers")
    data = json.loads(config_file.read_text())
    data["quantization_config"] = config
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return "config.json has compressed-tensors' quantization_config: transformers and vLLM load the 4-bit weights"
