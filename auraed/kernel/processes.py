"""Workload processes, as the daemon sees them: how to start one, and how it ended.

The daemon never forks workloads itself: auraed.kernel.spawner's fork server does (see there for
why), and its client (`auraed.kernel.spawner.client.Spawner`) takes the specs defined here.
"""

import os
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from auraed.output.log import OutputLog

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"



# include/uapi/linux/binfmts.h: one argv or envp string, its NUL included, is at most 32 pages.
MAX_ARG_STRLEN = 32 * os.sysconf("SC_PAGE_SIZE")
# fs/exec.c bounds all of them together by a quarter of RLIMIT_STACK, at most 3/4 of _STK_LIM
# (8 MiB) and at least ARG_MAX (include/uapi/linux/limits.h).
_STK_LIM = 8 * 1024 * 1024
_ARG_MAX = 128 * 1024
_POINTER_BYTES = 8


def exec_refusal(argv: Sequence[str], env: Mapping[str, str]) -> str | None:
    """Why execve(argv[0], argv, env) would fail with E2BIG, or None when the kernel takes it.

    Counted as fs/exec.c counts: each string with its NUL, the file name copied once more, and a
    pointer per string, against the limit RLIMIT_STACK gives (the spawner's is the daemon's).
    """
    strings = [os.fsencode(a) for a in argv] + [os.fsencode(f"{k}={v}") for k, v in env.items()]
    for index, string in enumerate(strings[: len(argv)]):
        if len(string) + 1 > MAX_ARG_STRLEN:
            return (f"argument {index} is {len(string)} bytes; exec takes at most "
                    f"{MAX_ARG_STRLEN - 1} (the kernel's MAX_ARG_STRLEN, {MAX_ARG_STRLEN} with "
                    "its NUL)")
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    limit = _STK_LIM // 4 * 3
    if stack != resource.RLIM_INFINITY:
        limit = min(limit, stack // 4)
    limit = max(limit, _ARG_MAX) - (max(len(argv), 1) + len(env)) * _POINTER_BYTES
    total = sum(len(string) + 1 for string in strings) + len(os.fsencode(argv[0])) + 1
    if total > limit:
        return (f"the arguments and environment take {total} bytes; exec takes at most {limit} "
                "under this daemon's stack limit")
    return None


def default_env() -> dict[str, str]:
    """The whole environment of a workload that asks for none: nothing of the daemon's leaks."""
    return {"PATH": DEFAULT_PATH}


@dataclass(frozen=True, kw_only=True)
class NamespaceSet:
    """Namespaces a workload joins, as /proc/<pid>/ns/<kind> paths; None keeps the host's."""

    pid: str | None = None
    mnt: str | None = None
    net: str | None = None
    ipc: str | None = None
    uts: str | None = None

    @classmethod
    def of_process(cls, pid: int) -> "NamespaceSet":
        """All the namespaces of a running process (typically a cell's namespace holder)."""
        return cls(**{kind.name: f"/proc/{pid}/ns/{kind.name}" for kind in fields(cls)})

    def paths(self) -> dict[str, str]:
        """{kind: path} of the namespaces to join."""
        joined = {kind.name: getattr(self, kind.name) for kind in fields(self)}
        return {kind: path for kind, path in joined.items() if path is not None}


@dataclass(frozen=True, kw_only=True)
class SpawnSpec:
    """How to start one workload.

    command: a string runs through /bin/sh -c; a sequence is the argv itself (argv[0] is looked up
    in the PATH of env). stdout_fd and stderr_fd stay the caller's: the spawner gets copies, so
    close them once spawn() returns. stdin is always /dev/null. cgroup_join: the cgroup files (one
    per hierarchy, see CgroupBackend.join_files) the workload moves itself into, by writing "0",
    before anything else. cgroup_birth: a cgroup2 directory (of the same cell) to be born in
    instead, where the kernel can (then nothing is written). The workload gets a session and
    process group of its own, no supplementary groups, umask 022, and only fds 0-2.
    """

    command: str | Sequence[str]
    uid: int
    gid: int
    stdout_fd: int = -1
    stderr_fd: int = -1
    # Instead of the fds: the spawner makes the pipes and writes these logs itself (they are
    # mirrors here: OutputLog.mirror), so output is captured while no daemon runs too.
    capture: tuple[OutputLog, OutputLog] | None = None
    # Kept by the spawner with the process, for a daemon that adopts it later.
    label: dict[str, object] | None = None
    cgroup_join: Sequence[str] = ()
    cgroup_birth: str | None = None
    # The cgroups it joins (or one above them) limit memory: the spawner must not visit them
    # to start it from C, since its own pages would be charged there and the OOM killer, at
    # the limit, would pick the spawner (the largest process in the cgroup). Its child joins
    # them itself instead (auraed.kernel.spawner.child).
    memory_limited: bool = False
    env: Mapping[str, str] = field(default_factory=default_env)
    cwd: str = "/"
    namespaces: NamespaceSet | None = None
    # A container's root filesystem, made and entered by the child (auraed.kernel.rootfs);
    # cwd and argv are then the container's.
    rootfs: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError("a workload needs a command")
        if (self.capture is None) == (self.stdout_fd < 0 or self.stderr_fd < 0):
            raise ValueError("a workload needs either stdout_fd and stderr_fd or a capture")

    @property
    def argv(self) -> list[str]:
        if isinstance(self.command, str):
            return ["/bin/sh", "-c", self.command]
        return list(self.command)


@dataclass(frozen=True, kw_only=True)
class HolderSpec:
    """How to start the process that owns a cell's namespaces.

    It joins `namespaces` (the parent cell's, None for the host's), places
    itself in `cgroup_join`, unshares the kinds in `unshare` ("pid", "mnt",
    "ipc", "uts", "net") and runs `argv` — a pause-and-reap init — as pid 1 of
    the new pid namespace, with a fresh /proc, `hostname`, and loopback up in
    a new network namespace. Its stdout/stderr go to the given fds.
    """

    unshare: frozenset[str]
    hostname: str
    stdout_fd: int
    stderr_fd: int
    cgroup_join: Sequence[str] = ()
    cgroup_birth: str | None = None
    memory_limited: bool = False  # as SpawnSpec's
    namespaces: NamespaceSet | None = None
    argv: Sequence[str] = ("catatonit", "-P")
    label: dict[str, object] | None = None


@dataclass(frozen=True)
class SpawnedProcess:
    """A running workload. start_time (clock ticks since boot, /proc/<pid>/stat field 22) tells
    this process apart from a later one that reuses its pid."""

    host_pid: int
    ns_pid: int  # as seen inside its pid namespace; host_pid when it joined none
    pgid: int  # its own process group: signal_group(pgid, ...) reaches its children too
    start_time: int


@dataclass(frozen=True)
class ExitStatus:
    """How a workload ended: exit_code when it exited, signal when a signal killed it."""

    exit_code: int | None
    signal: int | None
    core_dumped: bool = False

    @classmethod
    def from_wait_status(cls, status: int) -> "ExitStatus":
        if os.WIFSIGNALED(status):
            return cls(None, os.WTERMSIG(status), os.WCOREDUMP(status))
        return cls(os.WEXITSTATUS(status), None)


def signal_group(pgid: int, sig: int) -> None:
    """Signal a whole process group; a group that is already gone is not an error."""
    if pgid <= 1:
        # killpg(0) would signal the daemon's own group, and 1 is init's.
        raise ValueError(f"refusing to signal process group {pgid}")
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


