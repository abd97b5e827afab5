"""`share`: weight sharing by per-tensor k-means (Deep Compression's second stage).

Each selected tensor's values are clustered into at most k = 2**bits centroids (1-D Lloyd iterations from a
chosen initialisation); every value is replaced by its centroid, rounded to the codebook dtype, so the module
computes exactly what is stored. A pruned tensor (stored sparse) keeps its zeros exactly: they take no centroid,
and only the non-zero values are clustered. Stored as ``encodings.Codebook``: the centroids plus the n-bit index
of each value packed into bytes, and for pruned tensors their positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from ..encodings import Codebook, Int8, Sparse, dtype_name
from .base import Context, Pass, PassConfig, PassResult, register_pass
from .prune import PRUNABLE
from .select import per_module, select_tensors

SHARE_MEMORY = (2.8, 1.0)  # (working, after) as in Pass.memory: measured on a 0.25B Llama, docs/decisions.md

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..model import Model


class ShareConfig(PassConfig):
    """Settings of the `share` pass."""

    bits: int | dict[str, int] = Field(
        4, description="Index width: each tensor gets at most 2**bits shared values (2 to 8; Deep Compression used "
        "5 for fully connected layers and 8 for convolutions). A mapping gives widths per module: keys are class "
        "names or module-name globs, the first key that matches wins, and modules matching no key are left as "
        "they are (e.g. `{Embedding: 4, Linear: 6}`)."
    )
    init: Literal["linear", "density", "random"] = Field(
        "linear",
        description="Centroid initialisation: `linear` spreads them evenly between the smallest and largest value "
        "(keeps the rare large weights, which matter most; Deep Compression found it best), `density` at "
        "evenly spaced quantiles, `random` at values drawn with the recipe's seed.",
    )
    iterations: int = Field(50, ge=1, le=1000, description="At most this many k-means (Lloyd) iterations per tensor.")
    codebook_dtype: Literal["float16", "float32"] = Field(
        "float16", description="dtype of the stored centroids; they are rounded to it, so what runs is what is stored."
    )
    modules: list[str] = Field(
        default_factory=lambda: [*PRUNABLE, "Embedding"],
        description="Modules whose `weight` is shared: class names or module-name globs. Each must match something.",
    )
    exclude: list[str] = Field(
        default_factory=list, description="Modules left as they are: class names or module-name globs."
    )
    include_bias: bool = Field(
        False, description="Share the selected modules' biases too (each its own codebook). Biases are few, but in a "
        "small model stored in float32 they can outweigh the compressed weights."
    )


    @field_validator("bits")
    @classmethod
    def _widths(cls, value: Any) -> Any:
        widths = value.items() if isinstance(value, dict) else [("", value)]
        for key, bits in widths:
            where = f" for {key!r}" if key else ""
            if not 2 <= bits <= 8:
                raise ValueError(f"bits {bits}{where} is outside 2..8: 2**bits centroids per tensor, 4 (16 "
                                 "centroids) is the usual choice")
        if isinstance(value, dict) and not value:
            raise ValueError("bits is an empty mapping; give a number or {pattern: bits}")
        return value


@register_pass
class SharePass(Pass):
    """k-means weight sharing."""

    name = "share"
    Config = ShareConfig
    summary = "Cluster each tensor's values into 2**bits shared centroids (k-means); store a codebook and n-bit indices."
    must_not_follow = {
        "share": "the values already are centroids; keep one share with the bits you want",
        "quantize": "the weights are on an int8 grid already; share first (or instead)",
        "cast": "share in float32, then keep the codebook in float16 with `codebook_dtype`",
    }

    def _tensors(self, model: Model) -> dict[str, tuple[torch.Tensor, int]]:
        """Each selected tensor with its index width."""
        config: ShareConfig = self.config  # type: ignore[assignment]
        selected = self._selected(model)
        if not isinstance(config.bits, dict):
            return {name: (t, int(config.bits)) for name, t in selected.items()}
        return per_module(model, selected, config.bits, f"passes[{self.index}].share", "bits")

    def _selected(self, model: Model) -> dict[str, torch.Tensor]:
        config: ShareConfig = self.config  # type: ignore[assignment]
        attrs = ("weight", "bias") if config.include_bias else ("weight",)
        return select_tensors(model, config.modules, config.exclude, f"passes[{self.index}].share", attrs,
                              defaults="modules" not in config.model_fields_set)

    def memory(self) -> tuple[float, float]:
        # k-means keeps distances, assignments and sorted values of a tensor beside the weights while it runs.
        return SHARE_MEMORY

    def check(self, model: Model) -> None:
        self._tensors(model)

    def apply(self, model: Model, ctx: Context) -> PassResult:
        import torch

        config: ShareConfig = self.config  # type: ignore[assignment]
        tensors = self._tensors(model)
        gen = torch.Generator().manual_seed(ctx.seed)
        book_dtype = getattr(torch, config.codebook_dtype)
        per_tensor: dict[str, dict[str, float]] = {}
        with torch.no_grad():
            for name, (tensor, bits) in tensors.items():
                if isinstance(model.encodings[name], Int8):  # pragma: no cover - must_not_follow stops it
                    continue
                sparse = isinstance(model.encodings[name], Sparse)
                flat = tensor.detach().reshape(-1).float()
                keep = flat != 0 if sparse else torch.ones_like(flat, dtype=torch.bool)
                values = flat[keep]
                centroids = kmeans_1d(values, 1 << bits, config.init, config.iterations, gen)
                centroids = torch.unique(centroids.to(book_dtype).float())
                if sparse:
                    centroids = centroids[centroids != 0]  # a zero centroid would be read back as a pruned weight
                    if not centroids.numel():
                        centroids = values[:1].to(book_dtype).float()
                shared = _nearest(values, centroids)
                err = float((shared - values).norm() / values.norm().clamp_min(1e-30)) if values.numel() else 0.0
                out = torch.zeros_like(flat)
                out[keep] = shared
                tensor.copy_(out.reshape(tensor.shape).to(tensor.dtype))
                model.encodings[name] = Codebook(list(tensor.shape), bits, dtype_name(tensor.dtype),
                                                 config.codebook_dtype, sparse=sparse)
                per_tensor[name] = {"bits": bits, "centroids": int(torch.unique(shared).numel()), "values": int(values.numel()),
                                    "relative_error": round(err, 6)}
        widths = sorted({v["bits"] for v in per_tensor.values()})
        width = f"{widths[0]}" if len(widths) == 1 else f"{widths[0]}- to {widths[-1]}"
        ctx.info(f"shared {len(per_tensor)} tensors with {width}-bit codebooks")
        return PassResult(touched=list(per_tensor), details={"bits": config.bits, "init": config.init,
                                                             "per_tensor": per_tensor})


def kmeans_1d(values: torch.Tensor, k: int, init: str, iterations: int, gen: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means on scalars: at most ``k`` centroids, sorted. Assignment is a search among the midpoints of
    the sorted centroids (O(n log k)), so even an embedding table of millions of values clusters in seconds."""
    import torch

    if values.numel() == 0:
        return values.new_zeros(0)
    distinct = torch.unique(values)
    if distinct.numel() <= k:
        return distinct
    lo, hi = values.min(), values.max()
    if init == "linear":
        centroids = torch.linspace(float(lo), float(hi), k)
    elif init == "density":
        sample = values if values.numel() <= 1 << 24 else values[torch.randperm(values.numel(), generator=gen)[:1 << 24]]
        centroids = torch.quantile(sample, (torch.arange(k, dtype=torch.float32) + 0.5) / k)
    else:
        centroids = values[torch.randperm(values.numel(), generator=gen)[:k]].sort().values
    for _ in range(iterations):
        assign = _assign(values, centroids)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, values.double())
        counts = torch.bincount(assign, minlength=k).double()
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids.double()).float().sort().values
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids


def _assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``centroids`` for each value."""
    import torch

    mids = (centroids[1:] + centroids[:-1]) / 2
    return torch.searchsorted(mids, values)


def _nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return centroids[_assign(values, centroids)]
