"""List keeps its last page while nothing changes (auraed/services/cells.py): each change it
shows must still appear at the next List, whatever made it — an RPC, an exit, the host."""

from __future__ import annotations

import os
import signal

import aurae_sdk
from aurae_sdk import cells
from tests.daemon.test_reliability import cell_dirs, node_of, remove_behind_the_daemons_back
from tests.support.daemon import DaemonProcess


def test_every_change_shows_at_the_next_list(daemon: DaemonProcess,
                                             client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "kept", "cpu": {"weight": 100}})
    try:
        client.cells.start(cell_name="kept", executable={"name": "w", "command": "sleep 600"})
        first = node_of(client, "kept")
        assert node_of(client, "kept") == first  # unchanged: the same page again
        (status,) = first.executables
        assert status.state == cells.EXECUTABLE_STATE_RUNNING

        # An exit, reported by the spawner on its own thread, not by an RPC.
        os.killpg(status.host_pid, signal.SIGTERM)  # its process group: sh and sleep
        client.cells.wait(cell_name="kept", executable_name="w", timeout=30)
        (ended,) = node_of(client, "kept").executables
        assert ended.state == cells.EXECUTABLE_STATE_EXITED
        assert ended.signal == signal.SIGTERM

        client.cells.update(cell={"name": "kept", "cpu": {"weight": 300}})
        assert node_of(client, "kept").cell.cpu.weight == 300

        # Drift: the host changes under a page that was kept.
        assert list(node_of(client, "kept").missing_cgroups) == []
        (pids,) = [d for d in cell_dirs(daemon, "kept") if d.parent.parent.name == "pids"]
        remove_behind_the_daemons_back(pids)
        assert list(node_of(client, "kept").missing_cgroups) == [str(pids)]
        assert list(node_of(client, "kept").missing_cgroups) == [str(pids)]
    finally:
        client.cells.free(cell_name="kept")
    assert "kept" not in {n.cell.name for n in client.cells.list().cells}
