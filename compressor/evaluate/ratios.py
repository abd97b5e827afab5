"""The ratios of an artifact's report row to the baseline's row on the same device."""

from __future__ import annotations

from typing import Any

__all__ = ["ratios"]


def ratios(base: dict[str, Any], art: dict[str, Any]) -> dict[str, Any]:
    """An artifact row over the baseline row of the same device: compression, accuracy drop, load speedups and
    the RSS added while loading (above 1 favours the artifact, except the drop)."""

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def load(row: dict[str, Any], mode: str, key: str) -> float | None:
        entry = (row.get("load") or {}).get(mode)
        return entry[key]["median"] if entry else None

    acc_b, acc_a = (base.get("accuracy") or {}).get("value"), (art.get("accuracy") or {}).get("value")
    return {
        "compression": div(base["size_bytes"], art["size_bytes"]),
        "accuracy_drop": acc_b - acc_a if acc_b is not None and acc_a is not None else None,
        "cold_load_speedup": div(load(base, "cold", "load_ms"), load(art, "cold", "load_ms")),
        "warm_load_speedup": div(load(base, "warm", "load_ms"), load(art, "warm", "load_ms")),
        "cold_first_inference_speedup": div(load(base, "cold", "first_inference_ms"),
                                            load(art, "cold", "first_inference_ms")),
        "warm_first_inference_speedup": div(load(base, "warm", "first_inference_ms"),
                                            load(art, "warm", "first_inference_ms")),
        "rss_added_ratio": div(_rss(base), _rss(art)),
    }


def _rss(row: dict[str, Any]) -> float | None:
    entry = (row.get("load") or {}).get("cold") or (row.get("load") or {}).get("warm")
    return entry["rss_added_mb"] if entry else None
