"""Progress for long work (applying a plan, a fleet run): a rich progress bar on a terminal,
nothing at all when stderr is not one (CI logs, pipes), so output stays machine-readable."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[str], None]]:
    """Yields `advance(label)`, to call once per finished unit of work."""
    if total <= 1 or not sys.stderr.isatty():
        yield lambda label: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[label]}"), console=Console(stderr=True),
                   transient=True)
    with bar:
        task = bar.add_task(description, total=total, label="")

        def advance(label: str) -> None:
            bar.update(task, advance=1, label=label)

        yield advance
