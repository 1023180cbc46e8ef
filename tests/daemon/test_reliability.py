"""Reliability against a real auraed: drift between the host and the daemon's state, Wait after
Stop, dead namespaces refused at Allocate."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest

import aurae_sdk
from auraed.testing import DaemonProcess, cgroup_dirs


def cell_dirs(daemon: DaemonProcess, cell: str) -> list[Path]:
    return [top / cell for top in cgroup_dirs(daemon.cgroup_root) if (top / cell).exists()]


def remove_behind_the_daemons_back(directory: Path) -> None:
    for leaf in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if leaf.is_dir():
            leaf.rmdir()
    directory.rmdir()


def node_of(client: aurae_sdk.Client, name: str):  # type: ignore[no-untyped-def]
    (node,) = [n for n in client.cells.list().cells if n.cell.name == name]
    return node


def test_a_cell_removed_in_one_hierarchy_shows_as_drift_and_frees(
        daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "drift-part"})
    assert list(node_of(client, "drift-part").missing_cgroups) == []
    (memory,) = [d for d in cell_dirs(daemon, "drift-part") if d.parent.parent.name == "memory"]
    remove_behind_the_daemons_back(memory)
    assert list(node_of(client, "drift-part").missing_cgroups) == [str(memory)]
    client.cells.free(cell_name="drift-part")
    assert cell_dirs(daemon, "drift-part") == []
    assert "drift-part" not in {n.cell.name for n in client.cells.list().cells}


def test_a_cell_removed_from_the_host_frees_and_allocates_again(
        daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "vanished"})
    client.cells.allocate(cell={"name": "vanished/inner"})
    for directory in cell_dirs(daemon, "vanished"):
        remove_behind_the_daemons_back(directory)
    node = node_of(client, "vanished")
    assert len(node.missing_cgroups) == len(cgroup_dirs(daemon.cgroup_root))
    assert all(path.endswith("/vanished") for path in node.missing_cgroups)
    assert len(node.children[0].missing_cgroups) == len(node.missing_cgroups)
    client.cells.free(cell_name="vanished")  # succeeds, and cleans the state
    assert "vanished" not in {n.cell.name for n in client.cells.list().cells}
    client.cells.allocate(cell={"name": "vanished"})
    try:
        assert len(cell_dirs(daemon, "vanished")) == len(cgroup_dirs(daemon.cgroup_root))
        assert list(node_of(client, "vanished").missing_cgroups) == []
    finally:
        client.cells.free(cell_name="vanished")


@pytest.mark.parametrize("cell", [None, "waiting"])
def test_wait_after_stop_returns_the_recorded_status(
        client: aurae_sdk.Client, cell: str | None) -> None:
    if cell:
        client.cells.allocate(cell={"name": cell})
    try:
        client.cells.start(cell_name=cell, executable={"name": "w", "command": "sleep 60"})
        stopped = client.cells.stop(cell_name=cell, executable_name="w", grace_period_ms=0).status
        assert stopped.signal in (9, 15)  # SIGKILL if SIGTERM had not landed at once
        waited = client.cells.wait(cell_name=cell, executable_name="w", timeout=10).status
        assert (waited.signal, waited.host_pid, waited.exited_at) == (
            stopped.signal, stopped.host_pid, stopped.exited_at)
        # A new start of the name supersedes the record.
        client.cells.start(cell_name=cell, executable={"name": "w", "command": "exit 3"})
        assert client.cells.wait(cell_name=cell, executable_name="w", timeout=10).status.exit_code == 3
        client.cells.stop(cell_name=cell, executable_name="w")
    finally:
        if cell:
            client.cells.free(cell_name=cell)
    if cell:  # the record went with its cell
        with pytest.raises(aurae_sdk.NotFound) as missing:
            client.cells.wait(cell_name=cell, executable_name="w", timeout=10)
        assert missing.value.field == "cell_name"


def test_wait_has_no_deadline_of_its_own(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    client.cells.start(executable={"name": "slow", "command": "sleep 3"})
    try:
        # The daemon waits as long as the process runs; math.inf asks the SDK for no deadline
        # (here beyond a client default of 1 s).
        with daemon.client(timeout=1) as impatient:
            status = impatient.cells.wait(executable_name="slow", timeout=math.inf).status
        assert status.exit_code == 0 and status.exited_at - status.started_at > 2
    finally:
        client.cells.stop(executable_name="slow")


def holder_of(daemon: DaemonProcess, cell: str) -> int:
    (procs,) = [d / cell / "_procs" / "cgroup.procs" for d in cgroup_dirs(daemon.cgroup_root)
                if d.parent.name == "pids"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in procs.read_text().split():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"catatonit"):
                    return int(pid)
            except FileNotFoundError:
                continue
        time.sleep(0.01)
    raise AssertionError(f"no holder in {procs}")


def test_a_child_under_dead_namespaces_is_refused_at_allocate(
        daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "orphaned", "isolate_process": True})
    try:
        os.kill(holder_of(daemon, "orphaned"), 9)
        for child in ({"name": "orphaned/plain"}, {"name": "orphaned/iso", "isolate_process": True}):
            with pytest.raises(aurae_sdk.FailedPrecondition) as refused:
                client.cells.allocate(cell=child)
            assert "namespaces of cell orphaned are gone" in refused.value.message
            assert refused.value.field == "cell.name"
        assert cell_dirs(daemon, "orphaned/plain") == [] == cell_dirs(daemon, "orphaned/iso")
        assert node_of(client, "orphaned").namespaces_lost
    finally:
        client.cells.free(cell_name="orphaned")
