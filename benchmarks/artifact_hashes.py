"""Hashes of what every shipped recipe writes: proof that a reorganisation changed no artifact byte.

    python benchmarks/artifact_hashes.py --tree OLD_CHECKOUT --json old.json    # e.g. a `git worktree` of main
    python benchmarks/artifact_hashes.py --json new.json                        # this checkout
    python benchmarks/artifact_hashes.py --compare old.json new.json            # exit 1 on any difference

Each recipe in recipes/ is run with `compress run` from the checkout given by --tree (its own code, by
PYTHONPATH), with its `evaluate` and `gates` sections removed (they measure and report; they write no model file),
into a temporary directory. The sha256 of every file the manifest lists, and of manifest.json itself, is printed as
JSON: {recipe: {file: sha256}}. Manifests hold library versions, so compare runs made in one environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from compressor.manifest import sha256_file as _sha

HERE = Path(__file__).resolve().parent.parent


def hashes(tree: Path, only: list[str] | None) -> dict[str, dict[str, str]]:
    """Run every shipped recipe of ``tree`` without evaluation; {recipe: {file: sha256}}."""
    results: dict[str, dict[str, str]] = {}
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="artifact-hashes-") as tmp:
        for recipe in sorted((tree / "recipes").glob("*.yaml")):
            if only and recipe.stem not in only:
                continue
            data = yaml.safe_load(recipe.read_text())
            data.pop("evaluate", None)
            data.pop("gates", None)
            stripped = Path(tmp) / recipe.name
            stripped.write_text(yaml.safe_dump(data, sort_keys=False))
            out = Path(tmp) / recipe.stem
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "compressor", "run", str(stripped), "-o", str(out), "-q"],
                                  cwd=tree, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{recipe.name} failed:\n{proc.stderr[-3000:]}")
            manifest = json.loads((out / "manifest.json").read_text())
            files = {rel: _sha(out / rel) for rel in sorted(manifest["files"])}
            files["manifest.json"] = _sha(out / "manifest.json")
            results[recipe.stem] = files
            print(f"{recipe.stem}: {len(files)} files in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return results


def compare(old: dict[str, dict[str, str]], new: dict[str, dict[str, str]]) -> list[str]:
    """Every recipe or file whose hash differs, is missing or is new."""
    problems = []
    for recipe in sorted(set(old) | set(new)):
        a, b = old.get(recipe), new.get(recipe)
        if a is None or b is None:
            problems.append(f"{recipe}: only in {'new' if a is None else 'old'}")
            continue
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                problems.append(f"{recipe}/{name}: {a.get(name, 'absent')[:12]} -> {b.get(name, 'absent')[:12]}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=HERE, help="checkout whose code and recipes to run")
    parser.add_argument("--json", type=Path, help="also write the hashes to this file")
    parser.add_argument("--only", nargs="*", help="recipe names (file stems) to run; default all")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = parser.parse_args()
    if args.compare:
        old, new = (json.loads(p.read_text()) for p in args.compare)
        problems = compare(old, new)
        print(json.dumps({"recipes": len(new), "identical": not problems, "differences": problems}, indent=2))
        return 1 if problems else 0
    result = hashes(args.tree.resolve(), args.only)
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
