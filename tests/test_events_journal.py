"""The event journal on a real directory: numbering across reopenings, a torn tail dropped,
segments bounded with the loss reported, reads from disk beyond what memory holds, live
following, and what a restarted daemon reports of the run before."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from auraed.runtime.events import SEGMENT_SUFFIX, Event, EventJournal, EventKind


def _open(directory: Path, **settings: int) -> EventJournal:
    journal = EventJournal(directory, **settings)
    journal.open()
    return journal


def _all(journal: EventJournal, after: int = 0, batch: int = 512) -> tuple[int, list[Event]]:
    lost = 0
    events: list[Event] = []
    for missed, chunk in journal.read(after, lambda: False, follow=False, batch=batch):
        lost += missed
        events.extend(chunk)
    return lost, events


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SEGMENT_SUFFIX}"))


def test_numbers_continue_after_reopening(tmp_path: Path) -> None:
    journal = _open(tmp_path)
    for i in range(10):
        assert journal.publish(EventKind.CELL_ALLOCATED, cell=f"c{i}") == i + 1
    journal.close()
    again = _open(tmp_path)
    assert again.last_sequence == 10
    assert again.publish(EventKind.CELL_FREED, cell="c0") == 11
    again.flush()
    lost, events = _all(again)
    assert lost == 0
    assert [e.sequence for e in events] == list(range(1, 12))
    assert events[3].cell == "c3" and events[3].kind is EventKind.CELL_ALLOCATED
    assert events[-1].kind is EventKind.CELL_FREED
    again.close()


def test_a_torn_tail_is_dropped_and_its_numbers_reused(tmp_path: Path) -> None:
    journal = _open(tmp_path)
    for i in range(5):
        journal.publish(EventKind.CELL_ALLOCATED, cell=f"c{i}")
    journal.close()
    (segment,) = _segments(tmp_path)
    whole = segment.read_bytes()
    segment.write_bytes(whole[:-3])  # the last record cut short, as a crash mid-write leaves it
    again = _open(tmp_path)
    assert again.last_sequence == 4
    assert again.dropped_tail_bytes > 0
    assert segment.stat().st_size < len(whole) - 3  # truncated to the last whole record
    # Nobody could have seen event 5 (it was never made visible), so 5 is given again.
    assert again.publish(EventKind.CELL_FREED, cell="c0") == 5
    again.close()
    with segment.open("ab") as f:
        f.write(b"\x07garbage that is no record")
    third = _open(tmp_path)
    assert third.last_sequence == 5
    _, events = _all(third)
    assert [e.kind for e in events][-1] is EventKind.CELL_FREED
    third.close()


def test_a_damaged_record_ends_the_segment(tmp_path: Path) -> None:
    journal = _open(tmp_path)
    for i in range(5):
        journal.publish(EventKind.CELL_ALLOCATED, cell=f"cell-{i}")
    journal.close()
    (segment,) = _segments(tmp_path)
    data = bytearray(segment.read_bytes())
    data[data.index(b"cell-3")] ^= 0xFF  # one flipped byte: the CRC catches it
    segment.write_bytes(bytes(data))
    again = _open(tmp_path)
    assert again.last_sequence == 3
    again.close()


def test_segments_are_bounded_and_a_late_reader_is_told_what_it_lost(tmp_path: Path) -> None:
    journal = _open(tmp_path, segment_bytes=1024, max_segments=3, ring_events=8)
    for i in range(300):
        journal.publish(EventKind.CELL_ALLOCATED, cell=f"cell-{i}")
        if i % 10 == 9:
            journal.flush()  # one write per ten events: several segments
    journal.flush()
    segments = _segments(tmp_path)
    assert len(segments) == 3
    assert sum(p.stat().st_size for p in segments) < 3 * (1024 + 10 * 100)
    oldest = journal.oldest_sequence
    assert oldest > 1 and int(segments[0].name.removesuffix(SEGMENT_SUFFIX)) == oldest
    lost, events = _all(journal, batch=7)
    assert lost == oldest - 1
    assert [e.sequence for e in events] == list(range(oldest, 301))
    # Resuming inside what is kept loses nothing, from disk (older than memory) and memory.
    lost, events = _all(journal, after=oldest + 2, batch=5)
    assert lost == 0 and events[0].sequence == oldest + 3 and events[-1].sequence == 300
    journal.close()


def test_followers_get_new_events_live(tmp_path: Path) -> None:
    journal = _open(tmp_path)
    stop = threading.Event()
    got: list[int] = []

    def follow() -> None:
        for _, chunk in journal.read(0, stop.is_set, follow=True):
            got.extend(e.sequence for e in chunk)
            if len(got) >= 50:
                stop.set()

    reader = threading.Thread(target=follow)
    reader.start()
    for i in range(50):
        journal.publish(EventKind.CELL_ALLOCATED, cell=f"c{i}")
    reader.join(60)
    assert not reader.is_alive()
    assert got == list(range(1, 51))
    journal.close()


def test_a_restart_closes_what_the_previous_run_left_open(tmp_path: Path) -> None:
    journal = _open(tmp_path)
    journal.daemon_started()
    journal.publish(EventKind.CELL_ALLOCATED, cell="a")
    journal.publish(EventKind.CELL_ALLOCATED, cell="a/b")
    journal.publish(EventKind.EXECUTABLE_STARTED, cell="a/b", executable="x", pid=1, host_pid=77)
    journal.publish(EventKind.EXECUTABLE_STARTED, cell="", executable="h", pid=78, host_pid=78)
    journal.publish(EventKind.EXECUTABLE_STARTED, cell="a", executable="done", host_pid=79)
    journal.publish(EventKind.EXECUTABLE_EXITED, cell="a", executable="done", host_pid=79,
                    exit_code=0)
    journal.publish(EventKind.CELL_ALLOCATED, cell="gone")
    journal.publish(EventKind.CELL_FREED, cell="gone")
    journal.close()  # no DAEMON_STOPPED: as after a crash

    again = _open(tmp_path)
    assert again.previous is not None and not again.previous.stopped_cleanly
    again.daemon_started(["a", "a/b"])
    again.flush()
    _, events = _all(again, after=9)
    restart = events[0]
    assert restart.kind is EventKind.DAEMON_RESTARTED and restart.daemon is not None
    assert restart.daemon.cleaned_cells == ("a", "a/b")
    assert set(restart.daemon.cleaned_executables) == {"a/b/x", "h"}
    closing = [(e.kind, e.cell, e.executable, e.host_pid, e.cleaned_up) for e in events[1:]]
    assert closing == [
        (EventKind.EXECUTABLE_EXITED, "a/b", "x", 77, True),
        (EventKind.EXECUTABLE_EXITED, "", "h", 78, True),
        (EventKind.CELL_FREED, "a/b", "", 0, True),
        (EventKind.CELL_FREED, "a", "", 0, True),
    ]
    again.daemon_stopped()
    again.close()

    third = _open(tmp_path)
    assert third.previous is not None and third.previous.stopped_cleanly
    assert third.previous.open_cells == () and third.previous.running == ()
    third.close()


def test_adopted_workloads_stay_open(tmp_path: Path) -> None:
    journal = _open(tmp_path)
    journal.daemon_started()
    journal.publish(EventKind.CELL_ALLOCATED, cell="kept")
    journal.publish(EventKind.EXECUTABLE_STARTED, cell="kept", executable="w", host_pid=5)
    journal.close()
    again = _open(tmp_path)
    again.daemon_started(adopted_cells=["kept"], adopted_executables=["kept/w"])
    again.close()
    third = _open(tmp_path)
    assert third.previous is not None
    assert third.previous.open_cells == ("kept",)
    assert [(e.cell, e.executable) for e in third.previous.running] == [("kept", "w")]
    third.close()


def test_an_exit_already_published_is_known_across_restarts(tmp_path: Path) -> None:
    journal = _open(tmp_path)
    journal.daemon_started()
    journal.publish(EventKind.CELL_ALLOCATED, cell="kept")
    journal.publish(EventKind.EXECUTABLE_STARTED, cell="kept", executable="w", host_pid=5)
    journal.publish(EventKind.EXECUTABLE_EXITED, cell="kept", executable="w", host_pid=5)
    journal.publish(EventKind.EXECUTABLE_STARTED, executable="h", host_pid=6)
    journal.close()
    again = _open(tmp_path)
    assert again.previous is not None
    assert again.previous.exit_published("kept/w", 5)
    assert not again.previous.exit_published("kept/w", 7)  # another run of it
    assert not again.previous.exit_published("h", 6)  # still running
    # Adopted ended with its exit published: the next run's journal still knows it ...
    again.daemon_started(adopted_cells=["kept"], adopted_executables=["h", "kept/w"],
                         adopted_exits=[("kept/w", 5)])
    again.close()
    third = _open(tmp_path)
    assert third.previous is not None
    assert third.previous.exit_published("kept/w", 5)
    assert [e.executable for e in third.previous.running] == ["h"]
    # ... until it starts again, or its cell is freed.
    third.daemon_started(adopted_cells=["kept"], adopted_executables=["h", "kept/w"],
                         adopted_exits=[("kept/w", 5)])
    third.publish(EventKind.EXECUTABLE_STARTED, cell="kept", executable="w", host_pid=8)
    third.publish(EventKind.EXECUTABLE_EXITED, executable="h", host_pid=6)
    third.close()
    fourth = _open(tmp_path)
    assert fourth.previous is not None
    assert not fourth.previous.exit_published("kept/w", 5)
    assert fourth.previous.exit_published("h", 6)
    fourth.publish(EventKind.CELL_FREED, cell="kept")
    fourth.close()
    fifth = _open(tmp_path)
    assert fifth.previous is not None and fifth.previous.exits == {"h": 6}
    fifth.close()


def test_a_failed_write_keeps_events_visible_and_counts_them_lost_after_a_restart(
        tmp_path: Path) -> None:
    journal = _open(tmp_path)
    for i in range(3):
        journal.publish(EventKind.CELL_ALLOCATED, cell=f"c{i}")
    journal.flush()
    # The disk goes away under the writer (as EIO or a full disk would): its fd stops working.
    assert journal._fd is not None
    os.close(journal._fd)
    journal._fd = os.open(os.devnull, os.O_RDONLY)
    for i in range(3, 6):
        journal.publish(EventKind.CELL_ALLOCATED, cell=f"c{i}")
    journal.flush()
    lost, events = _all(journal)
    assert lost == 0 and [e.sequence for e in events] == [1, 2, 3, 4, 5, 6]  # from memory
    # The writer recovers with a new segment.
    journal.publish(EventKind.CELL_FREED, cell="c0")
    journal.close()
    again = _open(tmp_path)
    lost, events = _all(again)
    assert [e.sequence for e in events] == [1, 2, 3, 7]
    assert lost == 3  # 4-6 never reached the disk, and the reader is told
    assert again.publish(EventKind.CELL_FREED, cell="c1") == 8
    again.close()
