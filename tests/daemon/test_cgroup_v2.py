"""The whole daemon on a cgroup2 hierarchy: the unified mount of this hybrid host (it binds
none of the controllers limits need) or /sys/fs/cgroup on a v2 host. Processes are born in
their cell's cgroup (clone3 with CLONE_INTO_CGROUP) rather than moved there, and Free leaves
nothing in the hierarchy."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import aurae_sdk
from auraed.kernel.cgroups.mountinfo import read_mounts
from tests.support.daemon import DaemonProcess, running_daemon


def _cgroup2_mount() -> str | None:
    mounts = {m.mount_point for m in read_mounts() if m.fstype == "cgroup2"}
    return next((m for m in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup") if m in mounts), None)


MOUNT = _cgroup2_mount()

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(MOUNT is None, reason="needs a cgroup2 mount"),
]


@pytest.fixture(scope="module")
def daemon_v2() -> Iterator[DaemonProcess]:
    assert MOUNT is not None
    with running_daemon(cgroup_mount=MOUNT) as started:
        yield started


@pytest.fixture
def client_v2(daemon_v2: DaemonProcess) -> Iterator[aurae_sdk.Client]:
    with daemon_v2.client() as client:
        yield client


def cgroup_of(pid: int) -> str:
    """The process's cgroup2 path (the "0::" line of /proc/<pid>/cgroup)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return next(line[3:] for line in lines if line.startswith("0::"))


def holder_of(pid: int) -> int:
    """The host pid of pid 1 of the pid namespace `pid` is in."""
    namespace = os.readlink(f"/proc/{pid}/ns/pid")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            same = os.readlink(entry / "ns" / "pid") == namespace
            nspid = next(line for line in (entry / "status").read_text().splitlines()
                         if line.startswith("NSpid:")).split()
        except OSError:
            continue
        if same and nspid[-1] == "1":
            return int(entry.name)
    raise LookupError(pid)


def test_executables_and_holders_are_born_in_their_cells_cgroup(
    daemon_v2: DaemonProcess, client_v2: aurae_sdk.Client
) -> None:
    root = daemon_v2.cgroup_root
    client_v2.cells.allocate(cell={"name": "plain"})
    client_v2.cells.allocate(cell={"name": "boxed", "isolate_process": True,
                                   "isolate_network": True})
    try:
        plain = client_v2.cells.start(cell_name="plain",
                                      executable={"name": "s", "command": "sleep 30"})
        boxed = client_v2.cells.start(cell_name="boxed",
                                      executable={"name": "s", "command": "sleep 30"})
        host = client_v2.cells.start(executable={"name": "h", "command": "sleep 30"})
        assert cgroup_of(plain.host_pid) == f"/{root}/plain/_procs"
        assert cgroup_of(boxed.host_pid) == f"/{root}/boxed/_procs"
        assert cgroup_of(holder_of(boxed.host_pid)) == f"/{root}/boxed/_procs"
        assert cgroup_of(host.host_pid).startswith(f"/{root}/_host/h.")  # a scope of its own
        assert boxed.pid < 20 and boxed.host_pid != boxed.pid
        client_v2.cells.stop(executable_name="h", grace_period_ms=0)
    finally:
        for cell in ("plain", "boxed"):
            client_v2.cells.free(cell_name=cell)
    assert MOUNT is not None
    assert sorted(p.name for p in Path(MOUNT, root).iterdir() if p.is_dir()) == ["_host"]
    assert not Path(f"/proc/{boxed.host_pid}").exists()


def test_output_and_exit_status_on_v2(client_v2: aurae_sdk.Client) -> None:
    client_v2.cells.allocate(cell={"name": "talk", "isolate_process": True})
    try:
        started = client_v2.cells.start(cell_name="talk",
                                        executable={"name": "t", "command": "hostname; exit 3"})
        lines = [r.item.line for r in client_v2.observe.get_sub_process_stream(
            process_id=started.host_pid, channel_type="LOG_CHANNEL_TYPE_STDOUT", timeout=20)]
        status = client_v2.cells.wait(cell_name="talk", executable_name="t", timeout=10)
        assert lines == ["talk"]
        assert status.status.exit_code == 3
    finally:
        client_v2.cells.free(cell_name="talk")
