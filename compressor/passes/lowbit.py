"""`quantize` with ``bits: 4``: weight-only 4-bit integers in groups, computed by NNCF's weight compression.

NNCF (``nncf.compress_weights`` on the torch module) chooses the integers: round to nearest, AWQ (activation-aware
scaling, folded into the preceding layer), scale estimation (scales that minimise each layer's output error on the
calibration data) and mixed precision (``ratio``: the most sensitive layers at 8 bits per channel). compressor then
takes NNCF's integers and scales out of its decompression hooks, puts the effective weights ``(q - zp) * scale``
back into the plain module, and records each as an ``IntGroup`` encoding, from which the exporters write the
compressed-tensors layout (safetensors) and ``MatMulNBits`` (ONNX) — one set of integers for every format.

Embedding tables and the LM head are not given to NNCF (its 4-bit path would put a matrix product in front of a
tied embedding's lookup): they are int8 per row here (``embeddings: int8``) or kept in float.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import TYPE_CHECKING, Any

from ..encodings import IntGroup
from ..errors import Problem, RecipeError
from .nncf_weights import compress, from_decompressor, integers_from_hooks, out_of_scope

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..model import Model
    from .base import Context

__all__ = ["quantize_lowbit", "WEIGHT_METHODS", "WINDOW", "WINDOWS", "calibration_windows"]

WEIGHT_METHODS = ("rtn", "awq", "scale-estimation", "gptq")
WINDOW = 128  # tokens in a calibration window of a causal LM
WINDOWS = 128  # calibration windows when `calibration.limit` is unset


def _tables(module: torch.nn.Module, state_names: dict[int, str]) -> set[str]:
    """Names of the embedding tables and of the LM head's weight (tied or not)."""
    import torch

    out = {state_names[id(m.weight)] for m in module.modules()
           if isinstance(m, torch.nn.Embedding) and id(m.weight) in state_names}
    head = getattr(module, "get_output_embeddings", lambda: None)()
    if head is not None and getattr(head, "weight", None) is not None and id(head.weight) in state_names:
        out.add(state_names[id(head.weight)])
    return out


def calibration_windows(model: Model, spec: Any, base_dir: Any, window: int = WINDOW
                        ) -> list[dict[str, torch.Tensor]]:
    """Calibration batches of a causal LM, one window of ``window`` tokens each: the zoo LM's training documents
    (never its held-out ones) by default, else the shipped calibration sentences, or the user's text file."""
    import torch

    from ..data.datasets import CALIBRATION_TEXTS, _field, _read_jsonl, read_text_documents, tokenizer_for
    from ..errors import UsageError

    if spec.function is not None:
        raise UsageError("quantize.calibration.function: a causal language model calibrates on text; give a .txt "
                         "or .jsonl file of {\"text\": ...} rows as calibration.path")
    if spec.path is not None:
        docs = read_text_documents(base_dir / spec.path if base_dir is not None else spec.path)
    elif spec.builtin in (None, "train-text") and model.source.get("name") == "tiny-lm":
        from ..tinylm import training_texts

        docs = training_texts()[::7]  # a spread sample; calibration needs a few thousand tokens
    elif spec.builtin in (None, "calibration-text"):
        docs = [_field("calibration-text (built in)", r, "text", str) for r in _read_jsonl(CALIBRATION_TEXTS)]
    else:
        raise UsageError(f"quantize.calibration.builtin {spec.builtin}: a causal language model calibrates on text; "
                         "use calibration-text, train-text (the zoo LM) or a .txt/.jsonl file")
    tok = tokenizer_for(model.files_dir) if model.files_dir is not None else None
    if tok is None:
        raise UsageError("4-bit calibration of a language model needs its tokenizer, and the model directory has "
                         "none; use method rtn (data-free)")
    stream: list[int] = []
    limit = (spec.limit or WINDOWS) * window
    for ids in tok(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        stream += ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        if len(stream) >= limit:
            break
    count = min(len(stream) // window, spec.limit or WINDOWS)
    if count < 1:
        raise UsageError(f"the calibration text has {len(stream)} tokens, fewer than one window of {window}")
    ids = torch.tensor(stream[: count * window], dtype=torch.long).reshape(count, window)
    return [{"input_ids": ids[i:i + 1]} for i in range(count)]


def _int8_row_integers(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): symmetric int8 per row with float16 scales (round to nearest), for embedding tables and the LM
    head."""
    import torch

    w = weight.detach().float()
    # In place and without a copy of |w|: a streamed table is the largest tensor in flight.
    amax = torch.maximum(w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True).neg_())
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).half()
    return torch.div(w, scale.float()).round_().clamp_(-128, 127).to(torch.int8), scale


def _int8_rows(weight: torch.Tensor) -> IntGroup:
    """A table's IntGroup: its values as int8 per row, or (on the meta device: streamed) computed when written."""
    encoding = IntGroup(list(weight.shape), 8, None, True)
    if weight.is_meta:
        return encoding.computed_by(_int8_rows)
    return encoding.with_parts(*_int8_row_integers(weight))


def _rtn_integers(config: Any, weight: torch.Tensor) -> IntGroup:
    """NNCF's round-to-nearest integers of one Linear weight, for a streamed model: the steps its data-free
    compression of a whole torch model takes for each weight on its own (``compress_weight`` over the input axis,
    then the decompressor that packs them), without tracing a model. tests/test_stream.py holds them to the whole
    model's bytes."""
    import nncf
    from nncf.quantization.algorithms.weight_compression.config import WeightCompressionConfig
    from nncf.quantization.algorithms.weight_compression.weight_lowering import compress_weight
    from nncf.tensor import Tensor
    from nncf.torch.quantization import layers

    mode = nncf.CompressWeightsMode.INT4_SYM if config.symmetric else nncf.CompressWeightsMode.INT4_ASYM
    found = compress_weight(Tensor(weight), (1,), WeightCompressionConfig(mode=mode, group_size=config.group_size))
    common = {"scale": found.scale.data, "compressed_weight_shape": found.tensor.shape, "result_shape": weight.shape,
              "result_dtype": weight.dtype}
    hook = (layers.INT4SymmetricWeightsDecompressor(**common) if config.symmetric
            else layers.INT4AsymmetricWeightsDecompressor(zero_point=found.zero_point.data, **common))
    return from_decompressor(hook, hook.pack_weight(found.tensor.data), list(weight.shape))


def quantize_lowbit(model: Model, config: Any, index: int, ctx: Context) -> dict[str, Any]:
    """Quantize ``model``'s Linear weights to 4 bits (and its tables to int8) as ``config`` says; returns the
    pass's details. The module keeps float32 effective weights; ``model.encodings`` get the integers."""
    import torch

    where = f"passes[{index}].quantize"
    module = model.module
    state_names: dict[int, str] = {}
    for n, t in module.state_dict(keep_vars=True).items():
        state_names.setdefault(id(t), n)
    tables = _tables(module, state_names)
    matched = {pattern: False for pattern in config.exclude}
    chosen: dict[str, tuple[str, torch.nn.Module]] = {}  # weight name -> (module name, module)
    skipped: dict[str, str] = {}
    for mod_name, m in module.named_modules():
        weight = getattr(m, "weight", None) if isinstance(m, torch.nn.Linear) else None
        if weight is None or id(weight) not in state_names or state_names[id(weight)] in tables:
            continue
        if not any(fnmatch.fnmatchcase(type(m).__name__, p) or fnmatch.fnmatchcase(mod_name, p)
                   for p in config.modules):
            continue
        hit = [p for p in config.exclude if fnmatch.fnmatchcase(mod_name, p)]
        for p in hit:
            matched[p] = True
        name = state_names[id(weight)]
        if hit:
            continue
        if weight.dtype != torch.float32:
            skipped[name] = f"dtype {weight.dtype} (only float32 is quantized)"
        elif weight.numel() < config.min_elements:
            skipped[name] = f"{weight.numel()} elements (< min_elements {config.min_elements})"
        elif weight.shape[1] % config.group_size:
            skipped[name] = f"{weight.shape[1]} inputs, not a multiple of group_size {config.group_size}"
        elif not config.symmetric and weight.shape[0] * (weight.shape[1] // config.group_size) % 2:
            # NNCF packs the 4-bit zero points two to a byte and cannot pack an odd count.
            skipped[name] = "an odd number of groups (asymmetric 4-bit zero points are packed in pairs)"
        else:
            chosen[name] = (mod_name, m)
    unmatched = [p for p, hit in matched.items() if not hit]
    if unmatched:
        raise RecipeError(Problem(f"exclude pattern(s) {', '.join(repr(p) for p in unmatched)} match no Linear "
                                  "module this pass would quantize", path=f"{where}.exclude",
                                  hint="module names look like: " + ", ".join(n for n, _ in list(chosen.values())[:4])))
    if not chosen:
        raise RecipeError(Problem("no Linear weight can be quantized to 4 bits: "
                                  + ("; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3]) or "none matched"),
                                  path=where, hint="check `modules`, `exclude` and `group_size` against the model"))
    methods = config.weight_methods
    if next(iter(chosen.values()))[1].weight.is_meta and methods == ["rtn"] and config.ratio == 1:
        # streamed, data-free: each weight rounded when it is written
        details = _plan_streamed(model, config, chosen)
    elif next(iter(chosen.values()))[1].weight.is_meta:  # streamed, data-aware or mixed: one layer at a time
        from .layerwise import quantize_by_layer

        batches = calibration_windows(model, config.calibration, ctx.base_dir)
        found = quantize_by_layer(model, config, chosen, methods, batches, where, ctx)
        details = _details(config, methods, chosen, found, [])  # AWQ rescaled only 4-bit weights, or it refused
    else:
        data_aware = bool({"awq", "scale-estimation"} & set(methods)) or config.ratio < 1
        details = _run_nncf(model, config, chosen, _dataset(model, config, ctx, data_aware), methods, where, ctx)
    table_details: dict[str, str] = {}
    for name in sorted(tables):
        tensor = model.tensors().get(name)
        if tensor is None or config.embeddings == "keep":
            continue
        if tensor.dtype != torch.float32 or tensor.dim() != 2:
            table_details[name] = f"kept: {tensor.dtype} {tuple(tensor.shape)}"
            continue
        encoding = _int8_rows(tensor)
        if not tensor.is_meta:
            with torch.no_grad():
                tensor.copy_(encoding.decode(encoding.encode_parts()))
        model.encodings[name] = encoding
        table_details[name] = "int8 per row"
    details.update({"tables": table_details, "left_in_float": dict(sorted(skipped.items()))})
    return details


def _dataset(model: Model, config: Any, ctx: Context, data_aware: bool) -> Any:
    import nncf
    import torch

    if not data_aware:
        # NNCF traces the torch module with one example even when it computes nothing from data.
        example = {k: v for k, v in model.example_inputs.items()}
        return nncf.Dataset([example])
    if model.task != "text-generation":
        raise RecipeError(Problem(f"methods {', '.join(config.weight_methods)} and ratio < 1 calibrate on data, "
                                  "which compressor provides for causal language models only so far",
                                  path="quantize.method", hint="use method rtn with ratio 1 for this model"))
    batches = calibration_windows(model, config.calibration, ctx.base_dir)
    ctx.info(f"4-bit calibration on {len(batches)} windows of {batches[0]['input_ids'].shape[1]} tokens")
    del torch
    return nncf.Dataset(batches)


def _run_nncf(model: Model, config: Any, chosen: dict[str, tuple[str, Any]], dataset: Any, methods: list[str],
              where: str, ctx: Context) -> dict[str, Any]:
    """Compress a copy of the module with NNCF, then move its integers into ``model`` (module and encodings)."""
    work = copy.deepcopy(model.module).eval()
    ignored = out_of_scope(work, next(iter(dataset.get_inference_data())), chosen)
    compressed = compress(work, config, dataset, methods, ignored, where, ctx)
    found = integers_from_hooks(compressed, {n: list(model.tensors()[n].shape) for n in chosen})
    changed = _write_back(model, compressed.state_dict(), found, where)
    return _details(config, methods, chosen, found, changed)


def _plan_streamed(model: Model, config: Any, chosen: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Every chosen weight's encoding on a model on the meta device, its integers computed when its value is read
    (round to nearest with ratio 1: nothing else is decided weight by weight)."""
    from functools import partial

    # NNCF's modules are imported here, once, not first by two of the stream's writer threads at the same time.
    import nncf.quantization.algorithms.weight_compression.weight_lowering  # noqa: F401
    import nncf.torch.quantization.layers  # noqa: F401

    found = {}
    for name in chosen:
        shape = list(model.tensors()[name].shape)
        found[name] = IntGroup(shape, 4, config.group_size, config.symmetric).computed_by(
            partial(_rtn_integers, config))
        model.encodings[name] = found[name]
    return _details(config, config.weight_methods, chosen, found, [])


def _details(config: Any, methods: list[str], chosen: dict[str, Any], found: dict[str, IntGroup],
             changed: list[str]) -> dict[str, Any]:
    bits4 = sorted(n for n, e in found.items() if e.bits == 4)
    return {"format": "int4", "bits": 4, "group_size": config.group_size, "symmetric": config.symmetric,
            "method": methods, "ratio": config.ratio, "tensors_4bit": len(bits4),
            "tensors_8bit": len(found) - len(bits4),
            "int8_by_sensitivity": sorted(n for n, e in found.items() if e.bits == 8),
            "rescaled_by_awq": sorted(changed),
            "not_compressed_by_nncf": sorted(set(chosen) - set(found))}


def _write_back(model: Model, packed_state: dict[str, Any], found: dict[str, IntGroup], where: str) -> list[str]:
    """Give ``model`` the effective weights and encodings of ``found``, and copy everything else NNCF changed (AWQ
    folds its scales into the preceding Linear of a gated MLP) as is; returns the names of those rescaled."""
    import torch

    mine = model.module.state_dict()
    changed = []
    with torch.no_grad():
        for name, tensor in packed_state.items():
            if name in found or name not in mine or not torch.is_floating_point(tensor):
                continue
            if not torch.equal(mine[name], tensor):
                mine[name].copy_(tensor)
                changed.append(name)
        for name, encoding in found.items():
            mine[name].copy_(encoding.decode(encoding.encode_parts()))
            model.encodings[name] = encoding
    for name in changed:
        if model.encodings[name].kind not in ("dense", "sparse"):
            raise RecipeError(Problem(f"AWQ rescaled {name}, which an earlier pass stored as "
                                      f"{model.encodings[name].kind}", path=where,
                                      hint="put quantize before that pass, or use method scale-estimation"))
    return changed
