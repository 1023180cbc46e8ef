"""The spawner on the real kernel: what a workload gets, where it lands, and that nothing outlives it.

Needs root (uid switch, cgroups, namespaces).
"""

import contextlib
import errno
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from auraed.kernel.processes import (
    DEFAULT_PATH,
    ExitStatus,
    HolderSpec,
    NamespaceSet,
    SpawnedProcess,
    SpawnSpec,
    signal_group,
)
from auraed.kernel.spawner.client import Spawner, SpawnerClosed, SpawnError
from auraed.kernel.spawner.server import SPARE_NAME

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

NOBODY = 65534


class ExitLog:
    """on_exit target: remembers every exit and lets a test wait for one."""

    def __init__(self) -> None:
        self._exits: dict[int, ExitStatus] = {}
        self.start_times: dict[int, int] = {}  # as each exit report gave it
        self._changed = threading.Condition()

    def record(self, pid: int, start_time: int, status: ExitStatus) -> None:
        with self._changed:
            self._exits[pid] = status
            self.start_times[pid] = start_time
            self._changed.notify_all()

    def wait_for(self, pid: int, timeout: float = 10.0) -> ExitStatus:
        with self._changed:
            if not self._changed.wait_for(lambda: pid in self._exits, timeout):
                raise AssertionError(f"no exit reported for pid {pid}")
            return self._exits[pid]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def assert_spawner_came_back(spawner: Spawner) -> None:
    """The spawner is back in its own namespaces once it is idle. Not at every instant: after
    answering, a spawner that forks its holders refills its spare, and for that fork it is in
    a new pid namespace (pid_for_children) for a moment."""
    kinds = ("net", "uts", "ipc", "mnt", "pid", "pid_for_children")

    def different() -> list[str]:
        return [kind for kind in kinds if os.readlink(f"/proc/{spawner.pid}/ns/{kind}")
                != os.readlink(f"/proc/self/ns/{kind}")]

    with contextlib.suppress(AssertionError):
        wait_until(lambda: not different())
    assert different() == []


def alive(pid: int) -> bool:
    """Running: neither gone nor a zombie awaiting its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it went while being read
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def children(pid: int) -> list[int]:
    """The children of pid, leaving out the spawner's spare (a holder prepared ahead of time)."""
    listed = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in listed if not is_spare(int(child))]


def is_spare(pid: int) -> bool:
    """The spare: still the spawner's program (its name may not be set yet), and from birth
    pid 1 of a pid namespace of its own."""
    try:
        program = Path(f"/proc/{pid}/cmdline").read_bytes()
        nspid = proc_status(pid)["NSpid"].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"auraed.kernel.spawner" in program and len(nspid) > 1 and nspid[-1] == "1"


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


@pytest.fixture
def exits() -> ExitLog:
    return ExitLog()


@pytest.fixture
def spawner(exits: ExitLog) -> Iterator[Spawner]:
    # Closing kills whatever a test left running.
    with Spawner(exits.record) as running:
        yield running


@pytest.fixture
def python_spawner(exits: ExitLog) -> Iterator[Spawner]:
    """A spawner that starts every child through a Python fork, as where the kernel lets it
    start none from C (--direct no): it keeps a spare for holders."""
    with Spawner(exits.record, direct=False) as running:
        yield running


@pytest.fixture(params=["from C", "forked in Python"])
def any_spawner(request: pytest.FixtureRequest, exits: ExitLog) -> Iterator[Spawner]:
    """Each way a spawner starts children in namespaces: the same observable result."""
    with Spawner(exits.record, direct=request.param == "from C") as running:
        yield running


@pytest.fixture
def devnull() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def start(spawner: Spawner, devnull: int) -> Callable[..., SpawnedProcess]:
    """Spawn as root with output discarded unless a test says otherwise."""

    def start(command: str | list[str], **spec: object) -> SpawnedProcess:
        fields: dict[str, object] = {"uid": 0, "gid": 0, "stdout_fd": devnull, "stderr_fd": devnull}
        fields.update(spec)
        return spawner.spawn(SpawnSpec(command=command, **fields))  # type: ignore[arg-type]

    return start


@contextmanager
def scratch_cgroup(hierarchy: Path) -> Iterator[Path]:
    """A cgroup of the test's own below `hierarchy`; emptied (SIGKILL) and removed after."""
    cgroup = hierarchy / f"aurae-test-{secrets.token_hex(4)}"
    cgroup.mkdir()
    try:
        yield cgroup
    finally:
        for pid in (cgroup / "cgroup.procs").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
        wait_until(lambda: not (cgroup / "cgroup.procs").read_text())
        cgroup.rmdir()


@pytest.fixture
def pids_cgroup() -> Iterator[Path]:
    with scratch_cgroup(Path("/sys/fs/cgroup/pids")) as cgroup:
        yield cgroup


def read_to_end(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


def test_output_reaches_the_pipes_and_the_exit_code_the_callback(
    start: Callable[..., SpawnedProcess], exits: ExitLog
) -> None:
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        process = start("echo hello; echo oops >&2; exit 3", stdout_fd=out_w, stderr_fd=err_w)
        os.close(out_w)
        os.close(err_w)
        assert read_to_end(out_r) == b"hello\n"
        assert read_to_end(err_r) == b"oops\n"
    finally:
        os.close(out_r)
        os.close(err_r)
    assert exits.wait_for(process.host_pid) == ExitStatus(exit_code=3, signal=None)


def test_a_workload_has_only_fds_0_1_2(start: Callable[..., SpawnedProcess]) -> None:
    process = start(["sleep", "300"])
    # Right after exec the dynamic loader holds fd 3 (ld.so.cache, libc) for a
    # moment; look once the process has settled into its sleep.
    wait_until(lambda: Path(f"/proc/{process.host_pid}/wchan").read_text() not in ("", "0"))
    assert sorted(os.listdir(f"/proc/{process.host_pid}/fd")) == ["0", "1", "2"]
    assert os.readlink(f"/proc/{process.host_pid}/fd/0") == "/dev/null"


def test_a_workload_runs_as_the_given_user_with_no_supplementary_groups(
    start: Callable[..., SpawnedProcess],
) -> None:
    process = start(["sleep", "300"], uid=NOBODY, gid=NOBODY)
    status = proc_status(process.host_pid)
    assert status["Uid"].split() == [str(NOBODY)] * 4
    assert status["Gid"].split() == [str(NOBODY)] * 4
    assert status["Groups"] == ""


def test_a_workload_leads_its_own_session_and_process_group(
    start: Callable[..., SpawnedProcess],
) -> None:
    process = start(["sleep", "300"])
    stat = Path(f"/proc/{process.host_pid}/stat").read_text()
    pgrp, session = stat[stat.rindex(")") + 2 :].split()[2:4]
    assert int(pgrp) == int(session) == process.host_pid == process.pgid


def settled(pid: int) -> None:
    """Wait until pid sleeps in its program. The spawner's reply comes once the exec is past
    its point of no return (a vfork parent resumes there), while the kernel may still be
    laying out the new program's stack: /proc/<pid>/environ reads empty until then."""
    wait_until(lambda: Path(f"/proc/{pid}/wchan").read_text() not in ("", "0"))


def test_a_workload_starts_clean(start: Callable[..., SpawnedProcess]) -> None:
    process = start(["sleep", "300"])
    pid = process.host_pid
    settled(pid)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert Path(f"/proc/{pid}/environ").read_bytes() == f"PATH={DEFAULT_PATH}\0".encode()
    status = proc_status(pid)
    assert status["Umask"] == "0022"
    # Python ignores SIGPIPE; a workload must not inherit that, nor a blocked signal.
    assert int(status["SigIgn"], 16) == 0
    assert int(status["SigBlk"], 16) == 0
    assert process.ns_pid == pid
    stat = Path(f"/proc/{pid}/stat").read_text()
    assert process.start_time == int(stat.rpartition(")")[2].split()[19])


def test_environment_and_working_directory_are_the_given_ones(
    start: Callable[..., SpawnedProcess],
) -> None:
    process = start(["sleep", "300"], env={"PATH": "/bin:/usr/bin", "GREETING": "hi"}, cwd="/tmp")
    settled(process.host_pid)
    environ = Path(f"/proc/{process.host_pid}/environ").read_bytes()
    assert sorted(environ.split(b"\0")[:-1]) == [b"GREETING=hi", b"PATH=/bin:/usr/bin"]
    assert os.readlink(f"/proc/{process.host_pid}/cwd") == "/tmp"


def test_signal_group_reaches_the_workload_and_its_children(
    start: Callable[..., SpawnedProcess], spawner: Spawner, exits: ExitLog
) -> None:
    shell = start("sleep 300 & wait")
    wait_until(lambda: len(children(shell.host_pid)) == 1)
    (background,) = children(shell.host_pid)

    signal_group(shell.pgid, signal.SIGTERM)

    assert exits.wait_for(shell.host_pid) == ExitStatus(exit_code=None, signal=signal.SIGTERM)
    wait_until(lambda: not alive(background))
    # The orphaned sleep came back to the spawner (subreaper), which reaped it: no zombie left.
    wait_until(lambda: children(spawner.pid) == [])
    assert not Path(f"/proc/{background}").exists()
    signal_group(shell.pgid, signal.SIGTERM)  # an ended group is not an error


def test_signal_group_refuses_our_own_group_and_init() -> None:
    for pgid in (0, 1, -5):
        with pytest.raises(ValueError):
            signal_group(pgid, signal.SIGTERM)


def test_a_workload_lands_in_its_cgroup_before_it_runs(
    start: Callable[..., SpawnedProcess], pids_cgroup: Path
) -> None:
    process = start(["sleep", "300"], cgroup_join=[str(pids_cgroup / "cgroup.procs")])
    assert f"pids:/{pids_cgroup.name}\n" in Path(f"/proc/{process.host_pid}/cgroup").read_text()
    assert (pids_cgroup / "cgroup.procs").read_text().split() == [str(process.host_pid)]


def test_a_failed_step_is_reported_with_its_stage_and_leaves_nothing(
    start: Callable[..., SpawnedProcess], spawner: Spawner
) -> None:
    with pytest.raises(SpawnError) as missing_cgroup:
        start(["true"], cgroup_join=["/sys/fs/cgroup/pids/aurae-test-missing/cgroup.procs"])
    assert missing_cgroup.value.stage == "cgroup"
    assert missing_cgroup.value.errno == errno.ENOENT

    with pytest.raises(SpawnError) as missing_program:
        start(["/nonexistent/program"])
    assert (missing_program.value.stage, missing_program.value.errno) == ("exec", errno.ENOENT)

    with pytest.raises(SpawnError) as missing_namespace:
        start(["true"], namespaces=NamespaceSet(net="/proc/0/ns/net"))
    assert missing_namespace.value.stage == "namespace"

    assert children(spawner.pid) == []
    start(["true"])  # and the spawner still serves


def test_closing_the_spawner_kills_every_workload_and_ends_it(devnull: int) -> None:
    spawner = Spawner(lambda pid, start_time, status: None)
    spawner.start()
    try:
        spec = SpawnSpec(
            # The second sleep leaves the process group (setsid) and its parent dies: only the
            # spawner, as subreaper, still knows of it.
            command="sleep 300 & setsid sh -c 'sleep 301 & exit' & wait",
            uid=0,
            gid=0,
            stdout_fd=devnull,
            stderr_fd=devnull,
        )
        shell = spawner.spawn(spec)
        wait_until(lambda: len(children(spawner.pid)) == 2 and len(children(shell.host_pid)) == 1)
        (escaped,) = set(children(spawner.pid)) - {shell.host_pid}
        (background,) = children(shell.host_pid)
        spawner_pid = spawner.pid
    finally:
        spawner.close()
    for pid in (shell.host_pid, background, escaped, spawner_pid):
        assert not alive(pid)
    with pytest.raises(SpawnerClosed):
        spawner.spawn(spec)


DAEMON_THAT_DIES = textwrap.dedent(
    """
    import os, sys, time
    from auraed.kernel.processes import SpawnSpec
    from auraed.kernel.spawner.client import Spawner
    spawner = Spawner(lambda pid, start_time, status: None)
    spawner.start()
    devnull = os.open(os.devnull, os.O_WRONLY)
    workload = spawner.spawn(SpawnSpec(command=["sleep", "300"], uid=0, gid=0,
                                       stdout_fd=devnull, stderr_fd=devnull))
    print(spawner.pid, workload.host_pid, flush=True)
    time.sleep(300)
    """
)


def test_workloads_die_with_the_daemon() -> None:
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON_THAT_DIES], stdout=subprocess.PIPE)
    try:
        assert daemon.stdout is not None
        spawner_pid, workload_pid = map(int, daemon.stdout.readline().split())
        assert alive(workload_pid)
    finally:
        daemon.kill()
        daemon.wait()
    wait_until(lambda: not alive(workload_pid))
    wait_until(lambda: not alive(spawner_pid))


def test_sigterm_to_the_spawner_takes_its_workloads_with_it(devnull: int) -> None:
    spawner = Spawner(lambda pid, start_time, status: None)
    spawner.start()
    try:
        spec = SpawnSpec(
            command=["sleep", "300"], uid=0, gid=0, stdout_fd=devnull, stderr_fd=devnull
        )
        workload = spawner.spawn(spec)
        os.kill(spawner.pid, signal.SIGTERM)
        wait_until(lambda: not alive(workload.host_pid))
        with pytest.raises(SpawnerClosed):
            spawner.spawn(spec)
    finally:
        spawner.close()
    assert not alive(spawner.pid)


def test_a_dead_spawner_fails_spawns_instead_of_hanging(devnull: int) -> None:
    spawner = Spawner(lambda pid, start_time, status: None)
    spawner.start()
    try:
        os.kill(spawner.pid, signal.SIGKILL)
        spec = SpawnSpec(command=["true"], uid=0, gid=0, stdout_fd=devnull, stderr_fd=devnull)
        with pytest.raises(SpawnerClosed):
            spawner.spawn(spec)
    finally:
        spawner.close()
    assert not alive(spawner.pid)


def test_concurrent_spawns_get_their_own_replies_and_exits(
    start: Callable[..., SpawnedProcess], spawner: Spawner, exits: ExitLog
) -> None:
    spawner_fds = sorted(os.listdir(f"/proc/{spawner.pid}/fd"))

    def run(index: int) -> tuple[int, bytes, ExitStatus]:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            process = start(f"echo {index}; exit {index}", stdout_fd=write_fd)
            os.close(write_fd)
            write_fd = -1
            output = read_to_end(read_fd)
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        return index, output, exits.wait_for(process.host_pid)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, range(50)))
    for index, output, status in results:
        assert output == f"{index}\n".encode()
        assert status == ExitStatus(exit_code=index, signal=None)
    assert sorted(os.listdir(f"/proc/{spawner.pid}/fd")) == spawner_fds  # no fd leaked


@pytest.fixture
def namespace_holder() -> Iterator[int]:
    """The pid of a sleep in new pid, mount, uts, ipc and net namespaces (pid 1 in its own)."""
    holder = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--uts", "--ipc", "--net"]
        + ["sleep", "300"]
    )
    try:

        def inner_sleep() -> bool:
            found = children(holder.pid)
            return bool(found) and Path(f"/proc/{found[0]}/comm").read_text() == "sleep\n"

        wait_until(inner_sleep)
        yield children(holder.pid)[0]
    finally:
        holder.kill()  # --kill-child takes the inner sleep, and with it its pid namespace
        holder.wait()


def test_a_workload_joins_the_namespaces_it_is_given(
    any_spawner: Spawner, devnull: int, namespace_holder: int
) -> None:
    def start(command: list[str], **spec: object) -> SpawnedProcess:
        return any_spawner.spawn(SpawnSpec(command=command, uid=0, gid=0, stdout_fd=devnull,
                                           stderr_fd=devnull, **spec))  # type: ignore[arg-type]

    process = start(["sleep", "300"], namespaces=NamespaceSet.of_process(namespace_holder))
    for kind in ("net", "uts", "ipc", "mnt", "pid"):
        joined = os.readlink(f"/proc/{process.host_pid}/ns/{kind}")
        assert joined == os.readlink(f"/proc/{namespace_holder}/ns/{kind}")
        assert joined != os.readlink(f"/proc/self/ns/{kind}")
    assert process.ns_pid != process.host_pid
    assert proc_status(process.host_pid)["NSpid"].split() == [
        str(process.host_pid),
        str(process.ns_pid),
    ]

    # The spawner went back to its own pid namespace: the next workload is born in ours.
    plain = start(["sleep", "300"])
    assert os.readlink(f"/proc/{plain.host_pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
    assert plain.ns_pid == plain.host_pid
    assert_spawner_came_back(any_spawner)


def test_exit_status_from_a_raw_wait_status() -> None:
    assert ExitStatus.from_wait_status(3 << 8) == ExitStatus(exit_code=3, signal=None)
    assert ExitStatus.from_wait_status(signal.SIGKILL) == ExitStatus(None, signal.SIGKILL)
    assert ExitStatus.from_wait_status(signal.SIGSEGV | 0x80) == ExitStatus(
        None, signal.SIGSEGV, core_dumped=True
    )


def holder_spec(devnull: int, **fields: object) -> HolderSpec:
    spec: dict[str, object] = {"unshare": frozenset({"pid", "mnt", "ipc", "uts", "net"}),
                               "hostname": "cell-a", "stdout_fd": devnull, "stderr_fd": devnull}
    spec.update(fields)
    return HolderSpec(**spec)  # type: ignore[arg-type]


def test_a_holder_is_pid_one_of_its_new_namespaces(
    any_spawner: Spawner, devnull: int, exits: ExitLog
) -> None:
    holder = any_spawner.spawn_holder(holder_spec(devnull))
    assert holder.ns_pid == 1
    assert proc_status(holder.host_pid)["NSpid"].split() == [str(holder.host_pid), "1"]
    wait_until(lambda: Path(f"/proc/{holder.host_pid}/comm").read_text() == "catatonit\n")
    for kind in ("net", "uts", "ipc", "mnt", "pid"):
        assert os.readlink(f"/proc/{holder.host_pid}/ns/{kind}") != os.readlink(
            f"/proc/self/ns/{kind}")
    uname = subprocess.run(["nsenter", "-t", str(holder.host_pid), "--uts", "hostname"],
                           capture_output=True, text=True, check=True)
    assert uname.stdout == "cell-a\n"
    # Its own /proc, of its pid namespace (only itself in it), where no mount of it is
    # seen by the host; loopback up.
    inside = Path(f"/proc/{holder.host_pid}/root/proc")
    assert [entry for entry in os.listdir(inside) if entry.isdigit()] == ["1"]
    assert (inside / "1" / "comm").read_text() == "catatonit\n"
    proc_mounts = [line.split() for line in
                   Path(f"/proc/{holder.host_pid}/mountinfo").read_text().splitlines()
                   if line.split()[4] == "/proc"]
    assert {"nosuid", "nodev", "noexec"} <= set(proc_mounts[-1][5].split(","))
    assert Path("/proc/self").resolve().name == str(os.getpid())  # the host's is as it was
    links = subprocess.run(["nsenter", "-t", str(holder.host_pid), "--net", "ip", "-o", "link"],
                           capture_output=True, text=True, check=True).stdout
    assert "lo:" in links and "UP" in links.split("lo:")[1].split("\n")[0]
    assert_spawner_came_back(any_spawner)
    os.kill(holder.host_pid, signal.SIGKILL)
    assert exits.wait_for(holder.host_pid) == ExitStatus(exit_code=None, signal=signal.SIGKILL)


def test_a_nested_holder_its_parents_init_reaps_is_reported_ended_with_its_start_time(
    any_spawner: Spawner, devnull: int, exits: ExitLog
) -> None:
    parent = any_spawner.spawn_holder(holder_spec(devnull))
    nested = any_spawner.spawn_holder(holder_spec(
        devnull, hostname="cell-b", namespaces=NamespaceSet.of_process(parent.host_pid)))
    # Not the spawner's child: once the first child that forked it exited, the init of the
    # parent's pid namespace became its parent, and reaps it.
    assert proc_status(nested.host_pid)["PPid"] == str(parent.host_pid)
    os.kill(nested.host_pid, signal.SIGKILL)
    assert exits.wait_for(nested.host_pid) == ExitStatus(exit_code=None, signal=signal.SIGKILL)
    assert exits.start_times[nested.host_pid] == nested.start_time
    os.kill(parent.host_pid, signal.SIGKILL)
    assert exits.wait_for(parent.host_pid) == ExitStatus(exit_code=None, signal=signal.SIGKILL)
    assert exits.start_times[parent.host_pid] == parent.start_time


@pytest.mark.parametrize(("init", "error"), [("no-such-init", errno.ENOENT),
                                             ("not-executable", errno.EACCES)])
def test_a_holder_whose_init_cannot_run_is_refused_before_anything_is_made(
    any_spawner: Spawner, devnull: int, init: str, error: int, tmp_path: Path
) -> None:
    spawner = any_spawner
    if init == "not-executable":
        init = str(tmp_path / init)
        Path(init).write_text("#!/bin/sh\n")
        os.chmod(init, 0o644)
    before = children(spawner.pid)
    with pytest.raises(SpawnError) as refused:
        spawner.spawn_holder(holder_spec(devnull, argv=(init,)))
    assert (refused.value.stage, refused.value.errno) == ("exec", error)
    assert children(spawner.pid) == before


def spares(spawner_pid: int) -> list[int]:
    listed = Path(f"/proc/{spawner_pid}/task/{spawner_pid}/children").read_text().split()
    return [int(pid) for pid in listed if is_spare(int(pid))]


def test_a_spawner_that_starts_holders_from_c_keeps_no_spare(
    spawner: Spawner, devnull: int
) -> None:
    holder = spawner.spawn_holder(holder_spec(devnull))
    time.sleep(0.1)  # many times the idle moment after which a spare would be made
    listed = Path(f"/proc/{spawner.pid}/task/{spawner.pid}/children").read_text().split()
    assert listed == [str(holder.host_pid)]


def test_the_spawner_keeps_one_spare_holder_and_a_holder_takes_it(
    python_spawner: Spawner, devnull: int
) -> None:
    spawner = python_spawner
    wait_until(lambda: len(spares(spawner.pid)) == 1)
    (spare,) = spares(spawner.pid)
    wait_until(lambda: Path(f"/proc/{spare}/comm").read_text() == f"{SPARE_NAME}\n")
    # Only its pid namespace is new; the holder request brings the rest.
    assert os.readlink(f"/proc/{spare}/ns/pid") != os.readlink("/proc/self/ns/pid")
    assert os.readlink(f"/proc/{spare}/ns/net") == os.readlink("/proc/self/ns/net")

    holder = spawner.spawn_holder(holder_spec(devnull))
    assert holder.host_pid == spare
    wait_until(lambda: Path(f"/proc/{spare}/comm").read_text() == "catatonit\n")
    assert os.readlink(f"/proc/{spare}/ns/net") != os.readlink("/proc/self/ns/net")
    wait_until(lambda: len(spares(spawner.pid)) == 1)
    assert spares(spawner.pid) != [spare]


def test_a_killed_spare_is_replaced_and_the_next_holder_still_starts(
    python_spawner: Spawner, devnull: int
) -> None:
    spawner = python_spawner
    wait_until(lambda: len(spares(spawner.pid)) == 1)
    (spare,) = spares(spawner.pid)
    os.kill(spare, signal.SIGKILL)
    holder = spawner.spawn_holder(holder_spec(devnull))
    assert holder.host_pid != spare and holder.ns_pid == 1
    wait_until(lambda: len(spares(spawner.pid)) == 1 and spares(spawner.pid) != [holder.host_pid])


def _cgroup2_mount() -> Path | None:
    mounts = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if " - cgroup2 " in line}
    return next((Path(m) for m in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup") if m in mounts),
                None)


@pytest.fixture
def cgroup2_leaf() -> Iterator[Path]:
    mount = _cgroup2_mount()
    if mount is None:
        pytest.skip("needs a cgroup2 mount")
    with scratch_cgroup(mount) as leaf:
        yield leaf


def cgroup2_of(pid: int) -> str:
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return next(line[3:] for line in lines if line.startswith("0::"))


def test_a_workload_is_born_in_its_cgroup2_directory(
    start: Callable[..., SpawnedProcess], cgroup2_leaf: Path
) -> None:
    # No join file to write: only being born there can put it there.
    process = start(["sleep", "300"], cgroup_birth=str(cgroup2_leaf))
    assert cgroup2_of(process.host_pid) == f"/{cgroup2_leaf.name}"
    assert (cgroup2_leaf / "cgroup.procs").read_text().split() == [str(process.host_pid)]


def test_a_child_killed_at_birth_is_started_again_by_joining(
    start: Callable[..., SpawnedProcess], cgroup2_leaf: Path
) -> None:
    # Once a cgroup has had a cgroup.kill, some kernels kill a child born into it at birth.
    (cgroup2_leaf / "cgroup.kill").write_text("1")
    process = start(["sleep", "300"], cgroup_birth=str(cgroup2_leaf),
                    cgroup_join=[str(cgroup2_leaf / "cgroup.procs")])
    assert alive(process.host_pid)
    assert cgroup2_of(process.host_pid) == f"/{cgroup2_leaf.name}"


def test_a_missing_birth_cgroup_is_a_cgroup_failure(
    start: Callable[..., SpawnedProcess], spawner: Spawner
) -> None:
    with pytest.raises(SpawnError) as missing:
        start(["true"], cgroup_birth="/sys/fs/cgroup/unified/aurae-test-missing")
    assert (missing.value.stage, missing.value.errno) == ("cgroup", errno.ENOENT)
    assert children(spawner.pid) == []


# --- started from C: the spawner visits the workload's cgroups and fork_execs it there ---

# Hierarchies whose place shows in /proc/<pid>/cgroup and that need no set-up (unlike cpuset).
VISITED = ("pids", "freezer", "cpu", "memory")


@pytest.fixture
def placed() -> Iterator[tuple[list[Path], list[Path]]]:
    """Two scratch cgroups in each of VISITED: the spawner's own leaf, and a workload's."""
    with contextlib.ExitStack() as stack:
        own = [stack.enter_context(scratch_cgroup(Path("/sys/fs/cgroup") / h)) for h in VISITED]
        cell = [stack.enter_context(scratch_cgroup(Path("/sys/fs/cgroup") / h)) for h in VISITED]
        yield own, cell


@pytest.fixture
def placed_spawner(exits: ExitLog, placed: tuple[list[Path], list[Path]]) -> Iterator[Spawner]:
    own, _ = placed
    with Spawner(exits.record, cgroup_join=[str(c / "cgroup.procs") for c in own]) as running:
        yield running


def cgroups_of(text: str) -> dict[str, str]:
    return {controllers: path for _, controllers, path in
            (line.split(":", 2) for line in text.splitlines())}


def assert_placed(cgroup_text: str, cgroups: list[Path]) -> None:
    """/proc/<pid>/cgroup text: the process is in `cgroups`, one per hierarchy of VISITED."""
    seen = cgroups_of(cgroup_text)
    for hierarchy, cgroup in zip(VISITED, cgroups, strict=True):
        assert seen[hierarchy] == f"/{cgroup.name}", hierarchy


def run_to_end(spawner: Spawner, exits: ExitLog, command: str | list[str],
               **spec: object) -> tuple[bytes, ExitStatus]:
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    try:
        fields: dict[str, object] = {"uid": 0, "gid": 0, "stdout_fd": out_w, "stderr_fd": out_w}
        fields.update(spec)
        process = spawner.spawn(SpawnSpec(command=command, **fields))  # type: ignore[arg-type]
        os.close(out_w)
        out_w = -1
        output = read_to_end(out_r)
    finally:
        os.close(out_r)
        if out_w >= 0:
            os.close(out_w)
    return output, exits.wait_for(process.host_pid)


def test_a_visiting_start_runs_its_first_instruction_in_the_cell_and_the_spawner_goes_back(
    placed_spawner: Spawner, exits: ExitLog, placed: tuple[list[Path], list[Path]],
) -> None:
    own, cell = placed
    # cat is the program exec'd, no shell before it: what it reads is where it began.
    output, status = run_to_end(placed_spawner, exits, ["cat", "/proc/self/cgroup"],
                                cgroup_join=[str(c / "cgroup.procs") for c in cell])
    assert status == ExitStatus(exit_code=0, signal=None)
    assert_placed(output.decode(), cell)
    # Back in its own leaf in every hierarchy, and nothing of it left in the cell.
    assert_placed(Path(f"/proc/{placed_spawner.pid}/cgroup").read_text(), own)
    for cgroup in cell:
        assert (cgroup / "cgroup.procs").read_text() == ""


def test_a_spawner_started_before_it_knew_its_cgroups_joins_them_when_told(
    exits: ExitLog, placed: tuple[list[Path], list[Path]],
) -> None:
    # A spare daemon's: started where the daemon is, told its own cgroups after its claim.
    own, cell = placed
    with Spawner(exits.record) as spawner:
        before = cgroups_of(Path(f"/proc/{spawner.pid}/cgroup").read_text())
        with pytest.raises(SpawnError):
            spawner.join_at(["/sys/fs/cgroup/pids/aurae-test-missing/cgroup.procs"])
        assert cgroups_of(Path(f"/proc/{spawner.pid}/cgroup").read_text()) == before
        spawner.join_at([str(c / "cgroup.procs") for c in own])
        assert_placed(Path(f"/proc/{spawner.pid}/cgroup").read_text(), own)
        # Its own from now on: it comes back to them after visiting a workload's.
        output, status = run_to_end(spawner, exits, ["cat", "/proc/self/cgroup"],
                                    cgroup_join=[str(c / "cgroup.procs") for c in cell])
        assert status == ExitStatus(exit_code=0, signal=None)
        assert_placed(output.decode(), cell)
        assert_placed(Path(f"/proc/{spawner.pid}/cgroup").read_text(), own)


def test_a_join_refused_midway_leaves_the_spawner_in_its_own_cgroups(
    placed_spawner: Spawner, placed: tuple[list[Path], list[Path]],
) -> None:
    own, cell = placed
    # A new v1 cpuset has no cpus: joining it is refused (ENOSPC) after the other joins.
    with scratch_cgroup(Path("/sys/fs/cgroup/cpuset")) as empty_cpuset, \
            pytest.raises(SpawnError):
        placed_spawner.join_at([*(str(c / "cgroup.procs") for c in cell),
                                str(empty_cpuset / "cgroup.procs")])
    assert_placed(Path(f"/proc/{placed_spawner.pid}/cgroup").read_text(), own)
    for cgroup in cell:
        assert (cgroup / "cgroup.procs").read_text() == ""


def test_the_spawner_holds_its_own_join_files_and_its_spare_does_not(
    placed_spawner: Spawner, exits: ExitLog, placed: tuple[list[Path], list[Path]],
) -> None:
    own, cell = placed
    join = [str(c / "cgroup.procs") for c in cell]
    home = {str(c / "cgroup.procs") for c in own}

    def open_files(pid: int) -> set[str]:
        opened = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                opened.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except FileNotFoundError:
                continue
        return opened

    # It goes back through them after every visit: held open, one per hierarchy.
    assert open_files(placed_spawner.pid) >= home
    for _ in range(3):
        _, status = run_to_end(placed_spawner, exits, ["true"], cgroup_join=join)
        assert status == ExitStatus(exit_code=0, signal=None)
    spawner_groups = cgroups_of(Path(f"/proc/{placed_spawner.pid}/cgroup").read_text())
    for hierarchy, cgroup in zip(VISITED, own, strict=True):
        assert spawner_groups[hierarchy] == f"/{cgroup.name}", hierarchy
    # A spare, which may wait for hours, keeps none of them. Only a spawner that forks its
    # holders in Python keeps a spare (--direct no); its visits are the same.
    own_join = [str(c / "cgroup.procs") for c in own]
    with Spawner(exits.record, cgroup_join=own_join, direct=False) as forking:
        wait_until(lambda: len(spares(forking.pid)) == 1)
        (spare,) = spares(forking.pid)
        wait_until(lambda: Path(f"/proc/{spare}/comm").read_text() == f"{SPARE_NAME}\n")
        assert open_files(forking.pid) >= home
        assert open_files(spare) & home == set()


def test_a_visiting_start_as_another_user_gets_exactly_its_session_fds_env_and_ids(
    placed_spawner: Spawner, exits: ExitLog, placed: tuple[list[Path], list[Path]],
) -> None:
    _, cell = placed
    join = [str(c / "cgroup.procs") for c in cell]
    # The shell's own /proc entries ($$), read by its children while it waits with no pipe
    # of its own open: what the workload was started with.
    script = "echo $$; cat /proc/$$/environ; echo; cut -d' ' -f1,5,6 /proc/$$/stat; ls /proc/$$/fd"
    output, status = run_to_end(
        placed_spawner, exits, ["/bin/sh", "-c", script], uid=NOBODY, gid=NOBODY,
        env={"PATH": "/bin:/usr/bin", "GREETING": "hi"}, cgroup_join=join)
    assert status == ExitStatus(exit_code=0, signal=None)
    shell, environ, stat, *fds = output.decode().splitlines()
    assert fds == ["0", "1", "2"]
    assert sorted(environ.split("\0")[:-1]) == ["GREETING=hi", "PATH=/bin:/usr/bin"]
    # The leader of its own session and process group.
    assert stat.split() == [shell, shell, shell]
    # grep exec'd as the workload itself reads its own state as it began (a shell waiting
    # for a child blocks signals meanwhile).
    output, status = run_to_end(
        placed_spawner, exits, ["grep", "-E", "^(Uid|Gid|Groups|Umask|SigIgn|SigBlk):",
                                "/proc/self/status"],
        uid=NOBODY, gid=NOBODY, cgroup_join=join)
    assert status == ExitStatus(exit_code=0, signal=None)
    fields = {key: value.split() for key, _, value in
              (line.partition(":") for line in output.decode().splitlines())}
    assert fields["Uid"] == [str(NOBODY)] * 4 and fields["Gid"] == [str(NOBODY)] * 4
    assert fields["Groups"] == [] and fields["Umask"] == ["0022"]
    assert int(fields["SigIgn"][0], 16) == 0 and int(fields["SigBlk"][0], 16) == 0


def test_a_visiting_start_that_fails_names_its_stage_and_leaves_the_spawner_home(
    placed_spawner: Spawner, placed: tuple[list[Path], list[Path]],
) -> None:
    own, cell = placed
    join = [str(c / "cgroup.procs") for c in cell]
    with pytest.raises(SpawnError) as missing_program:
        placed_spawner.spawn(SpawnSpec(command=["/nonexistent/program"], uid=0, gid=0,
                                       stdout_fd=2, stderr_fd=2, cgroup_join=join))
    assert (missing_program.value.stage, missing_program.value.errno) == ("exec", errno.ENOENT)
    with pytest.raises(SpawnError) as missing_directory:
        placed_spawner.spawn(SpawnSpec(command=["true"], uid=0, gid=0, cwd="/nonexistent",
                                       stdout_fd=2, stderr_fd=2, cgroup_join=join))
    assert (missing_directory.value.stage, missing_directory.value.errno) == ("chdir",
                                                                              errno.ENOENT)
    # A directory only root may enter is refused to another user, as its own steps would.
    with pytest.raises(SpawnError) as forbidden:
        placed_spawner.spawn(SpawnSpec(command=["true"], uid=NOBODY, gid=NOBODY, cwd="/root",
                                       stdout_fd=2, stderr_fd=2, cgroup_join=join))
    assert (forbidden.value.stage, forbidden.value.errno) == ("chdir", errno.EACCES)
    spawner_groups = cgroups_of(Path(f"/proc/{placed_spawner.pid}/cgroup").read_text())
    for hierarchy, cgroup in zip(VISITED, own, strict=True):
        assert spawner_groups[hierarchy] == f"/{cgroup.name}", hierarchy
    assert children(placed_spawner.pid) == []


def test_a_cell_started_from_c_has_its_holder_and_workloads_in_its_cgroups_and_namespaces(
    placed_spawner: Spawner, exits: ExitLog, placed: tuple[list[Path], list[Path]], devnull: int,
) -> None:
    own, cell = placed
    join = [str(c / "cgroup.procs") for c in cell]
    holder = placed_spawner.spawn_holder(holder_spec(devnull, cgroup_join=join))
    namespaces = NamespaceSet.of_process(holder.host_pid)
    # What the workload's first instruction sees (cat is exec'd, no shell before it).
    output, status = run_to_end(placed_spawner, exits, ["cat", "/proc/self/cgroup"],
                                namespaces=namespaces, cgroup_join=join)
    assert status == ExitStatus(exit_code=0, signal=None)
    seen = cgroups_of(output.decode())
    for hierarchy, cgroup in zip(VISITED, cell, strict=True):
        assert seen[hierarchy] == f"/{cgroup.name}", hierarchy
        assert cgroups_of(Path(f"/proc/{holder.host_pid}/cgroup").read_text())[hierarchy] == (
            f"/{cgroup.name}")
    # As another user: its ids, groups, umask, session, fds, env, cwd and namespaces, seen by
    # the workload in the cell's own /proc.
    script = ("grep -E '^(NSpid|Uid|Gid|Groups|Umask):' /proc/$$/status; cut -d' ' -f1,5,6 "
              "/proc/$$/stat; ls /proc/$$/fd; cat /proc/$$/environ; echo; pwd; hostname")
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    try:
        process = placed_spawner.spawn(SpawnSpec(
            command=["/bin/sh", "-c", f"{script}; sleep 300"], uid=NOBODY, gid=NOBODY,
            env={"PATH": "/bin:/usr/bin", "GREETING": "hi"}, stdout_fd=out_w, stderr_fd=out_w,
            namespaces=namespaces, cgroup_join=join))
        os.close(out_w)
        out_w = -1
        for kind in ("net", "uts", "ipc", "mnt", "pid"):
            assert os.readlink(f"/proc/{process.host_pid}/ns/{kind}") == os.readlink(
                f"/proc/{holder.host_pid}/ns/{kind}"), kind
        lines = b""
        while lines.count(b"\n") < 12:
            lines += os.read(out_r, 4096)
    finally:
        os.close(out_r)
        if out_w >= 0:
            os.close(out_w)
    fields = lines.decode().splitlines()
    status_fields = {key: value.split() for key, _, value in
                     (line.partition(":") for line in fields[:5])}
    assert status_fields["NSpid"] == [str(process.ns_pid)] and process.ns_pid != 1
    assert status_fields["Uid"] == [str(NOBODY)] * 4 and status_fields["Gid"] == [str(NOBODY)] * 4
    assert status_fields["Groups"] == [] and status_fields["Umask"] == ["0022"]
    assert fields[5].split() == [str(process.ns_pid)] * 3  # its own session and group
    assert fields[6:9] == ["0", "1", "2"]
    assert sorted(fields[9].split("\0")[:-1]) == ["GREETING=hi", "PATH=/bin:/usr/bin"]
    assert fields[10:12] == ["/", "cell-a"]
    # The spawner is home: its own cgroups and namespaces.
    spawner_groups = cgroups_of(Path(f"/proc/{placed_spawner.pid}/cgroup").read_text())
    for hierarchy, cgroup in zip(VISITED, own, strict=True):
        assert spawner_groups[hierarchy] == f"/{cgroup.name}", hierarchy
    for kind in ("net", "uts", "ipc", "mnt", "pid", "pid_for_children"):
        assert os.readlink(f"/proc/{placed_spawner.pid}/ns/{kind}") == os.readlink(
            f"/proc/self/ns/{kind}"), kind
