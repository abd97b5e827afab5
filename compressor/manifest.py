"""manifest.json: what an artifact is, how it was made, and the sha256 and size of every file in it."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import stat
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from .errors import ArtifactError

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "Manifest", "FileEntry", "PassReport", "ModelEntry", "OnnxEntry",
           "TensorParallelEntry", "EvaluationEntry", "sha256_file", "library_versions", "write_manifest",
           "read_manifest", "read_document", "check_files", "is_artifact", "confined", "check_onnx_external_data", "REPORT_FILES",
           "REPORT_JSON", "EVALUATION_REPORTS", "TP_REPORT", "PLAN_FILE", "REPLICATED_FILE", "rank_file"]

# Reports are written beside the manifest, not listed in it (they hold timings and are rewritten by every
# evaluation): the one list that verify, staging and the evaluator agree on.
REPORT_JSON = "report.json"
EVALUATION_REPORTS = (REPORT_JSON, "report.md", "junit.xml", "report.png")  # written by every evaluation
TP_REPORT = "tp-report.json"  # written by `compress eval --tp`
REPORT_FILES = (*EVALUATION_REPORTS, TP_REPORT)

# A tensor-parallel artifact's files (written by export/tp.py, read by loading/tp.py).
PLAN_FILE = "tensor_parallel.json"
REPLICATED_FILE = "model-tp-replicated.safetensors"


def rank_file(rank: int, world: int) -> str:
    """The safetensors file holding rank ``rank``'s slices."""
    return f"model-tp-rank{rank:02d}-of-{world:02d}.safetensors"


FORMAT = "compressor-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_LIBRARIES = ("compressor", "torch", "transformers", "safetensors", "numpy", "onnx", "onnxruntime-gpu", "pydantic")


class _Entry(BaseModel):
    # extra="allow": a key a newer compressor of the same format version adds is kept, not an error, so reading
    # and writing a manifest back never loses it.
    model_config = ConfigDict(extra="allow")

    def to_json(self) -> dict[str, Any]:
        """The entry as written: only the keys that were set, in declaration order (a NaN or infinity inside a
        free-form figure is written as null: strict JSON has neither)."""
        return self.model_dump(mode="json", exclude_unset=True)


class FileEntry(_Entry):
    """One file of the artifact: its size and sha256."""

    sha256: StrictStr
    bytes: StrictInt = Field(ge=0)


class PassReport(_Entry):
    """What one pass did, as stored in manifest.json (``seconds`` is left out there: two runs of one recipe write
    identical manifests)."""

    name: str = Field(description="Pass name (its recipe key).")
    index: StrictInt = Field(description="Position of the pass in the recipe's `passes` list.")
    config: dict[str, Any] = Field(description="The validated pass config, defaults filled in.")
    tensors_touched: StrictInt = Field(description="How many tensors the pass changed.")
    params_touched: StrictInt = Field(description="How many scalar parameters those tensors hold.")
    bytes_before: StrictInt = Field(description="Stored bytes of all tensors before the pass.")
    bytes_after: StrictInt = Field(description="Stored bytes of all tensors after the pass.")
    seconds: float | None = Field(default=None, description="Wall time of the pass (not in manifest.json).")
    details: dict[str, Any] = Field(default_factory=dict, description="Pass-specific figures.")


class ModelEntry(_Entry):
    """The stored model: its weight files and what the loader needs to rebuild it."""

    weights: list[str]  #: the safetensors files (and their index) that hold the weights, in loading order
    tensors: StrictInt  #: stored tensors, tied duplicates left out
    parameters: StrictInt  #: scalars in those tensors
    stored_bytes: StrictInt  #: bytes of the tensors as stored (encoded)
    encodings: dict[str, dict[str, Any]] = {}  #: how each non-dense tensor is stored (compressor.encodings)
    aliases: dict[str, str] = {}  #: tied tensor name -> the one name that is stored
    dtype_bridges: dict[str, dict[str, str]] = {}  #: module -> the dtype it runs in and hands back (cast)
    resized: dict[str, dict[str, StrictInt]] = {}  #: module -> its size attributes after structured pruning
    pruned_heads: dict[str, list[StrictInt]] = {}  #: attention module -> removed head indices
    example_inputs: str | None = None  #: the safetensors file of example inputs
    copied_files: list[str] = []  #: the source's config and tokenizer files copied into the artifact


class OnnxEntry(_Entry):
    """The ONNX model: its files, how it was exported and checked, and what cast or int8 did to it."""

    model: str  #: the .onnx file
    files: list[str]  #: the .onnx file and its external data
    exporter: str  #: "optimum-onnx" or "torch.onnx"
    opset: StrictInt
    inputs: list[str]
    outputs: list[str]
    check: dict[str, Any]  #: the comparison with torch on the example inputs
    cast: dict[str, Any] | None = None  #: the float16/bfloat16 narrowing report
    quantization: dict[str, Any] | None = None  #: the int8 report (compressor.export.onnx_quant)
    int8_weights: dict[str, Any] | None = None  #: weight-only int8 stored in the graph (export.onnx_weights)


class TensorParallelEntry(_Entry):
    """A tensor-parallel artifact: the plan file and one safetensors file per rank."""

    world: StrictInt
    plan: str
    family: str
    ranks: list[str]
    replicated: str
    sharded_bytes: StrictInt = 0
    replicated_bytes: StrictInt = 0
    bytes_per_rank: list[StrictInt] = []


class EvaluationEntry(_Entry):
    """The evaluation data copied into the artifact, so `compress eval` needs nothing outside it."""

    data_file: str | None = None


class Manifest(_Entry):
    """manifest.json: the contract between the exporters that write an artifact and everything that reads it.
    Validated on write and on read; fields are declared in the order they are written."""

    format: Literal["compressor-artifact"] = "compressor-artifact"
    format_version: StrictInt = 1
    name: str | None = None
    description: str | None = None
    recipe: dict[str, Any] = {}  #: the validated recipe, as JSON
    source: dict[str, Any] = {}  #: the source's record (kind and what rebuilds the architecture)
    task: str | None = None
    versions: dict[str, str] = {}  #: Python and library versions that wrote the artifact
    passes: list[PassReport] = []  #: each pass's report
    model: ModelEntry
    evaluation: EvaluationEntry | None = None
    onnx: OnnxEntry | None = None
    tensor_parallel: TensorParallelEntry | None = None
    files: dict[str, FileEntry]  #: every file but manifest.json, by relative path

    @property
    def quantization(self) -> dict[str, Any]:
        """The int8 ONNX report ({} when the ONNX model is not int8, or there is none)."""
        return (self.onnx.quantization if self.onnx is not None else None) or {}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape an artifact (absent ones left out)."""
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_manifest(out_dir: Path, body: dict[str, Any], known: dict[str, tuple[str, int]] | None = None) -> Manifest:
    """Hash every file under ``out_dir`` and write manifest.json there; returns the manifest written. ``body``
    is validated as a :class:`Manifest`, so a writer that breaks the contract fails here, not in a reader.
    ``known``: {relative path: (sha256, bytes)} of files hashed as they were written, taken where the size agrees."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [p for p in sorted(out_dir.rglob("*")) if p.is_file() and p.relative_to(out_dir).as_posix() != MANIFEST]
    known = known or {}

    def digest(path: Path) -> str:
        sha, size = known.get(path.relative_to(out_dir).as_posix(), ("", -1))
        return sha if size == path.stat().st_size else sha256_file(path)

    # Files hashed side by side (hashlib and reads release the GIL): the shards of a large model take seconds each.
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(digest, paths))
    files = {path.relative_to(out_dir).as_posix(): {"sha256": digest, "bytes": path.stat().st_size}
             for path, digest in zip(paths, digests)}
    manifest = Manifest.model_validate({"format": FORMAT, "format_version": FORMAT_VERSION, **body, "files": files})
    (out_dir / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest


def is_artifact(path: Path) -> bool:
    """Whether ``path`` is a directory holding a manifest written by compressor."""
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def read_manifest(artifact_dir: Path) -> Manifest:
    """Read and validate manifest.json; ArtifactError saying what is wrong otherwise."""
    path = artifact_dir / MANIFEST
    if not artifact_dir.is_dir():
        raise ArtifactError(f"{artifact_dir} is not a directory; give an artifact directory written by `compress run`")
    if path.is_symlink():
        raise ArtifactError(f"{path} is a symbolic link; an artifact holds regular files only, and nothing outside "
                            "it is read")
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir} has no {MANIFEST}; it is not a compressor artifact (or is incomplete)")
    manifest = read_document(path, Manifest, FORMAT, FORMAT_VERSION, "manifest")
    for rel in manifest.files:
        _check_name(rel, path)
    return manifest


_Doc = TypeVar("_Doc", bound=BaseModel)


def read_document(path: Path, model: type[_Doc], fmt: str, version: int, kind: str) -> _Doc:
    """A versioned JSON file of compressor's (``{"format": fmt, "format_version": N, ...}``, N at most
    ``version``) validated as ``model``: the one reader of manifest.json and report.json. ArtifactError naming the
    file and, for a schema violation, the key that is wrong."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the {kind} is damaged") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ArtifactError(f"{path} is not a compressor {kind} (no \"format\": \"{fmt}\")")
    found = data.get("format_version")
    if not isinstance(found, int) or isinstance(found, bool) or found > version:
        raise ArtifactError(f"{path} has format_version {found!r}; this compressor reads up to {version}. "
                            "Upgrade compressor.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ArtifactError(f"{path}: {where}: {first['msg']} (got {json.dumps(first.get('input'), default=str)[:200]})"
                            f"; the {kind} is damaged") from None


def _check_name(rel: Any, manifest: Path) -> None:
    """A file an artifact names is a relative path inside it: no absolute path, no `..`, no empty part."""
    parts = rel.replace("\\", "/").split("/") if isinstance(rel, str) else []
    if not parts or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":") or "\x00" in rel \
            or any(p in ("", ".", "..") for p in parts):
        raise ArtifactError(f"{manifest} names the file {rel!r}, which is not a relative path inside the artifact; "
                            "the manifest is damaged or was written to read files elsewhere")


def confined(artifact_dir: Path, rel: str) -> Path:
    """``artifact_dir / rel`` when it is reached without symbolic links and stays inside the directory (the one
    confinement check every reader calls); ArtifactError otherwise."""
    return _confined(artifact_dir.resolve(), artifact_dir, rel)[0]


def _confined(root: Path, artifact_dir: Path, rel: str) -> tuple[Path, os.stat_result | None]:
    """``confined`` under ``root`` (``artifact_dir`` resolved), with the file's own ``lstat`` (None when it does
    not exist): what check_files needs of it, without asking the file system again."""
    name = Path(rel)
    # With no `..` and no link on the way, the path cannot leave the directory: no resolve() needed (it would lstat
    # every part of the path again, for every file of every load).
    if not name.parts or name.is_absolute() or ".." in name.parts:
        raise ArtifactError(f"{artifact_dir}: {rel} lies outside the artifact")
    if "\x00" in rel:
        raise ArtifactError(f"{artifact_dir}: {rel!r} is not a usable file name (it holds a NUL byte)")
    path, current = root.joinpath(*name.parts), root
    try:
        for part in name.parts:
            current = current / part
            try:
                found = os.lstat(current)
            except (FileNotFoundError, NotADirectoryError):
                return path, None  # nothing further down exists either: no link to find
            if stat.S_ISLNK(found.st_mode):
                raise ArtifactError(f"{artifact_dir}: {rel} is (or lies under) a symbolic link; an artifact holds "
                                    "regular files only, and nothing outside it is read")
    except (ValueError, OSError) as exc:  # a NUL byte, a name too long for the file system
        raise ArtifactError(f"{artifact_dir}: {rel!r} is not a usable file name ({exc})") from None
    return path, found


def check_files(artifact_dir: Path, manifest: Manifest, *, hashes: bool = False) -> None:
    """Every file in the manifest exists with its recorded size (and sha256 when ``hashes``)."""
    problems = []
    if (artifact_dir / MANIFEST).is_symlink():
        raise ArtifactError(f"{artifact_dir}: {MANIFEST} is a symbolic link; an artifact holds regular files only")
    root = artifact_dir.resolve()
    for rel, info in manifest.files.items():
        path, found = _confined(root, artifact_dir, rel)
        if found is None or not stat.S_ISREG(found.st_mode):
            problems.append(f"{rel}: missing")
            continue
        size = found.st_size
        if size != info.bytes:
            problems.append(f"{rel}: {size} bytes, manifest says {info.bytes} (truncated or modified)")
        elif hashes and sha256_file(path) != info.sha256:
            problems.append(f"{rel}: sha256 differs from the manifest (modified or corrupt)")
    if hashes and not problems:
        # Hashes prove the bytes are the ones the manifest describes, not that a hand-edited manifest describes a
        # model ONNX Runtime can open safely: check every ONNX file's structure before anything hands it over.
        for rel in manifest.files:
            if rel.endswith(".onnx"):
                try:
                    check_onnx_external_data(artifact_dir / rel, artifact_dir, set(manifest.files))
                except ArtifactError as exc:
                    problems.append(str(exc) if str(exc).startswith(rel) else f"{rel}: {exc}")
    if problems:
        raise ArtifactError(f"{artifact_dir} does not match its manifest:\n  " + "\n  ".join(problems))


def _tensors(graph: Any) -> Any:
    """Every TensorProto of a graph: initializers, tensor attributes, and those of subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def check_onnx_external_data(path: Path, root: Path, listed: set[str] | None = None) -> int:
    """ArtifactError unless the ONNX model at ``path`` parses and every external-data reference in it points inside
    ``root`` (by the confinement rule of :func:`confined`) at an existing file, within its size, with exactly the
    bytes the tensor's shape and type need; with ``listed`` (the manifest's file names), only at a listed file, so
    a hash covers every byte ONNX Runtime will read. Returns how many references were checked."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others for a damaged file
        raise ArtifactError(f"{path.name}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    checked = 0
    for tensor in _tensors(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        rel = (path.parent / location).relative_to(root).as_posix() if location and not Path(location).is_absolute() \
            else None
        if rel is None or ".." in Path(rel).parts:
            raise ArtifactError(f"{path.name}: tensor {tensor.name} points outside the artifact ({location!r})")
        target = confined(root, rel)
        if listed is not None and rel not in listed:
            raise ArtifactError(f"{path.name}: tensor {tensor.name} points at {location}, which the manifest does not "
                                "list (no hash covers it)")
        if not target.is_file():
            raise ArtifactError(f"{path.name}: tensor {tensor.name} points at {location}, which is missing")
        size = target.stat().st_size
        try:
            # Both are optional in ONNX: no offset is 0, no length is "to the end of the file".
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else size - offset
        except ValueError:
            raise ArtifactError(f"{path.name}: tensor {tensor.name} has a malformed offset or length") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise ArtifactError(f"{path.name}: tensor {tensor.name} spans bytes {offset}..{offset + length} of "
                                f"{location}, which has {size}")
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = None  # sub-byte or exotic types: the bounds check above is what can be said
        packed = {getattr(TensorProto, n, -1) for n in ("STRING", "INT4", "UINT4", "FLOAT4E2M1")}
        if itemsize is not None and tensor.data_type not in packed:
            expected = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
            if expected != length:
                raise ArtifactError(f"{path.name}: tensor {tensor.name} needs {expected} bytes but references "
                                    f"{length} in {location}")
        checked += 1
    return checked
