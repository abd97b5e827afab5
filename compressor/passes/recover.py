"""`recover`: short fine-tuning that keeps the compression fixed (Deep Compression's retraining).

- Pruned tensors keep their zeros: their gradients are masked and the zeros restored after every step.
- Shared tensors keep their assignment to centroids; each centroid moves by the sum of its members' gradients
  (trained quantization), and the weights are re-materialised from the centroids, rounded to the codebook dtype.
- Other float tensors train freely unless frozen; int8 and cast tensors never train.

The loss is distillation from the uncompressed model (the pipeline keeps a copy of it): KL divergence at a
temperature for logits, mean squared error (over real tokens) for hidden states, so any model recovers on
unlabeled data; with labels in the data, cross-entropy is added.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import Field

from ..encodings import Cast, Codebook, Int8, Sparse
from ..errors import CompressorError, UsageError
from ..data.spec import TrainingDataSpec
from .base import Context, Pass, PassConfig, PassResult, register_pass
from .select import matches

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..model import Model


SMALL_MODEL = 2_000_000  # parameters; below this recover trains on one thread


class RecoverConfig(PassConfig):
    """Settings of the `recover` pass."""

    steps: int = Field(300, ge=1, le=1_000_000, description="Optimizer steps (one batch each).")
    lr: float = Field(1e-4, gt=0, le=1, description="Adam learning rate (centroids and free weights alike).")
    data: TrainingDataSpec = Field(
        default_factory=TrainingDataSpec,
        description="Training data (same forms as `evaluate.data`; default: the digits training split or the "
        "shipped calibration sentences). Keep it apart from the evaluation data.",
    )
    temperature: float = Field(2.0, gt=0, le=100, description="Softmax temperature of the distillation loss on logits.")
    label_weight: float = Field(
        1.0, ge=0, description="Weight of the cross-entropy on labels, when the data has labels (0: distillation only)."
    )
    distill_weight: float = Field(
        1.0, ge=0, description="Weight of the distillation loss against the uncompressed model (0: labels only)."
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Modules whose tensors do not train: class names or module-name globs (e.g. `LayerNorm`, "
        "`embeddings.*`). Each must match something.",
    )


@register_pass
class RecoverPass(Pass):
    """Fine-tune under the compression constraints."""

    name = "recover"
    Config = RecoverConfig
    summary = "Fine-tune briefly with masks and codebooks fixed (distillation from the uncompressed model, plus labels)."
    needs_original = True
    must_not_follow = {
        "quantize": "int8 weights cannot be fine-tuned here; recover before quantize",
        "cast": "recover in float32, then cast",
    }

    def memory(self) -> tuple[float, float]:
        # Not measured: the teacher's copy, gradients and AdamW's two moments, each the model's size.
        return 4.0, 1.0

    def check(self, model: Model) -> None:
        self._frozen(model)

    def _frozen(self, model: Model) -> set[str]:
        """State-dict names of the tensors of frozen modules."""
        from ..errors import Problem, RecipeError

        config: RecoverConfig = self.config  # type: ignore[assignment]
        frozen: set[str] = set()
        hit = {p: False for p in config.freeze}
        for name, module in model.module.named_modules():
            for pattern in config.freeze:
                if matches(pattern, name, type(module).__name__):
                    hit[pattern] = True
                    frozen.update(f"{name}.{k}" if name else k for k, _ in module.named_parameters())
        missing = [p for p, h in hit.items() if not h]
        if missing:
            raise RecipeError(Problem(f"freeze pattern(s) {', '.join(repr(p) for p in missing)} match no module",
                                      path=f"passes[{self.index}].recover.freeze",
                                      hint="patterns match module names or class names; globs allowed"))
        return frozen

    def apply(self, model: Model, ctx: Context) -> PassResult:
        import torch

        config: RecoverConfig = self.config  # type: ignore[assignment]
        teacher = ctx.original
        if teacher is None:  # pragma: no cover - the pipeline keeps it for passes with needs_original
            raise UsageError("recover needs the uncompressed model; run it through `compress run`")
        batches, labels, _ = training_batches(model, config.data, ctx)
        params = dict(model.module.named_parameters())
        trained, masks, books = _trainable(model, self._frozen(model), params)
        if not trained:
            raise UsageError("recover found nothing to train: every tensor is frozen, int8 or cast")
        for name, tensor in params.items():
            tensor.requires_grad_(name in trained)
        free = [t for n, t in trained.items() if n not in books]
        optimizer = torch.optim.Adam([*free, *(c for c, _, _ in books.values())], lr=config.lr)
        gen = torch.Generator().manual_seed(ctx.seed)
        module = model.module.eval()  # no dropout: fine-tuning a compressed model, not training from scratch
        every = max(1, config.steps // 10)
        losses: list[float] = []
        order: list[int] = []
        threads = torch.get_num_threads()
        if model.numel() < SMALL_MODEL:
            # Tiny matrix products gain nothing from threads, and on a busy machine threads waiting for each other
            # made the digits recipe 30x slower.
            torch.set_num_threads(1)
        try:
            for step in range(config.steps):
                if not order:
                    order = torch.randperm(len(batches), generator=gen).tolist()
                which = order.pop()
                batch = batches[which]
                _materialise(books, params)
                with torch.no_grad():
                    target = _first_float(teacher(**batch))
                out = _first_float(module(**batch))
                loss = config.distill_weight * _distill(out, target, batch.get("attention_mask"), config.temperature)
                if labels[which] is not None and config.label_weight > 0 and out.dim() == 2:
                    loss = loss + config.label_weight * torch.nn.functional.cross_entropy(out.float(), labels[which])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                _constrained_step(optimizer, trained, masks, books, params)
                losses.append(float(loss.detach()))
                if not math.isfinite(losses[-1]):
                    # A runtime failure (exit 1), not a recipe error: the same lr may work on other data.
                    raise CompressorError(f"recover diverged at step {step + 1} (loss {losses[-1]}); lower `lr` "
                                          f"(now {config.lr:g})")
                if (step + 1) % every == 0 or step + 1 == config.steps:
                    recent = losses[-every:]
                    ctx.info(f"recover: step {step + 1}/{config.steps}, loss {sum(recent) / len(recent):.4g}")
        finally:
            torch.set_num_threads(threads)
            for tensor in params.values():
                tensor.requires_grad_(False)
                tensor.grad = None
        final = _materialise(books, params)
        window = max(1, len(losses) // 10)
        return PassResult(
            touched=list(trained),
            details={
                "steps": config.steps,
                "lr": config.lr,
                "data_batches": len(batches),
                "labels": any(lab is not None for lab in labels),
                "loss_first": round(sum(losses[:window]) / window, 6),
                "loss_last": round(sum(losses[-window:]) / window, 6),
                "tensors_trained": len(trained),
                "sparse_masked": len(masks),
                "codebooks_trained": len(books),
                "centroids": final,
            },
        )


def _trainable(model: Model, frozen: set[str], params: dict[str, Any]
               ) -> tuple[dict[str, Any], dict[str, Any], dict[str, tuple[Any, Any, Codebook]]]:
    """The tensors recover trains: {name: parameter}, the sparse ones' masks of kept entries, and for codebook
    tensors (centroids to train, each entry's centroid index or -1 for a pruned zero, the encoding). Frozen, int8
    and cast tensors are left out."""
    import torch

    trained: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    books: dict[str, tuple[torch.Tensor, torch.Tensor, Codebook]] = {}
    for name in model.tensors():
        tensor = params.get(name)
        enc = model.encodings[name]
        if tensor is None or not tensor.is_floating_point() or name in frozen or isinstance(enc, (Int8, Cast)):
            continue
        if isinstance(enc, Codebook):
            flat = tensor.detach().reshape(-1).float()
            member = flat != 0 if enc.sparse else torch.ones_like(flat, dtype=torch.bool)
            centroids, assign = torch.unique(flat[member], return_inverse=True)
            index = torch.full_like(flat, -1, dtype=torch.long)
            index[member] = assign
            books[name] = (centroids.clone().requires_grad_(True), index, enc)
        elif isinstance(enc, Sparse):
            masks[name] = tensor.detach() != 0
        trained[name] = tensor
    return trained, masks, books


def _constrained_step(optimizer: Any, trained: dict[str, Any], masks: dict[str, Any],
                      books: dict[str, tuple[Any, Any, Codebook]], params: dict[str, Any]) -> None:
    """One optimizer step that keeps the compression: pruned entries get no gradient and stay zero, and a codebook
    tensor's gradient is summed into its centroids (each shared value moves as one)."""
    import torch

    with torch.no_grad():
        for name, mask in masks.items():
            if trained[name].grad is not None:
                trained[name].grad.mul_(mask)
        for name, (centroids, index, _) in books.items():
            grad = params[name].grad
            member = index >= 0
            centroids.grad = torch.zeros_like(centroids).index_add_(
                0, index[member], grad.reshape(-1)[member].float()) if grad is not None else None
            params[name].grad = None
    optimizer.step()
    with torch.no_grad():
        for name, mask in masks.items():
            trained[name].masked_fill_(~mask, 0.0)  # +0.0: a multiply would leave -0.0


def _materialise(books: dict[str, Any], params: dict[str, Any]) -> int:
    """Write each shared tensor from its centroids, rounded to the codebook dtype; returns the centroid count."""
    import torch

    total = 0
    with torch.no_grad():
        for name, (centroids, index, enc) in books.items():
            book = centroids.detach().to(getattr(torch, enc.codebook_dtype)).float()
            if enc.sparse:
                # A centroid rounded to zero would read back as pruned: keep it at the smallest normal magnitude.
                tiny = torch.finfo(getattr(torch, enc.codebook_dtype)).tiny
                book = torch.where(book == 0, torch.where(centroids.detach() < 0, -tiny, tiny), book)
            flat = torch.where(index >= 0, book[index.clamp_min(0)], torch.zeros((), dtype=book.dtype))
            params[name].copy_(flat.reshape(params[name].shape).to(params[name].dtype))
            total += int(torch.unique(book).numel())
    return total


def _first_float(out: Any) -> torch.Tensor:
    """The model's main output: a tensor, `logits`, `last_hidden_state`, or the first float tensor."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None) if not isinstance(out, dict) else out.get(key)
        if isinstance(value, torch.Tensor):
            return value
    items = out.values() if isinstance(out, dict) else out
    for value in items:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    raise UsageError(f"recover cannot find a float output in the model's {type(out).__name__}")


def _distill(student: torch.Tensor, teacher: torch.Tensor, attention: torch.Tensor | None, temperature: float
             ) -> torch.Tensor:
    import torch

    student, teacher = student.float(), teacher.float()
    if student.dim() == 2:  # logits: soft targets at a temperature (Hinton et al.), scaled back by T^2
        t = temperature
        return torch.nn.functional.kl_div((student / t).log_softmax(-1), (teacher / t).log_softmax(-1),
                                          log_target=True, reduction="batchmean") * t * t
    # Hidden states: squared error relative to the teacher's energy, over real tokens only.
    err = (student - teacher).pow(2).mean(-1)
    scale = teacher.pow(2).mean(-1)
    if attention is not None and attention.shape == err.shape:
        w = attention.to(err.dtype)
        return (err * w).sum() / (scale * w).sum().clamp_min(1e-12)
    return err.mean() / scale.mean().clamp_min(1e-12)


def training_batches(model: Model, spec: Any, ctx: Context) -> tuple[list[dict], list, str]:
    """The data ``spec`` (a DataSpec; unset: chosen from the model) as model-input batches, each with its labels
    (or None), and the data's name."""
    from pathlib import Path

    from ..data.datasets import build_fitting_data

    base = Path(ctx.base_dir) if ctx.base_dir is not None else Path.cwd()
    data = build_fitting_data(spec, artifact=model.files_dir or base, task=model.task, source=model.source,
                             example_inputs=model.example_inputs, base_dir=base)
    batches, labels, at = [], [], 0
    for batch in data.batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        n = next(iter(inputs.values())).shape[0]
        if "labels" in batch:
            labels.append(batch["labels"])
        elif data.labels is not None and data.pairs is None:
            labels.append(data.labels[at:at + n])
        else:
            labels.append(None)
        at += n
        batches.append(inputs)
    if not batches:
        raise UsageError(f"the training data ({data.name}) has no examples")
    return batches, labels, data.name
