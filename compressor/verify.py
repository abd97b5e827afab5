"""`compress verify`: is an artifact directory exactly what `compress run` wrote?

Every file listed in manifest.json is hashed again (missing, resized and modified files are named); files the
manifest does not list are named as extra (the reports `compress eval` writes next to it are expected and listed
apart); every safetensors header is parsed strictly (offsets contiguous and inside the file); every ONNX model's
external-data references must point at a file inside the artifact, within its size, with the bytes the tensor
needs. No torch import: verification runs in seconds, in release pipelines, on machines without the model's
libraries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .manifest import MANIFEST, REPORT_FILES, check_onnx_external_data, read_manifest, sha256_file

__all__ = ["verify_artifact"]


def verify_artifact(root: Path, *, hashes: bool = True) -> dict[str, Any]:
    """Check ``root`` against its manifest. Returns {"ok", "files": {rel: {"status", "detail"}}, "problems",
    "reports"}; status is ok, missing, modified, extra or invalid. ``hashes=False`` checks sizes only."""
    from .safetensors_io import read_header

    root = Path(root)
    try:
        manifest = read_manifest(root)
    except ArtifactError as exc:
        return {"ok": False, "artifact": str(root), "files": {}, "problems": [f"{MANIFEST}: {exc}"], "reports": []}
    files: dict[str, dict[str, Any]] = {}
    for rel, info in sorted(manifest.files.items()):
        path = root / rel
        if not _inside(root, path):
            files[rel] = {"status": "invalid", "detail": "the manifest lists a path outside the artifact"}
        elif not path.is_file():
            files[rel] = {"status": "missing", "detail": "listed in the manifest, not on disk"}
        elif path.stat().st_size != info.bytes:
            files[rel] = {"status": "modified",
                          "detail": f"{path.stat().st_size} bytes, the manifest says {info.bytes}"}
        elif hashes and sha256_file(path) != info.sha256:
            files[rel] = {"status": "modified", "detail": "sha256 differs from the manifest"}
        else:
            files[rel] = {"status": "ok", "detail": "sha256 matches" if hashes else "size matches"}
    reports = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST or rel in files:
            continue
        if rel in REPORT_FILES:
            reports.append(rel)
        else:
            files[rel] = {"status": "extra", "detail": "on disk, not in the manifest"}
    for rel, entry in files.items():
        if entry["status"] != "ok":
            continue
        path = root / rel
        try:
            if rel.endswith(".safetensors"):
                read_header(path)
            elif rel.endswith(".onnx"):
                check_onnx_external_data(path, root, set(manifest.files))
        except ArtifactError as exc:
            files[rel] = {"status": "invalid", "detail": str(exc)}
    problems = [f"{rel}: {e['status']}: {e['detail']}" for rel, e in files.items() if e["status"] != "ok"]
    return {"ok": not problems, "artifact": str(root), "files": files, "problems": problems, "reports": reports,
            "hashes": hashes}


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True
