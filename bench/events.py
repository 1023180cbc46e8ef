"""Lifecycle events through a real auraed: events/s that reach an SDK client from the
journal (replayed from disk, cold, and from memory) and live from concurrent lifecycles,
against the same daemon's batched log-line stream carrying as many lines, in the same run.

The journal is filled before the daemon starts, with the same module the daemon writes it
with, as complete lifecycles (allocate, start, exit, stop, free), so the replay reads what a
busy node leaves behind.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from threading import Thread

import aurae_sdk
from aurae_sdk.wire.generated.pb.observe import observe_pb2 as pb
from auraed.runtime.events import EventJournal, EventKind
from bench.core import Comparison, Figure, Mode, Result, Series, interleave
from tests.support.daemon import running_daemon

BATCH = 1000


def _fill(library: Path, count: int) -> None:
    journal = EventJournal(library / "events")
    journal.open()
    journal.daemon_started()
    published = 1
    cell = 0
    while published < count - 1:
        name = f"cell-{cell}"
        cell += 1
        journal.publish(EventKind.CELL_ALLOCATED, cell=name)
        journal.publish(EventKind.EXECUTABLE_STARTED, cell=name, executable="web",
                        pid=1000 + cell, host_pid=1000 + cell)
        journal.publish(EventKind.EXECUTABLE_EXITED, cell=name, executable="web",
                        pid=1000 + cell, host_pid=1000 + cell, exit_code=0)
        journal.publish(EventKind.EXECUTABLE_STOPPED, cell=name, executable="web",
                        pid=1000 + cell, host_pid=1000 + cell)
        journal.publish(EventKind.CELL_FREED, cell=name)
        published += 5
    journal.daemon_stopped()
    journal.flush(60)
    journal.close()


def _newest(client: aurae_sdk.Client) -> int:
    head = 0
    for response in client.observe.get_event_stream(after_sequence=0, timeout=60):
        head = response.events[-1].sequence if response.events else head
    return head


def run(mode: Mode) -> list[Result]:
    count = mode.pick(full=100_000, quick=30_000, smoke=3_000)
    runs = mode.pick(full=5, quick=3, smoke=1)
    lifecycles = mode.pick(full=100, quick=30, smoke=2)
    # A resume this many events before the newest.
    near = mode.pick(full=10_000, quick=10_000, smoke=1_000)
    library = Path(tempfile.mkdtemp(prefix="aurae-bench-events-", dir="/tmp"))
    replayed = Series(f"events replayed through auraed (max_batch_events={BATCH})", "events/s")
    recent = Series(f"the newest {near:,} events (a resume near the head)", "events/s")
    lines = Series(f"log lines through the same auraed (max_batch_lines={BATCH})", "lines/s")
    floor = Series("the journal read in process, no gRPC", "events/s")
    try:
        _fill(library, count)
        # The in-process reader gets a copy: the daemon writes its own journal meanwhile.
        shutil.copytree(library / "events", library / "copy")
        with running_daemon(library_dir=library) as daemon, daemon.client() as client:
            def replay(after: int = 0) -> float:
                begin = time.perf_counter()
                received = 0
                for response in client.observe.get_event_stream(
                        after_sequence=after, max_batch_events=BATCH, timeout=600):
                    received += len(response.events)
                elapsed = time.perf_counter() - begin
                if received < count - after - 1:
                    raise RuntimeError(f"replay lost events: {received}")
                return received / elapsed

            cold = replay()  # the first read of the segments since the daemon started
            head = _newest(client)

            client.cells.allocate(cell={"name": "chatty"})
            counter = iter(range(10**9))

            def log_lines() -> float:
                name = f"c{next(counter)}"
                started = client.cells.start(cell_name="chatty", executable={
                    "name": name, "command": f"seq -f 'event-sized line %g' 1 {count}"})
                begin = time.perf_counter()
                received = 0
                for response in client.observe.get_sub_process_stream(
                        process_id=started.pid, channel_type="LOG_CHANNEL_TYPE_STDOUT",
                        max_batch_lines=BATCH, timeout=600):
                    received += len(response.items)
                elapsed = time.perf_counter() - begin
                client.cells.stop(cell_name="chatty", executable_name=name, grace_period_ms=0)
                return received / elapsed

            def in_process() -> float:
                journal = EventJournal(library / "copy")
                journal.open()
                begin = time.perf_counter()
                received = sum(len(chunk) for _, chunk in
                               journal.read(0, lambda: False, follow=False, batch=BATCH))
                rate = received / (time.perf_counter() - begin)
                journal.close()
                return rate

            interleave(runs, (replayed, replay), (recent, lambda: replay(head - near)),
                       (lines, log_lines), (floor, in_process), warmup=mode.warmup(1))
            client.cells.free(cell_name="chatty")

            # Live: a follower while lifecycles run; the rate is the producers'.
            live_events = 0
            start_sequence = _newest(client)

            def follow() -> None:
                nonlocal live_events
                for response in client.observe.get_event_stream(
                        after_sequence=start_sequence, follow=True, timeout=600):
                    live_events += len(response.events)
                    if any(e.kind == pb.EVENT_KIND_CELL_FREED and e.cell_name == f"live-{lifecycles - 1}"
                           for e in response.events):
                        return

            follower = Thread(target=follow)
            follower.start()
            begin = time.perf_counter()
            for i in range(lifecycles):
                client.cells.allocate(cell={"name": f"live-{i}"})
                client.cells.start(cell_name=f"live-{i}",
                                   executable={"name": "t", "command": "true"})
                client.cells.free(cell_name=f"live-{i}")
            follower.join(600)
            live_rate = live_events / (time.perf_counter() - begin)
    finally:
        shutil.rmtree(library, ignore_errors=True)
    return [
        Comparison("events_replay_vs_log_lines", f"Events replayed from the journal ({count})",
                   replayed, lines, higher_is_better=True, goal=">= 10k events/s",
                   notes=f"cold (first replay after start, from disk): {cold:,.0f} events/s"),
        Comparison("events_recent_vs_log_lines", f"Resuming {near:,} events before the newest",
                   recent, lines, higher_is_better=True, goal=">= 10k events/s"),
        Figure("events_in_process", "The journal read and decoded in one Python thread, "
                                    "no gRPC", floor.median, "events/s",
               notes="the daemon's share of a replay; client and daemon overlap on two cores"),
        Figure("events_live", f"Live events followed during {lifecycles} allocate/start/free "
                              "lifecycles (bound by the lifecycles)", live_rate, "events/s"),
    ]
