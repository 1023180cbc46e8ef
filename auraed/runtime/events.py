"""Lifecycle events: a numbered, ordered record of what happens on the node, kept on disk.

The runtime publishes an event at each lifecycle point (cell allocated and freed, executable
started, exited, stopped, restarted, OOM kills, the daemon's start and stop) and readers follow
them from any sequence number: first what the journal still holds, then new events live.

Order: a sequence number is taken under the journal's lock at the moment of publishing, and the
runtime publishes from inside its own ordering (a cell's allocation under the workload lock
before anything can start in it, an exit before anyone can see the process as ended), so per
workload the order is create -> start -> exit -> delete, as containerd orders its events.

On disk (`<library dir>/events/`): segment files named by the sequence number of their first
record (20 digits, `.events`). A record is a header `<IIQH`: payload length, CRC-32 of sequence,
kind and payload, the sequence number, the kind; then the payload, the event's other fields as
compact JSON. Sequence and kind sit in the header so a scan (start-up, a reader skipping to its
position) never decodes JSON.

Durability, by group commit: publish() numbers and queues an event and returns at once; one
writer thread appends all that is queued with one write and one fdatasync, and only then lets
readers see them. A client therefore never sees an event a crash could take back, and a
restarted daemon continues at the last durable number + 1 without reusing any number a client
saw. The cost is one fsync per batch, not per event: under load batches grow. An event published
while a prompt call is served is written once that call's answer is out (auraed.runtime.
deferred): the writer's wake-up then does not compete with the answer, and the window in which a
SIGKILL loses a published event grows by the rest of the call, a fraction of a millisecond for
a Start.

Torn tail: on open each segment is read record by record; the first record that is short, runs
past the end of the file, fails its CRC or breaks the sequence ends it, and the file is
truncated there (what a crash in the middle of a write leaves).

Bounds: a segment is closed once it reaches `segment_bytes`; beyond `max_segments` the oldest is
deleted. A reader resuming before the oldest kept event is told how many it lost: sequence
numbers are contiguous in storage, so any jump is counted as lost (also after a failed write).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auraed import __version__
from auraed.runtime.deferred import after_answer

if TYPE_CHECKING:
    from auraed.kernel.processes import ExitStatus
    from auraed.runtime.executables import Executable
    from auraed.runtime.names import CellName

log = logging.getLogger("auraed.events")

_HEADER = struct.Struct("<IIQH")
SEGMENT_SUFFIX = ".events"
DEFAULT_SEGMENT_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_SEGMENTS = 8
# Events kept decoded in memory for live readers; older ones are read back from disk.
RING_EVENTS = 16_384
# At most this many events per write: bounds how far a batch overshoots a segment's size.
MAX_WRITE_EVENTS = 4096
MAX_PAYLOAD = 1024 * 1024
_WAIT_SLICE = 0.2


class EventKind(enum.IntEnum):
    """What an event reports; the values are stored on disk and match the API's EventKind."""

    DAEMON_STARTED = 1
    DAEMON_RESTARTED = 2
    DAEMON_STOPPED = 3
    CELL_ALLOCATED = 10
    CELL_FREED = 11
    CELL_OOM_KILL = 12
    EXECUTABLE_STARTED = 20
    EXECUTABLE_EXITED = 21
    EXECUTABLE_STOPPED = 22
    EXECUTABLE_RESTARTED = 23
    EXECUTABLE_START_LIMIT_HIT = 24


_DAEMON_STARTS = (EventKind.DAEMON_STARTED, EventKind.DAEMON_RESTARTED)


@dataclass(frozen=True, slots=True)
class DaemonReport:
    """What a starting daemon found of the run before it."""

    version: str
    previous_stopped_cleanly: bool = False
    cleaned_cells: tuple[str, ...] = ()
    cleaned_executables: tuple[str, ...] = ()
    adopted_cells: tuple[str, ...] = ()
    adopted_executables: tuple[str, ...] = ()
    cleaned_containers: tuple[str, ...] = ()
    # Of the adopted executables, those that had ended and whose exit an earlier run's event
    # already tells: (key, host pid). The journal's own bookkeeping (not on the wire): a later
    # daemon, reading from this start on, must not publish those exits again.
    adopted_exits: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Event:
    sequence: int
    timestamp: float
    kind: EventKind
    cell: str = ""  # cell path; "" at host level and for daemon events
    executable: str = ""
    pid: int = 0  # as the cell sees it
    host_pid: int = 0
    exit_code: int | None = None
    signal: int | None = None
    oom_killed: bool = False
    restart_count: int = 0
    restart_delay_ms: int = 0
    oom_kills: int = 0
    cleaned_up: bool = False  # ended by the cleanup after a run that did not stop cleanly
    daemon: DaemonReport | None = None

    def within(self, cell: str) -> bool:
        """Whether the event concerns `cell` or a cell nested in it."""
        return self.cell == cell or self.cell.startswith(cell + "/")


_EVENT_FIELDS = {f.name: f for f in dataclasses.fields(Event)}
_DAEMON_FIELDS = {f.name for f in dataclasses.fields(DaemonReport)}


# (name, default) of what a record's payload holds: every field but those in its header.
_PAYLOAD_FIELDS = tuple((f.name, f.default) for f in dataclasses.fields(Event)
                        if f.name not in ("sequence", "kind"))
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _payload(event: Event) -> bytes:
    fields: dict[str, Any] = {}
    for name, default in _PAYLOAD_FIELDS:
        value = getattr(event, name)
        if value != default:
            fields[name] = value
    if event.daemon is not None:
        fields["daemon"] = dataclasses.asdict(event.daemon)
    return _ENCODER.encode(fields).encode()


_KINDS = {kind.value: kind for kind in EventKind}


def _event(sequence: int, kind: EventKind, fields: dict[str, Any]) -> Event:
    if not fields.keys() <= _EVENT_FIELDS.keys():
        # Fields a newer daemon added are dropped, not fatal.
        fields = {k: v for k, v in fields.items() if k in _EVENT_FIELDS}
    daemon = fields.pop("daemon", None)
    report = None
    if isinstance(daemon, dict):
        known: dict[str, Any] = {k: _frozen(v) for k, v in daemon.items() if k in _DAEMON_FIELDS}
        report = DaemonReport(**known)
    return Event(sequence=sequence, kind=kind, daemon=report, **fields)


def _frozen(value: Any) -> Any:
    """JSON's lists as the tuples the report's fields hold."""
    return tuple(_frozen(item) for item in value) if isinstance(value, list) else value


def _decode(records: list[_Record], data: bytes) -> list[Event]:
    """The events of records in `data`, decoded with one JSON parse; records of a kind this
    daemon does not know (a newer one wrote them) are left out."""
    known = [r for r in records if r.kind in _KINDS]
    payloads = b",".join(data[r.offset:r.offset + r.length] for r in known)
    values = json.loads(b"[" + payloads + b"]")
    return [_event(r.sequence, _KINDS[r.kind], fields)
            for r, fields in zip(known, values, strict=True)]


def _record(event: Event) -> bytes:
    payload = _payload(event)
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<QH", event.sequence, event.kind)))
    return _HEADER.pack(len(payload), crc, event.sequence, event.kind) + payload


@dataclass(frozen=True)
class _Record:
    sequence: int
    kind: int
    offset: int  # of the payload in the segment
    length: int


def _scan(data: bytes, expected: int | None, *, check_after: int = 0) -> tuple[list[_Record], int]:
    """The valid records of a segment's bytes, and where the valid part ends.

    `expected` is the sequence number the first record must carry (None: any). CRCs are
    checked only for records after `check_after` (a reader skipping to its position)."""
    records: list[_Record] = []
    position = 0
    while position + _HEADER.size <= len(data):
        length, crc, sequence, kind = _HEADER.unpack_from(data, position)
        start = position + _HEADER.size
        if length > MAX_PAYLOAD or start + length > len(data):
            break
        if expected is not None and sequence != expected:
            break
        if sequence > check_after and zlib.crc32(
                data[start:start + length], zlib.crc32(struct.pack("<QH", sequence, kind))) != crc:
            break
        records.append(_Record(sequence, kind, start, length))
        expected = sequence + 1
        position = start + length
    return records, position


@dataclass(frozen=True)
class PreviousRun:
    """What the journal says of the daemon run before this one."""

    stopped_cleanly: bool
    open_cells: tuple[str, ...]  # allocated and never freed, parents first
    running: tuple[Event, ...]  # the last start of each executable that never exited
    # Executables whose last event is their exit (their cell not freed since): key -> host pid.
    # A daemon adopting one of them ended must not publish that exit again.
    exits: dict[str, int] = dataclasses.field(default_factory=dict)

    def exit_published(self, key: str, host_pid: int) -> bool:
        """Whether the journal already tells the end of process `host_pid` of executable
        `key` ("cell/name", or "name" at host level)."""
        return self.exits.get(key) == host_pid


def _previous_run(events: Iterable[Event]) -> PreviousRun:
    cells: dict[str, None] = {}
    running: dict[tuple[str, str], Event] = {}
    exits: dict[tuple[str, str], int] = {}
    stopped = False
    for event in events:
        key = (event.cell, event.executable)
        if event.kind in _DAEMON_STARTS:
            # A new run: only what that daemon adopted stayed open (what it cleaned up, its own
            # events closed). Of what it adopted ended, the exits it found already published
            # are in its report; it published the others after it.
            stopped = False
            report = event.daemon or DaemonReport("")
            cells = dict.fromkeys(report.adopted_cells)
            running = {}
            exits = {_split_key(adopted): pid for adopted, pid in report.adopted_exits}
            for adopted in report.adopted_executables:
                cell, name = _split_key(adopted)
                if (cell, name) not in exits:
                    running[(cell, name)] = Event(event.sequence, event.timestamp,
                                                  EventKind.EXECUTABLE_STARTED, cell=cell,
                                                  executable=name)
        elif event.kind is EventKind.DAEMON_STOPPED:
            stopped = True
        elif event.kind is EventKind.CELL_ALLOCATED:
            cells[event.cell] = None
        elif event.kind is EventKind.CELL_FREED:
            for name in [c for c in cells if c == event.cell or c.startswith(event.cell + "/")]:
                del cells[name]
            for gone in [k for k in running if k[0] and running[k].within(event.cell)]:
                del running[gone]
            for gone in [k for k in exits if k[0] == event.cell
                         or k[0].startswith(event.cell + "/")]:
                del exits[gone]
        elif event.kind in (EventKind.EXECUTABLE_STARTED, EventKind.EXECUTABLE_RESTARTED):
            running[key] = event
            exits.pop(key, None)
        elif event.kind is EventKind.EXECUTABLE_EXITED:
            running.pop(key, None)
            exits[key] = event.host_pid
        elif event.kind is EventKind.EXECUTABLE_STOPPED:
            running.pop(key, None)
    return PreviousRun(stopped, tuple(sorted(cells)), tuple(running.values()),
                       {_joined_key(*key): pid for key, pid in exits.items()})


class EventJournal:
    """Events numbered in order, appended to a bounded on-disk journal, followed by readers.

    With `directory` None the journal lives in memory only (numbers restart with the process).
    """

    def __init__(self, directory: Path | None = None, *,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 max_segments: int = DEFAULT_MAX_SEGMENTS,
                 ring_events: int = RING_EVENTS) -> None:
        self.directory = directory
        self._segment_bytes = segment_bytes
        self._max_segments = max(1, max_segments)
        self._ring_events = ring_events
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)
        self._visible = threading.Condition(self._lock)
        self._pending: list[Event] = []
        self._ring: list[Event] = []
        self._next = 1
        self._durable = 0
        self._closing = False
        self._closed = False
        self._write_failed = False
        self._segments: list[tuple[int, Path]] = []  # (first sequence, path), oldest first
        self._fd: int | None = None
        self._fd_size = 0
        self._writer: threading.Thread | None = None
        self.previous: PreviousRun | None = None  # set by open() when the journal had events
        self.dropped_tail_bytes = 0

    @classmethod
    def in_memory(cls) -> EventJournal:
        """An open journal that keeps no files (for a runtime nobody gave a directory)."""
        journal = cls(None)
        journal.open()
        return journal

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Recover the journal (dropping a torn tail) and start the writer."""
        if self._writer is not None:
            return
        if self.directory is not None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._recover()
        self._writer = threading.Thread(target=self._write_loop, name="event-journal", daemon=True)
        self._writer.start()

    def close(self) -> None:
        """Write what is queued, then stop; later events are dropped."""
        with self._lock:
            self._closing = True
            self._queued.notify_all()
        if self._writer is not None:
            self._writer.join()
        with self._lock:
            self._closed = True
            self._visible.notify_all()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def last_sequence(self) -> int:
        """The newest event readers can see (0 when there is none)."""
        with self._lock:
            return self._durable

    @property
    def oldest_sequence(self) -> int:
        """The oldest event still kept (on disk, or in memory without a directory)."""
        with self._lock:
            if self._segments:
                return self._segments[0][0]
            return self._ring[0].sequence if self._ring else self._durable + 1

    # ------------------------------------------------------------------ publishing

    def publish(self, kind: EventKind, **fields: Any) -> int:
        """Number and queue an event; returns its sequence number (0 once closed)."""
        with self._lock:
            if self._closing:
                return 0
            sequence = self._next
            self._next += 1
            self._pending.append(Event(sequence, time.time(), kind, **fields))
        # Inside a prompt call, the writer is woken once the caller has its answer (auraed.
        # runtime.deferred): the event's number is taken, and with it its order; only its
        # write waits.
        after_answer(self._wake_writer, durable=True)
        return sequence

    def _wake_writer(self) -> None:
        with self._lock:
            if self._pending:
                self._queued.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event published so far is visible to readers."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._queued.notify()  # a call's events whose writer's wake waits for its answer
            target = self._next - 1
            while self._durable < target and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._visible.wait(remaining)
            return self._durable >= target

    # The runtime's lifecycle points, one call each.

    def cell_allocated(self, cell: CellName) -> None:
        self.publish(EventKind.CELL_ALLOCATED, cell=cell.path)

    def cell_freed(self, cell: CellName) -> None:
        self.publish(EventKind.CELL_FREED, cell=cell.path)

    def cell_oom_kill(self, cell: CellName, oom_kills: int) -> None:
        self.publish(EventKind.CELL_OOM_KILL, cell=cell.path, oom_kills=oom_kills)

    def executable_started(self, executable: Executable) -> None:
        """STARTED, or RESTARTED when its restart policy started it again."""
        restart = executable.restart
        kind = EventKind.EXECUTABLE_RESTARTED if restart.count else EventKind.EXECUTABLE_STARTED
        self.publish(kind, **_executable_fields(executable), restart_count=restart.count,
                     restart_delay_ms=round(restart.last_delay * 1000) if restart.count else 0)

    def executable_exited(self, executable: Executable, status: ExitStatus) -> None:
        self.publish(EventKind.EXECUTABLE_EXITED, **_executable_fields(executable),
                     exit_code=status.exit_code, signal=status.signal,
                     oom_killed=executable.oom_killed, restart_count=executable.restart.count)

    def executable_stopped(self, executable: Executable) -> None:
        self.publish(EventKind.EXECUTABLE_STOPPED, **_executable_fields(executable),
                     restart_count=executable.restart.count)

    def start_limit_hit(self, executable: Executable) -> None:
        self.publish(EventKind.EXECUTABLE_START_LIMIT_HIT, **_executable_fields(executable),
                     restart_count=executable.restart.count)

    def daemon_started(self, cleaned_cells: Iterable[str] = (), *,
                       adopted_cells: Iterable[str] = (),
                       adopted_executables: Iterable[str] = (),
                       cleaned_containers: Iterable[str] = (),
                       adopted_exits: Iterable[tuple[str, int]] = ()) -> None:
        """Announce this run. After an earlier one, say what of it was cleaned up or adopted,
        and close what it left open: an exit for each executable still running, a free for
        each cell, both marked cleaned_up, so every workload's events end. adopted_exits: the
        adopted executables that had ended with their exit already published (see
        PreviousRun.exit_published), as (key, host pid); their exits are not published again."""
        previous = self.previous
        if previous is None:
            self.publish(EventKind.DAEMON_STARTED, daemon=DaemonReport(
                __version__, cleaned_containers=tuple(sorted(cleaned_containers))))
            return
        kept_cells = set(adopted_cells)
        kept = set(adopted_executables)
        lost = [e for e in previous.running if _key(e) not in kept]
        lost_cells = [c for c in previous.open_cells if c not in kept_cells]
        if lost or lost_cells:
            log.warning("the previous run did not stop cleanly; its workloads were cleaned up",
                        extra={"cells": ",".join(lost_cells),
                               "executables": ",".join(_key(e) for e in lost)})
        self.publish(EventKind.DAEMON_RESTARTED, daemon=DaemonReport(
            __version__,
            previous_stopped_cleanly=previous.stopped_cleanly,
            cleaned_cells=tuple(sorted({*cleaned_cells, *lost_cells})),
            cleaned_executables=tuple(_key(e) for e in lost),
            adopted_cells=tuple(sorted(kept_cells)),
            adopted_executables=tuple(sorted(kept)),
            cleaned_containers=tuple(sorted(cleaned_containers)),
            adopted_exits=tuple(sorted(adopted_exits)),
        ))
        for event in lost:
            self.publish(EventKind.EXECUTABLE_EXITED, cell=event.cell,
                         executable=event.executable, pid=event.pid, host_pid=event.host_pid,
                         restart_count=event.restart_count, cleaned_up=True)
        for cell in sorted(lost_cells, key=lambda c: c.count("/"), reverse=True):
            self.publish(EventKind.CELL_FREED, cell=cell, cleaned_up=True)

    def daemon_stopped(self) -> None:
        self.publish(EventKind.DAEMON_STOPPED, daemon=DaemonReport(__version__))

    # ------------------------------------------------------------------ reading

    def read(self, after: int, cancelled: Callable[[], bool], *, follow: bool,
             batch: int = 512) -> Iterator[tuple[int, list[Event]]]:
        """Batches of events after sequence `after`, oldest first, each with how many events
        right before it are no longer kept. Without `follow`, ends at the newest event
        visible when the call started; with it, waits for new ones until `cancelled()`."""
        cursor = after
        end = None if follow else self.last_sequence
        skip_disk = False
        while not cancelled():
            with self._lock:
                head = self._durable if end is None else end
                if cursor >= head:
                    if end is not None or self._closed:
                        return
                    self._visible.wait(_WAIT_SLICE)
                    continue
                ring_first = self._ring[0].sequence if self._ring else head + 1
                events: list[Event] = []
                if cursor + 1 >= ring_first or self.directory is None or skip_disk:
                    start = max(0, cursor + 1 - ring_first)
                    events = [e for e in self._ring[start:start + batch] if e.sequence <= head]
            skip_disk = False
            if not events:
                # Older than memory holds: from the segments, up to where memory starts.
                for lost, chunk in self._read_disk(cursor, ring_first - 1, batch, cancelled):
                    yield lost, chunk
                    cursor = chunk[-1].sequence
                # What the disk no longer holds below memory is lost: go on from memory.
                skip_disk = cursor + 1 < ring_first
                continue
            lost = max(0, events[0].sequence - cursor - 1)
            cursor = events[-1].sequence
            yield lost, events

    def _read_disk(self, cursor: int, upto: int, batch: int,
                   cancelled: Callable[[], bool]) -> Iterator[tuple[int, list[Event]]]:
        with self._lock:
            segments = list(self._segments)
        firsts = [first for first, _ in segments]
        index = max(0, bisect.bisect_right(firsts, cursor + 1) - 1)
        for _, path in segments[index:]:
            if cancelled():
                return
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # the oldest, deleted as we went: counted as lost
                continue
            records, _ = _scan(data, None, check_after=cursor)
            wanted = [r for r in records if cursor < r.sequence <= upto]
            for start in range(0, len(wanted), batch):
                chunk = _decode(wanted[start:start + batch], data)
                if chunk:
                    lost = max(0, chunk[0].sequence - cursor - 1)
                    cursor = chunk[-1].sequence
                    yield lost, chunk
            if records and records[-1].sequence >= upto:
                return  # the rest is in memory

    # ------------------------------------------------------------------ disk

    def _recover(self) -> None:
        assert self.directory is not None
        paths = []
        for path in self.directory.iterdir():
            stem = path.name.removesuffix(SEGMENT_SUFFIX)
            if path.name.endswith(SEGMENT_SUFFIX) and stem.isdigit():
                paths.append((int(stem), path))
        paths.sort()
        last = 0
        kept: list[tuple[int, Path]] = []
        run_start: tuple[int, int] | None = None  # (segment index, record index)
        all_records: list[list[_Record]] = []
        for first, path in paths:
            data = path.read_bytes()
            # A segment continues its predecessor's numbering; the first one may start anywhere.
            # A segment's records are numbered from its name on, after its predecessor's; a gap
            # between segments (one deleted by hand) is allowed, readers count it as lost.
            records, end = _scan(data, first) if first > last else ([], 0)
            if end < len(data):
                self.dropped_tail_bytes += len(data) - end
                log.warning("event journal: dropping a torn or damaged tail",
                            extra={"segment": str(path), "bytes": len(data) - end})
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            if not records:
                path.unlink()
                last = max(last, first - 1)
                continue
            for position, record in enumerate(records):
                if record.kind in _DAEMON_STARTS:
                    run_start = (len(kept), position)
            kept.append((first, path))
            all_records.append(records)
            last = records[-1].sequence
        self._segments = kept
        self._next = last + 1
        self._durable = last
        if kept:
            self.previous = _previous_run(self._events_from(kept, all_records, run_start))
            self._fd_size = kept[-1][1].stat().st_size
            self._fd = os.open(kept[-1][1], os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def _events_from(self, segments: list[tuple[int, Path]], records: list[list[_Record]],
                     start: tuple[int, int] | None) -> Iterator[Event]:
        """Decoded events from the last daemon start on (from the oldest kept without one)."""
        segment_index, record_index = start or (0, 0)
        for index in range(segment_index, len(segments)):
            data = segments[index][1].read_bytes()
            yield from _decode(records[index][record_index if index == segment_index else 0:],
                               data)

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._queued.wait()
                if not self._pending:
                    return
                batch = self._pending[:MAX_WRITE_EVENTS]
                del self._pending[:MAX_WRITE_EVENTS]
            if self.directory is not None:
                try:
                    self._append(batch)
                except Exception:  # a bug must not stall every reader and flush()
                    log.exception("event journal: writing a batch failed")
            with self._lock:
                self._ring.extend(batch)
                if len(self._ring) > 2 * self._ring_events:
                    del self._ring[:len(self._ring) - self._ring_events]
                self._durable = batch[-1].sequence
                self._visible.notify_all()

    def _append(self, batch: list[Event]) -> None:
        data = b"".join(_record(event) for event in batch)
        try:
            if self._fd is None or self._fd_size >= self._segment_bytes:
                self._rotate(batch[0].sequence)
            assert self._fd is not None
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fdatasync(self._fd)
            self._fd_size += len(data)
            if self._write_failed:
                log.warning("event journal: writing again")
                self._write_failed = False
        except OSError as error:
            # Readers still get the events from memory; after a restart the gap counts as lost.
            if not self._write_failed:
                log.error("event journal: cannot write; events are kept in memory only",
                          extra={"error": str(error)})
            self._write_failed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _rotate(self, first: int) -> None:
        assert self.directory is not None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        path = self.directory / f"{first:020d}{SEGMENT_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._fd_size = os.fstat(self._fd).st_size
        with self._lock:
            self._segments.append((first, path))
            doomed = self._segments[:-self._max_segments]
            del self._segments[:-self._max_segments]
        for _, old in doomed:
            old.unlink(missing_ok=True)
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)  # the new file's name must survive a crash too
        finally:
            os.close(directory)


def _executable_fields(executable: Executable) -> dict[str, Any]:
    return {
        "cell": executable.cell.path if executable.cell else "",
        "executable": executable.name,
        "pid": executable.process.ns_pid,
        "host_pid": executable.process.host_pid,
    }


def _key(event: Event) -> str:
    return _joined_key(event.cell, event.executable)


def _joined_key(cell: str, executable: str) -> str:
    """An executable's key as reports name it: "cell/name", or "name" at host level."""
    return f"{cell}/{executable}" if cell else executable


def _split_key(key: str) -> tuple[str, str]:
    """(cell, executable) of a key _key made."""
    cell, _, name = key.rpartition("/")
    return cell, name
