"""4-bit AWQ and scale estimation on a streamed model: one decoder layer at a time.

A model streamed from its safetensors files (compressor/stream.py) holds no values when its passes run, and the
activation-driven methods need them, and the activations that reach each layer. As peers' sequential pipelines
do, the calibration windows go through the model one decoder layer at a time: the tensors before the layers (the
embeddings, the final norm) are read and the arguments the model gives each layer caught, every layer standing in
as the identity; then each layer is read from the source, compressed by NNCF on its own with its arguments and the
current hidden states as its calibration data, its outputs on them become the next layer's hidden states, and it
is released. Memory holds one layer (three copies: as read, NNCF's, and its compressed form) and the calibration
activations, whatever the depth.

The next layer's inputs are the outputs of the layer *as read*, not as compressed: NNCF's whole-model run collects
every statistic in one pass of the unquantized model, so each layer sees the very activations it would see there,
and its integers are the same (tests/test_stream.py compares the files). NNCF's statistics pass runs the unchanged
layer on every window, so its outputs are taken from there rather than computed twice.

Mixed precision (``ratio`` < 1) ranks the sensitivities of all the layers' weights together. The layers then run
twice: the first time NNCF's statistics and its criterion score each layer's weights (and stop there), the scores
are ranked as NNCF ranks them, and the second time NNCF compresses each layer with the precision that ranking gave
each weight in place of its own decision (compressor/passes/nncf_weights.py). Everything else NNCF does works
weight by weight, so the integers are again the whole run's.

Each layer's integers go to a file in the run's scratch directory (beside the artifact), from which the stream
writes them: memory does not grow with the layers done. Under torchrun every process runs the calibration forward
through every layer and compresses the layers that fall to it in turn (layer i: process i mod their number): each
layer's compression needs only its own inputs, the uncompressed layers' outputs, which each process computes.
"""

from __future__ import annotations

import copy
import gc
import inspect
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..encodings import IntGroup
from ..errors import CompressorError, Problem, RecipeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..model import Model
    from .base import Context

__all__ = ["quantize_by_layer", "held_bytes"]


_UNREACHED = ("NNCF compressed a decoder layer without reaching its mixed-precision step, which streamed ratio < 1 "
              "replaces (this NNCF version works otherwise than the one compressor was built on); run with --stream "
              "never where memory allows, or use ratio 1")


class _Caught(Exception):
    """Raised by the last decoder layer's stand-in once its arguments are recorded: nothing after it runs."""


def quantize_by_layer(model: Model, config: Any, chosen: dict[str, tuple[str, Any]], methods: list[str],
                      batches: list[dict[str, Any]], where: str, ctx: Context) -> dict[str, IntGroup]:
    """NNCF's data-aware 4-bit compression of the streamed ``model``'s ``chosen`` weights on the calibration
    ``batches`` (the model's keyword arguments), decoder layer by decoder layer. Gives each weight its encoding,
    whose integers are read back from rank 0's ``ctx.scratch`` when the stream writes it; returns those encodings
    by name. Under torchrun every rank runs every layer's calibration forward and compresses the layers that fall
    to it in turn (layer i: rank i mod the processes); the ranks then exchange what they found."""
    if ctx.read is None:
        raise CompressorError("a streamed model's values were not made readable to its passes; please report this bug")
    stack, layers = _decoder_layers(model.module, where)
    outside = sorted(n for n in chosen if not n.startswith(stack + "."))
    if outside:
        raise RecipeError(Problem(f"streamed, method {'+'.join(methods)} compresses the Linear weights of the decoder "
                                  f"layers ({stack}.N) one layer at a time, and {', '.join(outside[:3])} "
                                  "are outside them", path=where,
                                  hint="exclude those modules, or run with --stream never where memory allows"))
    group = ctx.group
    rank, world = (group.rank, group.world) if group is not None else (0, 1)
    scratch = group.share(ctx.scratch) if group is not None and world > 1 else ctx.scratch  # rank 0's, shared
    if scratch is None:
        raise CompressorError("a streamed run has no scratch directory for its layers' integers; "
                              "please report this bug")
    ctx.info(f"4-bit calibration on {len(batches)} windows of {batches[0]['input_ids'].shape[1]} tokens, one "
             f"decoder layer at a time ({len(layers)} layers"
             + (f", compressed by {world} processes in turn)" if world > 1 else ")"))
    plans = _by_layer(model, config, chosen, methods, batches, stack, layers, where, ctx, Path(scratch),
                      partial(_together, group), lambda i: i % world == rank)
    found: dict[str, IntGroup] = {}
    for name, (form, file) in plans.items():
        planned = IntGroup(form["shape"], form["bits"], form["group_size"], form["symmetric"])
        found[name] = planned.computed_by(partial(_spilled, Path(file), name, planned))
        model.encodings[name] = found[name]
    return found


def _by_layer(model: Model, config: Any, chosen: dict[str, tuple[str, Any]], methods: list[str],
              batches: list[dict[str, Any]], stack: str, layers: torch.nn.ModuleList, where: str, ctx: Context,
              scratch: Path, together: Callable[[Callable[[], Any]], list[Any]], owns: Callable[[int], bool]
              ) -> dict[str, tuple[dict[str, Any], str]]:
    """Run the layers and write the integers of each one this process ``owns`` to ``scratch``; {weight name: (its
    IntGroup's form, the file holding its parts)} of every layer, from every process (``together`` runs a walk
    over the layers on each and gathers what each found). With ``ratio`` < 1 the layers run twice: first for every
    weight's sensitivity (NNCF's criterion on its statistics), ranked across the model as NNCF's whole run ranks
    them, then to compress each layer with the precisions that ranking gave its weights."""
    import nncf
    from safetensors.torch import save_file

    from .nncf_weights import Decided, compress, forced, integers_from_hooks, primary_by_sensitivity, sensitivities

    inputs = _layer_inputs(model, layers, batches, ctx.read, where)
    firsts = [_first_argument(layer) for layer in layers]  # each layer's hidden-states argument
    # Each window's input to the first layer, in a box the walk empties (kept for a second walk only): the stand-ins
    # passed it on, so only the box holds it now.
    start = [[kwargs[0][firsts[0]] for kwargs in inputs]]
    for window in inputs:
        for first, kwargs in zip(firsts, window):
            kwargs.pop(first, None)
    walk = partial(_walk, model, chosen, stack, layers, inputs, start, firsts, owns, where, ctx)

    primary: set[str] | None = None
    if config.ratio < 1:
        scores: dict[int, list[tuple[str, float, int]]] = {}

        def score(i: int, prefix: str, real: Any, work: Any, data: list[dict[str, Any]], ignored: list[str]) -> None:
            found: list[tuple[str, float, int]] = []
            try:  # the statistics alone: NNCF stops once its criterion has scored the layer's weights
                compress(work, config, nncf.Dataset(data), ["rtn"], ignored, where, ctx, bars=False,
                         decide=partial(sensitivities, found))
            except Decided:
                scores[i] = [(prefix + name, value, size) for name, value, size in found]
            else:
                raise CompressorError(_UNREACHED)

        everyone = together(lambda: walk(score, "sensitivities of layer", "scored by another process", keep=True)
                            or scores)
        ranked = [s for i, s in sorted((i, s) for part in everyone for i, s in part.items())]
        primary = primary_by_sensitivity([one for layer in ranked for one in layer], config.ratio)
        ctx.info(f"mixed precision: {len(primary)} of {sum(map(len, ranked))} weights at 4 bits, the rest at NNCF's "
                 "backup precision (int8 per channel)")

    plans: dict[str, tuple[dict[str, Any], str]] = {}

    def quantize(i: int, prefix: str, real: Any, work: Any, data: list[dict[str, Any]], ignored: list[str]) -> None:
        mine = {n[len(prefix):] for n in chosen if n.startswith(prefix)}
        done: list[bool] = []
        decide = None if primary is None else partial(forced, {n[len(prefix):] for n in primary
                                                               if n.startswith(prefix)}, done)
        # Its progress bars, four a layer, would bury the layers' own progress lines.
        compressed = compress(work, config, nncf.Dataset(data), methods, ignored, where, ctx, bars=False,
                              decide=decide, given=decide is not None)
        if decide is not None and not done:
            raise CompressorError(_UNREACHED)
        layer_found = integers_from_hooks(compressed, {n: list(real.get_parameter(n).shape) for n in mine})
        changed = _rescaled(real, compressed, layer_found)
        if changed:  # AWQ folded its scales into a tensor that is not one of the layer's 4-bit weights
            raise RecipeError(Problem(
                f"AWQ rescaled {', '.join(prefix + n for n in changed)}, which stays in float; streamed, only "
                "a layer's 4-bit weights are written from its results", path=where,
                hint="use method scale-estimation, or --stream never where memory allows"))
        file = scratch / f"layer-{i}.safetensors"
        save_file({prefix + n + suffix: part.contiguous() for n, enc in layer_found.items()
                   for suffix, part in enc.encode_parts().items()}, str(file))
        for n, enc in layer_found.items():
            plans[prefix + n] = (enc.to_json(), str(file))

    return {k: v for part in together(lambda: walk(quantize, "layer", "compressed by another process") or plans)
            for k, v in part.items()}


def _together(group: Any, work: Callable[[], Any]) -> list[Any]:
    """``work()`` on this process and what it returned on each (rank order); one process: its own alone. When any
    process fails, every one raises (its own error, or one naming the process that failed, whose error that
    process reports), rather than leaving the others waiting for it."""
    if group is None or group.world == 1:
        return [work()]
    error: Exception | None = None
    try:
        mine = work()
    except Exception as exc:  # noqa: BLE001 - raised again below, once the other processes know
        mine, error = None, exc
    everyone = group.gather(None if error is not None else (mine,))
    if error is not None:
        raise error
    failed = [rank for rank, got in enumerate(everyone) if got is None]
    if failed:
        raise CompressorError(f"process {failed[0]} failed while compressing the decoder layers (its error is above)")
    return [got[0] for got in everyone]


def _walk(model: Model, chosen: dict[str, tuple[str, Any]], stack: str, layers: torch.nn.ModuleList,
          inputs: list[list[dict[str, Any]]], start: list[list[Any]], firsts: list[str], owns: Callable[[int], bool],
          where: str, ctx: Context, work_on: Any, label: str, elsewhere: str, keep: bool = False) -> None:
    """Read each decoder layer in turn and call ``work_on(index, prefix, layer as read, a copy for NNCF, its calibration
    data, NNCF's names of the operations out of scope)`` where it has weights in ``chosen``; the layer's outputs
    (taken from NNCF's statistics pass where it ran the copy unchanged) are the next layer's inputs. A layer this
    process does not ``own`` is only run (``elsewhere`` says what another does with it). The first layer's inputs
    come from the box ``start``, emptied unless ``keep`` (a second walk follows). One progress line a layer,
    ``label`` leading it."""
    from .nncf_weights import out_of_scope

    hidden = start[0] if keep else start.pop()
    began = time.perf_counter()
    for i, layer in enumerate(layers):
        prefix = f"{stack}.{i}."
        step = "reading"
        try:
            real = _materialised(layer, prefix, ctx.read, model.aliases)
            first = firsts[i]
            data = [dict(kwargs[i], **{first: h}) for kwargs, h in zip(inputs, hidden)]
            mine = {n[len(prefix):]: v for n, v in chosen.items() if n.startswith(prefix)}
            seen: dict[int, Any] = {}
            if mine and owns(i):
                step = "compressing"
                work = copy.deepcopy(real)
                ignored = out_of_scope(work, data[0], mine)
                # NNCF's statistics run the layer, unchanged until then, on every window: what it gives back the
                # first time it sees a window is that window's output, which need not be computed again.
                watch = work.register_forward_hook(partial(_first_output, seen, first), with_kwargs=True)
                try:
                    work_on(i, prefix, real, work, data, ignored)
                finally:
                    watch.remove()
                del work
            step = "running"
            hidden = _outputs(real, data, seen, first)
        except (CompressorError, KeyboardInterrupt):
            raise
        except OSError as exc:
            raise CompressorError(f"{where}: {step} decoder layer {i} failed: {exc}; free disk space beside the "
                                  "artifact (its scratch directory holds each layer's integers), or choose another "
                                  "-o") from exc
        except Exception as exc:  # noqa: BLE001 - a model's own forward, or NNCF's tracing, raise what they raise
            raise CompressorError(f"{where}: {step} decoder layer {i} one layer at a time failed: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; run with "
                                  "--stream never where memory allows, or use method rtn with ratio 1") from exc
        del real
        gc.collect()  # NNCF's wrapped copy holds reference cycles (hooks on modules): a layer's worth each time
        spent = time.perf_counter() - began
        ctx.info(f"{label} {i + 1}/{len(layers)} {'done' if owns(i) else 'run, ' + elsewhere} "
                 f"in {spent:.0f}s"
                 + (f" (about {spent / (i + 1) * (len(layers) - i - 1):.0f}s left)" if i + 1 < len(layers) else ""))


def held_bytes(model: Model, windows: int, window: int, twice: bool = False) -> int:
    """What ``quantize_by_layer`` holds at its peak, from the meta model's shapes: the largest decoder layer three
    times (as read, NNCF's copy and its compressed state), the tensors before the layers that catching their
    arguments reads (the embeddings), and per window: the hidden states in, out and as NNCF's statistics pass gave
    them, and NNCF's statistics of the widest input twice (2.63 GB measured at 1.1B, 1.46 GB at 0.25B); when the
    layers run ``twice`` (mixed precision), the first layer's inputs kept for the second run too."""
    try:
        _, layers = _decoder_layers(model.module, "")
    except RecipeError:
        return 0  # refused when the pass runs
    layer = max(sum(t.numel() * t.element_size() for t in m.state_dict().values()) for m in layers)
    before = sum(t.numel() * t.element_size() for *_, t in _before_layers(model, layers))
    hidden = int(getattr(getattr(model.module, "config", None), "hidden_size", 0) or 0)
    widest = max([t.shape[1] for m in layers for t in m.state_dict().values() if t.dim() == 2] or [hidden])
    return 3 * layer + before + windows * window * 4 * ((4 if twice else 3) * hidden + 2 * widest)


def _stored_names(model: Model) -> dict[int, str]:
    """{id of a parameter or buffer: the name it is stored under} (a tied tensor: its first name)."""
    return {id(t): n for n, t in model.module.state_dict(keep_vars=True).items() if n not in model.aliases}


def _before_layers(model: Model, layers: torch.nn.ModuleList) -> list[tuple[Any, str, str, torch.Tensor]]:
    """(module, "_parameters" or "_buffers", key, meta tensor) of every stored tensor outside the decoder layers and
    the output head: what the model may read before its first layer (the embeddings, a final norm)."""
    module = model.module
    head = getattr(module, "get_output_embeddings", lambda: None)()
    skip = {id(m) for m in layers.modules()} | ({id(m) for m in head.modules()} if head is not None else set())
    stored = set(_stored_names(model))
    out = []
    for owner in module.modules():
        if id(owner) in skip:
            continue
        for kind in ("_parameters", "_buffers"):
            for key, t in getattr(owner, kind).items():
                if t is not None and t.is_meta and id(t) in stored:
                    out.append((owner, kind, key, t))
    return out


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
    if best is None or size < total / 3:
        raise RecipeError(Problem("streamed, data-aware 4-bit methods run a model one decoder layer at a time, and "
                                  "this model has no stack of layers holding most of its weights", path=where,
                                  hint="use method rtn, or --stream never where memory allows"))
    return best


def _first_argument(layer: torch.nn.Module) -> str:
    """The name of a layer's first argument: the hidden states."""
    return next(iter(inspect.signature(layer.forward).parameters))


def _layer_inputs(model: Model, layers: torch.nn.ModuleList, batches: list[dict[str, Any]], read: Any, where: str
                  ) -> list[list[dict[str, Any]]]:
    """For each calibration window, the keyword arguments the model gives each decoder layer (``[window][layer]``),
    caught by running the model with every layer standing in as the identity: each records its arguments and
    passes the hidden states on, the last one stops the forward. Layers may be called with different arguments
    (sliding-window and full attention layers get different masks). Only the tensors before the layers are read
    (the embeddings, the final norm), then put back on the meta device."""
    import torch

    module = model.module
    names = _stored_names(model)
    swapped = _before_layers(model, layers)
    caught: list[list[dict[str, Any]]] = []

    def stand_in(i: int, signature: inspect.Signature, *args: Any, **kwargs: Any) -> Any:
        arguments = dict(signature.bind(*args, **kwargs).arguments)  # by name: NNCF calls with keyword arguments
        for p in signature.parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(p.name, {}) or {})
        # NNCF's whole-model run gives each forward a fresh cache, filled by that very call: a layer's attention
        # sees its own window's keys alone, which is what no cache gives a layer run on its own.
        for key in ("past_key_values", "past_key_value"):
            if key in arguments:
                arguments[key] = None
        if "use_cache" in arguments:
            arguments["use_cache"] = False
        if i == 0:
            caught.append([])
        caught[-1].append(arguments)
        if i == len(layers) - 1:
            raise _Caught
        return args[0] if args else kwargs[next(iter(signature.parameters))]

    try:
        for owner, kind, key, _ in swapped:
            _put(owner, kind, key, read(names[id(getattr(owner, kind)[key])]))
        for i, layer in enumerate(layers):
            layer.forward = partial(stand_in, i, inspect.signature(layer.forward))
        with torch.no_grad():
            for batch in batches:
                try:
                    module(**batch)
                except _Caught:
                    continue
                raise CompressorError("the model ran to its end without calling its last decoder layer; "
                                      "please report this bug")
    except (CompressorError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own forward raises what it raises
        raise CompressorError(f"{where}: running the calibration windows up to the decoder layers failed: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; run with "
                              "--stream never where memory allows, or use method rtn with ratio 1") from exc
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        for owner, kind, key, t in swapped:
            getattr(owner, kind)[key] = t  # the meta tensor itself, as it was
    return caught


def _put(owner: torch.nn.Module, kind: str, key: str, value: torch.Tensor) -> None:
    """Make ``value`` the module's parameter (frozen) or buffer ``key`` (``kind``: "_parameters" or "_buffers")."""
    import torch

    getattr(owner, kind)[key] = torch.nn.Parameter(value, requires_grad=False) if kind == "_parameters" else value


def _materialised(layer: torch.nn.Module, prefix: str, read: Any, aliases: dict[str, str]) -> torch.nn.Module:
    """A copy of the meta ``layer`` holding its values (each read as the passes so far left it; a tied tensor under
    the name it is stored by)."""
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
                name = prefix + (f"{sub_name}." if sub_name else "") + key
                _put(sub, kind, key, read(aliases.get(name, name)))
    return real.eval()


def _rescaled(real: torch.nn.Module, compressed: torch.nn.Module, found: dict[str, IntGroup]) -> list[str]:
    """The float tensors NNCF changed (AWQ folds its scales into a preceding layer), by name within the layer."""
    import torch

    mine = real.state_dict()
    return sorted(n for n, t in compressed.state_dict().items()
                  if n in mine and torch.is_floating_point(t) and n not in found and not torch.equal(mine[n], t))


def _hidden_out(result: Any) -> Any:
    """A decoder layer's hidden states from what it returns (a tensor, or a tuple led by one)."""
    return result[0] if isinstance(result, (tuple, list)) else result


def _first_output(seen: dict[int, Any], first: str, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                  output: Any) -> None:
    """A forward hook: the output of the first call on each hidden-states tensor (by identity)."""
    hidden = kwargs.get(first, args[0] if args else None)
    if hidden is not None and id(hidden) not in seen:
        seen[id(hidden)] = (hidden, _hidden_out(output))


def _outputs(real: torch.nn.Module, data: list[dict[str, Any]], seen: dict[int, Any], first: str
             ) -> list[torch.Tensor]:
    """``real``'s hidden states out (the layer as read) for each window's arguments: the next layer's inputs. Those
    NNCF's statistics already computed (``seen``, by the identity of the input tensor) are taken from there."""
    import torch

    out = []
    with torch.no_grad():
        for kwargs in data:
            hit = seen.get(id(kwargs[first]))
            if hit is not None and hit[0] is kwargs[first] and isinstance(hit[1], torch.Tensor):
                out.append(hit[1])
                continue
            out.append(_hidden_out(real(**kwargs)))
    return out


def _spilled(file: Path, name: str, planned: IntGroup, value: torch.Tensor) -> IntGroup:
    """The integers NNCF gave weight ``name``, read back from its layer's scratch ``file`` (``value``, the weight
    as read, does not enter: AWQ may have rescaled it)."""
    from safetensors import safe_open

    out = IntGroup(planned.shape, planned.bits, planned.group_size, planned.symmetric)
    with safe_open(str(file), "pt") as f:
        return out.with_stored({suffix: f.get_tensor(name + suffix) for suffix in out.stored_suffixes()})
