"""Work that a caller does not wait for, left until its call has been answered.

Waking a thread that sleeps on the other CPU costs tens of microseconds on a virtual machine
(an interprocessor interrupt the hypervisor delivers), and the thread woken then competes with
the call for the interpreter until the answer is out. So a call's handler that has work for
another thread that no answer depends on (the event journal's writer, the audit log's, the
spare scopes' thread) leaves the wake-up to `after_answer`; the server runs what was left
(auraed.interceptors.AfterAnswer) once the call's answer is sent, or at once when the call is
over already. The journal's writer waits only for a call that answers as soon as its own work
is done (Deferred.prompt). Outside a call (a spawner's exit report, a restart policy's timer)
the work runs at once. A call's routine log line (`log_after_answer`) is written after the
answer too, with the time it was logged at.

This knows nothing of gRPC: a call is the body of `answering()` on the thread that serves it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

log = logging.getLogger(__name__)

_current = threading.local()


class Deferred:
    """The work one call left for after its answer; each callable once, in order.

    prompt: the call answers as soon as its own work is done. Only then do wake-ups that make
    something durable or visible to others wait for its answer (`after_answer(durable=True)`):
    a call that waits on something else first (a VM's guest, an instance's daemon) would hold
    them for as long."""

    __slots__ = ("_work", "prompt")

    def __init__(self, prompt: bool = True) -> None:
        self._work: list[Callable[[], None]] = []
        self.prompt = prompt

    def __bool__(self) -> bool:
        return bool(self._work)

    def add(self, work: Callable[[], None]) -> None:
        # Bound methods of one object compare equal: a journal woken three times in one call is
        # woken once.
        if work not in self._work:
            self._work.append(work)

    def run(self) -> None:
        """Run what was left, and what that leaves in turn."""
        while self._work:
            work, self._work = self._work, []
            for item in work:
                try:
                    item()
                except Exception:
                    log.exception("work left until a call's answer failed")


@contextmanager
def answering(prompt: bool = True) -> Iterator[Deferred]:
    """While the body runs, `after_answer` on this thread adds to the Deferred yielded, which
    whoever sends the answer runs once it is sent. prompt: see Deferred."""
    deferred = Deferred(prompt)
    outer = getattr(_current, "deferred", None)
    _current.deferred = deferred
    try:
        yield deferred
    finally:
        _current.deferred = outer


def after_answer(work: Callable[[], None], *, durable: bool = False) -> None:
    """Run `work` once the answer of the call this thread serves is sent; now, outside a call.
    durable: the work makes something durable or visible to others (the event journal's
    writer), so it waits only for a prompt call's answer."""
    deferred: Deferred | None = getattr(_current, "deferred", None)
    if deferred is None or (durable and not deferred.prompt):
        work()
    else:
        deferred.add(work)


def log_after_answer(logger: logging.Logger, message: str, **context: object) -> None:
    """An info line, made now (its time is now) and written once the call's answer is out.
    Only routine lines: what may explain a crash is logged at once."""
    if logger.isEnabledFor(logging.INFO):
        record = logger.makeRecord(logger.name, logging.INFO, "(unknown file)", 0, message, (),
                                   None, extra=context)
        after_answer(partial(logger.handle, record))
