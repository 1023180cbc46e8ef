"""Work left until a call's answer (auraed.runtime.deferred): run once, in order, after the
call; the event journal's writer, woken that way, writes a call's events only then, and a
flush inside the call does not wait for it; a routine log line keeps the time it was logged."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from auraed.runtime.deferred import after_answer, answering, log_after_answer
from auraed.runtime.events import SEGMENT_SUFFIX, EventJournal, EventKind


def test_outside_a_call_the_work_runs_at_once() -> None:
    done: list[str] = []
    after_answer(lambda: done.append("now"))
    assert done == ["now"]


def test_inside_a_call_the_work_waits_for_its_answer_and_runs_once_in_order() -> None:
    done: list[str] = []

    class Writer:
        def wake(self) -> None:
            done.append("wake")

    writer = Writer()
    with answering() as deferred:
        after_answer(writer.wake)
        after_answer(lambda: done.append("audit"))
        after_answer(writer.wake)  # the same bound method: once
        assert done == []
    after_answer(lambda: done.append("after the call"))  # the call is over: at once
    assert done == ["after the call"]
    deferred.run()
    assert done == ["after the call", "wake", "audit"]
    deferred.run()
    assert done == ["after the call", "wake", "audit"]


def test_work_left_by_deferred_work_and_after_a_failure_still_runs() -> None:
    done: list[str] = []

    def fails() -> None:
        raise RuntimeError("a bug in one piece of work")

    with answering() as deferred:
        after_answer(fails)
        after_answer(lambda: deferred.add(lambda: done.append("left by the work")))
        after_answer(lambda: done.append("second"))
    deferred.run()
    assert done == ["second", "left by the work"]


def test_a_calls_inner_scope_ends_with_it() -> None:
    done: list[str] = []
    with answering() as outer:
        with answering() as inner:
            after_answer(lambda: done.append("inner"))
        after_answer(lambda: done.append("outer"))
    assert bool(inner) and bool(outer) and done == []
    outer.run()
    assert done == ["outer"]


def _readable(journal: EventJournal, sequence: int, timeout: float = 10.0) -> bool:
    """Whether readers see event `sequence`, and nothing after it, within `timeout`."""
    deadline = time.monotonic() + timeout
    while journal.last_sequence < sequence and time.monotonic() < deadline:
        time.sleep(0.005)
    return journal.last_sequence == sequence


def _written(directory: Path) -> int:
    return sum(segment.stat().st_size for segment in directory.glob(f"*{SEGMENT_SUFFIX}"))


def test_an_event_published_in_a_call_is_written_once_the_call_is_answered(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path)
    journal.open()
    try:
        journal.publish(EventKind.CELL_ALLOCATED, cell="before")
        assert journal.flush(timeout=10)
        size = _written(tmp_path)
        with answering() as deferred:
            sequence = journal.publish(EventKind.CELL_ALLOCATED, cell="in-a-call")
        # Nothing woke the writer: the event is numbered but neither on disk nor readable.
        time.sleep(0.2)
        assert journal.last_sequence == sequence - 1
        assert _written(tmp_path) == size
        deferred.run()
        assert _readable(journal, sequence)
        assert _written(tmp_path) > size
    finally:
        journal.close()


def test_a_flush_in_a_call_writes_what_the_call_published(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path)
    journal.open()
    try:
        with answering():
            sequence = journal.publish(EventKind.CELL_FREED, cell="in-a-call")
            began = time.monotonic()
            assert journal.flush(timeout=10)
            assert time.monotonic() - began < 5  # woken by the flush, not by the timeout
            assert journal.last_sequence == sequence
    finally:
        journal.close()


def test_a_routine_line_logged_in_a_call_is_written_after_it_with_its_own_time() -> None:
    written: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            written.append(record)

    logger = logging.getLogger("auraed.test.after_answer")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with answering() as deferred:
            logged_at = time.time()
            log_after_answer(logger, "executable started", executable="web", pid=42)
        assert written == []
        time.sleep(0.05)
        deferred.run()
        (record,) = written
        assert record.getMessage() == "executable started"
        assert record.executable == "web" and record.pid == 42  # type: ignore[attr-defined]
        assert abs(record.created - logged_at) < 0.04  # when it was logged, not written
        log_after_answer(logger, "cell freed", cell="c")  # outside a call: at once
        assert [r.getMessage() for r in written] == ["executable started", "cell freed"]
    finally:
        logger.handlers.clear()


def test_a_call_that_waits_on_something_else_does_not_hold_its_events_back(
        tmp_path: Path) -> None:
    """A VM's Start waits for its guest: what it publishes is written at once."""
    journal = EventJournal(tmp_path)
    journal.open()
    try:
        with answering(prompt=False) as deferred:
            sequence = journal.publish(EventKind.CELL_ALLOCATED, cell="vm-a")
            assert _readable(journal, sequence)  # before the call is answered
        assert not deferred  # nothing left for its answer
    finally:
        journal.close()
