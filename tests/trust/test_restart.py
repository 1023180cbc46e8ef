"""Faults and restarts, under the documented policy (docs/daemon.md): a daemon
that dies leaves its workloads to the spawner, which the next daemon on the same
runtime directory adopts (tests/trust/test_live_restore.py). A daemon that finds
no spawner to adopt from (both were killed, or another runtime directory) removes
whatever is left under its cgroup root before it serves, and says so in its log;
nothing left over ever stands in the way of allocating the same names again.

(Workloads SIGKILLed from outside and OOM kills are reported: see
tests/daemon/test_executables.py.)
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import aurae_sdk
from tests.support.daemon import DaemonProcess, cgroup_dirs, cgroup_pids, running_daemon

from .conftest import host_state, record_figure

pytestmark = pytest.mark.slow

CELLS = [
    {"name": "web", "cpu": {"weight": 50}, "memory": {"max": 128 << 20}},
    {"name": "web/api"},
    {"name": "iso", "isolate_process": True, "isolate_network": True},
]
WORKLOADS = [
    ("web", "server", "sleep 300"),
    ("web/api", "stubborn", "trap '' TERM; sleep 300 & wait"),
    ("iso", "inside", "sleep 300"),
    (None, "escapee", "setsid sleep 300 & sleep 300"),  # one child leaves the process group
]


def populate(daemon: DaemonProcess) -> set[int]:
    """Allocate CELLS, start WORKLOADS; every pid in the daemon's cgroups."""
    with daemon.client() as client:
        for cell in CELLS:
            client.cells.allocate(cell=cell)
        for cell, name, command in WORKLOADS:
            client.cells.start(cell_name=cell, executable={"name": name, "command": command})
    wait_for(lambda: len(cgroup_pids(daemon.cgroup_root)) >= len(WORKLOADS) + 2, 5)
    return cgroup_pids(daemon.cgroup_root)


def wait_for(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until `condition` held; fails after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - started


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if _running(pid)}


def _running(pid: int) -> bool:
    # A zombie has no cmdline: it is dead, only not yet reaped by its new parent.
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it went while being read
        return False


def spawner_of(daemon: DaemonProcess) -> int:
    children = Path(f"/proc/{daemon.process.pid}/task/{daemon.process.pid}/children")
    (spawner,) = [int(pid) for pid in children.read_text().split()
                  if b"auraed.kernel.spawner" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return spawner


def reuse_everything(daemon: DaemonProcess) -> None:
    """The same names allocate and run again, and free cleanly."""
    with daemon.client() as client:
        assert list(client.cells.list().cells) == []
        for cell in CELLS:
            client.cells.allocate(cell=cell)
        for cell, name, _ in WORKLOADS:
            client.cells.start(cell_name=cell, executable={"name": name, "command": "sleep 30"})
        assert {n.cell.name for n in client.cells.list().cells} == {"web", "iso"}
        client.cells.stop(executable_name="escapee", grace_period_ms=0)
        for cell in ("web", "iso"):
            client.cells.free(cell_name=cell)


def test_a_daemon_with_nothing_to_adopt_cleans_up_what_a_sigkilled_one_left() -> None:
    with running_daemon() as first:
        root = first.cgroup_root
        baseline = host_state(first)
        pids = populate(first)
        first.stop(signal.SIGKILL)
        # The spawner outlives its daemon: everything runs on.
        time.sleep(0.3)
        assert alive(pids) == pids
        assert cgroup_dirs(root), "a SIGKILLed daemon cannot remove its cgroups"

        # Another runtime directory: no spawner to adopt from.
        started = time.monotonic()
        with running_daemon(cgroup_root=root) as second:
            serving_in = time.monotonic() - started
            # Before serving, the stale cells were removed and every process killed, escapees
            # and the orphaned spawner too: only the root and host leaf remain.
            assert not alive(pids)
            assert host_state(second) == (baseline[0], set())
            assert "removing cells left by a previous run" in second.log()
            assert re.search(r'cells="?iso,web,web/api"? processes_killed=\d+', second.log())
            reuse_everything(second)
            assert host_state(second) == (baseline[0], set())
    record_figure("restart after SIGKILL, nothing to adopt",
                  f"{len(pids)} processes in {len(CELLS)} cells killed by the next daemon, "
                  f"which served in {serving_in:.1f} s with nothing stale")


def test_leftovers_the_spawner_could_not_kill_are_killed_at_the_next_start() -> None:
    # Daemon and spawner killed at once: nobody is left to end the workloads, so they
    # outlive both. The next daemon's clean-up is the second line of defence.
    with running_daemon() as first:
        root = first.cgroup_root
        baseline = host_state(first)
        pids = populate(first)
        spawner = spawner_of(first)
        os.kill(spawner, signal.SIGKILL)
        first.stop(signal.SIGKILL)
        time.sleep(0.5)
        survivors = alive(pids)
        assert survivors, "expected orphaned workloads to outlive a killed spawner"
        assert survivors <= cgroup_pids(root)

        with running_daemon(cgroup_root=root) as second:
            assert not alive(pids)
            assert host_state(second) == (baseline[0], set())
            reuse_everything(second)
    record_figure("restart after SIGKILL of daemon and spawner",
                  f"{len(survivors)} orphaned processes killed by the next daemon before serving")


def test_a_killed_spawner_stops_the_daemon_and_its_workloads() -> None:
    """Without its spawner the daemon cannot supervise anything: it goes
    NOT_SERVING, kills what runs through the cgroups and exits 70 so a
    service manager restarts it clean."""
    with running_daemon(grace_period=0.2) as daemon, daemon.client(timeout=10) as client:
        client.cells.allocate(cell={"name": "orphaned"})
        pids = [client.cells.start(cell_name="orphaned",
                                   executable={"name": f"w{i}", "command": "sleep 300"}).host_pid
                for i in range(3)]
        watch = client.health.watch(service="")
        assert next(iter(watch)).status == 1
        os.kill(spawner_of(daemon), signal.SIGKILL)
        statuses = []
        try:
            for response in watch:
                statuses.append(response.status)
        except aurae_sdk.AuraeError:
            pass  # the server went away after reporting
        assert daemon.process.wait(30) == 70
        assert statuses[:1] == [2], statuses
        assert "the spawner died" in daemon.log()
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists(), pid
        assert not cgroup_dirs(daemon.cgroup_root)