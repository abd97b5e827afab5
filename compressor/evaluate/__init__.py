"""The evaluator: accuracy, fidelity and speed of an artifact against its uncompressed baseline, and the gates.

Heavy imports (torch, transformers, matplotlib) happen inside the functions, so importing this package is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .runner import evaluate_artifact

__all__ = ["evaluate_artifact"]


def __getattr__(name: str) -> Any:
    if name == "evaluate_artifact":
        from .runner import evaluate_artifact

        return evaluate_artifact
    raise AttributeError(name)
