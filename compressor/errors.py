"""Typed errors and the exit codes they map to (DESIGN.md: 0 ok, 1 runtime, 2 recipe/usage, 3 gate)."""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "EXIT_GATE",
    "CompressorError",
    "RecipeError",
    "Problem",
    "ArtifactError",
    "UsageError",
    "GateFailure",
]

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_GATE = 3


class CompressorError(Exception):
    """An error a user can act on: printed as one paragraph, no traceback unless ``--debug``."""

    exit_code: int = EXIT_RUNTIME


class Problem:
    """One thing wrong with a recipe, with the place it was found."""

    __slots__ = ("file", "line", "col", "path", "message", "hint")

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        col: int | None = None,
        path: str = "",
        hint: str = "",
    ) -> None:
        self.file, self.line, self.col = file, line, col
        # Messages quote the user's values; a value can be a 10,000-element list or a megabyte string, and one
        # problem must still read as one paragraph.
        self.path, self.message, self.hint = _clip(path, 200), _clip(message, 400), _clip(hint, 1200)

    def __str__(self) -> str:
        where = self.file or "<recipe>"
        if self.line is not None:
            where += f":{self.line}"
            if self.col is not None:
                where += f":{self.col}"
        text = f"{where}: "
        if self.path:
            text += f"{self.path}: "
        text += self.message
        if self.hint:
            text += "\n    " + self.hint.replace("\n", "\n    ")
        return text

    def sort_key(self) -> tuple[int, int]:
        return (self.line or 0, self.col or 0)


def _clip(text: str, limit: int) -> str:
    """``text`` shortened in the middle to at most ``limit`` characters."""
    if len(text) <= limit:
        return text
    keep = (limit - 5) // 2
    return f"{text[:keep]} ... {text[-keep:]}"


class RecipeError(CompressorError):
    """The recipe (or a command-line value standing in for one) is invalid: exit code 2."""

    exit_code = EXIT_USAGE

    def __init__(self, problems: list[Problem] | Problem | str) -> None:
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = sorted(problems, key=Problem.sort_key)
        count = len(self.problems)
        head = "invalid recipe" if count == 1 else f"invalid recipe ({count} problems)"
        super().__init__(head + ":\n" + "\n".join(str(p) for p in self.problems))


class ArtifactError(CompressorError):
    """An artifact directory is missing files, truncated, corrupt or not ours: exit code 1."""


class UsageError(CompressorError):
    """A command-line value is unusable (a path that is not there, an unknown name): exit code 2."""

    exit_code = EXIT_USAGE


class GateFailure(CompressorError):
    """Artifacts and reports were written, but at least one release gate was missed: exit code 3."""

    exit_code = EXIT_GATE
