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


def _whole_and_paged(client: aurae_sdk.Client) -> list[cells.CellGraphNode]:
    """The one page of every cell (put together from kept pieces, auraed WholeListing), after
    checking that it is the tree a page-by-page List (list_page, no kept pieces) gives."""
    whole = client.cells.list()
    assert not whole.next_page_token
    assert list(whole.cells) == aurae_sdk.list_cells(client, page_size=1)
    return list(whole.cells)


def _shares(daemon: DaemonProcess, cell: str) -> int:
    (cpu,) = [d for d in cell_dirs(daemon, cell) if d.parent.parent.name == "cpu"]
    return int((cpu / "cpu.shares").read_text())


def test_a_list_after_one_change_among_many_cells_shows_exactly_the_new_state(
        daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    names = [f"many{i:02d}" for i in range(20)]
    for name in names:
        client.cells.allocate(cell={"name": name, "cpu": {"weight": 100}})
    client.cells.allocate(cell={"name": "many05/inner"})
    try:
        client.cells.start(cell_name="many05/inner",
                           executable={"name": "w", "command": "sleep 600"})
        before = _whole_and_paged(client)
        assert [n.cell.name for n in before] == names
        assert _whole_and_paged(client) == before  # unchanged: the kept page again

        # Update of one cell: its weight as the kernel has it; every other cell as it was.
        client.cells.update(cell={"name": "many07", "cpu": {"weight": 300}})
        after = _whole_and_paged(client)
        assert _shares(daemon, "many07") == round(300 * 1024 / 100)
        assert after[7].cell.cpu.weight == 300
        assert after[:7] + after[8:] == before[:7] + before[8:]

        # Allocate: the new cell in its place by name, its cgroups on the host.
        client.cells.allocate(cell={"name": "many07a", "cpu": {"weight": 200}})
        listed = _whole_and_paged(client)
        assert [n.cell.name for n in listed] == [*names[:8], "many07a", *names[8:]]
        assert listed[8].cell.cpu.weight == 200 and _shares(daemon, "many07a") == 2048
        assert listed[:8] + listed[9:] == after

        # An exit in a nested cell, reported by the spawner: that status, and nothing else.
        (inner,) = listed[5].children
        (running,) = inner.executables
        os.killpg(running.host_pid, signal.SIGKILL)
        client.cells.wait(cell_name="many05/inner", executable_name="w", timeout=30)
        exited = _whole_and_paged(client)
        (ended,) = exited[5].children[0].executables
        assert ended.state == cells.EXECUTABLE_STATE_EXITED and ended.signal == signal.SIGKILL
        assert exited[:5] + exited[6:] == listed[:5] + listed[6:]

        # Free of a nested cell and of a top-level one: gone from List and from the host.
        client.cells.free(cell_name="many05/inner")
        client.cells.free(cell_name="many07a")
        freed = _whole_and_paged(client)
        assert not freed[5].children and [n.cell.name for n in freed] == names
        assert cell_dirs(daemon, "many05/inner") == [] and cell_dirs(daemon, "many07a") == []
        assert freed[:5] + freed[6:] == exited[:5] + exited[6:8] + exited[9:]
    finally:
        for name in ("many05/inner", "many07a", *names):
            try:
                client.cells.free(cell_name=name)
            except aurae_sdk.NotFound:
                pass
    assert not {n.cell.name for n in client.cells.list().cells} & set(names)
