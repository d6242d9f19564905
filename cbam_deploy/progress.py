"""Progress of long work, on stderr (stdout belongs to ``--json``).

One line per step that ends (an artifact built, with its seconds and size; a target quantized; an
artifact verified), and a bar over work that takes a while in rounds (calibration batches, verify's
artifacts, bench's rounds) where stderr is a terminal; where it is not (a log file, CI), the bars are
left out and the lines stay. ``Progress(quiet=True)`` says nothing. Commands take a ``progress``
argument; ``NULL`` (nothing shown) is what the library uses when none is given.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn


def _size(size_bytes: int | None) -> str:
    if not size_bytes:
        return ""
    return f", {size_bytes / 1e6:.1f} MB" if size_bytes >= 1e5 else f", {size_bytes / 1e3:.1f} kB"


class Progress:
    """See the module doc. ``console``: where it writes (default: stderr); ``bars``: draw bars (default:
    when that console is a terminal)."""

    def __init__(self, quiet: bool = False, console: Console | None = None, bars: bool | None = None) -> None:
        self.quiet = quiet
        self.console = console or Console(stderr=True, highlight=False)
        self.bars = self.console.is_terminal if bars is None else bars
        self._live: RichProgress | None = None

    def line(self, text: str) -> None:
        """One line that stays."""
        if not self.quiet:
            self.console.print(escape(text), soft_wrap=True)

    def artifact(self, outcome) -> None:
        """One line for a built artifact (``backends.base.BuildOutcome``): its name, seconds and size, or
        why it was skipped or failed."""
        seconds = f" in {outcome.seconds:.1f} s" if outcome.seconds is not None else ""
        if outcome.name:
            self.line(f"built {outcome.name}{seconds}{_size(outcome.size_bytes)}")
        elif outcome.failed:
            self.line(f"failed {outcome.format} {outcome.precision}{seconds}: {outcome.failed}")
        elif outcome.skipped:
            self.line(f"skipped {outcome.format} {outcome.precision}: {outcome.skipped}")

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator:
        """A bar over ``total`` steps (advance it by calling what this yields); a line when it ends."""
        started = time.perf_counter()
        if self.quiet or not self.bars or self._live is not None:
            yield lambda steps=1: None
        else:
            bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), console=self.console, transient=True)
            self._live = bar
            with bar:
                task = bar.add_task(escape(description), total=total)
                yield lambda steps=1: bar.advance(task, steps)
            self._live = None
        self.line(f"{description}: done in {time.perf_counter() - started:.1f} s")


class _Null(Progress):
    def __init__(self) -> None:
        super().__init__(quiet=True, console=Console(file=sys.stderr, quiet=True), bars=False)


NULL = _Null()
