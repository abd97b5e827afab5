"""4-bit AWQ and scale estimation on a streamed model: one decoder layer at a time.

A model streamed from its safetensors files (compressor/stream.py) holds no values when its passes run, and the
activation-driven methods need them, and the activations that reach each layer. As peers' sequential pipelines
do, the calibration windows go through the model one decoder layer at a time: the tensors before the first layer
(the embeddings) are read and the windows' inputs to the first layer caught there; then each layer is read from
the source, compressed by NNCF on its own with those inputs as its calibration data, run on them to give the next
layer's inputs, and released. Memory holds one layer (three copies: as read, NNCF's, and its compressed form) and
the calibration activations, whatever the depth.

The next layer's inputs are the outputs of the layer *as read*, not as compressed: NNCF's whole-model run collects
every statistic in one pass of the unquantized model, so each layer sees the very activations it would see there,
and its integers are the same (tests/test_stream.py compares the files). Mixed precision (``ratio`` < 1) ranks all
the layers' sensitivities together and does not stream; pass.stream_problem says so before anything is read.

Each layer's integers go to a file in the run's scratch directory (beside the artifact), from which the stream
writes them: memory does not grow with the layers done.
"""

from __future__ import annotations

import copy
import gc
import inspect
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..encodings import IntGroup
from ..errors import CompressorError, Problem, RecipeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..model import Model
    from .base import Context

__all__ = ["quantize_by_layer", "held_bytes", "WINDOW"]

WINDOW = 128  # tokens in a calibration window (compressor.passes.lowbit.calibration_windows)


class _Caught(Exception):
    """Raised by the hook on the first decoder layer once its inputs are recorded: nothing after it runs."""


def quantize_by_layer(model: Model, config: Any, chosen: dict[str, tuple[str, Any]], methods: list[str],
                      batches: list[dict[str, Any]], where: str, ctx: Context) -> tuple[dict[str, IntGroup], list[str]]:
    """NNCF's data-aware 4-bit compression of the streamed ``model``'s ``chosen`` weights on the calibration
    ``batches`` (the model's keyword arguments), decoder layer by decoder layer; gives each its encoding (integers read back from ``ctx.scratch`` when written). Returns (the encodings
    by weight name, the names of the tensors AWQ rescaled)."""
    import nncf
    from safetensors.torch import save_file

    from .nncf_weights import compress, integers_from_hooks, out_of_scope

    if ctx.read is None or ctx.scratch is None:
        raise CompressorError("a streamed model's values were not made readable to its passes; please report this bug")
    module = model.module
    stack, layers = _decoder_layers(module, where)
    outside = sorted(n for n in chosen if not n.startswith(stack + "."))
    if outside:
        raise RecipeError(Problem(f"streamed, method {'+'.join(methods)} compresses the Linear weights of the decoder "
                                  f"layers ({stack}.N) one layer at a time, and {', '.join(outside[:3])} "
                                  "are outside them", path=where,
                                  hint="exclude those modules, or run with --stream never where memory allows"))
    ctx.info(f"4-bit calibration on {len(batches)} windows of {batches[0]['input_ids'].shape[1]} tokens, one "
             f"decoder layer at a time ({len(layers)} layers)")
    inputs = _first_inputs(model, layers, batches, ctx.read)
    found: dict[str, IntGroup] = {}
    rescaled: list[str] = []
    start = time.perf_counter()
    for i, layer in enumerate(layers):
        prefix = f"{stack}.{i}."
        real = _materialised(layer, prefix, ctx.read)
        mine = {n[len(prefix):]: v for n, v in chosen.items() if n.startswith(prefix)}
        if mine:
            work = copy.deepcopy(real)
            ignored = out_of_scope(work, inputs[0], mine)
            compressed = compress(work, config, nncf.Dataset(inputs), methods, ignored, f"{where} (layer {i})", ctx)
            shapes = {n: list(real.get_parameter(n).shape) for n in mine}
            layer_found = integers_from_hooks(compressed, shapes)
            changed = _rescaled(real, compressed, layer_found)
            kept = [n for n in changed if n not in layer_found]
            if kept:
                raise RecipeError(Problem(f"AWQ rescaled {', '.join(prefix + n for n in kept)}, which stays in float; "
                                          "streamed, only 4-bit weights are written from the layer's results",
                                          path=where, hint="use method scale-estimation, or --stream never"))
            rescaled += [prefix + n for n in changed]
            file = Path(ctx.scratch) / f"layer-{i}.safetensors"
            save_file({n + suffix: part.contiguous() for n, enc in layer_found.items()
                       for suffix, part in enc.encode_parts().items()},
                      str(file))
            for n, enc in layer_found.items():
                planned = IntGroup(enc.shape, enc.bits, enc.group_size, enc.symmetric)
                found[prefix + n] = planned.computed_by(partial(_spilled, file, n, planned))
                model.encodings[prefix + n] = found[prefix + n]
            del work, compressed
        inputs = _next_inputs(real, inputs)
        del real
        gc.collect()  # NNCF's wrapped copy holds reference cycles (hooks on modules): a layer's worth each time
        ctx.info(f"layer {i + 1}/{len(layers)} done in {time.perf_counter() - start:.0f}s")
    return found, rescaled


def held_bytes(model: Model, windows: int) -> int:
    """What ``quantize_by_layer`` holds at its peak, from the meta model's shapes: the largest decoder layer three
    times (as read, NNCF's copy and its compressed state), the tensors before the layers that catching their
    inputs reads (the embeddings), and each window's hidden states in and out of a layer."""
    try:
        stack, layers = _decoder_layers(model.module, "")
    except RecipeError:
        return 0  # refused when the pass runs
    def nbytes(tensors: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    layer = max(nbytes(m.state_dict().values()) for m in layers)
    head = getattr(model.module, "get_output_embeddings", lambda: None)()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    before = nbytes(t for n, t in model.tensors().items() if not n.startswith(stack + ".") and id(t) not in head_ids)
    hidden = int(getattr(getattr(model.module, "config", None), "hidden_size", 0) or 0)
    return 3 * layer + before + 2 * windows * WINDOW * hidden * 4


def _decoder_layers(module: torch.nn.Module, where: str) -> tuple[str, torch.nn.ModuleList]:
    """(name, modules) of the causal LM's stack of decoder layers: the ModuleList holding most of its parameters."""
    import torch

    best, size = None, 0
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0:
            n = sum(p.numel() for p in m.parameters())
            if n > size:
                best, size = (name, m), n
    total = sum(p.numel() for p in module.parameters())
    if best is None or size < total / 2:
        raise RecipeError(Problem("streamed, data-aware 4-bit methods run a model one decoder layer at a time, and "
                                  "this model has no stack of layers holding most of its weights", path=where,
                                  hint="use method rtn, or --stream never where memory allows"))
    return best


def _first_inputs(model: Model, layers: torch.nn.ModuleList, batches: list[dict[str, Any]], read: Any
                  ) -> list[dict[str, Any]]:
    """The keyword arguments each calibration window gives the first decoder layer, caught by running the model
    with the values of every tensor outside the layers and the output head (the embeddings, the final norm) read
    in, then put back on the meta device."""
    import torch

    module = model.module
    head = getattr(module, "get_output_embeddings", lambda: None)()
    skip = {id(m) for m in layers.modules()} | ({id(m) for m in head.modules()} if head is not None else set())
    names = {id(t): n for n, t in module.state_dict(keep_vars=True).items()}
    swapped: list[tuple[Any, str, str, Any]] = []  # (module, "_parameters"/"_buffers", key, the meta tensor)
    caught: list[dict[str, Any]] = []

    def catch(layer: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = inspect.signature(layer.forward).bind(*args, **kwargs)
        arguments = dict(bound.arguments)  # by name: NNCF calls the layer with a dict as keyword arguments
        arguments.update(arguments.pop("kwargs", {}) or {})
        # NNCF's whole-model run gives each forward a fresh cache, filled by that very call: a layer's attention
        # sees its own window's keys alone, which is what no cache gives a layer run on its own.
        for key in ("past_key_values", "past_key_value"):
            if key in arguments:
                arguments[key] = None
        if "use_cache" in arguments:
            arguments["use_cache"] = False
        caught.append(arguments)
        raise _Caught

    hook = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for owner in module.modules():
            if id(owner) in skip:
                continue
            for kind in ("_parameters", "_buffers"):
                for key, t in getattr(owner, kind).items():
                    if t is None or not t.is_meta or id(t) not in names:
                        continue
                    value = read(names[id(t)])
                    swapped.append((owner, kind, key, t))
                    getattr(owner, kind)[key] = torch.nn.Parameter(value, requires_grad=False) \
                        if kind == "_parameters" else value
        with torch.no_grad():
            for batch in batches:
                try:
                    module(**batch)
                except _Caught:
                    continue
                raise CompressorError("the model ran to its end without reaching its first decoder layer; "
                                      "please report this bug")
    finally:
        hook.remove()
        for owner, kind, key, t in swapped:
            getattr(owner, kind)[key] = t
    return caught


def _materialised(layer: torch.nn.Module, prefix: str, read: Any) -> torch.nn.Module:
    """A copy of the meta ``layer`` holding its values (each read as the passes so far left it)."""
    import torch

    real = copy.deepcopy(layer)
    for sub_name, sub in real.named_modules():
        for kind in ("_parameters", "_buffers"):
            for key, t in list(getattr(sub, kind).items()):
                if t is None or not t.is_meta:
                    continue
                if kind == "_buffers" and key in sub._non_persistent_buffers_set:
                    raise CompressorError(f"{prefix}{sub_name}: buffer {key} is computed by its module's constructor "
                                          "and was not built; please report this bug")
                value = read(prefix + (f"{sub_name}." if sub_name else "") + key)
                getattr(sub, kind)[key] = torch.nn.Parameter(value, requires_grad=False) \
                    if kind == "_parameters" else value
    return real.eval()


def _rescaled(real: torch.nn.Module, compressed: torch.nn.Module, found: dict[str, IntGroup]) -> list[str]:
    """The float tensors NNCF changed (AWQ folds its scales into a preceding layer), by name within the layer."""
    import torch

    mine = real.state_dict()
    return sorted(n for n, t in compressed.state_dict().items()
                  if n in mine and torch.is_floating_point(t) and n not in found and not torch.equal(mine[n], t))


def _next_inputs(real: torch.nn.Module, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each window's inputs to the next layer: ``real``'s outputs (the layer as read), the other arguments kept."""
    import torch

    out = []
    with torch.no_grad():
        for kwargs in inputs:
            result = real(**kwargs)
            hidden = result[0] if isinstance(result, (tuple, list)) else result
            out.append(dict(kwargs, **{next(iter(kwargs)): hidden}))  # the first argument: the hidden states
    return out


def _spilled(file: Path, name: str, planned: IntGroup, value: torch.Tensor) -> IntGroup:
    """The integers NNCF gave weight ``name`` of a layer, read back from its scratch ``file`` (``value``, the weight
    as read, does not enter: AWQ may have rescaled it)."""
    from safetensors import safe_open

    out = IntGroup(planned.shape, planned.bits, planned.group_size, planned.symmetric)
    with safe_open(str(file), "pt") as f:
        return out.with_stored({suffix: f.get_tensor(name + suffix) for suffix in out.stored_suffixes()})
