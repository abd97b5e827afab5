"""Property test (issue #15): `compress validate` on 1,000 mutations of the shipped recipes never shows a
traceback, exits 0 or 2 only, and answers each in under 2 seconds.

Mutations are drawn by hypothesis (derandomized, so CI sees the same 1,000 every run): keys deleted, misspelt or
added; values replaced by other types (None, booleans, huge, negative, NaN and infinite numbers, strings, lists,
mappings), wrapped in lists or mappings or nested deep; subtrees shared between places (YAML anchors and aliases,
up to alias fan-outs); and raw-text damage after dumping (truncation, stray YAML punctuation, tabs, duplicated
lines). `validate` is invoked in-process through click, as the `compress` entry point runs it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.cli import cli

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "recipes").glob("*.yaml"))}

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=24) | st.sampled_from(["", "-1", "1e999", ".nan", "~", "0x10", "500MB", "2GiB",
                                                     "float16", "int8", "cpu", "cuda", "zoo", "hf", "../../etc"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=10) | st.integers(), inner, max_size=3), max_leaves=8)


def _paths(root: Any, limit: int = 2000) -> list[tuple]:
    """Key paths of the tree, breadth first, at most ``limit`` (fan-outs make the count explode)."""
    found, queue = [], [((), root)]
    while queue and len(found) < limit:
        prefix, node = queue.pop(0)
        found.append(prefix)
        if isinstance(node, dict):
            queue += [(prefix + (k,), v) for k, v in node.items()]
        elif isinstance(node, list):
            queue += [(prefix + (i,), v) for i, v in enumerate(node)]
    return found


def _chain(root: Any, path: tuple) -> list[Any]:
    """The objects from the root down to (not including) the node at ``path``."""
    chain = [root]
    for key in path[:-1]:
        chain.append(chain[-1][key])
    return chain


def _get(node: Any, path: tuple) -> Any:
    for key in path:
        node = node[key]
    return node


def _set(root: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(root, path[:-1])[path[-1]] = value
    return root


@st.composite
def mutate(draw: st.DrawFn, root: Any) -> Any:
    path = draw(st.sampled_from(_paths(root)))
    op = draw(st.sampled_from(["replace", "delete", "rename", "add", "wrap-list", "wrap-map", "deep", "share",
                               "fan-out"]))
    target = _get(root, path)
    if op == "replace":
        return _set(root, path, draw(values))
    if op == "delete" and path:
        parent = _get(root, path[:-1])
        del parent[path[-1]]
        return root
    if op == "rename" and path and isinstance(path[-1], str):
        parent = _get(root, path[:-1])
        key = path[-1]
        new = draw(st.sampled_from([key[:-1], key + "s", key.upper(), key.replace("_", "-"), " " + key, ""]))
        parent[new] = parent.pop(key)
        return root
    if op == "add" and isinstance(target, dict):
        target[draw(st.text(max_size=12))] = draw(values)
        return root
    if op == "wrap-list":
        return _set(root, path, [target])
    if op == "wrap-map":
        return _set(root, path, {draw(st.text(max_size=8)): target})
    if op == "deep":
        deep: Any = target
        for _ in range(draw(st.integers(10, 60))):
            deep = [deep]
        return _set(root, path, deep)
    if op == "share" and path:
        # The same object in two places: yaml.safe_dump writes it once with an anchor and then an alias.
        other = draw(st.sampled_from(_paths(root)))
        if other and not any(node is target for node in _chain(root, other)):  # never a cycle
            return _set(root, other, target)
    if op == "fan-out":
        layer: Any = target
        for _ in range(draw(st.integers(1, 4))):
            layer = [layer] * draw(st.integers(2, 9))  # one alias repeated: expands multiplicatively
        return _set(root, path, layer)
    return root


@st.composite
def recipe_texts(draw: st.DrawFn) -> str:
    import copy

    name = draw(st.sampled_from(sorted(RECIPES)))
    data = copy.deepcopy(RECIPES[name])
    for _ in range(draw(st.integers(1, 4))):
        data = draw(mutate(data))
    try:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    except (yaml.YAMLError, RecursionError):
        text = yaml.safe_dump(RECIPES[name], sort_keys=False)
    damage = draw(st.sampled_from(["none", "none", "truncate", "insert", "duplicate-line", "tab"]))
    if damage == "truncate" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif damage == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(list(":{}[]&*!|>-#'\"%@`,?\n") + ["*a", "&a ", "<<: *a\n"])) + text[at:]
    elif damage == "duplicate-line":
        lines = text.splitlines(keepends=True)
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        text = "".join(lines[: i + 1] + lines[i:i + 1] + lines[i + 1:])
    elif damage == "tab":
        text = text.replace("  ", "\t", 1)
    return text


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=recipe_texts())
def test_validate_on_mutated_recipes_exits_0_or_2_quickly_without_tracebacks(workdir: Path, text: str) -> None:
    path = workdir / "mutated.yaml"
    path.write_text(text, encoding="utf-8")
    start = time.perf_counter()
    result = CliRunner().invoke(cli, ["validate", str(path)])
    seconds = time.perf_counter() - start
    output = result.output
    assert result.exit_code in (0, 2), f"exit {result.exit_code} for:\n{text}\n---\n{output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (text, result.exception)
    assert "Traceback" not in output and "unexpected failure" not in output, f"{text}\n---\n{output}"
    assert seconds < 2, f"{seconds:.2f}s for:\n{text}"
    if result.exit_code == 2:
        assert output.startswith("error: "), output
        assert max(len(line) for line in output.splitlines()) < 1500, output[:3000]  # quoted values are clipped
