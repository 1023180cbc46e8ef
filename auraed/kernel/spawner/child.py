"""The child side of the fork server: the steps a forked child runs between fork and exec.

Everything here runs in a freshly forked copy of the spawner and ends in exec or _exit: a
failure is reported to the spawner on the child's report fd as an encoded Failed message (id
None), then the child exits 127. Every Python object touched costs a copied page, so the work is
prepared in the parent. Standard library only.
"""

import errno
import fcntl
import os
import signal
import socket
import struct
from collections.abc import Callable
from typing import NoReturn

from auraed.kernel.libc import (
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_REC,
    NAMESPACE_FLAGS,
    mount,
    setns,
    unshare,
)
from auraed.kernel.rootfs import enter_rootfs
from auraed.kernel.spawner.protocol import Failed, HolderRequest, SpawnError, SpawnRequest

# What a holder's pid 1 reports once its namespaces are ready, just before it execs its init.
HOLDER_READY = b"ready"
# What a holder's child says first, before any step: it runs.
HOLDER_ALIVE = b"alive"

# The order a child joins namespaces in. The mount namespace comes last so that nothing resolved
# by path before it is looked up in the workload's filesystem. The pid namespace is not here: a
# process cannot change its own, so the spawner enters it before fork and the child is born in it.
_CHILD_NAMESPACES = ("net", "ipc", "uts", "mnt")


class _Step:
    """The step a forked child is on, so that a failure is reported as that step."""

    def __init__(self) -> None:
        self.stage = "setup"
        self.detail = ""

    def at(self, stage: str, detail: str = "") -> None:
        self.stage, self.detail = stage, detail


def _run_in_child(report_fd: int, steps: Callable[[_Step], None]) -> NoReturn:
    """Run a forked child's steps; any failure is written to report_fd as a Failed message,
    then the child exits 127. Never returns: the last step of a successful child is exec."""
    step = _Step()
    try:
        signal.set_wakeup_fd(-1)
        steps(step)
    except OSError as error:
        _report(report_fd, SpawnError.at(step.stage, error.errno or 0, step.detail))
    except BaseException as error:  # noqa: BLE001 - the child must report, then _exit, whatever it was
        _report(report_fd, SpawnError.at(step.stage, 0, f"{step.detail} {error!r}".strip()))
    finally:
        os._exit(127)


def _join_cell(step: _Step, request: SpawnRequest, namespace_fds: dict[str, int],
               join_cgroups: bool) -> None:
    # Cgroups first, while the cgroup paths are still the host's (before any
    # mount namespace is joined); not at all for a child born in its cgroup.
    for path in request.cgroup_join if join_cgroups else ():
        step.at("cgroup", path)
        write_file(path, b"0")
    for kind in _CHILD_NAMESPACES:
        if kind in namespace_fds:
            step.at("setns", kind)
            setns(namespace_fds[kind], NAMESPACE_FLAGS[kind])


def _exec_with_stdio(
    step: _Step,
    request: SpawnRequest,
    executables: list[str],
    stdio: tuple[int, int, int],
    report_fd: int,
    max_fd: int,
) -> None:
    """Only fds 0-2 (and the report fd, closed by exec) survive into argv."""
    step.at("stdio")
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
    os.closerange(3, report_fd)
    os.closerange(report_fd + 1, max_fd)
    step.at("exec", request.argv[0])
    _exec(executables, request.argv, request.env)


def become_workload(
    request: SpawnRequest,
    executables: list[str],
    stdio: tuple[int, int, int],
    namespace_fds: dict[str, int],
    report_fd: int,
    max_fd: int,
    join_cgroups: bool,
) -> NoReturn:
    """In the forked child: set up the workload's process and exec it. Never returns.

    Signals need no work: the spawner has none ignored or blocked, and exec resets caught ones.
    """

    def steps(step: _Step) -> None:
        # First sign of life; born in its pid namespace, so getpid() is the pid the cell sees.
        os.write(report_fd, b"%d\n" % os.getpid())
        _join_cell(step, request, namespace_fds, join_cgroups)
        if request.rootfs:
            enter_rootfs(request.rootfs, step.at)
        step.at("setsid")
        os.setsid()
        os.umask(0o022)
        step.at("setgroups")
        os.setgroups([])
        step.at("setgid")
        os.setgid(request.gid)
        step.at("setuid")
        os.setuid(request.uid)
        step.at("chdir", request.cwd)
        os.chdir(request.cwd)
        _exec_with_stdio(step, request, executables, stdio, report_fd, max_fd)

    _run_in_child(report_fd, steps)


def become_holder(
    request: HolderRequest,
    executables: list[str],
    stdio: tuple[int, int, int],
    namespace_fds: dict[str, int],
    report_fd: int,
    max_fd: int,
    is_pid_one: bool,
    join_cgroups: bool,
) -> NoReturn:
    """In the forked child: make the cell's namespaces and become (or fork) their holder.

    `is_pid_one`: the spawner already made the pid namespace and we are its pid 1.
    """
    kinds = request.unshare

    def steps(step: _Step) -> None:
        os.write(report_fd, HOLDER_ALIVE)
        _join_cell(step, request, namespace_fds, join_cgroups)
        step.at("unshare", ",".join(kinds))
        flags = 0
        for kind in kinds:
            if not (is_pid_one and kind == "pid"):
                flags |= NAMESPACE_FLAGS[kind]
        unshare(flags)
        if "mnt" in kinds:
            # Nothing mounted in the cell may propagate to the host.
            step.at("mount", "/ private")
            mount("none", "/", None, MS_REC | MS_PRIVATE)
        if "pid" in kinds and not is_pid_one:
            step.at("fork")
            if (pid_one := os.fork()) != 0:
                pidfd = os.pidfd_open(pid_one)
                socket.send_fds(socket.socket(fileno=report_fd), [b"pid"], [pidfd])
                os._exit(0)
        # Looked up in our filesystem, which is the one a new mount namespace copies.
        _hold_namespaces(request, executables, stdio, report_fd, max_fd,
                         init_checked="mnt" not in namespace_fds)

    _run_in_child(report_fd, steps)


def _hold_namespaces(
    request: HolderRequest,
    executables: list[str],
    stdio: tuple[int, int, int],
    report_fd: int,
    max_fd: int,
    init_checked: bool,
) -> NoReturn:
    """Inside the new namespaces: fill them in, then exec the holder's init.

    `init_checked`: the init was found in the filesystem it will be exec'd from.
    """
    kinds = request.unshare

    def steps(step: _Step) -> None:
        if "pid" in kinds and "mnt" in kinds:
            step.at("mount", "/proc")
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        if "uts" in kinds and request.hostname:
            step.at("sethostname", request.hostname)
            socket.sethostname(request.hostname)
        if "net" in kinds:
            step.at("loopback", "lo")
            loopback_up()
        step.at("setsid")
        os.setsid()
        if init_checked:
            # The namespaces are complete: the daemon may answer now rather than after the
            # exec. An exec failing after this (the init was found when the request came) ends
            # the holder, and the daemon learns of it as of any holder that dies.
            os.write(report_fd, HOLDER_READY)
        _exec_with_stdio(step, request, executables, stdio, report_fd, max_fd)

    _run_in_child(report_fd, steps)


_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def loopback_up() -> None:
    """Bring lo up; the kernel then gives it 127.0.0.1 and ::1 by itself."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))


def _report(report_fd: int, error: SpawnError) -> None:
    os.write(report_fd, Failed.of(None, error).encode())


def _exec(executables: list[str], argv: list[str], env: dict[str, str]) -> NoReturn:
    """execvp's search: the first error other than a missing file is the one that counts."""
    failure: OSError = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
    for executable in executables:
        try:
            os.execve(executable, argv, env)
        except OSError as error:
            missing = error.errno in (errno.ENOENT, errno.ENOTDIR)
            if not missing and failure.errno == errno.ENOENT:
                failure = error
    raise failure


def write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


