"""Which int8 matrix products to compute in float so that the model meets ``target_fidelity`` on every target.

One ONNX Runtime session scores every choice: the quantized model, its MatMulInteger nodes rewritten to compute
the targets' arithmetic exactly (``int8_emulate.emulate``), with a boolean input per product that swaps its int8
result for float compute on the same int8 weights (``int8_emulate.switchable``). No choice rebuilds or reloads a
model.

The search: each product's harm is scored once, as the gain in minimum cosine when that product alone moves to
float (on RANK_EXAMPLES calibration examples, taken from every batch). Products are then taken in order of that
gain (the cheaper first on ties), each kept only if the whole calibration set confirms that it raised the minimum,
until the target or ``max_float`` is reached; last, each product taken before the final one goes back to int8 if
the target holds without it. Gains do not add up exactly, which is why every step is confirmed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .int8_emulate import emulate, switchable

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["Scorer", "search", "RANK_EXAMPLES"]

RANK_EXAMPLES = 48  # calibration examples that rank the products (all of them confirm each step)


class Scorer:
    """Fidelity of the quantized model to the float model on the calibration data, for any set of products moved
    to float, under ``arithmetic`` ("exact" or "saturating-pairs"; None: this CPU's own kernels, for when they
    compute the arithmetic being scored)."""

    def __init__(self, model: onnx.ModelProto, float_weights: dict[str, np.ndarray], arithmetic: str | None,
                 feeds: list[dict[str, np.ndarray]], reference: list[np.ndarray],
                 outputs: Callable[[Any, dict[str, np.ndarray]], np.ndarray], work: Path) -> None:
        from ..ort import ort_session, save_with_external_data

        graph, self.switches = switchable(model, float_weights)
        if arithmetic is not None:
            graph = emulate(graph, arithmetic)
        path = work / "search.onnx"
        save_with_external_data(graph, path)
        try:
            self.session = ort_session(path)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            from ..errors import CompressorError

            raise CompressorError(f"the int8 fallback search cannot load its scoring model: {type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from exc
        self.feeds, self.reference, self.outputs = feeds, reference, outputs
        self.runs = 0

    def score(self, in_float: set[str] | list[str], examples: int | None = None) -> dict[str, float]:
        """{"min", "mean"} cosine over ``examples`` calibration examples taken evenly from every batch (all when
        None: a slice of each batch varies like the whole set; the first batch alone would not)."""
        flags = {s: np.array(name in in_float) for name, s in self.switches.items()}
        got, ref = [], []
        each = None if examples is None else max(1, -(-examples // len(self.feeds)))
        for feed, expected in zip(self.feeds, self.reference):
            part = feed if each is None else {k: v[:each] for k, v in feed.items()}
            got.append(self.outputs(self.session, {**part, **flags}))
            ref.append(expected if each is None else expected[:each])
        self.runs += 1
        cos = row_cosines(ref, got)
        return {"min": float(cos.min()), "mean": float(cos.mean())}


def search(scorer: Scorer, candidates: list[str], cost: dict[str, int], target: float, budget: int,
           say: Callable[[str], None]) -> tuple[list[str], dict[str, float]]:
    """Products to move to float (in the order chosen) and the fidelity reached on the whole calibration set."""
    start = time.perf_counter()
    current = scorer.score(set())
    moved: list[str] = []
    if current["min"] >= target or budget <= 0:
        return moved, current
    base = scorer.score(set(), RANK_EXAMPLES)
    gain = {name: scorer.score({name}, RANK_EXAMPLES)["min"] - base["min"] for name in candidates}
    # Largest regained fidelity first, the cheaper product on (near) ties: the minimum cosine is one example's,
    # so many small gains do not add up to one large one, and taking small cheap ones first (gain per multiply)
    # moved five products where one would do.
    order = sorted(candidates, key=lambda n: (-round(gain[n], 5), cost.get(n, 1)))
    say(f"  ranked {len(candidates)} matrix products by the fidelity each regains in float "
        f"({time.perf_counter() - start:.1f}s)")
    for name in order:
        if len(moved) >= budget or current["min"] >= target:
            break
        if gain[name] <= 0:
            break  # the rest regain nothing on their own
        tried = scorer.score(set(moved) | {name})
        if tried["min"] <= current["min"]:
            continue
        moved.append(name)
        current = tried
        say(f"  {name}: float compute (int8 weights) -> min cosine {current['min']:.5f}")
    if current["min"] >= target and len(moved) > 1:
        # Prune: a product taken early may be unnecessary once later ones are in float; most expensive first.
        for name in sorted(moved[:-1], key=lambda n: -cost.get(n, 1)):
            rest = [n for n in moved if n != name]
            tried = scorer.score(rest)
            if tried["min"] >= target:
                moved, current = rest, tried
                say(f"  {name}: back to int8 (the target holds without it) -> min cosine {current['min']:.5f}")
    say(f"  search: {scorer.runs} scoring runs in {time.perf_counter() - start:.1f}s")
    return moved, current


def row_cosines(reference: list[np.ndarray], got: list[np.ndarray]) -> np.ndarray:
    """Cosine of each row of the concatenated outputs (1 where both rows are zero, 0 where one is)."""
    a, b = np.concatenate(reference), np.concatenate(got)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    return np.where(den > 0, num / np.maximum(den, 1e-30), np.where(both_zero, 1.0, 0.0))
