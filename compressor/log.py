"""Progress and messages: rich spinners on a terminal, plain timestamped lines elsewhere (CI logs)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import TextIO

__all__ = ["Reporter", "progress"]

# The reporter of the run in progress, for code far below the pipeline that reports long work of its own (the zoo
# training a model at first use) without a reporter handed down through every layer.
_ACTIVE: ContextVar[Reporter | None] = ContextVar("compressor_reporter", default=None)


def progress(text: str) -> None:
    """A progress note through the active run's reporter (quiet runs stay quiet), else on stderr."""
    reporter = _ACTIVE.get()
    if reporter is not None:
        reporter.info(text)
    else:
        print(f"compress: {text}", file=sys.stderr, flush=True)


class Reporter:
    """Prints progress of long steps to stderr. ``quiet`` keeps only warnings and errors."""

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False, force_plain: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.fancy = not force_plain and self.stream.isatty()
        self._console = None
        if self.fancy:
            from rich.console import Console

            self._console = Console(file=self.stream, highlight=False)

    def _plain(self, text: str) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(f"{stamp} compress: {text}", file=self.stream, flush=True)

    @contextmanager
    def active(self) -> Iterator[Reporter]:
        """Make this the reporter :func:`progress` writes to, for the block."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def info(self, text: str) -> None:
        """A progress note."""
        if self.quiet:
            return
        if self._console is not None:
            self._console.print(f"  [dim]{text}[/dim]")
        else:
            self._plain(text)

    def warn(self, text: str) -> None:
        """Something the user should read; printed even when quiet."""
        if self._console is not None:
            self._console.print(f"[yellow]warning:[/yellow] {text}")
        else:
            self._plain(f"warning: {text}")

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        """A long step: spinner (terminal) or start/finish lines (plain), with its duration."""
        start = time.perf_counter()
        if self.quiet:
            yield
            return
        if self._console is not None:
            with self._console.status(f"{title}..."):
                yield
            self._console.print(f"[green]✓[/green] {title} [dim]({time.perf_counter() - start:.1f}s)[/dim]")
        else:
            self._plain(f"{title}...")
            yield
            self._plain(f"{title}: done in {time.perf_counter() - start:.1f}s")
