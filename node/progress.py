"""Progress bars on a terminal, the plain log lines everywhere else.

A bar is drawn only when stdout is a terminal and `$FEDPT_NO_PROGRESS` is unset (or "0"); piped
output, log files and tests see exactly the lines they saw before. While a bar is shown, rich
redirects stdout, so `print`ed log lines appear above it. fedpt/ imports this too (node code
must not import from fedpt/)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import IO

from rich.console import Console
from rich.errors import LiveError
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

DISABLE_ENV = "FEDPT_NO_PROGRESS"
REFRESH_PER_SECOND = 2


def progress_enabled(stream: IO | None = None) -> bool:
    """Bars on `stream` (default stdout): a terminal, and not turned off by $FEDPT_NO_PROGRESS."""
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return False
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class Bar:
    """One task of a live rich Progress; with no progress (bars off) every call does nothing."""

    def __init__(self, progress: Progress | None, description: str, total: float | None,
                 **fields: str) -> None:  # fmt: skip
        self.progress = progress
        self._task = progress.add_task(description, total=total, **fields) if progress else None

    @property
    def shown(self) -> bool:
        return self.progress is not None

    def update(self, completed: float, **fields: str) -> None:
        if self.progress is not None:
            self.progress.update(self._task, completed=completed, **fields)


def _description() -> TextColumn:
    return TextColumn("[progress.description]{task.description}")


STEP_COLUMNS = (_description, BarColumn, MofNCompleteColumn, TaskProgressColumn,
                lambda: TextColumn("{task.fields[rate]}"), lambda: TextColumn("{task.fields[loss]}"),
                TimeRemainingColumn)  # fmt: skip
TRANSFER_COLUMNS = (_description, BarColumn, DownloadColumn, TransferSpeedColumn,
                    TimeRemainingColumn)  # fmt: skip
COUNT_COLUMNS = (_description, BarColumn, MofNCompleteColumn, TimeRemainingColumn)


@contextmanager
def _bar(
    columns: tuple[Callable[[], ProgressColumn], ...],
    description: str,
    total: float | None,
    *,
    enabled: bool,
    console: Console | None,
    transient: bool,
    **fields: str,
) -> Iterator[Bar]:
    """A Bar, live for the `with` block when `console` is given or bars are enabled."""
    if console is None and not (enabled and progress_enabled()):
        yield Bar(None, description, total)
        return
    # Redrawn twice a second, not rich's default 10: the redraw thread competes with training
    # for the cores (bench/trainer_throughput.py measures the bar's cost).
    progress = Progress(*(c() for c in columns), console=console, transient=transient,
                        refresh_per_second=REFRESH_PER_SECOND)  # fmt: skip
    try:
        progress.start()
    except LiveError:  # another bar is already live: this one stays silent
        yield Bar(None, description, total)
        return
    try:
        yield Bar(progress, description, total, **fields)
    finally:
        progress.stop()


def step_bar(
    description: str, total: int, *, enabled: bool = True, console: Console | None = None
) -> AbstractContextManager[Bar]:
    """Optimizer steps done of `total`, with the fields `rate` (tok/s) and `loss`."""
    return _bar(STEP_COLUMNS, description, total, enabled=enabled, console=console,
                transient=False, rate="", loss="")  # fmt: skip


def count_bar(
    description: str, total: int, *, enabled: bool = True, console: Console | None = None
) -> AbstractContextManager[Bar]:
    """Things (rounds) done of `total`."""
    return _bar(COUNT_COLUMNS, description, total, enabled=enabled, console=console,
                transient=False)  # fmt: skip


@contextmanager
def transfer_bar(
    description: str,
    total_bytes: int | None,
    chunk_bytes: int,
    *,
    enabled: bool = True,
    console: Console | None = None,
) -> Iterator[Callable[[int], None]]:
    """Bytes moved (and their speed, and the time left when `total_bytes` is known), fed by a
    chunk count: yields `on_chunks(n)` for the `progress` callbacks of node/client.py."""
    with _bar(TRANSFER_COLUMNS, description, total_bytes, enabled=enabled, console=console,
              transient=True) as bar:  # fmt: skip

        def on_chunks(chunks: int) -> None:
            done = chunks * chunk_bytes
            bar.update(min(done, total_bytes) if total_bytes is not None else done)

        yield on_chunks
