"""Lifecycle events against real daemons: order per workload over hundreds of concurrent
lifecycles, contiguous sequence numbers, resuming across a SIGKILL and a clean restart of the
daemon on the same library directory, bad requests, and `aurae-py events`."""

from __future__ import annotations

import json
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest

import aurae_sdk
from aurae_sdk.wire.generated.pb.observe import observe_pb2 as pb
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.processes import alive

KIND = {value: name.removeprefix("EVENT_KIND_") for name, value in pb.EventKind.items()}
DEADLINE = 120.0


def newest(client: aurae_sdk.Client) -> int:
    """The newest sequence number the daemon has made visible."""
    last = 0
    for response in client.observe.get_event_stream(after_sequence=0, timeout=30):
        if response.events:
            last = response.events[-1].sequence
    return last


def collect_until(client: aurae_sdk.Client, after: int,
                  done: Callable[[list[pb.Event]], bool]) -> tuple[list[pb.Event], int]:
    """Follow from `after` until done(events) holds; the events and the total lost."""
    events: list[pb.Event] = []
    lost = 0
    stream = client.observe.get_event_stream(after_sequence=after, follow=True, timeout=DEADLINE)
    for response in stream:
        lost += response.lost
        events.extend(response.events)
        if done(events):
            stream.cancel()
            break
    return events, lost


def assert_contiguous(events: Iterable[pb.Event], after: int) -> None:
    expected = after + 1
    for event in events:
        assert event.sequence == expected, f"gap: expected {expected}, got {event.sequence}"
        expected += 1


def assert_ordered_per_workload(events: list[pb.Event]) -> None:
    """containerd's rule: a cell's events sit between its allocation and its free; an
    executable's process is started, then exits, then is stopped (or its cell freed)."""
    cells: dict[str, str] = {}  # cell -> "allocated" | "freed"
    processes: dict[tuple[str, str], str] = {}  # (cell, executable) -> last lifecycle step
    for event in events:
        kind = KIND[event.kind]
        cell, name = event.cell_name, event.executable_name
        if kind == "CELL_ALLOCATED":
            assert cells.get(cell) != "allocated", f"{cell} allocated twice"
            cells[cell] = "allocated"
        elif kind == "CELL_FREED":
            assert cells.get(cell, "allocated") == "allocated", f"{cell} freed twice"
            cells[cell] = "freed"
            for key, step in processes.items():
                if key[0] == cell or key[0].startswith(cell + "/"):
                    assert step != "started", f"{key} still running when {cell} was freed"
        elif kind in ("EXECUTABLE_STARTED", "EXECUTABLE_RESTARTED"):
            if cell:
                assert cells.get(cell, "allocated") == "allocated", f"{name} started in freed {cell}"
            assert processes.get((cell, name)) != "started", f"{cell}/{name} started twice"
            processes[(cell, name)] = "started"
        elif kind == "EXECUTABLE_EXITED":
            assert processes.get((cell, name), "started") == "started", f"{cell}/{name} exited twice"
            processes[(cell, name)] = "exited"
        elif kind == "EXECUTABLE_STOPPED":
            assert processes.get((cell, name), "exited") == "exited", \
                f"{cell}/{name} stopped before it exited"
            processes[(cell, name)] = "stopped"


def lifecycle(client: aurae_sdk.Client, cell: str) -> dict[str, int]:
    """Allocate, run one process to its end and stop another, free; the pids Start gave."""
    client.cells.allocate(cell={"name": cell})
    quick = client.cells.start(cell_name=cell, executable={"name": "quick", "command": "exit 3"})
    slow = client.cells.start(cell_name=cell, executable={"name": "slow", "command": "sleep 60"})
    assert client.cells.wait(cell_name=cell, executable_name="quick", timeout=60).status.exit_code == 3
    client.cells.stop(cell_name=cell, executable_name="slow", grace_period_ms=5000)
    client.cells.free(cell_name=cell)
    return {"quick": quick.host_pid, "slow": slow.host_pid}


def test_hundreds_of_concurrent_lifecycles_are_ordered_per_workload(
        client: aurae_sdk.Client, daemon: DaemonProcess) -> None:
    before = newest(client)
    cells = [f"ev-{i}" for i in range(200)]

    def run(cell: str) -> dict[str, int]:
        with daemon.client() as own:
            return lifecycle(own, cell)

    with ThreadPoolExecutor(max_workers=6) as pool:
        pids = dict(zip(cells, pool.map(run, cells), strict=True))
    # A host-level executable too: started, exited, stopped.
    client.cells.start(executable={"name": "ev-host", "command": "exit 0"})
    client.cells.wait(executable_name="ev-host", timeout=30)
    client.cells.stop(executable_name="ev-host")

    def complete(events: list[pb.Event]) -> bool:
        return any(KIND[e.kind] == "EXECUTABLE_STOPPED" and e.executable_name == "ev-host"
                   for e in events)

    events, lost = collect_until(client, before, complete)
    assert lost == 0
    assert_contiguous(events, before)
    assert_ordered_per_workload(events)
    by_cell: dict[str, list[pb.Event]] = defaultdict(list)
    for event in events:
        by_cell[event.cell_name].append(event)
    for cell in cells:
        kinds = [(KIND[e.kind], e.executable_name) for e in by_cell[cell]]
        assert kinds[0] == ("CELL_ALLOCATED", "") and kinds[-1] == ("CELL_FREED", "")
        assert sorted(kinds[1:-1]) == sorted([
            ("EXECUTABLE_STARTED", "quick"), ("EXECUTABLE_EXITED", "quick"),
            ("EXECUTABLE_STARTED", "slow"), ("EXECUTABLE_EXITED", "slow"),
            ("EXECUTABLE_STOPPED", "slow")])
        exits = {e.executable_name: e for e in by_cell[cell] if KIND[e.kind] == "EXECUTABLE_EXITED"}
        assert exits["quick"].exit_code == 3 and not exits["quick"].HasField("signal")
        assert exits["slow"].signal == signal.SIGTERM
        starts = {e.executable_name: e.host_pid for e in by_cell[cell]
                  if KIND[e.kind] == "EXECUTABLE_STARTED"}
        assert starts == pids[cell]
    timestamps = [e.timestamp for e in events]
    assert all(abs(t - time.time()) < 600 for t in timestamps)


def test_a_filtered_stream_sees_only_its_cell(client: aurae_sdk.Client) -> None:
    before = newest(client)
    lifecycle(client, "ev-other")
    lifecycle(client, "ev-mine")
    events, _ = collect_until(
        client, before, lambda evs: any(KIND[e.kind] == "CELL_FREED" and e.cell_name == "ev-mine"
                                        for e in evs))
    del events
    filtered = []
    for response in client.observe.get_event_stream(
            after_sequence=before, workload={"workload_type": "WORKLOAD_TYPE_CELL", "id": "ev-mine"},
            timeout=30):
        filtered.extend(response.events)
    assert {e.cell_name for e in filtered} == {"ev-mine"}
    kinds = [KIND[e.kind] for e in filtered]
    assert kinds[0] == "CELL_ALLOCATED" and kinds[-1] == "CELL_FREED"


def test_bad_requests_are_refused(client: aurae_sdk.Client) -> None:
    last = newest(client)
    with pytest.raises(aurae_sdk.FailedPrecondition) as error:
        list(client.observe.get_event_stream(after_sequence=last + 1000, timeout=10))
    assert error.value.field == "after_sequence"
    with pytest.raises(aurae_sdk.InvalidArgument) as error:
        list(client.observe.get_event_stream(max_batch_events=10_001, timeout=10))
    assert error.value.field == "max_batch_events"
    with pytest.raises(aurae_sdk.InvalidArgument):
        list(client.observe.get_event_stream(
            workload={"workload_type": "WORKLOAD_TYPE_CELL", "id": "Bad Name"}, timeout=10))


def test_batches_respect_the_requested_size(client: aurae_sdk.Client) -> None:
    sizes = [len(r.events) for r in client.observe.get_event_stream(max_batch_events=7, timeout=30)]
    assert sizes and max(sizes) <= 7 and sum(sizes) >= 7


def test_cli_prints_events_and_resumes(client: aurae_sdk.Client, daemon: DaemonProcess) -> None:
    before = newest(client)
    lifecycle(client, "ev-cli")
    collect_until(client, before, lambda evs: any(KIND[e.kind] == "CELL_FREED" for e in evs))
    result = daemon.cli("events", "--since", str(before))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[0] == str(before + 1)
    assert lines[0].split()[2:4] == ["cell-allocated", "ev-cli"]
    assert any("executable-exited ev-cli/quick" in line and "exit_code=3" in line for line in lines)
    assert lines[-1].split()[2:4] == ["cell-freed", "ev-cli"]
    as_json = daemon.cli("events", "--since", str(before + 1), "-o", "json")
    assert as_json.returncode == 0, as_json.stderr
    parsed = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert int(parsed[0]["sequence"]) == before + 2
    assert len(parsed) == len(lines) - 1


def test_cli_follows_live_events(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    import subprocess
    import sys

    before = newest(client)
    follower = subprocess.Popen(
        [sys.executable, "-m", "aurae_cli", "events", "-f", "--since", str(before)],
        env={"AURAE_CONFIG": daemon.config, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE, text=True)
    try:
        client.cells.allocate(cell={"name": "ev-follow"})
        client.cells.free(cell_name="ev-follow")
        assert follower.stdout is not None
        seen = []
        for line in follower.stdout:
            seen.append(line.split()[2:4])
            if seen[-1] == ["cell-freed", "ev-follow"]:
                break
        assert seen == [["cell-allocated", "ev-follow"], ["cell-freed", "ev-follow"]]
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(30)
    assert follower.returncode == 130


@pytest.mark.slow
def test_resume_across_sigkill_and_clean_restart_of_the_daemon() -> None:
    with running_daemon() as first:
        library = first.workdir / "lib"
        with first.client() as client:
            assert KIND[next(iter(client.observe.get_event_stream(timeout=30))).events[0].kind] \
                == "DAEMON_STARTED"
            for i in range(30):
                lifecycle(client, f"before-{i}")
            # Left running when the daemon dies: the next one must close its events.
            client.cells.allocate(cell={"name": "orphan"})
            client.cells.allocate(cell={"name": "orphan/inner"})
            client.cells.start(cell_name="orphan/inner",
                               executable={"name": "sleeper", "command": "sleep 600"})
            client.cells.start(executable={"name": "host-sleeper", "command": "sleep 600"})
            seen, _ = collect_until(client, 0, lambda evs: any(
                KIND[e.kind] == "EXECUTABLE_STARTED" and e.executable_name == "host-sleeper"
                for e in evs))
        # A client saw this far, then its daemon was killed.
        resume_at = seen[-1].sequence
        first.stop(signal.SIGKILL)

        with running_daemon(library_dir=library, cgroup_root=first.cgroup_root) as second:
            with second.client() as client:
                for i in range(20):
                    lifecycle(client, f"after-{i}")
                after_kill, lost = collect_until(client, resume_at, lambda evs: any(
                    KIND[e.kind] == "CELL_FREED" and e.cell_name == "after-19" for e in evs))
            assert lost == 0
            assert_contiguous(after_kill, resume_at)
            restarted = after_kill[0]
            assert KIND[restarted.kind] == "DAEMON_RESTARTED"
            assert not restarted.daemon.previous_stopped_cleanly
            assert set(restarted.daemon.cleaned_cells) == {"orphan", "orphan/inner"}
            assert set(restarted.daemon.cleaned_executables) == {"orphan/inner/sleeper",
                                                                  "host-sleeper"}
            cleaned = [(KIND[e.kind], e.cell_name, e.executable_name) for e in after_kill[1:5]]
            assert sorted(cleaned) == sorted([
                ("EXECUTABLE_EXITED", "orphan/inner", "sleeper"),
                ("EXECUTABLE_EXITED", "", "host-sleeper"),
                ("CELL_FREED", "orphan/inner", ""), ("CELL_FREED", "orphan", "")])
            assert all(e.cleaned_up for e in after_kill[1:5])
            assert_ordered_per_workload([*seen, *after_kill])
            second_last = after_kill[-1].sequence

        with (running_daemon(library_dir=library, cgroup_root=first.cgroup_root) as third,
              third.client() as client):
                everything, lost = collect_until(client, 0, lambda evs: any(
                    KIND[e.kind] == "DAEMON_RESTARTED" and e.sequence > second_last for e in evs))
        assert lost == 0
        assert_contiguous(everything, 0)
        assert_ordered_per_workload(everything)
        tail = [KIND[e.kind] for e in everything if e.sequence > second_last]
        # The clean stop of the second daemon, then the third's start with nothing to clean.
        assert tail == ["DAEMON_STOPPED", "DAEMON_RESTARTED"]
        last = everything[-1]
        assert last.daemon.previous_stopped_cleanly
        assert not last.daemon.cleaned_cells and not last.daemon.cleaned_executables


@pytest.mark.slow
def test_order_holds_when_the_daemon_is_killed_in_the_middle_of_lifecycles() -> None:
    import threading

    with running_daemon() as first:
        stop = threading.Event()
        seen: list[pb.Event] = []

        def worker(index: int) -> None:
            with first.client(timeout=10) as own:
                for round_ in range(10_000):
                    if stop.is_set():
                        return
                    try:
                        lifecycle(own, f"k-{index}-{round_}")
                    except aurae_sdk.AuraeError:
                        return  # the daemon died under us

        def follower() -> None:
            with first.client() as own:
                try:
                    for response in own.observe.get_event_stream(follow=True, timeout=DEADLINE):
                        seen.extend(response.events)
                        if sum(KIND[e.kind] == "CELL_FREED" for e in seen) >= 40:
                            stop.set()
                except aurae_sdk.AuraeError:
                    return  # ended by the daemon's death

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        following = threading.Thread(target=follower)
        following.start()
        for thread in threads:
            thread.start()
        assert stop.wait(DEADLINE)
        first.stop(signal.SIGKILL)  # lifecycles are in flight
        for thread in [*threads, following]:
            thread.join(DEADLINE)
        resume_at = seen[-1].sequence
        with (running_daemon(library_dir=first.workdir / "lib", cgroup_root=first.cgroup_root)
              as second, second.client() as client):
            after, lost = collect_until(client, resume_at, lambda evs: any(
                KIND[e.kind] == "DAEMON_RESTARTED" for e in evs) and client.cells.list().cells == [])
            # Everything the restart closed is there once it reports itself: read to the end.
            for response in client.observe.get_event_stream(after_sequence=after[-1].sequence,
                                                            timeout=30):
                after.extend(response.events)
        assert lost == 0
        everything = [*seen, *after]
        assert_contiguous(everything, 0)
        assert_ordered_per_workload(everything)
        # Nothing stays open: every cell allocated is freed, every process started has exited.
        open_cells: set[str] = set()
        running: set[tuple[str, str]] = set()
        for event in everything:
            key = (event.cell_name, event.executable_name)
            if KIND[event.kind] == "CELL_ALLOCATED":
                open_cells.add(event.cell_name)
            elif KIND[event.kind] == "CELL_FREED":
                open_cells.discard(event.cell_name)
            elif KIND[event.kind] == "EXECUTABLE_STARTED":
                running.add(key)
            elif KIND[event.kind] == "EXECUTABLE_EXITED":
                running.discard(key)
        assert open_cells == set() and running == set()
        restart = next(e for e in after if KIND[e.kind] == "DAEMON_RESTARTED")
        assert not restart.daemon.previous_stopped_cleanly


@pytest.mark.slow
def test_each_exit_is_published_once_across_restarts_that_adopt(tmp_path: Path) -> None:
    """Live restore: an exit the first daemon published is not published again by the daemons
    that adopt the ended executable (after a SIGKILL, then after a --live-restore SIGTERM);
    an exit while no daemon ran is published once, by the next one. Per executable: started,
    exited, stopped, each exactly once."""
    release = tmp_path / "release"
    with ExitStack() as stack:
        first = stack.enter_context(running_daemon("--live-restore"))
        with first.client(timeout=30) as client:
            client.cells.allocate(cell={"name": "kept"})
            pids = {name: client.cells.start(cell_name="kept", executable={
                "name": name, "command": command}).host_pid for name, command in [
                    ("quick", "exit 3"),  # ends under the first daemon
                    ("away", f"while [ ! -e {release} ]; do sleep 0.05; done; exit 7"),
                    ("sleeper", "sleep 600")]}
            assert client.cells.wait(cell_name="kept", executable_name="quick",
                                     timeout=60).status.exit_code == 3
            # The first daemon has published the exit: it is in the journal.
            collect_until(client, 0, lambda evs: any(
                KIND[e.kind] == "EXECUTABLE_EXITED" and e.executable_name == "quick"
                for e in evs))
        first.stop(signal.SIGKILL)
        release.touch()  # "away" ends while no daemon runs
        deadline = time.monotonic() + DEADLINE
        while alive(pids["away"]):
            assert time.monotonic() < deadline, "away did not end"
            time.sleep(0.05)
        second = stack.enter_context(running_daemon("--live-restore", after=first))
        with second.client(timeout=30) as client:
            assert client.cells.wait(cell_name="kept", executable_name="away",
                                     timeout=60).status.exit_code == 7
        assert second.stop(signal.SIGTERM) == 0  # planned: the workloads stay
        third = stack.enter_context(running_daemon("--live-restore", after=second))
        with third.client(timeout=30) as client:
            for name, code in (("quick", 3), ("away", 7)):
                assert client.cells.wait(cell_name="kept", executable_name=name,
                                         timeout=60).status.exit_code == code
            for name in pids:
                client.cells.stop(cell_name="kept", executable_name=name, grace_period_ms=0)
            client.cells.free(cell_name="kept")
            events, lost = collect_until(client, 0, lambda evs: any(
                KIND[e.kind] == "CELL_FREED" and e.cell_name == "kept" for e in evs))
    assert lost == 0
    assert_contiguous(events, 0)
    assert_ordered_per_workload(events)
    lifecycles = defaultdict(list)
    for event in events:
        if event.cell_name == "kept":
            lifecycles[event.executable_name].append((KIND[event.kind], event.host_pid))
    for name, pid in pids.items():
        assert lifecycles[name] == [("EXECUTABLE_STARTED", pid), ("EXECUTABLE_EXITED", pid),
                                    ("EXECUTABLE_STOPPED", pid)], name
    assert lifecycles[""] == [("CELL_ALLOCATED", 0), ("CELL_FREED", 0)]
    starts = [e.daemon for e in events if KIND[e.kind] == "DAEMON_RESTARTED"]
    assert len(starts) == 2
