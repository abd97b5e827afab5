"""Write an artifact directory so that readers only ever see a complete one.

Work happens in a hidden sibling ``.<name>.compress-tmp-<pid>-<token>``; on success it replaces the target in
one step (Linux ``renameat2(RENAME_EXCHANGE)``, falling back to two renames). A failed or interrupted run removes
its temporary directory; one killed outright leaves it, and the next run in that directory removes it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CompressorError, EXIT_USAGE
from .manifest import MANIFEST, REPORT_FILES, is_artifact

__all__ = ["staged_dir", "scratch_dir", "check_target", "prepare_target", "clean_stale", "TargetError"]

_MARK = ".compress-tmp-"


class TargetError(CompressorError):
    """The output path cannot be used."""

    exit_code = EXIT_USAGE


def check_target(target: Path) -> None:
    """Refuse to replace anything but an earlier artifact (exactly its files) or an empty directory, and never
    the working directory: nothing of the user's is lost."""
    if target.is_symlink():
        raise TargetError(f"output path {target} is a symbolic link; give the real directory instead")
    if target.exists() and not target.is_dir():
        raise TargetError(f"output path {target} exists and is not a directory; choose another -o or remove it")
    cwd = Path.cwd().resolve()
    if target.resolve() == cwd or target.resolve() in cwd.parents:
        raise TargetError(f"output path {target} is (or contains) the current directory; choose a subdirectory")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not is_artifact(target):
        raise TargetError(
            f"refusing to replace {target}: it is not empty and holds no compressor manifest.json, so it is not an "
            "earlier artifact; choose another output directory (-o) or remove it yourself"
        )
    # Reports are written beside the manifest by the evaluator (they hold timings, so they are not hashed in it).
    known = set(json.loads((target / MANIFEST).read_text()).get("files", {})) | {MANIFEST, *REPORT_FILES}
    extra = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    extra = [rel for rel in extra if rel not in known]
    if extra:
        raise TargetError(
            f"refusing to replace {target}: it is an earlier artifact, but these files in it are not part of that "
            f"artifact and would be lost: {', '.join(extra[:10])}; move them out or choose another -o"
        )


def prepare_target(target: Path) -> None:
    """Check ``target`` and that its parent can take a new directory, before any long work starts."""
    target = target.absolute()
    check_target(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{_MARK}{os.getpid()}-probe")
        os.rmdir(probe)
    except OSError as exc:
        raise TargetError(f"cannot write the artifact to {target}: {exc.strerror or exc}; choose another -o") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: Path) -> list[Path]:
    """Remove temporary directories left in ``parent`` by runs that no longer exist; returns what was removed."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        name = entry.name
        if not name.startswith(".") or _MARK not in name:
            continue
        try:
            pid = int(name.split(_MARK, 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on normal exit it becomes ``target``."""
    target = target.absolute()
    check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent)
    tmp = target.parent / f".{target.name}{_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        check_target(target)  # it may have changed while we worked
        if not target.exists():
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp)  # tmp now holds the previous artifact
        else:
            old = target.parent / f".{target.name}{_MARK}{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def scratch_dir(target: Path) -> Iterator[Path]:
    """A fresh temporary directory beside ``target`` for a run's intermediate files, removed on exit (and, after
    a run killed outright, by the next run's clean_stale, like the staging directory)."""
    target = target.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}{_MARK}{os.getpid()}-scratch-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
