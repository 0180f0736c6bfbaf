"""Progress bars: one ``rich`` bar on stderr for every loop that can take more than a second
(training, faithfulness evaluation, explaining the examples of a report).

``with progress_bar(total, "evaluate") as bar: ... bar.advance()`` shows the description, the
bar, ``done/total``, the elapsed and the remaining time, and a status text (``bar.status(...)``).
The bar is drawn (in place) only when stderr is a terminal, so logs, pipes and captured output stay
free of it; ``enabled=False`` gives a bar that does nothing anywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class ProgressBar:
    """A handle on one bar of :func:`progress_bar` (a no-op when the bar is disabled)."""

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self._progress, self._task = progress, task

    def advance(self, steps: int = 1) -> None:
        """Count ``steps`` more items as done."""
        if self._progress is not None:
            self._progress.advance(self._task, steps)

    def status(self, text: str) -> None:
        """Show ``text`` after the bar (e.g. the current loss)."""
        if self._progress is not None:
            self._progress.update(self._task, status=text)


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[ProgressBar]:
    """A ``rich`` progress bar on stderr over ``total`` items; see the module docstring."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield ProgressBar()
        return
    with Progress(*columns, console=console, refresh_per_second=4) as progress:
        yield ProgressBar(progress, progress.add_task(description, total=total, status=""))


__all__ = ["ProgressBar", "progress_bar"]
