"""Output capture on real pipes and files: nothing lost, nothing blocked, followers end when told.

Workloads' pipes are read by the spawner (it outlives the daemon), which writes the segment
files; the daemon follows them through mirrors. The capture tests run a real spawner."""

import itertools
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from auraed.kernel.processes import ExitStatus, SpawnSpec
from auraed.kernel.spawner.client import Spawner
from auraed.output import (
    MAX_LINE_BYTES,
    LineAssembler,
    LogRing,
    LogRingHandler,
    OutputLog,
    follow_all,
)


@pytest.fixture
def log_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="aurae-test-output-") as directory:
        yield Path(directory)


class Exits:
    """on_exit target: which workloads the spawner has reported ended."""

    def __init__(self) -> None:
        self.statuses: dict[int, ExitStatus] = {}
        self._changed = threading.Condition()

    def record(self, pid: int, start_time: int, status: ExitStatus) -> None:
        with self._changed:
            self.statuses[pid] = status
            self._changed.notify_all()

    def wait_for(self, pid: int, timeout: float = 60) -> ExitStatus:
        with self._changed:
            assert self._changed.wait_for(lambda: pid in self.statuses, timeout=timeout)
            return self.statuses[pid]


@pytest.fixture
def exits() -> Exits:
    return Exits()


@pytest.fixture
def spawner(exits: Exits) -> Iterator[Spawner]:
    if os.geteuid() != 0:
        pytest.skip("the spawner runs workloads as uid 0")
    with Spawner(exits.record) as running:
        yield running


def captured(directory: Path) -> tuple[OutputLog, OutputLog]:
    """The daemon's side of a capture: mirrors the spawner advances as it writes."""
    return (OutputLog.mirror(directory, "stdout", segment_bytes=1 << 20, max_segments=8),
            OutputLog.mirror(directory, "stderr", segment_bytes=1 << 20, max_segments=8))


@pytest.fixture
def never() -> threading.Event:
    """A cancellation that never comes."""
    return threading.Event()


def lines_of(log: OutputLog, cancelled: threading.Event) -> list[bytes]:
    return [line for _, line in log.follow(cancelled)]


def run_into(spawner: Spawner, exits: Exits, directory: Path, argv: list[str]) -> OutputLog:
    """Run argv with its output captured by the spawner; wait for its exit; its stdout log."""
    logs = captured(directory)
    process = spawner.spawn(SpawnSpec(command=argv, uid=0, gid=0, capture=logs))
    assert exits.wait_for(process.host_pid) == ExitStatus(0, None)
    # The spawner stores and reports what a process wrote before its exit.
    assert logs[0].complete
    return logs[0]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_a_follower_gets_the_retained_lines_then_the_live_ones(
    log_dir: Path, never: threading.Event
) -> None:
    log = OutputLog(log_dir, "stdout")
    log.append([b"one", b"two"], 1000.5)
    follower = log.follow(never)
    assert next(follower) == (1000.5, b"one")
    assert next(follower) == (1000.5, b"two")

    def write_more() -> None:
        log.append([b"three"], 1001.25)
        log.finish()

    later = threading.Timer(0.1, write_more)
    later.start()
    try:
        assert list(follower) == [(1001.25, b"three")]
    finally:
        later.join()


def test_a_silent_channel_leaves_no_file_and_its_follower_waits_for_the_first_line(
    log_dir: Path, never: threading.Event
) -> None:
    log = OutputLog(log_dir / "new" / "nested", "stdout")
    assert list((log_dir / "new" / "nested").iterdir()) == []
    follower = log.follow(never)
    later = threading.Timer(0.3, lambda: (log.append([b"late"], 5.0), log.finish()))
    later.start()
    try:
        assert list(follower) == [(5.0, b"late")]
    finally:
        later.join()
    silent = OutputLog(log_dir / "new" / "nested", "stderr")
    silent.finish()
    assert list(silent.follow(never)) == []
    assert sorted(p.name for p in (log_dir / "new" / "nested").iterdir()) == ["stdout.000001.log"]


def test_a_log_reusing_a_directory_drops_the_earlier_run(log_dir: Path) -> None:
    earlier = OutputLog(log_dir, "stdout")
    earlier.append([b"old"], 1.0)
    earlier.finish()
    log = OutputLog(log_dir, "stdout")
    assert not (log_dir / "stdout.000001.log").exists()
    log.finish()
    assert list(log.follow(threading.Event())) == []


def test_records_on_disk_are_timestamp_space_line(log_dir: Path) -> None:
    log = OutputLog(log_dir, "stderr")
    log.append([b"a b", b""], 12.0)
    log.finish()
    assert (log_dir / "stderr.000001.log").read_bytes() == b"12.000000 a b\n12.000000 \n"


def test_rotation_keeps_the_newest_segments_and_readers_get_a_consistent_suffix(
    log_dir: Path, never: threading.Event
) -> None:
    log = OutputLog(log_dir, "stdout", segment_bytes=200, max_segments=3)
    early = log.follow(never)
    log.append([b"line 0"], 1.0)
    assert next(early) == (1.0, b"line 0")

    for number in range(1, 500):
        log.append([f"line {number}".encode()], 1.0)
    log.finish()

    segments = sorted(log_dir.iterdir())
    assert len(segments) == 3
    assert segments[-1].name > "stdout.000030.log"  # many were made, the oldest deleted

    # A new reader starts at the oldest retained line and reads on without a gap.
    late = [int(line.split()[1]) for line in lines_of(log, never)]
    assert late == list(range(late[0], 500))
    assert late[0] > 400

    # The early reader lost what rotated away under it but goes on from the oldest retained.
    rest = [int(line.split()[1]) for _, line in early]
    assert rest[-len(late) :] == late
    assert rest == sorted(rest)

    log.remove()
    assert list(log_dir.iterdir()) == []


def test_a_slow_reader_does_not_hold_up_the_writer(
    log_dir: Path, spawner: Spawner, exits: Exits, never: threading.Event
) -> None:
    logs = captured(log_dir)
    follower = logs[0].follow(never)
    # Far more than a pipe holds: it finishes only if the spawner keeps reading.
    writer = spawner.spawn(SpawnSpec(command=["seq", "1", "300000"], uid=0, gid=0, capture=logs))
    assert next(follower)[1] == b"1"
    # The reader sleeps here; the workload still runs to its end.
    assert exits.wait_for(writer.host_pid) == ExitStatus(0, None)
    rest = [int(line) for _, line in follower]
    assert rest == list(range(2, 300001))


def test_a_partial_last_line_is_kept_at_end_of_file(
    log_dir: Path, spawner: Spawner, exits: Exits, never: threading.Event
) -> None:
    log = run_into(spawner, exits, log_dir, ["printf", "first\\nno newline"])
    assert lines_of(log, never) == [b"first", b"no newline"]


def test_an_overlong_line_is_split(
    log_dir: Path, spawner: Spawner, exits: Exits, never: threading.Event
) -> None:
    log = run_into(spawner, exits, log_dir,
                   ["sh", "-c", "head -c 150000 /dev/zero | tr '\\0' x; echo; echo after"])
    pieces = lines_of(log, never)
    assert [len(piece) for piece in pieces] == [
        MAX_LINE_BYTES,
        MAX_LINE_BYTES,
        150000 - 2 * MAX_LINE_BYTES,
        5,
    ]
    assert pieces[-1] == b"after"


def test_stdout_and_stderr_land_in_their_own_logs(
    log_dir: Path, spawner: Spawner, exits: Exits, never: threading.Event
) -> None:
    logs = captured(log_dir)
    process = spawner.spawn(SpawnSpec(command="echo out; echo err >&2; echo out2", uid=0, gid=0,
                                      capture=logs))
    assert exits.wait_for(process.host_pid) == ExitStatus(0, None)
    assert lines_of(logs[0], never) == [b"out", b"out2"]
    assert lines_of(logs[1], never) == [b"err"]


def test_a_log_refuses_lines_that_would_break_its_records(log_dir: Path) -> None:
    log = OutputLog(log_dir, "stdout")
    try:
        with pytest.raises(ValueError):
            log.append([b"two\nlines"], 1.0)
        with pytest.raises(ValueError):
            log.append([b"x" * (MAX_LINE_BYTES + 1)], 1.0)
    finally:
        log.finish()


def test_line_assembler_keeps_a_line_of_exactly_the_limit_whole() -> None:
    lines = LineAssembler(max_line_bytes=4)
    assert lines.feed(b"abcd") == []
    assert lines.feed(b"\nabcdefghij") == [b"abcd", b"abcd", b"efgh"]
    assert lines.feed(b"\n\n") == [b"ij", b""]
    assert lines.flush() == []


def test_batches_carry_many_lines_at_once(log_dir: Path, never: threading.Event) -> None:
    log = OutputLog(log_dir, "stdout")
    log.append([b"%d" % number for number in range(1000)], 5.0)
    log.finish()
    batches = list(log.follow_batches(never, max_lines=300))
    assert [len(batch) for batch in batches] == [300, 300, 300, 100]
    assert [line for batch in batches for _, line in batch] == [b"%d" % n for n in range(1000)]


def test_cancellation_ends_a_waiting_follower_promptly(log_dir: Path) -> None:
    log = OutputLog(log_dir, "stdout")
    cancelled = threading.Event()
    received: list[bytes] = []
    ended = threading.Event()

    def follow() -> None:
        received.extend(line for _, line in log.follow(cancelled))
        ended.set()

    follower = threading.Thread(target=follow)
    follower.start()
    try:
        log.append([b"only"], 1.0)
        wait_until(lambda: received == [b"only"])
        cancelled.set()
        started = time.monotonic()
        assert ended.wait(timeout=2)
        assert time.monotonic() - started < 1.0
    finally:
        cancelled.set()
        follower.join()
        log.finish()


def test_a_callable_also_cancels(log_dir: Path) -> None:
    log = OutputLog(log_dir, "stdout")
    deadline = time.monotonic() + 0.3
    try:
        assert list(log.follow(lambda: time.monotonic() > deadline)) == []
    finally:
        log.finish()


def test_log_ring_replays_the_latest_then_follows_live() -> None:
    ring = LogRing(capacity=5)
    for number in range(8):
        ring.append(f"old {number}", timestamp=float(number))
    follower = ring.follow(threading.Event(), replay=2)
    assert next(follower) == (6.0, "old 6")
    assert next(follower) == (7.0, "old 7")
    ring.append("new", timestamp=9.0)
    assert next(follower) == (9.0, "new")
    ring.close()
    assert list(follower) == []


def test_log_ring_followers_skip_what_was_dropped_and_end_on_cancel() -> None:
    ring = LogRing(capacity=3)
    cancelled = threading.Event()
    follower = ring.follow(cancelled)
    for number in range(10):
        ring.append(str(number))
    assert [line for _, line in (next(follower), next(follower), next(follower))] == ["7", "8", "9"]
    cancelled.set()
    started = time.monotonic()
    assert list(follower) == []
    assert time.monotonic() - started < 1.0


def test_log_ring_handler_takes_the_daemons_log_records() -> None:
    ring = LogRing()
    handler = LogRingHandler(ring)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("aurae-test-ring")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("cell %s started", "alpha")
    finally:
        logger.removeHandler(handler)
    ring.close()
    ((timestamp, line),) = list(ring.follow(threading.Event(), replay=10))
    assert line == "WARNING cell alpha started"
    assert abs(timestamp - time.time()) < 5


def test_several_logs_take_turns_in_bounded_batches_and_each_keeps_its_order(
    log_dir: Path, never: threading.Event
) -> None:
    out, err = OutputLog(log_dir, "stdout"), OutputLog(log_dir, "stderr")
    out.append([b"o%d" % n for n in range(1000)], 1.0)
    err.append([b"e%d" % n for n in range(250)], 1.0)
    follower = follow_all([out, err], never, max_lines=100)
    first = [index for index, _ in itertools.islice(follower, 4)]
    assert first == [0, 1, 0, 1]  # turns, not one log drained before the other
    out.finish()
    err.finish()
    batches = list(follower)
    assert all(len(lines) <= 100 for _, lines in batches)
    got = {0: [], 1: []}  # type: dict[int, list[bytes]]
    for index, lines in batches:
        got[index].extend(line for _, line in lines)
    assert got[0][-1] == b"o999" and got[1][-1] == b"e249"


def test_a_stalled_follower_holds_one_read_not_the_log(log_dir: Path,
                                                       never: threading.Event) -> None:
    """Lines written while a follower stalls stay in the file until it asks for them."""
    log = OutputLog(log_dir, "stdout")
    log.append([b"x" * 1000] * 20_000, 1.0)  # 20 MB on disk
    follower = log.follow_batches(never, max_lines=10_000)
    batch = next(follower)
    # One read of the file: at most one record's worth of bytes, whatever max_lines allows.
    assert 0 < sum(len(line) for _, line in batch) <= MAX_LINE_BYTES
    log.finish()
    assert len(batch) + sum(len(b) for b in follower) == 20_000


def test_time_ordered_replay_merges_the_backlog_by_timestamp_then_follows(
    log_dir: Path, never: threading.Event
) -> None:
    stdout = OutputLog(log_dir / "a", "stdout", segment_bytes=120, max_segments=50)
    stderr = OutputLog(log_dir / "b", "stderr", segment_bytes=120, max_segments=50)
    # Interleaved in time, with runs on each side, across several segments each.
    for second in range(40):
        target = stdout if second % 3 else stderr
        target.append([f"{second}".encode()], float(second))
    follower = follow_all([stdout, stderr], never, max_lines=7, replay_in_time_order=True)
    backlog = []
    while len(backlog) < 40:
        index, lines = next(follower)
        assert 0 < len(lines) <= 7
        backlog += [(index, int(line)) for _, line in lines]
    assert [second for _, second in backlog] == list(range(40))
    assert all(index == (0 if second % 3 else 1) for index, second in backlog)
    # What comes after the backlog follows, once.
    stdout.append([b"later"], 100.0)
    stdout.finish()
    stderr.finish()
    assert [(index, [line for _, line in lines]) for index, lines in follower] == [
        (0, [b"later"])]


def test_replay_only_ends_after_the_backlog(log_dir: Path, never: threading.Event) -> None:
    stdout, stderr = OutputLog(log_dir, "stdout"), OutputLog(log_dir, "stderr")
    stderr.append([b"first"], 1.0)
    stdout.append([b"second"], 2.0)
    # Neither log has ended: a follower would wait; a replay ends.
    replayed = list(follow_all([stdout, stderr], never, replay_only=True))
    assert [(index, [line for _, line in lines]) for index, lines in replayed] == [
        (1, [b"first"]), (0, [b"second"])]
