"""Progress for long work, drawn with rich only where someone watches.

`progress` (a fleet run): a bar on stderr when stderr is a terminal and there is more than one
unit of work. `working` (one long call: a VM's boot, an image's import) and `steps` (applying a
plan): a spinner with the time elapsed on stdout when stdout is a terminal. Anywhere else
(pipes, CI logs, files) nothing at all is drawn, so the output stays what the command prints.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


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


def watched() -> bool:
    """Whether stdout is a terminal: then long work shows how far it got."""
    return sys.stdout.isatty()


# How often a long step's detail is asked for again.
DETAIL_SECONDS = 0.5


class Steps:
    """A plan's progress: a bar over its steps, and under it a spinner with the time the
    current long step (a VM's boot, an instance's start) has taken so far and, when the step
    says how it goes (`detail`, a VM's boot phase and console), that too."""

    def __init__(self, bar: Any, total: int) -> None:
        self._bar = bar
        self._task = bar.add_task("applying", total=total, label="") if total else None
        self._long: Any = None
        self._ticking: threading.Event | None = None

    def begin(self, label: str, *, long: bool = False,
              detail: Callable[[], str] | None = None) -> None:
        """A step starts; `long` ones get a spinner and a clock of their own, and under it
        what `detail()` returns, asked again every DETAIL_SECONDS on a thread of its own."""
        self.stop_detail()
        if self._task is not None:
            self._bar.update(self._task, label=label)
        if long:
            self._long = self._bar.add_task(label, total=None, label="")
            if detail is not None:
                self._ticking = threading.Event()
                threading.Thread(target=self._tick, args=(self._long, detail, self._ticking),
                                 daemon=True, name="step-detail").start()
        self._bar.refresh()

    def _tick(self, task: Any, detail: Callable[[], str], stopped: threading.Event) -> None:
        from rich.markup import escape

        while not stopped.wait(DETAIL_SECONDS):
            try:
                text = detail()
            except Exception:  # noqa: BLE001, S112 -- progress is best effort; the step reports errors
                continue
            if not stopped.is_set():
                self._bar.update(task, label=escape(text))

    def stop_detail(self) -> None:
        if self._ticking is not None:
            self._ticking.set()
            self._ticking = None

    def done(self, label: str) -> None:
        self.stop_detail()
        if self._long is not None:
            self._bar.remove_task(self._long)
            self._long = None
        if self._task is not None:
            self._bar.update(self._task, advance=1, label=label)


class _Quiet:
    def begin(self, label: str, *, long: bool = False,
              detail: Callable[[], str] | None = None) -> None:
        pass

    def done(self, label: str) -> None:
        pass


@contextmanager
def steps(total: int) -> Iterator[Steps | _Quiet]:
    """Progress over `total` steps, on stdout when it is a terminal (else nothing)."""
    if not watched():
        yield _Quiet()
        return
    with _live_progress() as bar:
        shown = Steps(bar, total)
        try:
            yield shown
        finally:
            shown.stop_detail()  # a failed step's detail stops with the display


@contextmanager
def working(what: str) -> Iterator[Callable[[str], None]]:
    """A spinner, `what` and the time elapsed while one long call runs, on stdout when it is a
    terminal (else nothing). Yields `say(text)`, to change what it shows."""
    if not watched():
        yield lambda text: None
        return
    with _live_progress(bar=False) as bar:
        task = bar.add_task(what, total=None, label="")
        bar.refresh()
        yield lambda text: bar.update(task, description=text)


@contextmanager
def _live_progress(*, bar: bool = True) -> Iterator[Any]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    counted = (BarColumn(), MofNCompleteColumn()) if bar else ()
    # Transient: once done, the lines go and what the command prints stands alone.
    shown = Progress(SpinnerColumn(), TextColumn("{task.description}"), *counted,
                     TimeElapsedColumn(), TextColumn("{task.fields[label]}"),
                     console=Console(file=sys.stdout), transient=True)
    with shown:
        yield shown
