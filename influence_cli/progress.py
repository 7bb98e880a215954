"""Progress reporting that the pipeline can use without knowing about terminals.

The pipeline and library code call a `Reporter`; the CLI passes one that draws rich
progress bars on stderr, library users get the silent default.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter:
    """Silent reporter: the default for library use and tests."""

    @contextlib.contextmanager
    def task(self, description: str, total: Optional[int]) -> Iterator[Callable[[int], None]]:
        yield lambda n: None

    @contextlib.contextmanager
    def stages(self, total: Optional[int]) -> Iterator[Callable[[str, int], None]]:
        """A callback ``(stage, n_examples)`` for library code with several passes."""
        yield lambda stage, n: None

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass


class RichReporter(Reporter):
    """Progress bars and messages on a rich console (stderr in the CLI)."""

    def __init__(self, console: Console):
        self.console = console

    @contextlib.contextmanager
    def task(self, description: str, total: Optional[int]) -> Iterator[Callable[[int], None]]:
        progress = self._progress()
        with progress:
            task_id = progress.add_task(description, total=total)
            yield lambda n: progress.advance(task_id, n)

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold blue]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )

    @contextlib.contextmanager
    def stages(self, total: Optional[int]) -> Iterator[Callable[[str, int], None]]:
        progress = self._progress()
        tasks: dict[str, Any] = {}

        def advance(stage: str, n: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.advance(tasks[stage], n)

        with progress:
            yield advance

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
