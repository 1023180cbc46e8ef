"""Restart policies with real processes: on-failure restarts with doubling delays until the
start limit, always restarts after exit 0, Stop ends a policy for good (even in the middle of
a backoff), Free of the cell ends it, and bad policies are refused."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import aurae_sdk
from aurae_sdk.wire.generated.pb.observe import observe_pb2 as observe_pb
from tests.support.daemon import DaemonProcess

DEADLINE = 60.0


def kind(event: Any) -> str:
    return observe_pb.EventKind.Name(event.kind).removeprefix("EVENT_KIND_")


def newest(client: aurae_sdk.Client) -> int:
    last = 0
    for response in client.observe.get_event_stream(timeout=30):
        last = response.events[-1].sequence if response.events else last
    return last


def events_until(client: aurae_sdk.Client, after: int, cell: str,
                 done: Callable[[list[Any]], bool]) -> list[Any]:
    """The events of `cell` after sequence `after`, until done(those events).

    Only that cell's: `after` comes from newest(), which sees what the journal has written
    (fdatasync'd), so an earlier test's last events (its Stop's EXECUTABLE_STOPPED, say) may
    still come after it, and must not meet this test's condition."""
    events: list[Any] = []
    stream = client.observe.get_event_stream(after_sequence=after, follow=True, timeout=DEADLINE)
    for response in stream:
        events.extend(e for e in response.events if e.cell_name == cell)
        if done(events):
            stream.cancel()
            break
    return events


def status_of(client: aurae_sdk.Client, cell: str | None, name: str) -> Any:
    if cell is None:
        # Host-level executables are not in List; Wait answers at once for an exited one.
        return client.cells.wait(executable_name=name, timeout=30).status
    (node,) = [n for n in client.cells.list().cells if n.cell.name == cell]
    (found,) = [e for e in node.executables if e.name == name]
    return found


def test_on_failure_restarts_with_growing_delays_until_the_start_limit(
        client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "r-fail"})
    try:
        before = newest(client)
        client.cells.start(cell_name="r-fail", executable={
            "name": "crash", "command": "exit 1", "restart_policy": "EXECUTABLE_RESTART_POLICY_ON_FAILURE",
            "restart_delay_ms": 100})
        events = events_until(client, before, "r-fail", lambda evs: any(
            kind(e) == "EXECUTABLE_START_LIMIT_HIT" for e in evs))
        mine = [e for e in events if e.executable_name == "crash"]
        assert [kind(e) for e in mine] == [
            "EXECUTABLE_STARTED", "EXECUTABLE_EXITED",
            *["EXECUTABLE_RESTARTED", "EXECUTABLE_EXITED"] * 4,
            "EXECUTABLE_START_LIMIT_HIT"]  # 5 starts within 10 s, systemd's default limit
        restarts = [e for e in mine if kind(e) == "EXECUTABLE_RESTARTED"]
        assert [e.restart_delay_ms for e in restarts] == [100, 200, 400, 800]
        assert [e.restart_count for e in restarts] == [1, 2, 3, 4]
        exits = [e for e in mine if kind(e) == "EXECUTABLE_EXITED"]
        assert all(e.exit_code == 1 for e in exits)
        # Each restart really waited its delay after the exit before it.
        for exited, restarted in zip(exits, restarts, strict=False):
            assert restarted.timestamp - exited.timestamp >= restarted.restart_delay_ms / 1000 * 0.95
        # Five real processes, one after the other.
        assert len({e.host_pid for e in mine if kind(e).endswith("STARTED")}) == 5
        status = status_of(client, "r-fail", "crash")
        assert status.restart_count == 4 and status.start_limit_hit
        assert status.exit_code == 1 and status.next_restart_at == 0
        assert status.restart_policy == 1  # ON_FAILURE
        # Given up for good: the next delay (1.6 s) passes without a restart.
        time.sleep(2.5)
        assert status_of(client, "r-fail", "crash").restart_count == 4
    finally:
        client.cells.free(cell_name="r-fail")


def test_on_failure_leaves_a_clean_exit_alone(client: aurae_sdk.Client) -> None:
    before = newest(client)
    client.cells.start(executable={"name": "r-clean", "command": "exit 0",
                                   "restart_policy": "EXECUTABLE_RESTART_POLICY_ON_FAILURE",
                                   "restart_delay_ms": 50})
    try:
        assert client.cells.wait(executable_name="r-clean", timeout=30).status.exit_code == 0
        time.sleep(1.0)  # twenty times the delay
        status = status_of(client, None, "r-clean")
        assert status.restart_count == 0 and status.next_restart_at == 0
        events = [e for _, e in _after(client, before) if e.executable_name == "r-clean"]
        assert [kind(e) for e in events] == ["EXECUTABLE_STARTED", "EXECUTABLE_EXITED"]
    finally:
        client.cells.stop(executable_name="r-clean")


def _after(client: aurae_sdk.Client, sequence: int) -> list[tuple[int, Any]]:
    return [(e.sequence, e) for r in client.observe.get_event_stream(
        after_sequence=sequence, timeout=30) for e in r.events]


def test_always_restarts_after_exit_zero_and_stop_ends_it_for_good(
        client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "r-always"})
    try:
        before = newest(client)
        client.cells.start(cell_name="r-always", executable={
            "name": "tick", "command": "exit 0", "restart_policy": "EXECUTABLE_RESTART_POLICY_ALWAYS",
            "restart_delay_ms": 20, "restart_max_delay_ms": 100, "start_limit": {"burst": 0}})
        events_until(client, before, "r-always", lambda evs: sum(
            kind(e) == "EXECUTABLE_RESTARTED" for e in evs) >= 5)
        stopped = client.cells.stop(cell_name="r-always", executable_name="tick").status
        assert stopped.restart_count >= 5 and stopped.next_restart_at == 0
        (stop_seen,) = [e.sequence for e in events_until(client, before, "r-always", lambda evs: any(
            kind(e) == "EXECUTABLE_STOPPED" for e in evs)) if kind(e) == "EXECUTABLE_STOPPED"]
        time.sleep(1.0)  # ten times the longest delay
        after = [e for _, e in _after(client, stop_seen) if e.cell_name == "r-always"]
        assert after == []
        (node,) = [n for n in client.cells.list().cells if n.cell.name == "r-always"]
        assert list(node.executables) == []
        assert client.cells.metrics(cell_name="r-always").cells[0].pids_current == 0
        exits = [e for _, e in _after(client, before)
                 if e.executable_name == "tick" and kind(e) == "EXECUTABLE_EXITED"]
        assert all(e.exit_code == 0 for e in exits)
    finally:
        client.cells.free(cell_name="r-always")


def test_stop_during_a_backoff_cancels_the_restart(client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "r-backoff"})
    try:
        before = newest(client)
        client.cells.start(cell_name="r-backoff", executable={
            "name": "crash", "command": "exit 2",
            "restart_policy": "EXECUTABLE_RESTART_POLICY_ON_FAILURE", "restart_delay_ms": 1500})
        deadline = time.monotonic() + DEADLINE
        while (status := status_of(client, "r-backoff", "crash")).next_restart_at == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert status.next_restart_at > time.time()
        client.cells.stop(cell_name="r-backoff", executable_name="crash")
        time.sleep(2.5)
        kinds = [kind(e) for _, e in _after(client, before) if e.executable_name == "crash"
                 and e.cell_name == "r-backoff"]
        assert kinds == ["EXECUTABLE_STARTED", "EXECUTABLE_EXITED", "EXECUTABLE_STOPPED"]
    finally:
        client.cells.free(cell_name="r-backoff")


def test_free_of_the_cell_ends_the_policy(client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "r-free"})
    before = newest(client)
    client.cells.start(cell_name="r-free", executable={
        "name": "loop", "command": "sleep 0.05", "restart_policy": "EXECUTABLE_RESTART_POLICY_ALWAYS",
        "restart_delay_ms": 10, "restart_max_delay_ms": 50, "start_limit": {"burst": 0}})
    events_until(client, before, "r-free", lambda evs: sum(
        kind(e) == "EXECUTABLE_RESTARTED" for e in evs) >= 3)
    client.cells.free(cell_name="r-free")
    (freed,) = [e.sequence for e in events_until(client, before, "r-free", lambda evs: any(
        kind(e) == "CELL_FREED" for e in evs)) if kind(e) == "CELL_FREED"]
    time.sleep(1.0)
    assert [e for _, e in _after(client, freed) if e.cell_name == "r-free"] == []
    with pytest.raises(aurae_sdk.NotFound):
        client.cells.metrics(cell_name="r-free")
    mine = [kind(e) for _, e in _after(client, before) if e.cell_name == "r-free"]
    assert mine[-1] == "CELL_FREED" and mine[-2] == "EXECUTABLE_EXITED"


def test_every_runs_output_replays_within_the_output_bound(
        daemon: DaemonProcess, client: aurae_sdk.Client, tmp_path: Path) -> None:
    """A restarted executable's output goes on in one log: Observe replays the earlier runs'
    lines before the current run's, and what it keeps is bounded as one run's output is (8
    segments by default; each run starts a segment of its own)."""
    runs = tmp_path / "runs"
    command = (f"n=$(( $(cat {runs} 2>/dev/null || echo 0) + 1 )); echo $n > {runs}; "
               "echo run $n; echo oops $n >&2; exit 1")
    client.cells.allocate(cell={"name": "r-output"})
    try:
        before = newest(client)
        started = client.cells.start(cell_name="r-output", executable={
            "name": "crash", "command": command,
            "restart_policy": "EXECUTABLE_RESTART_POLICY_ON_FAILURE", "restart_delay_ms": 10,
            "restart_max_delay_ms": 20, "start_limit": {"burst": 10, "interval_ms": 600_000}})
        events_until(client, before, "r-output", lambda evs: any(
            kind(e) == "EXECUTABLE_START_LIMIT_HIT" for e in evs))
        assert runs.read_text().split() == ["10"]
        replay = [(r.item.channel, r.item.line) for r in client.observe.get_sub_process_stream(
            executable={"cell_name": "r-output", "executable_name": "crash"}, replay_only=True,
            channel_type="LOG_CHANNEL_TYPE_UNSPECIFIED", timeout=30)]
        # Runs 1 and 2 were rotated away with their segments; 3 to 10 remain, in order.
        assert [line for channel, line in replay if channel == "crash::stdout"] == [
            f"run {n}" for n in range(3, 11)]
        assert [line for channel, line in replay if channel == "crash::stderr"] == [
            f"oops {n}" for n in range(3, 11)]
        # The first run's pid names nothing any more; the log lives on in one directory.
        (directory,) = (daemon.runtime_dir / "logs" / "r-output").iterdir()
        assert sorted(p.name for p in directory.iterdir() if p.name.startswith("stdout")) == [
            f"stdout.{n:06d}.log" for n in range(3, 11)]
        assert started.host_pid not in {status_of(client, "r-output", "crash").host_pid}
    finally:
        client.cells.free(cell_name="r-output")
    assert not (daemon.runtime_dir / "logs" / "r-output").exists()


@pytest.mark.parametrize(("executable", "field"), [
    ({"restart_delay_ms": 100}, "executable.restart_delay_ms"),
    ({"start_limit": {"burst": 3}}, "executable.start_limit"),
    ({"restart_policy": 7}, "executable.restart_policy"),
    ({"restart_policy": "EXECUTABLE_RESTART_POLICY_ALWAYS", "restart_delay_ms": 0},
     "executable.restart_delay_ms"),
    ({"restart_policy": "EXECUTABLE_RESTART_POLICY_ALWAYS", "restart_delay_ms": 500,
      "restart_max_delay_ms": 100}, "executable.restart_max_delay_ms"),
    ({"restart_policy": "EXECUTABLE_RESTART_POLICY_ALWAYS",
      "start_limit": {"interval_ms": 10**9}}, "executable.start_limit.interval_ms"),
])
def test_bad_policies_are_refused_and_start_nothing(
        client: aurae_sdk.Client, executable: dict[str, Any], field: str) -> None:
    with pytest.raises(aurae_sdk.InvalidArgument) as error:
        client.cells.start(executable={"name": "r-bad", "command": "sleep 60", **executable})
    assert error.value.field == field
    with pytest.raises(aurae_sdk.NotFound):
        client.cells.stop(executable_name="r-bad")
