"""Structured pruning: find the hidden neurons between two linear layers and remove the least important ones,
shrinking the producer's rows and the consumer's columns, so the model is smaller and faster in any runtime.

Groups (producers -> consumer) come from the architecture:
- Hugging Face BERT family: ``<layer>.intermediate.dense -> <layer>.output.dense``;
- Llama family: ``<mlp>.gate_proj`` and ``<mlp>.up_proj -> <mlp>.down_proj``;
- any other module that torch.fx can trace: a Linear whose output reaches exactly one Linear through element-wise
  ops only (activations, dropout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = ["NeuronGroup", "neuron_groups", "shrink_group", "neuron_importance", "consumer_input_power",
           "resize_linear"]

_ELEMENTWISE_MODULES = ("ReLU", "GELU", "SiLU", "Tanh", "Sigmoid", "Dropout", "Identity", "LeakyReLU", "Mish",
                        "Hardswish", "ELU", "ReLU6")
_ELEMENTWISE_FUNCTIONS = {"relu", "gelu", "silu", "tanh", "sigmoid", "dropout", "leaky_relu", "mish", "hardswish",
                          "elu", "relu6"}


@dataclass
class NeuronGroup:
    """Hidden neurons shared by the rows of ``producers`` and the columns of ``consumer``."""

    producers: list[str]
    consumer: str
    width: int


def neuron_groups(module: nn.Module) -> list[NeuronGroup]:
    """The prunable neuron groups of ``module``; empty when none can be found."""
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


def _traced_groups(module: nn.Module) -> list[NeuronGroup]:
    import torch.fx
    from torch import nn

    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - untraceable (data-dependent control flow): no groups, the caller says so
        return []
    named = dict(module.named_modules())

    def is_linear(node: torch.fx.Node) -> bool:
        return node.op == "call_module" and isinstance(named.get(str(node.target)), nn.Linear)

    def elementwise(node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            return type(named.get(str(node.target))).__name__ in _ELEMENTWISE_MODULES
        if node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target))
            return name in _ELEMENTWISE_FUNCTIONS and len(node.args) >= 1
        return False

    groups = []
    for node in graph.nodes:
        if not is_linear(node):
            continue
        current = node
        while len(current.users) == 1:
            (user,) = current.users
            if is_linear(user) and user.args and user.args[0] is current:
                producer, consumer = named[str(node.target)], named[str(user.target)]
                if consumer.in_features == producer.out_features:
                    groups.append(NeuronGroup([str(node.target)], str(user.target), producer.out_features))
                break
            if not elementwise(user) or user.args[0] is not current:
                break
            current = user
    return groups


def neuron_importance(module: nn.Module, group: NeuronGroup, activations: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each neuron: what removing it would take from the consumer's output, estimated as the
    consumer column's L2 norm times the neuron's RMS activation on data (``activations``: mean square per
    neuron at the consumer's input), or, without data, times the L2 norm of its producer rows."""
    named = dict(module.named_modules())
    cols = named[group.consumer].weight.detach().float().pow(2).sum(dim=0)
    if activations is not None:
        return (activations.float() * cols).sqrt()
    rows = sum(named[p].weight.detach().float().pow(2).sum(dim=1) for p in group.producers)
    return (rows * cols).sqrt()


def consumer_input_power(module: nn.Module, groups: list[NeuronGroup], batches: list[dict[str, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
    """Mean square of each consumer's input features over ``batches`` (by consumer name); real tokens only when
    the batch has an attention mask."""
    import torch

    named = dict(module.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str):  # noqa: ANN202 - a forward pre-hook
        def record(_mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            m = mask[0]
            if m is not None and m.numel() == x.shape[0]:
                x = x[m.reshape(-1).bool()]
            sums[name] = sums.get(name, 0) + x.pow(2).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
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
    return {n: sums[n] / max(counts[n], 1) for n in sums}


def resize_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep only ``rows`` (output features) and/or ``cols`` (input features) of ``layer``, in place."""
    from torch import nn

    weight = layer.weight.detach()
    if rows is not None:
        weight = weight[rows]
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach()[rows].clone(), requires_grad=layer.bias.requires_grad)
        layer.out_features = int(rows.numel())
    if cols is not None:
        weight = weight[:, cols]
        layer.in_features = int(cols.numel())
    layer.weight = nn.Parameter(weight.clone().contiguous(), requires_grad=layer.weight.requires_grad)


def shrink_group(module: nn.Module, group: NeuronGroup, remove: int, activations: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Remove the ``remove`` least important neurons of ``group``; returns the kept neuron indices (sorted)."""
    import torch

    importance = neuron_importance(module, group, activations)
    order = torch.argsort(importance, descending=True, stable=True)
    keep = order[: group.width - remove].sort().values
    named = dict(module.named_modules())
    for p in group.producers:
        resize_linear(named[p], rows=keep)
    resize_linear(named[group.consumer], cols=keep)
    return keep
