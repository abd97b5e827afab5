"""ONNX export: optimum-onnx for Hugging Face models, torch.onnx for any other module; checked against torch in
ONNX Runtime; weights in external data aligned for memory mapping.

Layout of ``model.onnx.data``: tensors of 1 MiB or more start at multiples of 4096 (a page, so ONNX Runtime can
map them), smaller ones at multiples of 64. Tensors under 1 KiB stay inside model.onnx, as onnx itself does.
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CompressorError
from ..ort import ort_session, run_onnx
from .onnx_lm import OPTIMUM_TASK, check_decoder, is_causal_lm

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from ..model import Model

__all__ = ["ONNX_FILE", "ONNX_DATA", "export_onnx", "calibration", "save_aligned", "check_against_torch", "BIG_TENSOR",
           "BIG_ALIGN", "SMALL_ALIGN"]

ONNX_FILE = "model.onnx"
ONNX_DATA = "model.onnx.data"
BIG_TENSOR = 1 << 20
BIG_ALIGN = 4096
SMALL_ALIGN = 64
INLINE_BELOW = 1024
FLOAT16_TOLERANCE = 0.01
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def export_onnx(model: Model, out_dir: Path, spec: Any, *, base_dir: Path | None = None, log: Any = None
                ) -> dict[str, Any]:
    """Export ``model`` to ``out_dir/model.onnx`` (+ ``model.onnx.data``), check it in ONNX Runtime against torch
    on the example inputs, and return the manifest entry. Raises CompressorError (exit 1) on a mismatch.

    The model's export plan says what the passes asked for: ``onnx_cast`` narrows the checked graph to float16 or
    bfloat16 (compressor.export.onnx_cast); ``onnx_quantize`` turns it into int8 (compressor.export.onnx_quant),
    calibrating on data resolved against ``base_dir``."""
    import onnx

    cast, quantize = model.export.onnx_cast, model.export.onnx_quantize
    # A cast model is traced as its float32 view (exact: the rounded weights widened), checked at the usual tight
    # tolerance, and only then narrowed (compressor.export.onnx_cast), so the check tests the export, not float16
    # rounding in two different kernels.
    with model.float32_view() if cast else nullcontext(model.module):
        with tempfile.TemporaryDirectory(prefix="compress-onnx-") as tmp:
            if _is_transformers(model.module):
                path, exporter = _export_optimum(model, Path(tmp), spec), "optimum-onnx"
            else:
                path, exporter = _export_torch(model, Path(tmp), spec), "torch.onnx"
            proto = onnx.load(str(path), load_external_data=True)
        files = save_aligned(proto, out_dir)
        if is_causal_lm(model):
            check = check_decoder(model, out_dir / ONNX_FILE, spec.atol, spec.rtol)
        else:
            check = check_against_torch(model, out_dir / ONNX_FILE, spec.atol, spec.rtol)
    info = {
        "model": ONNX_FILE,
        "files": files,
        "exporter": exporter,
        "opset": spec.opset,
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
        "check": check,
    }
    if cast:
        from .onnx_cast import narrow_onnx

        lm = is_causal_lm(model)
        reference = None if lm else run_onnx(out_dir / ONNX_FILE, model.example_inputs)
        # save_aligned pointed the in-memory initializers at the data file: read the saved model back whole.
        proto = onnx.load(str(out_dir / ONNX_FILE), load_external_data=True)
        narrowed, report = narrow_onnx(proto, cast.dtype, float32_io=cast.float32_io, kept_modules=cast.kept_modules)
        info["files"] = save_aligned(narrowed, out_dir)
        if lm:  # the narrowed decoder against the float32 view of the same weights, step by step
            with model.float32_view():
                report["check"] = check_decoder(model, out_dir / ONNX_FILE, spec.atol, spec.rtol,
                                                relative=FLOAT16_TOLERANCE if cast.dtype == "float16" else None)
        else:
            report["check"] = check_narrowed(model, out_dir / ONNX_FILE, reference, cast.dtype, spec)
        info["cast"] = report
    if quantize is None and cast is None and model.encodings:
        int8 = _int8_weights(model, out_dir, spec)
        if int8 is not None:
            info["files"], info["int8_weights"] = int8
    if quantize is not None:
        from .onnx_quant import quantize_onnx

        config = quantize.config
        calib = calibration(model, out_dir, config.calibration, base_dir or Path.cwd())
        del proto
        with tempfile.TemporaryDirectory(prefix="compress-int8-") as work:
            quantized, report = quantize_onnx(out_dir / ONNX_FILE, Path(work), config, calib,
                                              where=f"passes[{quantize.index}].quantize", log=log)
        info["files"] = save_aligned(quantized, out_dir)
        info["quantization"] = report
    return info


def _int8_weights(model: Model, out_dir: Path, spec: Any) -> tuple[list[str], dict[str, Any]] | None:
    """Weight-only int8 weights stored as int8 in the checked graph (compressor.export.onnx_weights), checked
    again; None when the model has none."""
    import onnx

    from .onnx_weights import int8_weights, lowbit_weights

    proto = onnx.load(str(out_dir / ONNX_FILE), load_external_data=True)
    report = int8_weights(proto, model)
    lowbit = lowbit_weights(proto, model)
    if lowbit:
        report["lowbit"] = lowbit
    if not report["initializers"] and not lowbit.get("initializers"):
        return None
    files = save_aligned(proto, out_dir)
    # ONNX Runtime computes Cast(q) * scale in float32, torch's own product, and MatMulNBits at accuracy level 0
    # dequantizes to float32 and multiplies: the tight check holds unchanged, and proves the integers and layout.
    if is_causal_lm(model):
        report["check"] = check_decoder(model, out_dir / ONNX_FILE, spec.atol, spec.rtol)
    else:
        report["check"] = check_against_torch(model, out_dir / ONNX_FILE, spec.atol, spec.rtol)
    level = model.export.lowbit_accuracy_level
    if lowbit.get("matmul_nbits") and level:
        # Then the shipped level: int8 activations round every product's input, an accuracy effect the evaluator
        # measures against the baseline (perplexity, agreement), not an export error. save_aligned pointed the
        # in-memory initializers at the data file: read the saved model back whole.
        proto = onnx.load(str(out_dir / ONNX_FILE), load_external_data=True)
        for node in proto.graph.node:
            if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
                for attr in node.attribute:
                    if attr.name == "accuracy_level":
                        attr.i = level
        lowbit["accuracy_level"] = level
        files = save_aligned(proto, out_dir)
    return files, report


def calibration(model: Model, artifact: Path, spec: Any, base_dir: Path) -> Any:
    """Calibration batches for ONNX quantization, as numpy feeds (see CalibrationSpec)."""
    from ..data.datasets import build_fitting_data
    from .int8_select import Calibration

    data = build_fitting_data(spec, artifact=artifact, task=model.task, source=model.source,
                             example_inputs=model.example_inputs, base_dir=base_dir)
    feeds = [{k: v.detach().cpu().numpy() for k, v in batch.items() if k != "labels"} for batch in data.batches]
    return Calibration(feeds=feeds, name=data.name, pooled=model.task == "text-embedding")


def _is_transformers(module: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, PreTrainedModel)


def _export_optimum(model: Model, tmp: Path, spec: Any) -> Path:
    import warnings

    from optimum.exporters.onnx import onnx_export_from_model
    from optimum.exporters.tasks import TasksManager

    module = model.module
    try:
        task = OPTIMUM_TASK if is_causal_lm(model) else TasksManager.infer_task_from_model(module)
    except Exception:  # noqa: BLE001 - optimum cannot tell: the plain encoder task
        task = "feature-extraction"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optimum and torch.onnx warn about tracing at length
            onnx_export_from_model(module, tmp, opset=spec.opset, task=task, do_validation=False,
                                   no_dynamic_axes=not spec.dynamic_axes, no_post_process=True)
    except Exception as exc:
        raise CompressorError(f"optimum-onnx could not export this {type(module).__name__} (task {task}): "
                              f"{type(exc).__name__}: {exc}") from exc
    path = tmp / ONNX_FILE
    if not path.is_file():
        raise CompressorError(f"optimum-onnx wrote no {ONNX_FILE} (it wrote {sorted(p.name for p in tmp.iterdir())})")
    return path


def _export_torch(model: Model, tmp: Path, spec: Any) -> Path:
    import warnings

    import torch

    inputs = model.example_inputs
    names = list(inputs)
    with torch.no_grad():
        outputs = _flat_outputs(model.module(**inputs))
    out_names = ["logits"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    axes: dict[str, dict[int, str]] | None = None
    if spec.dynamic_axes:
        axes = {}
        for name, tensor in inputs.items():
            axes[name] = {0: "batch"}
            if name in TOKEN_INPUTS and tensor.dim() >= 2:
                axes[name][1] = "sequence"
        for name, tensor in zip(out_names, outputs):
            axes[name] = {0: "batch"} if tensor.dim() >= 1 else {}
    path = tmp / ONNX_FILE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript exporter: the dynamo one needs onnxscript, which is not a dependency.
            torch.onnx.export(model.module, (), str(path), kwargs=dict(inputs), input_names=names,
                              output_names=out_names, dynamic_axes=axes, opset_version=spec.opset, dynamo=False)
    except Exception as exc:
        raise CompressorError(f"torch.onnx could not export the model: {type(exc).__name__}: {exc}") from exc
    return path


def _flat_outputs(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _flat_outputs(item)]
    return []


def save_aligned(proto: onnx.ModelProto, out_dir: Path) -> list[str]:
    """Write ``model.onnx`` with every initializer of 1 KiB or more in ``model.onnx.data``, aligned (4096 bytes
    for tensors of 1 MiB or more, 64 for the rest); returns the files written."""
    import onnx
    from onnx import numpy_helper

    tensors = list(_initializers(proto.graph))
    offset = 0
    wrote_data = False
    with open(out_dir / ONNX_DATA, "wb") as data:
        for tensor in tensors:
            raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
            if len(raw) < INLINE_BELOW:
                continue
            align = BIG_ALIGN if len(raw) >= BIG_TENSOR else SMALL_ALIGN
            pad = -offset % align
            data.write(b"\0" * pad)
            offset += pad
            data.write(raw)
            name, dims, dtype = tensor.name, list(tensor.dims), tensor.data_type
            tensor.Clear()
            tensor.name, tensor.data_type = name, dtype
            tensor.dims.extend(dims)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", ONNX_DATA), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
            wrote_data = True
    if not wrote_data:
        (out_dir / ONNX_DATA).unlink()
    onnx.save_model(proto, str(out_dir / ONNX_FILE))
    return [ONNX_FILE] + ([ONNX_DATA] if wrote_data else [])


def _initializers(graph: Any) -> Any:
    """Initializers of a graph and of every subgraph (If/Loop bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _initializers(attr.g)
            for sub in attr.graphs:
                yield from _initializers(sub)


def _torch_output(out: Any, flat: list[Any], name: str, index: int) -> Any:
    """torch's counterpart of ONNX output ``name``: by name for Hugging Face outputs, else by position."""
    import torch

    ref = getattr(out, name, None) if not isinstance(out, torch.Tensor) else None
    if isinstance(ref, torch.Tensor):
        return ref
    if index >= len(flat):
        raise CompressorError(f"ONNX output {name!r} has no counterpart among torch's {len(flat)} outputs")
    return flat[index]


def check_narrowed(model: Model, path: Path, reference: dict[str, Any], dtype: str, spec: Any) -> dict[str, Any]:
    """Compare the narrowed ONNX model with the float32 graph it came from (``reference``, its outputs on the
    example inputs), and with how far the cast torch model itself is from that reference."""
    import numpy as np
    import torch

    try:
        got = run_onnx(path, model.example_inputs)
    except Exception as exc:  # noqa: BLE001 - a graph ONNX Runtime cannot load or run is this run's failure
        raise CompressorError(f"ONNX Runtime cannot run the {dtype} ONNX model: {type(exc).__name__}: {exc}") from exc
    with torch.no_grad():
        out = model.module(**model.example_inputs)
    flat = _flat_outputs(out)
    result: dict[str, Any] = {"max_abs_err": {}, "torch_max_abs_err": {}, "max_abs_value": {}}
    for i, (name, expected) in enumerate(reference.items()):
        actual = got[name]
        torch_value = _torch_output(out, flat, name, i).detach().float().numpy()
        result["max_abs_err"][name] = float(np.abs(actual - expected).max()) if actual.size else 0.0
        result["torch_max_abs_err"][name] = float(np.abs(torch_value - expected).max()) if actual.size else 0.0
        result["max_abs_value"][name] = float(np.abs(expected).max()) if actual.size else 0.0
        if not np.isfinite(actual).all():
            raise CompressorError(
                f"the {dtype} ONNX model gives non-finite values at output {name!r} on the example inputs (float16 "
                "overflows above 65504); keep the modules that overflow in float32 with cast.keep, or use dtype "
                "bfloat16")
        if dtype == "float16":
            # float16 compute rounds every activation: allow 1% of the output's largest magnitude, which an export
            # that is right stays far below (MiniLM: 0.04%) and a broken conversion does not.
            limit = spec.atol + FLOAT16_TOLERANCE * result["max_abs_value"][name]
            if result["max_abs_err"][name] > limit:
                raise CompressorError(
                    f"the float16 ONNX model differs from the float32 graph of the same weights by up to "
                    f"{result['max_abs_err'][name]:.3g} at output {name!r} (limit {limit:.3g}: {FLOAT16_TOLERANCE:.0%} "
                    f"of its largest value {result['max_abs_value'][name]:.3g}); keep sensitive modules in float32 "
                    "with cast.keep, or use dtype bfloat16 (float32 compute)")
        else:
            # bfloat16 is stored, not computed: the graph must reproduce the float32 export like any export.
            bad = np.abs(actual - expected) > spec.atol + spec.rtol * np.abs(expected)
            if bad.any():
                raise CompressorError(
                    f"the {dtype} ONNX model does not reproduce the float32 export of the same weights: output "
                    f"{name!r} differs by up to {result['max_abs_err'][name]:.3g} ({int(bad.sum())} of {bad.size} "
                    f"values beyond atol {spec.atol:g} + rtol {spec.rtol:g} x |value|)")
    result["limit"] = "1% of each output's largest value" if dtype == "float16" else "atol + rtol x |value|"
    return result


def check_against_torch(model: Model, path: Path, atol: float, rtol: float) -> dict[str, Any]:
    """Run the example inputs through ONNX Runtime and torch; every ONNX output must match its torch counterpart
    (by name for Hugging Face outputs, else by position) within ``atol + rtol * |torch|``."""
    import numpy as np
    import torch

    try:
        session = ort_session(path)
    except CompressorError:
        raise
    except Exception as exc:
        raise CompressorError(f"ONNX Runtime cannot load the exported model: {type(exc).__name__}: {exc}") from exc
    feed_names = [i.name for i in session.get_inputs()]
    missing = [n for n in feed_names if n not in model.example_inputs]
    if missing:
        raise CompressorError(f"the exported model wants inputs {missing} that the example inputs do not have")
    feed = {n: model.example_inputs[n].numpy() for n in feed_names}
    got = session.run(None, feed)
    with torch.no_grad():
        out = model.module(**model.example_inputs)
    names = [o.name for o in session.get_outputs()]
    flat = _flat_outputs(out)
    worst: dict[str, float] = {}
    for i, (name, value) in enumerate(zip(names, got)):
        expected = _torch_output(out, flat, name, i).detach().float().numpy()
        actual = np.asarray(value, dtype=np.float32)
        if expected.shape != actual.shape:
            raise CompressorError(f"ONNX output {name!r} has shape {list(actual.shape)}, torch's "
                                  f"{list(expected.shape)}; the export is wrong")
        err = np.abs(actual - expected)
        worst[name] = float(err.max()) if err.size else 0.0
        bad = err > atol + rtol * np.abs(expected)
        if bad.any() or not np.isfinite(actual).all():
            raise CompressorError(
                f"the ONNX export does not match torch: output {name!r} differs by up to {worst[name]:.3g} "
                f"({int(bad.sum())} of {bad.size} values beyond atol {atol:g} + rtol {rtol:g} x |value|); "
                "the artifact would compute something else than the model. Raise export.onnx.atol/rtol only if "
                "the difference is expected (e.g. float16)"
            )
    return {"max_abs_err": worst, "atol": atol, "rtol": rtol, "inputs": {n: list(v.shape) for n, v in feed.items()}}
