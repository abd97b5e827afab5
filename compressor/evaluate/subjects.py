"""What gets measured: the artifact, and the baseline it is compared with.

A subject is described by a small JSON-able record so that fresh processes (cold/warm load timing) can load
exactly what the parent measures:

- ``{"kind": "artifact", "path": DIR}``: an artifact directory, loaded with ``compressor.load``;
- ``{"kind": "source", "model": {...recipe model section...}, "base_dir": DIR}``: the uncompressed model,
  loaded the way its owner loads it (``from_pretrained`` for Hugging Face directories, the factory and weights
  file for python sources, the zoo's cache for zoo models).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ArtifactError, CompressorError, UsageError
from ..manifest import REPORT_FILES, REPORT_JSON, Manifest
from ..report_format import read_report

__all__ = ["Subject", "artifact_subject", "source_subject", "baseline_from_manifest", "baseline_from_argument",
           "load_module", "preimport", "onnx_subject", "OrtModule"]


@dataclass
class Subject:
    """One model under measurement."""

    role: str  # "baseline" or "artifact"
    label: str  # human-readable: "zoo: minilm", "artifact (safetensors)"
    format: str  # "safetensors" (an artifact) or "source" (the original model as its owner loads it)
    spec: dict[str, Any]  # the JSON record that load_module() understands
    files: list[Path] = field(default_factory=list)  # everything read when loading (evicted for cold runs)
    model_files: list[Path] = field(default_factory=list)  # the files that hold weights (size on disk)

    @property
    def size_bytes(self) -> int:
        """Bytes of the files that hold the model's weights."""
        return sum(p.stat().st_size for p in self.model_files)

    @property
    def files_bytes(self) -> int:
        """Bytes of every file read when loading (weights, config, tokenizer)."""
        return sum(p.stat().st_size for p in self.files)

    @property
    def key(self) -> str:
        """Unique within one evaluation: ``baseline``, ``artifact`` (safetensors) or ``artifact:onnx``."""
        if self.role == "baseline":
            return "baseline"
        return "artifact" if self.format == "safetensors" else f"artifact:{self.format}"

    def describe(self) -> dict[str, Any]:
        """The record stored in report.json."""
        return {"role": self.role, "label": self.label, "format": self.format, "spec": self.spec,
                "size_bytes": self.size_bytes, "files_bytes": self.files_bytes}


def artifact_subject(path: Path, role: str = "artifact", manifest: Manifest | None = None) -> Subject:
    """An artifact directory written by ``compress run`` (``manifest``: its manifest, if already read)."""
    from ..manifest import read_manifest

    root = path.resolve()
    manifest = manifest or read_manifest(root)
    model_files = [root / w for w in manifest.model.weights]
    # The safetensors subject reads neither the ONNX files nor the example inputs, reports or evaluation data.
    onnx_files = set(manifest.onnx.files) if manifest.onnx else set()
    skip = {"manifest.json", manifest.model.example_inputs} | set(REPORT_FILES) | onnx_files
    files = [root / "manifest.json"] + [root / rel for rel in manifest.files if rel not in skip
                                        and not rel.startswith("eval/")]
    label = "artifact (safetensors)" if role == "artifact" else f"artifact {root.name}"
    return Subject(role=role, label=label, format="safetensors", spec={"kind": "artifact", "path": str(root)},
                   files=files, model_files=model_files)


def onnx_subject(path: Path, manifest: Manifest | None = None) -> Subject | None:
    """The artifact's ONNX model, run by ONNX Runtime, or None when the artifact has no ONNX export."""
    from ..manifest import read_manifest

    root = path.resolve()
    entry = (manifest or read_manifest(root)).onnx
    if entry is None:
        return None
    files = [root / rel for rel in entry.files]
    return Subject(role="artifact", label="artifact (onnx, ONNX Runtime)", format="onnx",
                   spec={"kind": "onnx", "path": str(root / entry.model)}, files=files,
                   model_files=files)


def source_subject(model: dict[str, Any], base_dir: Path) -> Subject:
    """The uncompressed model named by a recipe's ``model`` section (paths relative to ``base_dir``)."""
    from ..sources import baseline

    spec = {"kind": "source", "model": model, "base_dir": str(base_dir.resolve())}
    label, files, weights = baseline(model, base_dir)
    return Subject(role="baseline", label=label, format="source", spec=spec, files=files, model_files=weights)


def baseline_from_manifest(artifact: Path, manifest: Manifest) -> Subject:
    """The baseline ``compress eval`` uses when none is given.

    The report of an earlier evaluation records where its baseline was (so a copied artifact still finds it);
    otherwise the manifest's recipe names the source, which works anywhere for zoo models and for absolute paths.
    """
    previous = artifact / REPORT_JSON
    if previous.is_file():
        try:
            spec = read_report(previous).baseline["spec"]
            if spec.get("kind") == "source":
                return source_subject(spec["model"], Path(spec["base_dir"]))
            if spec.get("kind") == "artifact" and Path(spec["path"]).is_dir():
                return artifact_subject(Path(spec["path"]), role="baseline")
        except (ArtifactError, OSError, ValueError, KeyError, TypeError, AttributeError, UsageError):
            pass  # fall back to the manifest
    model = manifest.recipe.get("model")
    if not isinstance(model, dict):
        raise UsageError(f"{artifact}/manifest.json names no source model; give one with --baseline")
    base = Path.cwd()
    try:
        return source_subject(model, base)
    except UsageError as exc:
        where = model.get("path") or model.get("weights")
        raise UsageError(f"{exc}; the artifact's recipe names {where!r} relative to its recipe file. Give the "
                         "original model with --baseline PATH or --baseline RECIPE.yaml") from None


def baseline_from_argument(value: str, manifest: Manifest) -> Subject:
    """``--baseline``: an artifact directory, a Hugging Face model directory, a recipe file, or ``zoo:NAME``."""
    from ..manifest import is_artifact
    from ..sources.zoo import ZOO_MODELS

    if value.startswith("zoo:"):
        name = value[4:]
        if name not in ZOO_MODELS:
            raise UsageError(f"--baseline {value}: no zoo model {name!r}; choose one of {', '.join(ZOO_MODELS)}")
        return source_subject({"source": "zoo", "name": name}, Path.cwd())
    path = Path(value).expanduser()
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        from ..recipe import load_recipe

        recipe = load_recipe(path)  # the original model as that recipe names it, paths relative to the recipe
        return source_subject(recipe.model.model_dump(mode="json"), recipe.base_dir)
    if not path.is_dir():
        raise UsageError(f"--baseline {value}: not a directory or recipe; give an artifact directory, a Hugging "
                         "Face model directory (with config.json), a recipe file (.yaml) or zoo:NAME")
    if is_artifact(path):
        return artifact_subject(path, role="baseline")
    if (path / "config.json").is_file():
        auto = manifest.source.get("auto_class", "AutoModel")
        return source_subject({"source": "hf", "path": str(path.resolve()), "auto_class": auto}, Path.cwd())
    raise UsageError(f"--baseline {value}: neither a compressor artifact (no manifest.json) nor a Hugging Face "
                     "model directory (no config.json)")


def preimport(spec: dict[str, Any]) -> None:
    """Import the code a subject's loader needs (transformers and the model's own modeling module, which
    transformers imports lazily at first use and which takes seconds), so that load timing measures the model."""
    from .. import loading, model, recipe, zoo  # noqa: F401
    from ..sources import preimport as source_preimport

    if spec["kind"] == "onnx":
        import onnxruntime  # noqa: F401

        from .. import ort  # noqa: F401
        return
    if spec["kind"] == "artifact":
        root = Path(spec["path"])
        try:
            source = json.loads((root / "manifest.json").read_text()).get("source") or {}
        except (OSError, ValueError):
            return
        source_preimport(root=root, source=source)
    else:
        source_preimport(spec["model"], Path(spec["base_dir"]))


def load_module(spec: dict[str, Any], device: str = "cpu", threads: int | None = None) -> Any:
    """Load a subject's model onto ``device``, in eval mode; for timing, this is all that is timed. ``threads``:
    ONNX Runtime's intra-op threads (torch's are the process's, set by the caller), so both run on as many."""
    import torch

    if spec["kind"] == "artifact":
        from ..loading import load

        return load(spec["path"], device=device)
    if spec["kind"] == "onnx":
        return OrtModule(Path(spec["path"]), device, threads=threads)
    from ..sources import baseline_module

    module = baseline_module(spec["model"], Path(spec["base_dir"]))
    if device != "cpu":
        module = module.to(torch.device(device))
    return module.eval()


class OrtOutputs(dict):
    """ONNX Runtime outputs by name, also readable as attributes (``out.last_hidden_state``, ``out.logits``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class OrtModule:
    """An ONNX Runtime session called like the torch module: keyword tensors in, named tensors out. A causal LM's
    KV-cache decoder (compressor.decoding) is called like a transformers model without a cache: given
    ``input_ids`` and ``attention_mask``, it gets an empty cache and the positions, and returns the logits."""

    def __init__(self, path: Path, device: str = "cpu", unfused: bool = False, threads: int | None = None) -> None:
        from ..decoding import OrtDecoder, is_decoder
        from ..ort import ort_session

        self.session = ort_session(path, device, unfused, threads, artifact=True)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.decoder = OrtDecoder(self.session) if is_decoder(self.session) else None

    def __call__(self, **inputs: Any) -> OrtOutputs:
        import torch

        from ..ort import ort_feed

        if self.decoder is not None:
            ids = inputs["input_ids"].cpu().numpy()
            mask = inputs.get("attention_mask")
            mask = mask.cpu().numpy() if mask is not None else ids * 0 + 1
            logits, _ = self.decoder.step(ids, mask, self.decoder.empty_past(ids.shape[0]))
            return OrtOutputs(logits=torch.from_numpy(logits))
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise CompressorError(f"the ONNX model needs inputs {missing}; got {sorted(inputs)}")
        feed = ort_feed(self.session, inputs)
        values = self.session.run(None, feed)
        return OrtOutputs((n, torch.from_numpy(v)) for n, v in zip(self.output_names, values))

    def eval(self) -> OrtModule:
        """For symmetry with nn.Module."""
        return self
