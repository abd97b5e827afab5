"""compressor: compress PyTorch models by recipe and export artifacts laid out for memory-mapped loading.

Importing this package is cheap: torch and the other heavy libraries load only when a function needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__
__all__ = ["__version__", "load", "load_recipe"]

if TYPE_CHECKING:  # pragma: no cover
    from .loading import load
    from .recipe import load_recipe


def __getattr__(name: str) -> Any:
    # Lazy attributes keep `import compressor` (and so `compress --help`) free of torch.
    if name == "load":
        from .loading import load

        return load
    if name == "load_recipe":
        from .recipe import load_recipe

        return load_recipe
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")
