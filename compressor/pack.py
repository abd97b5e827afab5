"""`compress pack`: an artifact's ONNX model as a deterministic zip bundle for a device class.

The bundle holds the model (ONNX, or ONNX Runtime's ORT format for minimal builds), the tokenizer for text
models, the artifact's manifest, ``bundle.json`` (target, providers, inputs, tokenizer settings, file hashes) and
``run.py``, a runner that needs only numpy and onnxruntime (plus `tokenizers` for text); causal language models
also get ``generate.py`` and ``decoding.py``, so that run.py generates. Packing the same artifact twice gives
byte-identical bundles: entries sorted, fixed timestamps and permissions, fixed compression level.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError, CompressorError, UsageError
from .manifest import Manifest
from .manifest import sha256_file as _sha256
from .export.onnx_lm import GENERATION_TASK
from .pack_lm import generation_settings, prefill_inputs

__all__ = ["TARGETS", "Target", "pack_artifact", "targets_text", "BUNDLE_FORMAT", "is_bundle"]

BUNDLE_FORMAT = "compressor-bundle"
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest date: the same for every entry of every bundle
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")
# The runner's files in a bundle: name in the bundle -> compressor's module; the last two for causal LMs only.
_RUNNER = {"run.py": "bundle_runner.py", "generate.py": "bundle_generate.py", "decoding.py": "decoding.py"}


@dataclass(frozen=True)
class Target:
    """A device class: the model format, dtype and execution-provider settings a bundle for it gets."""

    format: str  # "onnx" or "ort"
    dtype: str  # "keep" (as exported) or "float16" (a float32 export is narrowed, weights and compute)
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    graph_optimization: str = "all"  # what the runner asks ONNX Runtime for at load
    platform: str | None = None  # ORT format: the --target_platform of ONNX Runtime's converter
    description: str = ""


TARGETS: dict[str, Target] = {
    "cpu-x86_64": Target(
        "onnx", "keep", description="x86-64 servers and desktops with the full onnxruntime package: the ONNX model as "
        "exported (float32, float16 or int8), CPU provider, all graph optimizations at load."),
    "cpu-x86_64-minimal": Target(
        "ort", "keep", graph_optimization="disable", platform="amd64",
        description="x86-64 devices running an ONNX Runtime minimal build: ORT format, optimized for amd64 at pack "
        "time (NCHWc layouts and the like baked in), plus required_operators.config, the operator list to build "
        "that minimal runtime with (--include_ops_by_config)."),
    "cpu-arm64": Target(
        "ort", "keep", graph_optimization="disable", platform="arm",
        description="ARM64 boards and phones (Raspberry Pi, Jetson CPU, Android, iOS): ORT format optimized for ARM "
        "at pack time (int8 kept as QDQ where ARM kernels want it), CPU provider, plus required_operators.config "
        "for a minimal build. Also runs on the full onnxruntime package."),
    "cuda": Target(
        "onnx", "float16", providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="NVIDIA GPUs: a float32 export is narrowed to float16 weights and compute (inputs and outputs "
        "stay float32; checked against the float32 graph), CUDA provider first, CPU as fallback. int8 and float16 "
        "exports are kept as they are."),
}


def targets_text() -> str:
    """What each target does, for `compress pack --list-targets`."""
    lines = []
    for name, t in TARGETS.items():
        lines.append(f"{name}\n  format {t.format}, dtype {t.dtype}, providers {', '.join(t.providers)}, graph "
                     f"optimization at load: {t.graph_optimization}")
        lines.append("  " + t.description)
    return "\n".join(lines)


def _graph_float_type(path: Path) -> str:
    """"float16", "int8" or "float32": what the ONNX model at ``path`` mostly stores its weights in."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    count: dict[int, int] = {}
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        count[init.data_type] = count.get(init.data_type, 0) + n
    if not count:
        return "float32"
    top = max(count, key=lambda k: count[k])
    return {TensorProto.FLOAT16: "float16", TensorProto.INT8: "int8", TensorProto.UINT8: "int8",
            TensorProto.BFLOAT16: "bfloat16"}.get(top, "float32")


def _compare(reference_model: Path, candidate_model: Path, artifact: Path, what: str, rel_tol: float) -> None:
    """CompressorError unless ``candidate_model`` gives finite outputs within ``rel_tol`` of the largest value of
    ``reference_model``'s, on the artifact's example inputs."""
    import numpy as np

    from .loading import load_example_inputs
    from .ort import ort_session, run_onnx

    inputs = prefill_inputs(ort_session(reference_model, artifact=True), load_example_inputs(artifact))
    expected_all, got_all = run_onnx(reference_model, inputs, artifact=True), run_onnx(candidate_model, inputs)
    for name, expected in expected_all.items():
        got = got_all[name]
        if not np.isfinite(got).all():
            raise CompressorError(f"{what} gives non-finite values at output {name!r} on the example inputs")
        err = float(np.abs(got - expected).max()) / (float(np.abs(expected).max()) or 1.0)
        if err > rel_tol:
            raise CompressorError(f"{what} is off by {err:.3g} (relative to the largest value) at output {name!r}, "
                                  f"more than {rel_tol}; pack with --dtype keep")


def _narrow_float16(src: Path, dst_dir: Path) -> list[str]:
    import onnx

    from .export.onnx import save_aligned
    from .export.onnx_cast import narrow_onnx

    proto = onnx.load(str(src), load_external_data=True)
    narrowed, _ = narrow_onnx(proto, "float16", float32_io=True, kept_modules=[])
    return save_aligned(narrowed, dst_dir)


# Runs the converter in a process without address-space randomization: ONNX Runtime writes a table of the ORT
# format model in the iteration order of a hash map seeded by an address, so with randomization the same model
# converts to different bytes on every run. personality() takes effect at the next exec, hence the trampoline;
# it says on stderr whether the kernel allowed it (containers may refuse).
_TRAMPOLINE = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "cur = libc.personality(0xFFFFFFFF)\n"
    "ok = cur != -1 and libc.personality(cur | 0x0040000) != -1 and libc.personality(0xFFFFFFFF) & 0x0040000\n"
    "sys.stderr.write('compressor-aslr:' + ('off' if ok else 'on') + '\\n'); sys.stderr.flush()\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'onnxruntime.tools.convert_onnx_models_to_ort'] + sys.argv[1:])\n"
)


def _to_ort(src_dir: Path, model: str, dst_dir: Path, platform: str) -> tuple[list[str], bool]:
    """Convert with ONNX Runtime's own tool (python -m onnxruntime.tools.convert_onnx_models_to_ort); returns the
    files written and whether the conversion ran without address randomization (reproducible bytes)."""
    with tempfile.TemporaryDirectory(prefix="compress-ort-") as out:
        cmd = [sys.executable, "-c", _TRAMPOLINE, str(src_dir / model),
               "--output_dir", out, "--optimization_style", "Fixed", "--target_platform", platform]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        produced = sorted(Path(out).rglob("*.ort"))
        if proc.returncode != 0 or not produced:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise CompressorError("ONNX Runtime's converter could not make an ORT format model:\n  " +
                                  "\n  ".join(tail))
        shutil.copyfile(produced[0], dst_dir / "model.ort")
        files = ["model.ort"]
        configs = sorted(Path(out).rglob("*.config"))
        if configs:
            # The converter names the model it read by its (temporary) path: name it as the bundle does.
            text = configs[0].read_text().replace(str(produced[0]), "model.ort")
            (dst_dir / "required_operators.config").write_text(text)
            files.append("required_operators.config")
    return files, "compressor-aslr:off" in proc.stderr


def _tokenizer(artifact: Path, manifest: Manifest, dst: Path) -> dict[str, Any] | None:
    """Copy the tokenizer files (making tokenizer.json from a slow tokenizer when needed); the runner's settings."""
    from .data.datasets import tokenizer_for

    copied = set(manifest.model.copied_files)
    if not {"tokenizer.json", "tokenizer_config.json"} & copied:
        return None
    tok = tokenizer_for(artifact)  # the tokenizer compressor's own evaluation uses, padding token and all
    if tok is None:
        raise ArtifactError(f"{artifact}: its tokenizer files cannot be loaded by transformers' AutoTokenizer")
    for name in _TOKENIZER_FILES:
        if name in copied:
            shutil.copyfile(artifact / name, dst / name)
    if "tokenizer.json" not in copied:
        if not getattr(tok, "is_fast", False):
            raise ArtifactError(f"{artifact}: its tokenizer has no fast (tokenizers) version, which the bundle's "
                                "runner needs")
        tok.backend_tokenizer.save(str(dst / "tokenizer.json"))
    if tok.pad_token is None:
        raise ArtifactError(f"{artifact}: its tokenizer has no padding, end or unknown token to pad batches with")
    settings = {"file": "tokenizer.json", "max_length": min(int(tok.model_max_length or 512), 512),
                "pad_token": tok.pad_token, "pad_id": int(tok.pad_token_id)}
    return {**settings, "eos_id": int(tok.eos_token_id)} if tok.eos_token_id is not None else settings


def is_bundle(path: Path) -> bool:
    """Whether ``path`` is a zip that `compress pack` wrote: one top folder holding a bundle.json of our format
    (only such a file may be replaced by a new bundle)."""
    try:
        with zipfile.ZipFile(path) as zf:
            tops = {name.split("/", 1)[0] for name in zf.namelist()}
            if len(tops) != 1:
                return False
            info = zf.getinfo(f"{tops.pop()}/bundle.json")
            if info.file_size > 1 << 20:
                return False
            body = json.loads(zf.read(info))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, RuntimeError, NotImplementedError):
        return False
    return isinstance(body, dict) and body.get("format") == BUNDLE_FORMAT


def _zip(src: Path, output: Path, top: str) -> None:
    """Deterministic zip of ``src`` under the folder ``top``: sorted entries, fixed times and modes."""
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            for path in sorted(p for p in src.rglob("*") if p.is_file()):
                info = zipfile.ZipInfo(f"{top}/{path.relative_to(src).as_posix()}", date_time=_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.create_system = 3  # unix, whatever packs it
                info.external_attr = (0o100755 if path.name == "run.py" else 0o100644) << 16
                info.file_size = path.stat().st_size  # lets zipfile use ZIP64 for members over 2 GiB
                with open(path, "rb") as f, zf.open(info, "w") as out:
                    shutil.copyfileobj(f, out, 1 << 20)
        os.replace(tmp, output)  # the bundle appears whole or not at all
    finally:
        tmp.unlink(missing_ok=True)


def pack_artifact(artifact: Path, output: Path, target: str = "cpu-x86_64", dtype: str = "auto",
                  log: Any = None) -> dict[str, Any]:
    """Pack ``artifact`` into the zip ``output`` for ``target`` (see TARGETS). ``dtype``: "auto" (the target's),
    "keep" or "float16". The artifact is verified first (sha256 of every file). Returns the bundle's description
    (bundle.json) with its path, size and sha256."""
    from .recipe import NAME_PATTERN

    artifact = Path(artifact).resolve()
    manifest = _checked(artifact, output, target, dtype)
    spec = TARGETS[target]
    families = _cpu_families(artifact, manifest, target)
    assert manifest.onnx is not None  # _checked refused an artifact without one
    source_model = artifact / manifest.onnx.model
    stored = _graph_float_type(source_model)
    wanted = spec.dtype if dtype == "auto" else dtype
    if wanted == "float16" and stored == "int8":
        if dtype == "float16":
            raise UsageError("the artifact's ONNX model is int8; float16 applies to float32 exports")
        wanted = "keep"
    name = manifest.name
    if not (isinstance(name, str) and re.fullmatch(NAME_PATTERN, name)):
        name = artifact.name  # the bundle's top folder must never lead out of where it is unpacked
    with tempfile.TemporaryDirectory(prefix="compress-pack-") as tmp:
        stage = Path(tmp) / "bundle"
        stage.mkdir()
        staged = _stage_model(artifact, manifest, Path(tmp), stage, spec, narrow=wanted == "float16" and
                              stored == "float32", stored=stored, log=log)
        tokenizer = _tokenizer(artifact, manifest, stage)
        shutil.copyfile(artifact / "manifest.json", stage / "manifest.json")
        body = _bundle_body(name, target, spec, manifest, staged, tokenizer, artifact)
        if manifest.task == GENERATION_TASK:
            body["generation"] = generation_settings(artifact, manifest, tokenizer, body["inputs"])
        for bundled in _RUNNER if "generation" in body else ["run.py"]:
            shutil.copyfile(Path(__file__).with_name(_RUNNER[bundled]), stage / bundled)
        if families is not None:
            body["int8_cpu_families"] = families
        body["files"] = {p.relative_to(stage).as_posix(): _sha256(p) for p in sorted(stage.rglob("*")) if p.is_file()}
        (stage / "bundle.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        _say(log, f"writing {output}")
        _zip(stage, output, name)
    return {**body, "bundle": str(output), "bytes": output.stat().st_size, "sha256": _sha256(output),
            "model_files": staged.files}


def _checked(artifact: Path, output: Path, target: str, dtype: str) -> Manifest:
    """The artifact's manifest, once the arguments are usable, the artifact matches its manifest, has an ONNX
    model, and ``output`` may be written (its folder is created)."""
    from .manifest import read_manifest
    from .verify import verify_artifact

    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; targets: {', '.join(TARGETS)} (see --list-targets)")
    if dtype not in ("auto", "keep", "float16"):
        raise UsageError(f"--dtype {dtype!r}: use auto, keep or float16")
    manifest = read_manifest(artifact)
    checked = verify_artifact(artifact)
    if not checked["ok"]:
        raise ArtifactError(f"{artifact} does not match its manifest; refusing to pack it:\n  " +
                            "\n  ".join(checked["problems"]))
    if manifest.onnx is None:
        raise UsageError(f"{artifact} has no ONNX model; bundles run on ONNX Runtime. Add `export: {{onnx: {{}}}}` "
                         "to its recipe and run it again")
    if output.suffix != ".zip":
        raise UsageError(f"{output}: bundles are zip files; name it *.zip")
    if output.is_symlink() or (output.exists() and not output.is_file()):
        raise UsageError(f"{output} exists and is not a regular file; choose another -o")
    if output.exists() and not is_bundle(output):
        raise UsageError(f"refusing to overwrite {output}: it is not a compressor bundle (no <name>/bundle.json of "
                         f"format {BUNDLE_FORMAT!r} in it), so it may be someone's data; choose another -o or remove "
                         "it yourself")
    output.parent.mkdir(parents=True, exist_ok=True)
    return manifest


@dataclass
class _Staged:
    """The bundle's model as staged: the ONNX files it came from and the files written."""

    model_dir: Path  #: where the ONNX model the bundle is made from lies (the artifact, or the narrowed copy)
    model_files: list[str]  #: that model's files, the .onnx first
    files: list[str]  #: the model files in the bundle
    model_name: str  #: the file the runner opens
    dtype_note: str
    reproducible: bool = True


def _stage_model(artifact: Path, manifest: Manifest, tmp: Path, stage: Path, spec: Target, *, narrow: bool,
                 stored: str, log: Any) -> _Staged:
    """Put the bundle's model into ``stage``: narrowed to float16 (checked against float32) when ``narrow``,
    converted to ORT format for ORT targets (checked against its source), else copied."""
    from .export.onnx import FLOAT16_TOLERANCE

    assert manifest.onnx is not None  # _checked refused an artifact without one
    source_model = artifact / manifest.onnx.model
    if narrow:
        _say(log, "narrowing the float32 ONNX model to float16 and checking it against float32")
        narrow_dir = tmp / "fp16"
        narrow_dir.mkdir()
        model_files = _narrow_float16(source_model, narrow_dir)
        _compare(source_model, narrow_dir / model_files[0], artifact, "the float16 model", FLOAT16_TOLERANCE)
        dtype_note = "float16 (narrowed at pack time from the float32 export; float32 inputs and outputs)"
        model_dir = narrow_dir
    else:
        model_files = list(manifest.onnx.files)
        model_dir = artifact
        dtype_note = f"{stored} (as exported)"
    if spec.format != "ort":
        for f in model_files:
            shutil.copyfile(model_dir / f, stage / f)
        return _Staged(model_dir, model_files, list(model_files), model_files[0], dtype_note)
    _say(log, f"converting to ORT format for {spec.platform} with ONNX Runtime's converter")
    files, reproducible = _to_ort(model_dir, model_files[0], stage, spec.platform or "amd64")
    if not reproducible and log is not None:
        log.warn("this system refused to turn address randomization off for ONNX Runtime's converter, "
                 "so this ORT format bundle may differ byte for byte from the next one")
    _compare(model_dir / model_files[0], stage / "model.ort", artifact, "the ORT format model", 1e-3)
    return _Staged(model_dir, model_files, files, "model.ort", dtype_note, reproducible)


def _bundle_body(name: str, target: str, spec: Target, manifest: Manifest, staged: _Staged,
                 tokenizer: dict[str, Any] | None, artifact: Path) -> dict[str, Any]:
    """bundle.json's content, but for the hashes of the files."""
    import onnx

    graph = onnx.load(str(staged.model_dir / staged.model_files[0]), load_external_data=False)
    return {
        "format": BUNDLE_FORMAT,
        "format_version": 1,
        "name": name,
        "target": target,
        "target_settings": asdict(spec),
        "model": staged.model_name,
        "model_format": spec.format,
        "dtype": staged.dtype_note,
        "providers": spec.providers,
        "graph_optimization": spec.graph_optimization,
        "task": manifest.task,
        "pooling": "mean" if manifest.task == "text-embedding" else None,
        "inputs": [i.name for i in graph.graph.input],
        "outputs": [o.name for o in graph.graph.output],
        "tokenizer": tokenizer,
        "artifact_manifest_sha256": _sha256(artifact / "manifest.json"),
        "requires": ["numpy", "onnxruntime"] + (["tokenizers"] if tokenizer else []),
        "reproducible": staged.reproducible,
    }


# Which int8 CPU families (compressor.cpu) a bundle can land on: an x86-64 bundle on x86 with or without VNNI.
_FAMILIES_OF = {"cpu-x86_64": ("x86-avx2", "x86-vnni"), "cpu-x86_64-minimal": ("x86-avx2", "x86-vnni"),
                "cpu-arm64": ("arm64",)}


def _cpu_families(artifact: Path, manifest: Manifest, target: str) -> dict[str, Any] | None:
    """For an int8 ONNX artifact: the CPU families this bundle can run on, each verified by the artifact's
    quantization (and its numbers from the last evaluation, measured or emulated). Refuses a bundle target whose
    families the artifact was not quantized for. None for other artifacts and for GPU bundles."""
    quant = manifest.quantization
    if quant.get("mode") not in ("dynamic", "static") or target not in _FAMILIES_OF:
        return None
    declared = quant.get("targets")
    if not isinstance(declared, list):
        raise UsageError(f"{artifact} is int8 but records no quantize.targets (it predates them): nobody checked "
                         "which CPUs its numbers hold on. Run its recipe again with this compressor")
    needed = _FAMILIES_OF[target]
    missing = [f for f in needed if f not in declared]
    if missing:
        raise UsageError(f"a {target} bundle can run on {' and '.join(needed)} CPUs, but {artifact.name} was "
                         f"quantized for {', '.join(declared)} only; add {', '.join(missing)} to the quantize pass's "
                         f"`targets` in its recipe (e.g. `targets: [{', '.join(dict.fromkeys([*declared, *missing]))}]`) "
                         "and run it again")
    numbers: dict[str, Any] = {}
    try:
        report = json.loads((artifact / "report.json").read_text())
    except (OSError, ValueError):
        report = {}
    for row in report.get("results", []) if isinstance(report, dict) else []:
        if isinstance(row, dict) and row.get("device") == "cpu" and row.get("target") in needed and row.get("fidelity"):
            numbers[row["target"]] = {"cos_min": row["fidelity"].get("cos_min"),
                                      "accuracy": (row.get("accuracy") or {}).get("value"),
                                      "emulated": bool(row.get("emulated")),
                                      "measured_on": None if row.get("emulated") else
                                      (report.get("machine") or {}).get("cpu")}
    return {"families": list(needed), "quantized_for": declared, "arithmetic": quant.get("arithmetic"),
            "evaluation": numbers}


def _say(log: Any, message: str) -> None:
    if log is not None:
        log.info(message)
