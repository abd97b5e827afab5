"""ONNX Runtime, one way for every layer: sessions (CPU, or CUDA only where it really is), feeds from torch tensors,
outputs as numpy, and saving a model proto where a session can open it. Used by the exporters (checks, int8
search), the evaluator (ONNX subjects) and pack; imports nothing of compressor's but its errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ArtifactError, CompressorError

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["ort_session", "ort_feed", "run_onnx", "save_with_external_data"]


def ort_session(path: Path, device: str = "cpu", unfused: bool = False, threads: int | None = None, *,
                artifact: bool = False) -> Any:
    """An ONNX Runtime session; CUDA is requested only when CUDA is really there (no error spam elsewhere).
    ``unfused``: no graph optimizations (QDQ pairs stay DequantizeLinear + float ops: exact integer arithmetic);
    ``threads``: intra-op threads (ONNX Runtime's default when None). ``artifact``: the model is an artifact's (not
    one the exporter just wrote), so a model ONNX Runtime cannot load is an ArtifactError naming the file; the
    exporters keep ONNX Runtime's own error, which their callers read and report."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
            raise CompressorError("ONNX Runtime's CUDA provider is not available on this machine")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if unfused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not artifact:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own classes (and decode errors) for a damaged model
        try:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        except Exception:  # noqa: BLE001 - a message that cannot even be turned into text
            detail = type(exc).__name__
        raise ArtifactError(f"ONNX Runtime cannot load {path}: {detail}; run `compress verify` on the artifact, "
                            "or export it again") from None


_NUMPY_FLOAT = {"tensor(float16)": "float16", "tensor(float)": "float32", "tensor(double)": "float64"}


def ort_feed(session: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Numpy feeds for ``session`` from torch tensors by name. Float inputs are given in the float dtype the graph
    declares: a float16-IO graph (cast with float32_io false) takes the float32 tensors the torch model takes."""
    feed = {}
    for arg in session.get_inputs():
        value = inputs[arg.name].detach().cpu().numpy()
        wanted = _NUMPY_FLOAT.get(arg.type)
        feed[arg.name] = value.astype(wanted) if wanted and value.dtype.kind == "f" and value.dtype != wanted else value
    return feed


def run_onnx(path: Path, inputs: dict[str, Any], *, artifact: bool = False) -> dict[str, Any]:
    """Outputs of the ONNX model at ``path`` on ``inputs`` (torch tensors by name) as float32 numpy arrays by name."""
    import numpy as np

    session = ort_session(path, artifact=artifact)
    names = [o.name for o in session.get_outputs()]
    return {n: np.asarray(v, dtype=np.float32) for n, v in zip(names, session.run(None, ort_feed(session, inputs)))}


def save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Save ``model`` at ``path`` with all weights in one external file beside it (``<name>.data``), as ONNX
    Runtime's quantizer and sessions read models from files; ``model`` itself is left whole."""
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving as external data strips the tensors from the proto it is given
    onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
