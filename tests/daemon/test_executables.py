"""Executables against a real auraed: how they run, how they end, what is reported."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import aurae_sdk
from aurae_sdk import cells
from tests.support.daemon import DaemonProcess


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        state = proc_status(pid)["State"]
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it went while being read
        return False
    return not state.startswith("Z")


def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def cell(client: aurae_sdk.Client, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    import re

    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:50].strip("-")
    client.cells.allocate(cell={"name": name})
    yield name
    client.cells.free(cell_name=name)


def test_exit_code_is_reported(client: aurae_sdk.Client, cell: str) -> None:
    started = client.cells.start(cell_name=cell, executable={"name": "three", "command": "exit 3"})
    status = client.cells.wait(cell_name=cell, executable_name="three", timeout=10).status
    assert status.state == cells.EXECUTABLE_STATE_EXITED
    assert status.exit_code == 3 and not status.HasField("signal")
    assert status.pid == started.pid and status.exited_at >= status.started_at > 0
    # An exited executable is listed with its status until stopped or replaced.
    (node,) = [n for n in client.cells.list().cells if n.cell.name == cell]
    assert [(e.name, e.exit_code) for e in node.executables] == [("three", 3)]


def test_runs_in_the_cells_cgroup_with_only_stdio(daemon: DaemonProcess, client: aurae_sdk.Client, cell: str) -> None:
    started = client.cells.start(cell_name=cell, executable={"name": "s", "command": "sleep 30"})
    pid = started.pid
    try:
        # The pid is the shell's (dash forks even its last command). Right after
        # exec the dynamic loader briefly holds fd 3; wait until sh waits.
        wait_for(lambda: Path(f"/proc/{pid}/wchan").read_text() not in ("", "0"))
        fds = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
        assert fds == [0, 1, 2]
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        groups = dict(line.split(":", 2)[1:] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines())
        for controller in ("cpu", "memory", "pids", "cpuset", "freezer"):
            assert groups[controller] == f"/{daemon.cgroup_root}/{cell}/_procs", controller
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert [e for e in environ if e] == [b"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(stat[2]) == pid and int(stat[3]) == pid  # own process group and session
    finally:
        client.cells.stop(cell_name=cell, executable_name="s", grace_period_ms=0)


def test_runs_as_the_requested_user_without_supplementary_groups(client: aurae_sdk.Client, cell: str) -> None:
    started = client.cells.start(cell_name=cell, executable={"name": "nobody", "command": "sleep 30"},
                                 uid=65534, gid=65534)
    assert (started.uid, started.gid) == (65534, 65534)
    try:
        status = proc_status(started.pid)
        assert status["Uid"].split() == ["65534"] * 4
        assert status["Gid"].split() == ["65534"] * 4
        assert status["Groups"] == ""
    finally:
        client.cells.stop(cell_name=cell, executable_name="nobody", grace_period_ms=0)


def test_unknown_uid_or_gid_is_refused(client: aurae_sdk.Client, cell: str) -> None:
    with pytest.raises(aurae_sdk.InvalidArgument) as refused:
        client.cells.start(cell_name=cell, executable={"name": "x", "command": "true"}, uid=4_000_000)
    assert refused.value.field == "uid"
    with pytest.raises(aurae_sdk.InvalidArgument) as refused:
        client.cells.start(cell_name=cell, executable={"name": "x", "command": "true"}, gid=4_000_000)
    assert refused.value.field == "gid"


def test_stop_ends_the_whole_process_group(client: aurae_sdk.Client, cell: str) -> None:
    started = client.cells.start(
        cell_name=cell, executable={"name": "tree", "command": "sleep 300 & sleep 301; wait"}
    )
    wait_for(lambda: len(children_of(started.pid)) == 2)
    family = [started.pid, *children_of(started.pid)]
    stopped = client.cells.stop(cell_name=cell, executable_name="tree")
    assert stopped.status.state == cells.EXECUTABLE_STATE_EXITED
    assert stopped.status.signal == 15
    for pid in family:
        assert not alive(pid), pid
        assert not Path(f"/proc/{pid}").exists(), f"{pid} left as a zombie"
    with pytest.raises(aurae_sdk.NotFound):
        client.cells.stop(cell_name=cell, executable_name="tree")


def test_stop_kills_what_ignores_sigterm_after_the_grace_period(client: aurae_sdk.Client, cell: str) -> None:
    started = client.cells.start(
        cell_name=cell, executable={"name": "stubborn", "command": "trap '' TERM; sleep 300 & wait"}
    )
    wait_for(lambda: len(children_of(started.pid)) == 1)
    child = children_of(started.pid)[0]
    began = time.monotonic()
    stopped = client.cells.stop(cell_name=cell, executable_name="stubborn", grace_period_ms=300)
    assert time.monotonic() - began >= 0.3
    assert stopped.status.signal == 9
    assert not Path(f"/proc/{started.pid}").exists() and not Path(f"/proc/{child}").exists()


def test_a_process_killed_from_outside_is_noticed(client: aurae_sdk.Client, cell: str) -> None:
    started = client.cells.start(cell_name=cell, executable={"name": "victim", "command": "sleep 300"})
    os.kill(started.pid, 9)
    status = client.cells.wait(cell_name=cell, executable_name="victim", timeout=5).status
    assert status.signal == 9 and not status.HasField("exit_code")


def test_names_are_unique_while_running(client: aurae_sdk.Client, cell: str) -> None:
    client.cells.start(cell_name=cell, executable={"name": "once", "command": "sleep 30"})
    with pytest.raises(aurae_sdk.AlreadyExists) as clash:
        client.cells.start(cell_name=cell, executable={"name": "once", "command": "sleep 30"})
    assert clash.value.field == "executable.name"
    client.cells.stop(cell_name=cell, executable_name="once", grace_period_ms=0)
    # Once it has ended, the name can be used again.
    client.cells.start(cell_name=cell, executable={"name": "once", "command": "exit 0"})
    client.cells.wait(cell_name=cell, executable_name="once", timeout=5)
    client.cells.start(cell_name=cell, executable={"name": "once", "command": "exit 7"})
    assert client.cells.wait(cell_name=cell, executable_name="once", timeout=5).status.exit_code == 7


def test_host_level_executable(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    started = client.cells.start(executable={"name": "hostjob", "command": "sleep 30"})
    try:
        cgroups = Path(f"/proc/{started.pid}/cgroup").read_text()
        assert f":pids:/{daemon.cgroup_root}/_host" in cgroups
    finally:
        stopped = client.cells.stop(executable_name="hostjob", grace_period_ms=0)
    assert stopped.status.signal in (9, 15)


def test_wait_times_out_while_running(client: aurae_sdk.Client, cell: str) -> None:
    client.cells.start(cell_name=cell, executable={"name": "long", "command": "sleep 30"})
    with pytest.raises(aurae_sdk.DeadlineExceeded):
        client.cells.wait(cell_name=cell, executable_name="long", timeout=0.5)
    client.cells.stop(cell_name=cell, executable_name="long", grace_period_ms=0)


@pytest.mark.parametrize(
    "executable,field",
    [
        ({"name": "", "command": "true"}, "executable.name"),
        ({"name": "a/b", "command": "true"}, "executable.name"),
        ({"name": "ok", "command": ""}, "executable.command"),
        ({"name": "ok", "command": "a\0b"}, "executable.command"),
        ({"name": "ok", "command": "x" * (200 * 1024)}, "executable.command"),
    ],
)
def test_bad_executables_are_refused(client: aurae_sdk.Client, cell: str, executable: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(aurae_sdk.InvalidArgument) as refused:
        client.cells.start(cell_name=cell, executable=executable)
    assert refused.value.field == field


def test_start_in_a_missing_cell(client: aurae_sdk.Client) -> None:
    with pytest.raises(aurae_sdk.NotFound) as missing:
        client.cells.start(cell_name="absent", executable={"name": "x", "command": "true"})
    assert missing.value.field == "cell_name"


def test_free_stops_running_executables(client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "busy"})
    client.cells.allocate(cell={"name": "busy/nested"})
    a = client.cells.start(cell_name="busy", executable={"name": "a", "command": "sleep 300"})
    b = client.cells.start(cell_name="busy/nested", executable={"name": "b", "command": "sleep 300"})
    client.cells.free(cell_name="busy")
    assert not Path(f"/proc/{a.pid}").exists() and not Path(f"/proc/{b.pid}").exists()


def test_an_oom_kill_in_a_cell_is_reported(client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "tight", "memory": {"max": 16 * 1024 * 1024}})
    try:
        # exec: the process Start reports is the one that outgrows the cell.
        client.cells.start(cell_name="tight", executable={
            "name": "direct", "command": "exec python3 -c 'b = bytearray(64 << 20)'"})
        direct = client.cells.wait(cell_name="tight", executable_name="direct", timeout=30).status
        assert direct.signal == 9 and direct.oom_killed
        killed = client.cells.start(cell_name="tight", executable={"name": "k", "command": "exec sleep 30"})
        os.kill(killed.pid, 9)
        plain = client.cells.wait(cell_name="tight", executable_name="k", timeout=10).status
        assert plain.signal == 9 and not plain.oom_killed
    finally:
        client.cells.free(cell_name="tight")


def test_the_first_start_after_a_child_cells_oom_kill_counts_it_as_seen(
        client: aurae_sdk.Client) -> None:
    """A cell's first Start takes its OOM kill counter as 0 without reading it, unless a
    child cell was made below it: the child's kills count in the parent's cgroups too."""
    client.cells.allocate(cell={"name": "outer", "memory": {"max": 64 * 1024 * 1024}})
    try:
        client.cells.allocate(cell={"name": "outer/inner", "memory": {"max": 16 * 1024 * 1024}})
        client.cells.start(cell_name="outer/inner", executable={
            "name": "hog", "command": "exec python3 -c 'b = bytearray(64 << 20)'"})
        hog = client.cells.wait(cell_name="outer/inner", executable_name="hog", timeout=30).status
        assert hog.signal == 9 and hog.oom_killed
        # The outer cell's first Start, killed from outside: no OOM kill of its own.
        killed = client.cells.start(cell_name="outer", executable={"name": "k",
                                                                   "command": "exec sleep 30"})
        os.kill(killed.pid, 9)
        plain = client.cells.wait(cell_name="outer", executable_name="k", timeout=10).status
        assert plain.signal == 9 and not plain.oom_killed
    finally:
        client.cells.free(cell_name="outer")
