"""One output channel of one executable, kept on disk as size-rotated segment files.

Each record is one line: `<unix seconds, 6 decimals> <line bytes>\\n`. The writer appends and then
publishes how far its segment is complete; readers read the files on their own and never read
past that mark, so the writer never waits for a reader and a reader never sees half a record.

A reader holds no more than it hands on: it takes one bounded read of a file at a time, and only
when its consumer asks for the next batch. A follower that stops consuming (a client that stalls)
therefore costs one batch of memory, whatever the workload writes meanwhile; the rest stays in the
files. Several logs are followed on the caller's thread (follow_all), woken by their writers.

The writer may be another process (the spawner writes the daemon's captured output, so that it
goes on while no daemon runs): the reading side then holds a mirror (OutputLog.mirror) that the
writer's reports of its position advance.
"""

import fcntl
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

Line = tuple[float, bytes]
Cancelled = Callable[[], bool] | threading.Event

DEFAULT_SEGMENT_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_SEGMENTS = 8
# Longer lines are stored in pieces of this size (see LineAssembler).
MAX_LINE_BYTES = 64 * 1024

# Room in an output pipe for a burst while its reader is busy elsewhere (the default is 64 KiB).
_PIPE_BYTES = 1024 * 1024

# How often a waiting reader looks at its cancellation.
_POLL_SECONDS = 0.2
# Bytes a reader takes from a file at once: one record at most (a line, its timestamp and its
# newline) and no more, as this is what a stalled follower holds.
_READ_BYTES = MAX_LINE_BYTES + 64


def as_predicate(cancelled: Cancelled) -> Callable[[], bool]:
    if isinstance(cancelled, threading.Event):
        return cancelled.is_set
    return cancelled


def output_pipe() -> tuple[int, int]:
    """A pipe for one output channel: (read end for the spawner, write end for the workload).

    Both ends are close-on-exec; the write end goes to the workload explicitly.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except PermissionError:
        pass  # over fs.pipe-max-size without CAP_SYS_RESOURCE: the default size still works
    return read_fd, write_fd


def continuation(first: int, last: int, max_segments: int) -> tuple[int, int]:
    """Where a log goes on from a finished one that kept segments first..last: the (first,
    next) segments of its `continues`, the oldest dropped so that at most max_segments are
    kept with the next one."""
    following = last + 1
    return max(first, following - max_segments + 1), following


class LineAssembler:
    """Cuts a byte stream into lines without their newline. A partial line waits for the next
    chunk; a line longer than max_line_bytes comes out in pieces of that size."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max_line_bytes
        self._partial = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        lines = (self._partial + chunk if self._partial else chunk).split(b"\n")
        partial = lines.pop()
        if lines and max(map(len, lines)) > self._max:
            lines = [piece for line in lines for piece in self._pieces(line)]
        # Only while strictly longer: a line of exactly max bytes may still be ended by a newline.
        while len(partial) > self._max:
            lines.append(partial[: self._max])
            partial = partial[self._max :]
        self._partial = partial
        return lines

    def flush(self) -> list[bytes]:
        """The unterminated last line, at end of stream."""
        rest, self._partial = self._partial, b""
        return [rest] if rest else []

    def _pieces(self, line: bytes) -> list[bytes]:
        return [line[start : start + self._max] for start in range(0, len(line), self._max)] or [
            b""
        ]


class OutputLog:
    """The lines of one channel (stdout or stderr) of one executable.

    Segment files `<channel>.<number>.log` in directory; a segment is closed once it holds
    segment_bytes or more, and only the newest max_segments are kept. One thread writes (append,
    finish), or another process does and advance() tells a mirror; any number of threads follow.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        channel: str,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_segments: int = DEFAULT_MAX_SEGMENTS,
        fresh: bool = False,
        continues: tuple[int, int] | None = None,
    ) -> None:
        """fresh: the caller knows no log was ever in `directory` (its name is new); then it
        is created with the first segment, not now (a mkdir costs more than the start of a
        short-lived executable that writes nothing).

        continues: (first, next) segment numbers: this log goes on from a finished one in the
        same directory (the earlier run of a restarted executable), whose segments first to
        next - 1 it keeps, within max_segments as its own, and writes segment next on."""
        if segment_bytes < 1 or max_segments < 1:
            raise ValueError("segment_bytes and max_segments must be positive")
        if continues is not None and not 1 <= continues[0] <= continues[1]:
            raise ValueError(f"segments {continues!r} do not continue a log")
        self.directory = Path(directory)
        self.channel = channel
        self._segment_bytes = segment_bytes
        self._max_segments = max_segments
        try:
            if continues is not None:
                os.makedirs(self.directory, exist_ok=True)
            elif not fresh:
                os.mkdir(self.directory)
        except FileNotFoundError:
            os.makedirs(self.directory, exist_ok=True)
        except FileExistsError:
            # A log starts empty: segments of an earlier run under this name would never be
            # rotated, and a reader would take them for ours.
            for name in os.listdir(self.directory):
                if name.startswith(f"{channel}.") and name.endswith(".log"):
                    os.unlink(self.directory / name)
        self._changed = threading.Condition()
        # Guarded by _changed: the retained segments are first.._last, and _last holds _committed
        # bytes of whole records.
        self._first, self._last = continues or (1, 1)
        self._committed = 0
        if continues is not None:
            # The earlier runs' oldest segments beyond the bound go now, as a rotation would
            # (the reading side may already have moved `first` on: every one below goes).
            self._first = continuation(self._first, self._last - 1, max_segments)[0]
            for name in os.listdir(self.directory):
                number = name.removeprefix(f"{channel}.").removesuffix(".log")
                if number != name and number.isdigit() and int(number) < self._first:
                    os.unlink(self.directory / name)
        self._complete = False
        # Set by remove(): a reader then finds nothing more, rather than waiting for files that
        # are gone to hold what the position says.
        self._removed = False
        # Followers of several logs at once, set whenever this one changes.
        self._watchers: set[threading.Event] = set()
        # The first segment is created by the first append: most short-lived executables write
        # nothing, and starting one should not cost two file creations.
        self._fd: int | None = None

    @classmethod
    def mirror(cls, directory: str | os.PathLike[str], channel: str, *, segment_bytes: int,
               max_segments: int, position: tuple[int, int, int, bool] = (1, 1, 0, False),
               ) -> "OutputLog":
        """The reading side of a log another process writes, as far as `position` (see
        position()); nothing on disk is touched."""
        log = cls.__new__(cls)
        log.directory = Path(directory)
        log.channel = channel
        log._segment_bytes = segment_bytes
        log._max_segments = max_segments
        log._changed = threading.Condition()
        log._first, log._last, log._committed, log._complete = position
        log._removed = False
        log._watchers = set()
        log._fd = None
        return log

    @property
    def segment_bytes(self) -> int:
        return self._segment_bytes

    @property
    def max_segments(self) -> int:
        return self._max_segments

    def fileno(self) -> int | None:
        """The segment being written, if one is open."""
        return self._fd

    def position(self) -> tuple[int, int, int, bool]:
        """(first segment, last segment, bytes of whole records in the last, complete)."""
        with self._changed:
            return self._first, self._last, self._committed, self._complete

    def advance(self, first: int, last: int, committed: int, complete: bool) -> None:
        """A mirror's writer (another process) reports its position."""
        with self._changed:
            self._first, self._last, self._committed = first, last, committed
            self._complete = self._complete or complete
            self._notify()

    def segment_path(self, number: int) -> Path:
        return self.directory / f"{self.channel}.{number:06d}.log"

    def _create_segment(self, number: int) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            return os.open(self.segment_path(number), flags, 0o640)
        except FileNotFoundError:
            os.makedirs(self.directory, exist_ok=True)  # a fresh log's first segment
            return os.open(self.segment_path(number), flags, 0o640)

    @property
    def complete(self) -> bool:
        """True once the channel has ended (finish() was called): no more lines will come."""
        with self._changed:
            return self._complete

    def append(self, lines: Sequence[bytes], timestamp: float) -> None:
        """Store lines that arrived at timestamp (unix seconds). A line holds no newline and at
        most MAX_LINE_BYTES bytes."""
        if not lines:
            return
        if self._complete:
            raise ValueError("append to a finished OutputLog")
        prefix = b"%.6f " % timestamp
        records = prefix + (b"\n" + prefix).join(lines) + b"\n"
        # Checked in bulk, since a broken record would stop every reader.
        if records.count(b"\n") != len(lines) or max(map(len, lines)) > MAX_LINE_BYTES:
            raise ValueError("a line holds a newline or is longer than MAX_LINE_BYTES")
        if self._fd is None:
            self._fd = self._create_segment(self._last)
        _write_all(self._fd, records)
        with self._changed:
            self._committed += len(records)
            self._notify()
        if self._committed >= self._segment_bytes:
            self._rotate()

    def _rotate(self) -> None:
        new_fd = self._create_segment(self._last + 1)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = new_fd
        with self._changed:
            self._last += 1
            self._committed = 0
            expired = range(self._first, self._last - self._max_segments + 1)
            self._first += len(expired)
            self._notify()
        # A reader that has one of these open reads it to the end regardless. An earlier run's
        # may be missing: a run that wrote nothing made no segment.
        for number in expired:
            self.segment_path(number).unlink(missing_ok=True)

    def finish(self) -> None:
        """Mark the channel ended; followers end once they have read everything."""
        with self._changed:
            if self._complete:
                return
            self._complete = True
            self._notify()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _notify(self) -> None:
        # Holding _changed.
        self._changed.notify_all()
        for watcher in self._watchers:
            watcher.set()

    def watch(self, watcher: threading.Event) -> None:
        """Set watcher whenever a line is appended or the log rotates or finishes."""
        with self._changed:
            self._watchers.add(watcher)

    def unwatch(self, watcher: threading.Event) -> None:
        with self._changed:
            self._watchers.discard(watcher)

    def remove(self) -> None:
        """Delete the segment files (the log must be finished)."""
        if not self.complete:
            raise ValueError("remove an OutputLog that is still being written")
        with self._changed:
            numbers = range(self._first, self._last + 1)
            self._removed = True
            self._notify()
        for number in numbers:
            self.segment_path(number).unlink(missing_ok=True)

    @property
    def removed(self) -> bool:
        """Whether remove() dropped the files (what was read is all there will be)."""
        with self._changed:
            return self._removed

    def follow(self, cancelled: Cancelled) -> Iterator[Line]:
        """Every line still retained, then new lines as they come, until the channel ends and all
        is read, or until cancelled (noticed within about 0.2 s while waiting)."""
        return itertools.chain.from_iterable(self.follow_batches(cancelled))

    def follow_batches(self, cancelled: Cancelled, max_lines: int = 1024) -> Iterator[list[Line]]:
        """Like follow(), in lists of up to max_lines lines: for output too fast to pass one line
        at a time."""
        return (lines for _, lines in follow_all([self], cancelled, max_lines))


def follow_all(
    logs: Sequence[OutputLog], cancelled: Cancelled, max_lines: int = 1024, *,
    replay_in_time_order: bool = False, replay_only: bool = False,
) -> Iterator[tuple[int, list[Line]]]:
    """(index of the log, lines) from several logs as their lines arrive, until all have ended
    and are read, or until cancelled (noticed within about 0.2 s while waiting).

    Each log's order is kept; the logs take turns, a batch each, so a chatty one cannot hide the
    others. Nothing is read ahead of the consumer: one thread, no queue.

    With replay_in_time_order, what the logs hold when the call starts comes first, merged by
    the lines' timestamps (so stdout and stderr replay in the order they were written); with
    replay_only, that is all, and the iterator ends there.
    """
    if max_lines < 1:
        raise ValueError("max_lines must be positive")
    # The readers take their places now, not at the first next().
    readers = [_SegmentReader(log) for log in logs]
    is_cancelled = as_predicate(cancelled)
    if not (replay_in_time_order or replay_only):
        return _follow_all(readers, is_cancelled, max_lines)
    return _replay_then_follow(readers, is_cancelled, max_lines, follow=not replay_only)


def _replay_then_follow(
    readers: list["_SegmentReader"], is_cancelled: Callable[[], bool], max_lines: int,
    follow: bool,
) -> Iterator[tuple[int, list[Line]]]:
    try:
        yield from _merged_backlog(readers, is_cancelled, max_lines)
        if follow:
            yield from _follow_all(readers, is_cancelled, max_lines)
    finally:
        for reader in readers:
            reader.close()


def _merged_backlog(
    readers: list["_SegmentReader"], is_cancelled: Callable[[], bool], max_lines: int
) -> Iterator[tuple[int, list[Line]]]:
    """What the readers' logs hold now, in timestamp order, as runs of one log's lines.

    At most max_lines lines per reader are held at a time, as follow_all holds.
    """
    pending: list[list[Line]] = [[] for _ in readers]
    positions = [0] * len(readers)
    caught_up = [False] * len(readers)
    while not is_cancelled():
        for index, reader in enumerate(readers):
            if positions[index] >= len(pending[index]) and not caught_up[index]:
                pending[index], positions[index] = reader.read_available(max_lines), 0
                caught_up[index] = not pending[index]
        heads = [(pending[i][positions[i]][0], i) for i in range(len(readers))
                 if positions[i] < len(pending[i])]
        if not heads:
            return
        # Send from the earliest log while it is no later than every other log's next line.
        _, index = min(heads)
        limit = min((t for t, i in heads if i != index), default=float("inf"))
        lines, start = pending[index], positions[index]
        end = start
        while end < len(lines) and lines[end][0] <= limit:
            end += 1
        positions[index] = end
        yield index, lines[start:end]


def _follow_all(
    readers: list["_SegmentReader"], is_cancelled: Callable[[], bool], max_lines: int
) -> Iterator[tuple[int, list[Line]]]:
    woken = threading.Event()
    for reader in readers:
        reader.log.watch(woken)
    live = list(enumerate(readers))
    try:
        while live and not is_cancelled():
            # Cleared before looking, so a line written after our look still wakes us.
            woken.clear()
            progressed = False
            for entry in list(live):
                index, reader = entry
                lines = reader.read(max_lines)
                if lines:
                    progressed = True
                    yield index, lines
                elif reader.at_end():
                    live.remove(entry)
            if live and not progressed:
                woken.wait(_POLL_SECONDS)
    finally:
        for reader in readers:
            reader.log.unwatch(woken)
            reader.close()


class _SegmentReader:
    """One reader's place in a log: a segment number and an offset in it. A reader whose segment
    was rotated away before it got there goes on from the oldest one retained."""

    def __init__(self, log: OutputLog) -> None:
        self.log = self._log = log
        with log._changed:
            self._number = log._first
        self._fd: int | None = None
        self._offset = 0

    def read(self, max_lines: int) -> list[Line]:
        """Up to max_lines parsed lines from where the reader stands; empty at the end of what
        is committed."""
        log = self._log
        with log._changed:
            first, last, committed = log._first, log._last, log._committed
        if self._fd is None:
            self._number = max(self._number, first)
            try:
                self._fd = os.open(log.segment_path(self._number), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if self._number < last:
                    # Rotated away between our look and the open; next time we start further on.
                    self._next_segment()
                # Else the newest segment, not created before its first line: nothing yet.
                return []
        # A segment older than the last is no longer written: all of it is committed.
        limit = committed - self._offset if self._number == last else _READ_BYTES
        data = os.pread(self._fd, min(limit, _READ_BYTES), self._offset)
        end = data.rfind(b"\n") + 1
        if end == 0:
            if self._number < last:
                self._next_segment()
            return []
        records = data[: end - 1].split(b"\n")
        if len(records) > max_lines:
            del records[max_lines:]
            end = sum(map(len, records)) + len(records)
        self._offset += end
        return _parse_records(records)

    def read_available(self, max_lines: int) -> list[Line]:
        """Like read(), but empty only at the end of what is committed now (read() is also
        empty when it steps to the next segment)."""
        while True:
            lines = self.read(max_lines)
            if lines:
                return lines
            log = self._log
            with log._changed:
                at_end = log._removed or self._number >= log._last and (
                    self._number > log._last or self._offset >= log._committed)
            if at_end:
                return []

    def _next_segment(self) -> None:
        self.close()
        self._number += 1
        self._offset = 0

    def at_end(self) -> bool:
        log = self._log
        with log._changed:
            if log._removed:
                return True
            if not log._complete:
                return False
            # Past the last segment only when it was removed under us.
            return self._number > log._last or (
                self._number == log._last and self._offset >= log._committed
            )

    def wait_for_more(self, timeout: float) -> None:
        log = self._log
        with log._changed:
            if (self._number >= log._last and self._offset >= log._committed
                    and not log._complete and not log._removed):
                log._changed.wait(timeout)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _parse_records(records: list[bytes]) -> list[Line]:
    lines: list[Line] = []
    # The lines of one append share a timestamp; float() is most of the cost of a line.
    last_text, last_timestamp = b"", 0.0
    for record in records:
        text, _, line = record.partition(b" ")
        if text != last_text:
            last_text, last_timestamp = text, float(text)
        lines.append((last_timestamp, line))
    return lines


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
