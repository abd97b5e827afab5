"""YAML loading that remembers where every value came from, so errors can say file:line:col.

PyYAML's constructors drop positions; composing the node graph ourselves keeps them. Duplicate keys are an
error here (PyYAML silently keeps the last one, which hides typos in long recipes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import Problem, RecipeError

__all__ = ["Located", "load_yaml"]

Path_ = tuple[Any, ...]


@dataclass
class Located:
    """A parsed YAML document plus the (line, col) of every value and mapping key, 1-based, by key path."""

    data: Any
    file: str
    values: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    # Conversion state: values counted so far (an alias counts its whole subtree at every use), and each node
    # already converted with its subtree's count, so an alias is converted once, not once per use.
    count: int = field(default=0, repr=False)
    _done: dict[int, tuple[Any, int]] = field(default_factory=dict, repr=False)

    def where(self, path: Path_, *, key: bool = False) -> tuple[int | None, int | None]:
        """Best position for ``path``: the exact node, else the nearest ancestor that exists."""
        table = self.keys if key else self.values
        if path in table:
            return table[path]
        p = tuple(path)
        while p:
            if p in self.values:
                return self.values[p]
            p = p[:-1]
        return self.values.get((), (None, None))


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def load_yaml(text: str, file: str) -> Located:
    """Parse one YAML document from ``text``; raise RecipeError with the position on any syntax error."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        what = exc.problem or exc.context or "syntax error"
        raise RecipeError(
            Problem(
                f"YAML syntax error: {what}",
                file=file,
                line=line,
                col=col,
                hint="check indentation (spaces, not tabs), quoting and ':' after each key",
            )
        ) from exc
    except yaml.YAMLError as exc:
        raise RecipeError(Problem(f"YAML error: {exc}", file=file)) from exc
    finally:
        loader.dispose()
    located = Located(data=None, file=file)
    if root is None:
        return located
    located.data = _convert(root, (), loader, located)
    return located


MAX_VALUES = 100_000  # values a recipe may expand to: aliases of aliases can multiply a few lines into billions


def _convert(node: yaml.Node, path: Path_, loader: yaml.SafeLoader, out: Located) -> Any:
    """The Python value of ``node``, recording positions by key path. A node met again (a YAML alias) is not
    converted again: its value is reused and its size counted, so an alias bomb is refused in time proportional to
    the text, not to what it would expand to (its paths get the position of the nearest recorded ancestor)."""
    done = out._done.get(id(node))
    if done is not None:
        out.count += done[1]
        _check_count(node, out)
        return done[0]
    out.values[path] = _mark(node)
    before = out.count
    out.count += 1
    _check_count(node, out)
    value = _convert_new(node, path, loader, out)
    out._done[id(node)] = (value, out.count - before)
    return value


def _check_count(node: yaml.Node, out: Located) -> None:
    if out.count > MAX_VALUES:
        line, col = _mark(node)
        raise RecipeError(Problem(f"the recipe expands to more than {MAX_VALUES:,} values (YAML aliases of aliases?)",
                                  file=out.file, line=line, col=col,
                                  hint="recipes are small: write the values out, or use fewer nested aliases"))


def _convert_new(node: yaml.Node, path: Path_, loader: yaml.SafeLoader, out: Located) -> Any:
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves '<<' merge keys into plain pairs
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node, loader, out) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise RecipeError(
                    Problem(
                        "mapping keys must be plain scalars",
                        file=out.file,
                        line=_mark(key_node)[0],
                        col=_mark(key_node)[1],
                    )
                )
            if key in result:
                first = out.keys.get(path + (key,), (None, None))[0]
                raise RecipeError(
                    Problem(
                        f"duplicate key {key!r} (first given on line {first})",
                        file=out.file,
                        line=_mark(key_node)[0],
                        col=_mark(key_node)[1],
                        hint="each key may appear once in a mapping; remove or merge one of them",
                    )
                )
            out.keys[path + (key,)] = _mark(key_node)
            result[key] = _convert(value_node, path + (key,), loader, out)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, path + (i,), loader, out) for i, item in enumerate(node.value)]
    return _scalar(node, loader, out)


def _scalar(node: yaml.Node, loader: yaml.SafeLoader, out: Located) -> Any:
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        # Bad tags (`!custom`, `!!python/object`) and unparseable typed scalars (`!!int abc`, `2001-02-30`).
        line, col = _mark(node)
        what = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(
            Problem(f"cannot read the value {node.value!r}: {what}", file=out.file, line=line, col=col,
                    hint="recipes use plain YAML values; quote it to make it a string")
        ) from None
