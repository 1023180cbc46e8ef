"""Reliability against a real auraed: drift between the host and the daemon's state, Wait after
Stop, dead namespaces refused at Allocate."""

from __future__ import annotations

import math
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

import aurae_sdk
from tests.support.daemon import DaemonProcess, cgroup_dirs, running_daemon


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


def scope_dirs(daemon: DaemonProcess, name: str) -> list[Path]:
    return [scope for top in cgroup_dirs(daemon.cgroup_root)
            for scope in (top / "_host").glob(f"{name}.*")]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_for(condition, timeout: float = 30) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_stop_reaches_descendants_in_sessions_of_their_own(
        daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    # A warm-up round, so that the fds a first Start opens for good (log directory, pump) count
    # in the baseline.
    rounds = 6
    baseline = 0
    for round_number in range(rounds):
        started = client.cells.start(executable={
            "name": "escapee",
            "command": "setsid sleep 300 & setsid sh -c 'sleep 300 & wait' & echo up; wait"})
        (procs,) = [scope / "cgroup.procs" for scope in scope_dirs(daemon, "escapee")
                    if scope.parents[2].name == "pids"]

        def sessions(procs: Path = procs) -> set[int]:
            found = set()
            for pid in procs.read_text().split():
                try:
                    found.add(os.getsid(int(pid)))
                except ProcessLookupError:
                    continue
            return found

        # The shell, two sleeps and the second session's shell, in three sessions: two beyond
        # the reach of the executable's process group (a fork calls setsid a moment later).
        assert wait_for(lambda procs=procs: len(sessions()) >= 3 and len(procs.read_text().split()) >= 4), \
            procs.read_text()
        members = [int(p) for p in procs.read_text().split()]
        stopped = client.cells.stop(executable_name="escapee", grace_period_ms=0).status
        assert stopped.host_pid == started.host_pid
        assert wait_for(lambda members=members: not any(alive(pid) for pid in members)), \
            [pid for pid in members if alive(pid)]
        assert scope_dirs(daemon, "escapee") == []
        if round_number == 0:
            assert wait_for(lambda: open_fds(daemon.process.pid) < 10_000)
            baseline = open_fds(daemon.process.pid)
    # The output pipes the descendants held are closed: no fd is left per round.
    assert wait_for(lambda: open_fds(daemon.process.pid) <= baseline), \
        (open_fds(daemon.process.pid), baseline)


def test_oom_kills_are_attributed_to_the_process_killed(client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "tight", "memory": {"max": 32 * 1024 * 1024}})
    try:
        # tail holds the whole line in memory; the OOM killer ends it, not the shell.
        client.cells.start(cell_name="tight", executable={
            "name": "pipeline", "command": "head -c 300000000 /dev/zero | tail"})
        piped = client.cells.wait(cell_name="tight", executable_name="pipeline", timeout=60).status
        if piped.signal == signal.SIGKILL:
            # The kernel may take a second victim while the first is still being reaped (seen
            # under load): the shell itself, then rightly the executable's own OOM kill.
            assert piped.oom_killed and piped.cell_oom_kills >= 1, piped
        else:
            assert (piped.exit_code, piped.oom_killed) == (137, False), piped
        assert piped.cell_oom_kills >= 1
        # A later kill -9 from outside is not the OOM killer's. (Started after the OOM kill:
        # one running beside it may be the killer's choice too, under memory pressure.)
        bystander = client.cells.start(cell_name="tight",
                                       executable={"name": "bystander", "command": "sleep 300"})
        os.kill(bystander.host_pid, 9)
        killed = client.cells.wait(cell_name="tight", executable_name="bystander", timeout=60).status
        assert (killed.signal, killed.oom_killed, killed.cell_oom_kills) == (9, False, 0)
        # The executable's own process killed by the OOM killer.
        client.cells.start(cell_name="tight",
                           executable={"name": "hog", "command": "exec tail /dev/zero"})
        hog = client.cells.wait(cell_name="tight", executable_name="hog", timeout=60).status
        assert (hog.signal, hog.oom_killed, hog.cell_oom_kills) == (9, True, 1)
        # A Stop's SIGKILL is not the OOM killer's either.
        client.cells.start(cell_name="tight", executable={
            "name": "stubborn", "command": "trap '' TERM; sleep 300 & wait"})
        time.sleep(0.2)  # the trap is set
        stubborn = client.cells.stop(cell_name="tight", executable_name="stubborn",
                                     grace_period_ms=100).status
        assert (stubborn.signal, stubborn.oom_killed) == (9, False)
    finally:
        client.cells.free(cell_name="tight")


def set_next_pid(holder: int, next_pid: int) -> None:
    """Make `next_pid` the next pid the holder's pid namespace hands out."""
    subprocess.run(["nsenter", "-t", str(holder), "-p", "-m", "sh", "-c",
                    f"echo {next_pid - 1} > /proc/sys/kernel/ns_last_pid"], check=True)


def first_line(client: aurae_sdk.Client, **selector: object) -> str:
    with client.observe.get_sub_process_stream(channel_type="LOG_CHANNEL_TYPE_STDOUT",
                                               timeout=30, **selector) as stream:
        for response in stream:
            return str(response.item.line)
    raise AssertionError("the stream ended without a line")


def test_pid_lookups_never_cross_cells(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    host = client.cells.start(executable={"name": "hostside",
                                          "command": "echo from-host; exec sleep 300"})
    cells = ("pidns-a", "pidns-b")
    for cell in cells:
        client.cells.allocate(cell={"name": cell, "isolate_process": True})
    try:
        # A pid inside cell a that is the host pid of the host-level executable.
        set_next_pid(holder_of(daemon, "pidns-a"), host.host_pid)
        inner = client.cells.start(cell_name="pidns-a", executable={
            "name": "inner", "command": "echo from-a; exec sleep 300"})
        assert inner.pid == host.host_pid != inner.host_pid
        assert first_line(client, process_id=host.host_pid) == "from-host"  # host pids first
        assert first_line(client, process_id=inner.pid, executable={"cell_name": "pidns-a"}) == "from-a"
        assert first_line(client, process_id=inner.host_pid) == "from-a"
        # By name: in a cell, and (no cell_name) at host level.
        assert first_line(client, executable={"cell_name": "pidns-a", "executable_name": "inner"}) == "from-a"
        assert first_line(client, executable={"executable_name": "hostside"}) == "from-host"
        # The same namespace pid in two cells, and no host pid: ambiguous, refused.
        shared = max(host.host_pid, inner.host_pid) + 5000
        for cell in cells:
            set_next_pid(holder_of(daemon, cell), shared)
            started = client.cells.start(cell_name=cell, executable={
                "name": "twin", "command": f"echo twin-{cell}; exec sleep 300"})
            assert started.pid == shared
        with pytest.raises(aurae_sdk.FailedPrecondition) as ambiguous:
            first_line(client, process_id=shared)
        assert ambiguous.value.field == "process_id"
        assert "pidns-a/twin" in ambiguous.value.message
        assert "pidns-b/twin" in ambiguous.value.message
        assert first_line(client, process_id=shared, executable={"cell_name": "pidns-b"}) == "twin-pidns-b"
        # A selector that names nothing.
        with pytest.raises(aurae_sdk.NotFound) as missing:
            first_line(client, executable={"cell_name": "pidns-b", "executable_name": "nobody"})
        assert missing.value.field == "executable.executable_name"
        with pytest.raises(aurae_sdk.NotFound) as missing:
            first_line(client, process_id=shared, executable={"cell_name": "ghost"})
        assert missing.value.field == "executable.cell_name"
    finally:
        client.cells.stop(executable_name="hostside", grace_period_ms=0)
        for cell in cells:
            client.cells.free(cell_name=cell)


def test_broad_directories_are_tightened_and_foreign_ones_refused(tmp_path: Path) -> None:
    runtime, library = tmp_path / "run", tmp_path / "lib"
    runtime.mkdir(mode=0o755)
    library.mkdir()
    os.chmod(runtime, 0o777)
    os.chmod(library, 0o750)
    with running_daemon("--runtime-dir", str(runtime), "--library-dir", str(library)) as daemon:
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
        assert stat.S_IMODE(library.stat().st_mode) == 0o700
        assert "tightening an existing directory to mode 0700" in daemon.log()
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    swapped = tmp_path / "swapped"
    swapped.symlink_to(runtime)
    for flag, path, message in (("--library-dir", foreign, "owned by uid 65534"),
                                ("--runtime-dir", swapped, "not a directory")):
        with pytest.raises(RuntimeError) as refused, running_daemon(flag, str(path)):
            pass
        assert "exited with 2" in str(refused.value)
        assert f"{flag} {path}: {message}" in str(refused.value)


def spare_dirs(daemon: DaemonProcess) -> list[Path]:
    return [spare for top in cgroup_dirs(daemon.cgroup_root)
            for spare in (top / "_host").glob("_spare.*")]


def cgroup_paths(pid: int) -> dict[str, str]:
    placed = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            placed[controller] = path
    return placed


def v1_host() -> bool:
    return not Path("/sys/fs/cgroup/cgroup.controllers").exists()


@pytest.mark.skipif(not v1_host(), reason="spare scopes need cgroup v1 (cgroup2 renames none)")
def test_a_host_start_takes_a_spare_scope_that_accounts_like_a_made_one(
        daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    # Kept from the first host-level Start on, ahead of the next ones.
    client.cells.start(executable={"name": "first", "command": "true"})
    client.cells.stop(executable_name="first", grace_period_ms=0)
    assert wait_for(lambda: len(spare_dirs(daemon)) >= 6), spare_dirs(daemon)
    before = {spare.name for spare in spare_dirs(daemon)}
    started = client.cells.start(executable={
        "name": "spared", "command": "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 300"})
    try:
        (scope,) = {path for controller, path in cgroup_paths(started.host_pid).items()
                    if controller in ("cpu", "cpuacct", "memory", "pids", "freezer", "cpuset")}
        assert scope.startswith(f"/{daemon.cgroup_root}/_host/spared.")
        # One of the spares became it: in every hierarchy, under its own name.
        taken = before - {spare.name for spare in spare_dirs(daemon)}
        assert len(taken) == 1, (before, taken)
        usage = Path("/sys/fs/cgroup/cpuacct", scope.lstrip("/"), "cpuacct.usage")
        # Its CPU is its own from its start: the spare had none.
        assert wait_for(lambda: int(usage.read_text()) > 10_000_000), usage.read_text()
        # And another is made once the Start is answered.
        assert wait_for(lambda: len({s.name for s in spare_dirs(daemon)}) == len(before))
    finally:
        client.cells.stop(executable_name="spared", grace_period_ms=0)
    assert scope_dirs(daemon, "spared") == []


@pytest.mark.skipif(not v1_host(), reason="spare scopes need cgroup v1 (cgroup2 renames none)")
def test_a_successor_removes_the_spares_a_killed_daemon_left() -> None:
    with running_daemon("--live-restore") as first:
        assert spare_dirs(first) == []  # none before the first host-level Start
        with first.client() as client:
            client.cells.start(executable={"name": "kept", "command": "sleep 300"})
        assert wait_for(lambda: len(spare_dirs(first)) >= 6)
        first.stop(signal.SIGKILL)  # no time to remove its spares
        left = {spare.stat().st_ino for spare in spare_dirs(first)}
        assert left
        with running_daemon("--live-restore", after=first) as second, \
                second.client() as client:
            assert spare_dirs(second) == []  # the earlier ones are gone
            client.cells.start(executable={"name": "next", "command": "true"})
            # Its own spares, as many as one daemon keeps, and none of the earlier ones.
            assert wait_for(lambda: len(spare_dirs(second)) == len(left))
            assert not left & {spare.stat().st_ino for spare in spare_dirs(second)}
            # The executable the first one started was adopted, in its scope.
            assert scope_dirs(second, "kept")
            for name in ("kept", "next"):
                client.cells.stop(executable_name=name, grace_period_ms=0)
            assert scope_dirs(second, "kept") == []
