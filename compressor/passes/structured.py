"""Structured pruning: find groups of units (hidden neurons, conv channels, attention heads) between the layers
that produce them and the layer that consumes them, and remove the least important units, shrinking the
producers' output rows and the consumer's input columns, so the model is smaller and faster in any runtime.

Groups come from the architecture:
- Hugging Face BERT family: FFN neurons ``<layer>.intermediate.dense -> <layer>.output.dense`` and attention
  heads (``<layer>.attention``: query/key/value rows -> ``attention.output.dense`` columns, removed with the
  model's own ``prune_heads``);
- Llama family: ``<mlp>.gate_proj`` and ``<mlp>.up_proj -> <mlp>.down_proj``;
- any other module that torch.fx can trace: a Linear or Conv whose output reaches exactly one Linear or Conv
  through element-wise and per-channel ops only (activations, dropout, pooling, batch norm, which is shrunk with
  the channels, and ``flatten(1)``, after which each channel feeds a block of the consumer's columns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = ["NeuronGroup", "InputStats", "neuron_groups", "head_groups", "shrink_group", "prune_head_group",
           "neuron_importance", "consumer_input_stats", "reconstruct_consumer", "resize_module", "module_sizes"]

_ELEMENTWISE_MODULES = {"ReLU", "GELU", "SiLU", "Tanh", "Sigmoid", "Dropout", "Identity", "LeakyReLU", "Mish",
                        "Hardswish", "ELU", "ReLU6"}
_ELEMENTWISE_FUNCTIONS = {"relu", "gelu", "silu", "tanh", "sigmoid", "dropout", "leaky_relu", "mish", "hardswish",
                          "elu", "relu6"}
# Per channel over positions: transparent after a conv (never after a Linear, where they would mix features).
_POOLING = {"MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d",
            "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool2d", "Dropout2d", "max_pool1d", "max_pool2d",
            "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
            "adaptive_avg_pool3d", "adaptive_max_pool2d", "dropout2d"}
_SIZE_ATTRIBUTES = {"Linear": ("in_features", "out_features"), "Conv": ("in_channels", "out_channels"),
                    "BatchNorm": ("num_features",)}


@dataclass
class NeuronGroup:
    """Units (neurons, channels or heads) produced by the output rows of ``producers`` and consumed by the input
    columns of ``consumer``.

    Each unit owns ``len(rows) / width`` consecutive output rows of every producer (a head: its head-size rows of
    query, key and value) and ``span`` consecutive input columns of the consumer (a head: head-size columns; a
    conv channel before ``flatten(1)``: its H*W columns). ``followers`` are per-channel modules in between (batch
    norm) sliced with the units. ``attention`` names the attention module of a head group."""

    producers: list[str]
    consumer: str
    width: int
    span: int = 1
    followers: list[str] = field(default_factory=list)
    attention: str | None = None

    @property
    def members(self) -> list[str]:
        """Every module whose shape the group's pruning changes."""
        return [*self.producers, *self.followers, self.consumer]


def neuron_groups(module: nn.Module) -> list[NeuronGroup]:
    """The prunable neuron and channel groups of ``module``; empty when none can be found."""
    from torch import nn

    named = dict(module.named_modules())

    def linear(name: str) -> nn.Linear | None:
        m = named.get(name)
        return m if isinstance(m, nn.Linear) else None

    groups: list[NeuronGroup] = []
    for name, m in named.items():
        if isinstance(m, nn.Linear) and name.endswith("intermediate.dense"):
            consumer = name[: -len("intermediate.dense")] + "output.dense"
            c = linear(consumer)
            if c is not None and c.in_features == m.out_features:
                groups.append(NeuronGroup([name], consumer, m.out_features))
        if isinstance(m, nn.Linear) and name.endswith("gate_proj"):
            stem = name[: -len("gate_proj")]
            up, down = linear(stem + "up_proj"), linear(stem + "down_proj")
            if up is not None and down is not None and up.out_features == m.out_features == down.in_features:
                groups.append(NeuronGroup([name, stem + "up_proj"], stem + "down_proj", m.out_features))
    if groups:
        return groups
    return _traced_groups(module)


def head_groups(module: nn.Module) -> list[NeuronGroup]:
    """The attention-head groups of a BERT-family model: attention modules with the model's own ``prune_heads``
    (query/key/value -> output.dense); empty for other models."""
    from torch import nn

    groups = []
    for name, m in module.named_modules():
        inner, out = getattr(m, "self", None), getattr(getattr(m, "output", None), "dense", None)
        if not (callable(getattr(m, "prune_heads", None)) and isinstance(out, nn.Linear)
                and isinstance(getattr(inner, "num_attention_heads", None), int)
                and all(isinstance(getattr(inner, p, None), nn.Linear) for p in ("query", "key", "value"))):
            continue
        heads, size = inner.num_attention_heads, inner.attention_head_size
        if out.in_features != heads * size:
            continue
        stem = f"{name}." if name else ""
        groups.append(NeuronGroup([f"{stem}self.query", f"{stem}self.key", f"{stem}self.value"],
                                  f"{stem}output.dense", heads, span=size, attention=name))
    return groups


def _kind(m: nn.Module) -> str | None:
    from torch import nn

    if isinstance(m, nn.Linear):
        return "Linear"
    if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.groups == 1:
        return "Conv"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "BatchNorm"
    return None


def _traced_groups(module: nn.Module) -> list[NeuronGroup]:
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - untraceable (data-dependent control flow): no groups, the caller says so
        return []
    named = dict(module.named_modules())

    def kind(node: torch.fx.Node) -> str | None:
        return _kind(named[str(node.target)]) if node.op == "call_module" else None

    def passes_through(node: torch.fx.Node, channels: bool) -> bool:
        """Element-wise ops, and per-channel pooling while ``channels`` (a conv's output, not yet flattened)."""
        if node.op == "call_module":
            name = type(named.get(str(node.target))).__name__
            return name in _ELEMENTWISE_MODULES or (channels and name in _POOLING)
        if node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target))
            return name in _ELEMENTWISE_FUNCTIONS or (channels and name in _POOLING)
        return False

    def flattens_channels(node: torch.fx.Node) -> bool:
        """``flatten(x, 1)``: channel-major, so each channel becomes a block of consecutive features."""
        if node.op not in ("call_function", "call_method") or getattr(node.target, "__name__", node.target) != \
                "flatten":
            return False
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1

    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    groups = []
    for node in graph.nodes:
        if kind(node) not in ("Linear", "Conv"):
            continue
        producer = named[str(node.target)]
        width = producer.out_features if kind(node) == "Linear" else producer.out_channels
        current, followers, flat = node, [], False
        while len(current.users) == 1:
            (user,) = current.users
            if not user.args or user.args[0] is not current:
                break
            user_kind = kind(user)
            if user_kind in ("Linear", "Conv"):
                consumer = named[str(user.target)]
                fan_in = consumer.in_features if user_kind == "Linear" else consumer.in_channels
                if (user_kind == "Conv") != (kind(node) == "Conv" and not flat):
                    break  # a conv consumes channels only from a conv, unflattened; a Linear after a conv needs
                    # flatten(1), else it would act on positions
                span = fan_in // width if flat else 1
                if fan_in == width * span and (span == 1 or kind(node) == "Conv"):
                    groups.append(NeuronGroup([str(node.target)], str(user.target), width, span, followers))
                break
            if user_kind == "BatchNorm" and not flat and named[str(user.target)].num_features == width:
                followers = [*followers, str(user.target)]
            elif flattens_channels(user) and kind(node) == "Conv" and not flat:
                flat = True
            elif not passes_through(user, kind(node) == "Conv" and not flat):
                break
            current = user
    # A module called at more than one place (weights shared across calls) has inputs from several producers or
    # outputs to several consumers: shrinking it for one group would break the others, so it is left alone.
    return [g for g in groups if all(calls.get(m, 0) == 1 for m in g.members)]


def _unit_sums(values: torch.Tensor, width: int) -> torch.Tensor:
    """Per-unit sums of per-row (or per-column) values: each unit owns ``len(values) / width`` consecutive ones."""
    return values.reshape(width, -1).sum(dim=1)


def _power_by_column(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of squares of ``weight`` over every dimension but ``dim``."""
    w = weight.detach().float().pow(2)
    return w.transpose(0, dim).reshape(w.shape[dim], -1).sum(dim=1)


def neuron_importance(module: nn.Module, group: NeuronGroup, activations: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each unit: what removing it would take from the consumer's output, estimated from the
    consumer columns' L2 norms times the unit's RMS activation on data (``activations``: mean square of each
    consumer input column), or, without data, times the L2 norm of its producer rows."""
    named = dict(module.named_modules())
    cols = _power_by_column(named[group.consumer].weight, 1)
    if activations is not None:
        return _unit_sums(activations.float() * cols, group.width).sqrt()
    rows = sum(_unit_sums(_power_by_column(named[p].weight, 0), group.width) for p in group.producers)
    return (rows * _unit_sums(cols, group.width)).sqrt()


@dataclass
class InputStats:
    """What a consumer saw on calibration data: the mean square of each input column, and, for a Linear consumer
    when asked, the Gram matrix of its inputs with a constant column appended (float64, summed over rows)."""

    power: torch.Tensor
    gram: torch.Tensor | None = None


def consumer_input_stats(module: nn.Module, groups: list[NeuronGroup], batches: list[dict[str, torch.Tensor]],
                         gram: bool = False) -> dict[str, InputStats]:
    """Input statistics of each group's consumer over ``batches`` (a conv consumer: per input channel, over every
    position), by consumer name; real tokens only when the batch has an attention mask. ``gram`` also collects
    Gram matrices for Linear consumers (what `reconstruct_consumer` needs)."""
    import torch
    from torch import nn

    named = dict(module.named_modules())
    sums: dict[str, torch.Tensor] = {}
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str):  # noqa: ANN202 - a forward pre-hook
        def record(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            if _kind(mod) == "Conv":
                x = x.movedim(1, -1)
            x = x.reshape(-1, x.shape[-1])
            m = mask[0]
            if m is not None and m.numel() == x.shape[0]:
                x = x[m.reshape(-1).bool()]
            sums[name] = sums.get(name, 0) + x.pow(2).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
            if gram and _kind(mod) == "Linear":
                xd = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
                grams[name] = grams.get(name, 0) + xd.T @ xd
        return record

    handles = [named[g.consumer].register_forward_pre_hook(hook(g.consumer)) for g in groups]
    try:
        with torch.no_grad():
            for batch in batches:
                mask[0] = batch.get("attention_mask")
                module(**batch)
    finally:
        for h in handles:
            h.remove()
    return {n: InputStats(sums[n] / max(counts[n], 1), grams.get(n)) for n in sums}


RECONSTRUCT_DAMPING = 0.01  # of the mean diagonal: keeps the solve well posed; 0.01-1 measured alike on MiniLM


def reconstruct_consumer(layer: nn.Linear, keep: torch.Tensor, drop: torch.Tensor, gram: torch.Tensor) -> None:
    """Refit a Linear consumer's kept input columns (and bias) so that, on the data ``gram`` was measured on, it
    reproduces the output it gave with every column: the least-squares fit of the dropped columns' contribution
    from the kept ones and a constant, ``W_K += W_D G_DK G_KK^-1``, in place (before the columns are removed)."""
    import torch

    n = gram.shape[0] - 1
    basis = torch.cat([keep, torch.tensor([n])]) if layer.bias is not None else keep
    g_kk = gram[basis][:, basis]
    g_kk = g_kk + RECONSTRUCT_DAMPING * g_kk.diagonal().mean() * torch.eye(len(basis), dtype=gram.dtype)
    weight = layer.weight.detach()
    correction = weight[:, drop].double() @ torch.linalg.solve(g_kk, gram[drop][:, basis].T).T
    with torch.no_grad():
        weight[:, keep] += correction[:, : len(keep)].to(weight.dtype)
        if layer.bias is not None:
            layer.bias += correction[:, -1].to(layer.bias.dtype)


def module_sizes(layer: nn.Module) -> dict[str, int]:
    """The size attributes of a Linear, Conv or BatchNorm (what the loader sets when it rebuilds it)."""
    kind = _kind(layer)
    if kind is None:
        raise TypeError(f"{type(layer).__name__} is not a Linear, Conv or BatchNorm")
    return {a: int(getattr(layer, a)) for a in _SIZE_ATTRIBUTES[kind]}


def resize_module(layer: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep only ``rows`` (output features or channels; a batch norm's features) and/or ``cols`` (input features
    or channels) of a Linear, Conv or BatchNorm, in place."""
    from torch import nn

    kind = _kind(layer)
    if kind is None:
        raise TypeError(f"cannot resize a {type(layer).__name__}")
    if kind == "BatchNorm":
        assert cols is None and rows is not None
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(layer, name)
            if t is None:
                continue
            if isinstance(t, nn.Parameter):
                setattr(layer, name, nn.Parameter(t.detach()[rows].clone(), requires_grad=t.requires_grad))
            else:
                setattr(layer, name, t[rows].clone())
        layer.num_features = int(rows.numel())
        return
    out_attr, in_attr = ("out_features", "in_features") if kind == "Linear" else ("out_channels", "in_channels")
    weight = layer.weight.detach()
    if rows is not None:
        weight = weight[rows]
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach()[rows].clone(), requires_grad=layer.bias.requires_grad)
        setattr(layer, out_attr, int(rows.numel()))
    if cols is not None:
        weight = weight[:, cols]
        setattr(layer, in_attr, int(cols.numel()))
    layer.weight = nn.Parameter(weight.clone().contiguous(), requires_grad=layer.weight.requires_grad)


def _expand(keep: torch.Tensor, block: int) -> torch.Tensor:
    """Indices of the ``block`` consecutive rows or columns owned by each kept unit."""
    import torch

    return (keep[:, None] * block + torch.arange(block)).reshape(-1)


def _least_important(module: nn.Module, group: NeuronGroup, remove: int, activations: torch.Tensor | None
                     ) -> torch.Tensor:
    import torch

    importance = neuron_importance(module, group, activations)
    order = torch.argsort(importance, descending=True, stable=True)
    return order[group.width - remove:].sort().values


def _split(module: nn.Module, group: NeuronGroup, remove: int, stats: InputStats | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, removed) unit indices, sorted; with a Gram matrix, the consumer is refitted on the kept columns."""
    import torch

    drop = _least_important(module, group, remove, stats.power if stats is not None else None)
    dropped = set(drop.tolist())
    keep = torch.tensor([i for i in range(group.width) if i not in dropped], dtype=torch.long)
    if stats is not None and stats.gram is not None and remove:
        consumer = module.get_submodule(group.consumer)
        reconstruct_consumer(consumer, _expand(keep, group.span), _expand(drop, group.span), stats.gram)
    return keep, drop


def shrink_group(module: nn.Module, group: NeuronGroup, remove: int, stats: InputStats | None = None
                 ) -> torch.Tensor:
    """Remove the ``remove`` least important units of a neuron or channel group (ranked with ``stats`` when given,
    else by magnitude; the consumer refitted when ``stats`` has a Gram matrix); returns the kept unit indices."""
    keep, _ = _split(module, group, remove, stats)
    named = dict(module.named_modules())
    for p in group.producers:
        resize_module(named[p], rows=_expand(keep, named[p].weight.shape[0] // group.width))
    for f in group.followers:
        resize_module(named[f], rows=keep)
    resize_module(named[group.consumer], cols=_expand(keep, group.span))
    return keep


def prune_head_group(module: nn.Module, group: NeuronGroup, remove: int, stats: InputStats | None = None
                     ) -> list[int]:
    """Remove the ``remove`` least important heads of a head group (as `shrink_group` ranks and refits) with the
    attention module's own ``prune_heads``; returns every head removed from it so far, as indices into the
    original heads (what ``prune_heads`` takes to rebuild the pruned model)."""
    attention = module.get_submodule(group.attention or "")
    if not remove:
        return sorted(attention.pruned_heads)
    current = _split(module, group, remove, stats)[1].tolist()
    # prune_heads takes indices of the original heads; earlier pruning may have removed some already.
    original = sorted(set(range(group.width + len(attention.pruned_heads))) - set(attention.pruned_heads))
    attention.prune_heads({original[i] for i in current})
    return sorted(int(h) for h in attention.pruned_heads)
