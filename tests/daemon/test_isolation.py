"""Isolated cells against a real auraed: their own pid, mount, ipc, uts and
network namespaces, shared by the cell's executables, gone after Free, and
the host unchanged throughout."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

import aurae_sdk
from tests.support.daemon import DaemonProcess, cgroup_dirs


def output_of(client: aurae_sdk.Client, cell: str, name: str, command: str) -> str:
    started = client.cells.start(cell_name=cell, executable={"name": name, "command": command})
    lines = [r.item.line for r in client.observe.get_sub_process_stream(
        process_id=started.host_pid, channel_type="LOG_CHANNEL_TYPE_STDOUT", timeout=20)]
    client.cells.stop(cell_name=cell, executable_name=name, grace_period_ms=0)
    return "\n".join(lines)


def namespace_ids(pid: int) -> dict[str, str]:
    return {kind: os.readlink(f"/proc/{pid}/ns/{kind}") for kind in ("pid", "mnt", "ipc", "uts", "net")}


def host_mounts() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


@pytest.fixture
def isolated(client: aurae_sdk.Client):  # type: ignore[no-untyped-def]
    client.cells.allocate(cell={"name": "sandbox", "isolate_process": True, "isolate_network": True})
    yield "sandbox"
    client.cells.free(cell_name="sandbox")


def test_the_cell_sees_only_itself(client: aurae_sdk.Client, isolated: str) -> None:
    processes = output_of(client, isolated, "ps", "ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '").split()
    # pid 1 holds the namespaces; the rest is this pipeline.
    assert "1" in processes and all(int(p) < 20 for p in processes), processes
    assert output_of(client, isolated, "hostname", "hostname") == "sandbox"
    links = output_of(client, isolated, "links", "ip -o link show")
    assert links.count("\n") == 0 and ": lo:" in links and "UP" in links
    assert socket.gethostname() != "sandbox"


def test_start_reports_the_pid_inside_the_cell(client: aurae_sdk.Client, isolated: str) -> None:
    started = client.cells.start(cell_name=isolated, executable={"name": "s", "command": "sleep 30"})
    try:
        assert started.pid < 20 and started.host_pid > started.pid
        nspid = next(line for line in Path(f"/proc/{started.host_pid}/status").read_text().splitlines()
                     if line.startswith("NSpid:"))
        assert nspid.split()[1:] == [str(started.host_pid), str(started.pid)]
        (node,) = [n for n in client.cells.list().cells if n.cell.name == isolated]
        assert node.cell.isolate_process and node.cell.isolate_network
        assert [(e.pid, e.host_pid) for e in node.executables] == [(started.pid, started.host_pid)]
    finally:
        client.cells.stop(cell_name=isolated, executable_name="s", grace_period_ms=0)


def test_executables_of_a_cell_share_its_namespaces_and_loopback(client: aurae_sdk.Client, isolated: str) -> None:
    server = client.cells.start(cell_name=isolated, executable={
        "name": "server",
        "command": "python3 -c \"import socket; s=socket.socket(); s.bind(('127.0.0.1', 7777)); s.listen(); "
                   "c, _ = s.accept(); c.sendall(b'hello from ' + socket.gethostname().encode())\""})
    try:
        server_namespaces = namespace_ids(server.host_pid)
        peer = client.cells.start(cell_name=isolated, executable={"name": "peer", "command": "sleep 30"})
        assert namespace_ids(peer.host_pid) == server_namespaces
        assert server_namespaces["net"] != os.readlink("/proc/self/ns/net")
        client.cells.stop(cell_name=isolated, executable_name="peer", grace_period_ms=0)
        time.sleep(0.5)
        reply = output_of(client, isolated, "client",
                          "python3 -c \"import socket; print(socket.create_connection(('127.0.0.1', 7777)).recv(100).decode())\"")
        assert reply == "hello from sandbox"
        # ::1 works too.
        assert output_of(client, isolated, "v6", "ip -o addr show lo | grep -c '::1'") == "1"
    finally:
        client.cells.stop(cell_name=isolated, executable_name="server", grace_period_ms=0)
    # The host's loopback never saw the cell's server.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", 7777), timeout=0.5)


def test_network_only_isolation(client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "netonly", "isolate_network": True})
    try:
        started = client.cells.start(cell_name="netonly", executable={"name": "s", "command": "sleep 30"})
        ids = namespace_ids(started.host_pid)
        assert ids["net"] != os.readlink("/proc/self/ns/net")
        assert ids["pid"] == os.readlink("/proc/self/ns/pid") and started.pid == started.host_pid
        assert output_of(client, "netonly", "links", "ip -o link show | wc -l") == "1"
    finally:
        client.cells.free(cell_name="netonly")


def test_nested_cells_share_or_isolate_further(client: aurae_sdk.Client, isolated: str) -> None:
    client.cells.allocate(cell={"name": f"{isolated}/inner"})
    client.cells.allocate(cell={"name": f"{isolated}/deeper", "isolate_process": True})
    outer = client.cells.start(cell_name=isolated, executable={"name": "o", "command": "sleep 30"})
    inner = client.cells.start(cell_name=f"{isolated}/inner", executable={"name": "i", "command": "sleep 30"})
    deeper = client.cells.start(cell_name=f"{isolated}/deeper", executable={"name": "d", "command": "sleep 30"})
    # A plain child lives in its parent's namespaces.
    assert namespace_ids(inner.host_pid) == namespace_ids(outer.host_pid)
    # An isolating child gets new process namespaces inside its parent's,
    # and keeps its parent's network.
    o, d = namespace_ids(outer.host_pid), namespace_ids(deeper.host_pid)
    assert d["pid"] != o["pid"] and d["uts"] != o["uts"] and d["net"] == o["net"]
    nspid = next(line for line in Path(f"/proc/{deeper.host_pid}/status").read_text().splitlines()
                 if line.startswith("NSpid:")).split()[1:]
    assert len(nspid) == 3  # host, the outer cell, the inner cell
    assert output_of(client, f"{isolated}/deeper", "h", "hostname") == "deeper"
    # Freeing the outer cell (the fixture) takes the nested ones along.


def test_free_leaves_nothing_of_the_cell_on_the_host(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    mounts_before = host_mounts()
    hostname_before = socket.gethostname()
    client.cells.allocate(cell={"name": "ephemeral", "isolate_process": True, "isolate_network": True})
    started = client.cells.start(cell_name="ephemeral", executable={"name": "s", "command": "sleep 300"})
    assert started.pid != started.host_pid
    # The holder, the workload's shell and its sleep, all in the cell's cgroup (the shell
    # forks its sleep a moment after Start answers).
    deadline = time.monotonic() + 30
    while True:
        members = {int(p) for d in cgroup_dirs(daemon.cgroup_root)
                   for p in (d / "ephemeral" / "_procs" / "cgroup.procs").read_text().split()}
        if len(members) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert started.host_pid in members and len(members) == 3
    assert host_mounts() == mounts_before  # the cell's /proc never reached the host
    client.cells.free(cell_name="ephemeral")
    for pid in members:
        assert not Path(f"/proc/{pid}").exists()
    assert not any((d / "ephemeral").exists() for d in cgroup_dirs(daemon.cgroup_root))
    assert host_mounts() == mounts_before and socket.gethostname() == hostname_before


def test_a_killed_holder_is_reported_and_refused(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "fragile", "isolate_process": True})
    try:
        client.cells.start(cell_name="fragile", executable={"name": "s", "command": "sleep 30"})
        (procs,) = [d / "fragile" / "_procs" / "cgroup.procs" for d in cgroup_dirs(daemon.cgroup_root)
                    if d.parent.name == "pids"]

        def holders() -> list[int]:
            return [int(p) for p in procs.read_text().split()
                    if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"catatonit")]

        # Allocate answers once the namespaces are made, a moment before the exec of catatonit.
        deadline = time.monotonic() + 5
        while not holders() and time.monotonic() < deadline:
            time.sleep(0.01)
        (holder,) = holders()
        # Killing pid 1 of a pid namespace ends everything in it.
        os.kill(holder, 9)
        status = client.cells.wait(cell_name="fragile", executable_name="s", timeout=5).status
        assert status.signal == 9
        deadline = time.monotonic() + 5
        while True:
            try:
                client.cells.start(cell_name="fragile", executable={"name": "t", "command": "true"})
            except aurae_sdk.FailedPrecondition as refused:
                # Refused either way; before the holder's exit is reported, by the spawner
                # finding its namespaces gone.
                assert ("namespaces of cell fragile are gone" in refused.message
                        or ("/ns/" in refused.message and "(at namespace)" in refused.message))
                break
            client.cells.stop(cell_name="fragile", executable_name="t", grace_period_ms=0)
            assert time.monotonic() < deadline, "a Start into dead namespaces was allowed"
            time.sleep(0.05)
    finally:
        client.cells.free(cell_name="fragile")


def test_a_cell_at_a_tiny_memory_limit_does_not_take_the_spawner_with_it(
        client: aurae_sdk.Client) -> None:
    # At 256 KiB an isolated cell's namespaces and holder fill the limit: whatever is charged
    # beyond it meets the OOM killer, which must find the cell's own processes, not the
    # spawner (a spawner visiting the cell's cgroups to start a child from C would be the
    # largest process there).
    try:
        client.cells.allocate(cell={"name": "tiny", "isolate_process": True,
                                    "isolate_network": True, "memory": {"max": 256 * 1024}})
    except aurae_sdk.errors.FailedPrecondition as refused:
        assert "could not create the namespaces of cell tiny" in refused.message
    else:
        try:
            client.cells.start(cell_name="tiny", executable={"name": "t", "command": "true"})
            client.cells.wait(cell_name="tiny", executable_name="t", timeout=10)
        except aurae_sdk.errors.AuraeError:
            pass  # refused or killed for its limit: the cell's business
        finally:
            client.cells.free(cell_name="tiny")
    assert not [c for c in client.cells.list().cells if c.cell.name == "tiny"]
    # The spawner lives: the next cell starts and its executable exits 0.
    client.cells.allocate(cell={"name": "next", "isolate_process": True, "isolate_network": True})
    try:
        client.cells.start(cell_name="next", executable={"name": "t", "command": "true"})
        status = client.cells.wait(cell_name="next", executable_name="t", timeout=10).status
        assert status.exit_code == 0
    finally:
        client.cells.free(cell_name="next")
