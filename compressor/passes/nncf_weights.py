"""NNCF's weight compression of a torch module, and its results as compressor's encodings: the one place that
calls ``nncf.compress_weights`` and reads its decompressor hooks (for a whole model, compressor/passes/lowbit.py,
and for one decoder layer at a time, compressor/passes/layerwise.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..encodings import IntGroup
from ..errors import CompressorError, Problem, RecipeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .base import Context

__all__ = ["from_decompressor", "out_of_scope", "compress", "integers_from_hooks", "Decided", "sensitivities",
           "forced", "primary_by_sensitivity"]


class Decided(Exception):
    """Raised by a ``decide`` given to ``compress`` once it has what it needs: NNCF stops there."""


def from_decompressor(hook: Any, packed: torch.Tensor, shape: list[int]) -> IntGroup:
    """The IntGroup of one NNCF-compressed weight: its decompressor's integers, scales and zero points."""
    import torch
    from nncf.torch.quantization import layers
    from nncf.torch.quantization.quantize_functions import unpack_int4, unpack_uint4

    rows, cols = shape
    scale = hook._scale.detach().reshape(rows, -1)
    groups = scale.shape[1]
    group_size = None if groups == 1 and not hasattr(hook, "compressed_weight_shape") else cols // groups
    if isinstance(hook, layers.INT4SymmetricWeightsDecompressor):
        q = unpack_int4(packed).reshape(rows, cols)
        return IntGroup(shape, 4, group_size, True).with_parts(q.to(torch.int8), scale)
    if isinstance(hook, layers.INT4AsymmetricWeightsDecompressor):
        q = unpack_uint4(packed).reshape(rows, cols).to(torch.int16) - 8
        zp = unpack_uint4(hook._zero_point).reshape(rows, groups).to(torch.int16) - 8
        return IntGroup(shape, 4, group_size, False).with_parts(q.to(torch.int8), scale, zp.to(torch.int8))
    if isinstance(hook, layers.INT8SymmetricWeightsDecompressor):
        return IntGroup(shape, 8, None, True).with_parts(packed.reshape(rows, cols).to(torch.int8), scale)
    if isinstance(hook, layers.INT8AsymmetricWeightsDecompressor):
        q = packed.reshape(rows, cols).to(torch.int16) - 128
        zp = hook._zero_point.reshape(rows, 1).to(torch.int16) - 128
        return IntGroup(shape, 8, None, False).with_parts(q.to(torch.int8), scale, zp.to(torch.int8))
    raise CompressorError(f"NNCF compressed a weight with {type(hook).__name__}, which compressor cannot store yet")


def out_of_scope(work: Any, example: Any, chosen: dict[str, tuple[str, Any]]) -> list[str]:
    """NNCF's names of every operation that reads a parameter not in ``chosen`` (the tables, the LM head, excluded
    and skipped modules), of any op type. NNCF names operations by call site, so they are found by their weight."""
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph

    graph = build_nncf_graph(work, example)
    params = set(work.state_dict(keep_vars=True))
    ignored = []
    for node in graph.get_all_nodes():
        weights = [e.from_node.node_name for e in graph.get_input_edges(node)]
        if any(w in params for w in weights) and not any(w in chosen for w in weights):
            ignored.append(node.node_name)
    return ignored


def compress(work: Any, config: Any, dataset: Any, methods: list[str], ignored: list[str], where: str,
             ctx: Context, bars: bool = True, decide: Callable[..., None] | None = None, given: bool = False) -> Any:
    """NNCF's ``compress_weights`` on ``work``, its output kept off standard output (its progress bars on standard
    error unless quiet or not ``bars``); its failures as one-paragraph errors naming the pass.

    ``decide``, when given, takes the place of NNCF's mixed-precision step (``ratio`` < 1), called as NNCF calls
    that step: with the algorithm, the weights whose precision it sets, the model, its graph and the statistics
    (``sensitivities`` and ``forced`` are the two used; a ``Decided`` it raises goes through). ``given``: the
    decision needs no statistics (``forced``), so NNCF is not asked to collect them (another pass over the
    calibration windows)."""
    import logging

    import nncf
    import torch

    mode = nncf.CompressWeightsMode.INT4_SYM if config.symmetric else nncf.CompressWeightsMode.INT4_ASYM
    backup = nncf.BackupMode.INT8_SYM if config.symmetric else nncf.BackupMode.INT8_ASYM
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.ERROR)  # its statistics tables are not this run's output
    quiet = getattr(ctx.log, "quiet", True) or not bars
    # NNCF draws its progress bars on standard output, which belongs to the command's result: they go to stderr
    # (where compressor's own progress goes), or nowhere under --quiet.
    sink = open(os.devnull, "w") if quiet else sys.stderr  # noqa: SIM115 - closed below
    try:
        with torch.no_grad(), contextlib.redirect_stdout(sink), _mixed_precision(decide):
            return nncf.compress_weights(
                work, mode=mode, group_size=config.group_size, ratio=config.ratio, all_layers=True,
                dataset=dataset, awq="awq" in methods or None,
                scale_estimation="scale-estimation" in methods or None, backup_mode=backup,
                ignored_scope=nncf.IgnoredScope(names=ignored, validate=False) if ignored else None,
                # NNCF's criterion with data (its default) collects activation statistics for the ratio alone; with
                # the decision forced it is never asked, and the data-free one collects none.
                sensitivity_metric=nncf.SensitivityMetric.WEIGHT_QUANTIZATION_ERROR if given else None,
                subset_size=len(list(dataset.get_inference_data())))
    except (nncf.ParameterNotSupportedError, nncf.ValidationError) as exc:
        raise RecipeError(Problem(f"NNCF refuses these settings: {exc}", path=where)) from exc
    except (Decided, CompressorError):  # the decision's own refusals, and its early stop
        raise
    except Exception as exc:  # noqa: BLE001 - NNCF's tracing and algorithms raise whatever their code raises
        raise CompressorError(f"{where}: NNCF's weight compression failed on this model: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}; exclude the module it names, or "
                              "try method rtn") from exc
    finally:
        nncf_logger.setLevel(level)
        if sink is not sys.stderr:
            sink.close()


def integers_from_hooks(compressed: Any, shapes: dict[str, list[int]]) -> dict[str, IntGroup]:
    """The IntGroup encoding of every weight NNCF compressed, from its decompressor hooks; ``shapes``: those of the
    weights it was given."""
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import BaseWeightsDecompressor

    packed_state = compressed.state_dict()
    found: dict[str, IntGroup] = {}
    for key, hook in get_hook_storage(compressed).named_modules():
        if not key or "." not in key or key.count(".") < 2:
            continue
        if not isinstance(hook, BaseWeightsDecompressor):
            raise CompressorError(f"NNCF inserted {type(hook).__name__} at {key}: AWQ could not fold its scales into "
                                  "a preceding layer (it folds only into a gated MLP's up projection), and compressor "
                                  "stores weights only. Use method scale-estimation (or rtn) for this model.")
        name = key.split(".", 1)[1].rsplit("__", 1)[0].replace(":", ".")
        if name not in shapes:
            raise CompressorError(f"NNCF compressed {name}, which was out of its scope")
        found[name] = from_decompressor(hook, packed_state[name], shapes[name])
    return found


@contextlib.contextmanager
def _mixed_precision(decide: Callable[..., None] | None) -> Iterator[None]:
    """NNCF's mixed-precision step (``WeightCompression.apply_mixed_precision``) replaced by ``decide`` while NNCF
    runs, when one is given. That step alone ranks weights across the model; everything NNCF does before it
    (statistics) and after it (AWQ, scale estimation, the integers) works weight by weight, so a model compressed
    one decoder layer at a time gets the whole run's results when the decision is made once for all the layers."""
    if decide is None:
        yield
        return
    from nncf.quantization.algorithms.weight_compression.algorithm import WeightCompression

    original = WeightCompression.apply_mixed_precision
    owner = threading.get_ident()

    def step(algorithm: Any, params: list[Any], model: Any, graph: Any, statistic_points: Any) -> None:
        if threading.get_ident() != owner:  # another thread's NNCF run (the patch is the class's): NNCF's own step
            return original(algorithm, params, model, graph, statistic_points)
        if algorithm._ratio < 1 and params:  # as NNCF's own step: nothing to decide at ratio 1
            decide(algorithm, params, model, graph, statistic_points)

    WeightCompression.apply_mixed_precision = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        WeightCompression.apply_mixed_precision = original  # type: ignore[method-assign]


def sensitivities(found: list[tuple[str, float, int]], algorithm: Any, params: list[Any], model: Any, graph: Any,
                  statistic_points: Any) -> None:
    """A ``decide`` that appends (weight name, NNCF's sensitivity score, size) of every weight whose precision the
    ratio sets to ``found`` (NNCF's own criterion, on the statistics it collected), then stops NNCF."""
    criterion = algorithm._mixed_precision_algo
    criterion._set_backend_entity(model)
    scores = criterion._calc_sensitivity(model, graph, params, statistic_points)
    found.extend((p.weight_name, float(s), int(p.num_weights)) for p, s in zip(params, scores))
    raise Decided


def forced(primary: set[str], done: list[bool], algorithm: Any, params: list[Any], model: Any, graph: Any,
           statistic_points: Any) -> None:
    """A ``decide`` that keeps the weights named in ``primary`` at 4 bits and gives the others NNCF's backup
    precision (int8 per channel), as NNCF's step does with the weights its criterion chose; appends to ``done``
    (an NNCF that never reached the step would otherwise have made its own decision unnoticed)."""
    done.append(True)
    unknown = primary - {p.weight_name for p in params}
    if unknown:  # the names the first run scored by are not this run's: the decision would be silently wrong
        raise CompressorError(f"mixed precision chose {', '.join(sorted(unknown)[:3])}, which NNCF does not find "
                              "among this layer's weights; please report this bug")
    for p in params:
        if p.weight_name not in primary:
            p.compression_config = algorithm._get_backup_config(p.weight_dtype)


def primary_by_sensitivity(found: list[tuple[str, float, int]], ratio: float) -> set[str]:
    """The weights NNCF's mixed precision keeps at 4 bits, from every weight's (name, score, size) in the model's
    order: the least sensitive first (ties in order), while the 4-bit share stays below ``ratio`` of the sizes —
    NNCF's ``MixedPrecisionCriterion.apply``, given the scores."""
    total = sum(size for *_, size in found)
    primary: set[str] = set()
    count = 0
    for name, _, size in sorted(found, key=lambda f: f[1]):
        if (count + size) / total >= ratio:
            break
        primary.add(name)
        count += size
    return primary
