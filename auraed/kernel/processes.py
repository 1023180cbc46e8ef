"""Workload processes, as the daemon sees them: started by the spawner, ended with a status.

The daemon never forks workloads itself (see auraed.kernel.spawner for why); `Spawner` runs the
fork server and talks to it. Everything here is safe to call from many threads.
"""

import itertools
import json
import logging
import os
import resource
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from auraed.kernel.spawner import MAX_MESSAGE_BYTES

_log = logging.getLogger(__name__)

# <asm-generic/socket.h>; Python's socket module does not name it.
SO_SNDBUFFORCE = 32

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The directory holding the auraed package, for the spawner's import path.
_SOURCE_ROOT = str(Path(__file__).resolve().parents[2])


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
    stdout_fd: int
    stderr_fd: int
    cgroup_join: Sequence[str] = ()
    cgroup_birth: str | None = None
    env: Mapping[str, str] = field(default_factory=default_env)
    cwd: str = "/"
    namespaces: NamespaceSet | None = None
    # A container's root filesystem, made and entered by the child (auraed.kernel.rootfs);
    # cwd and argv are then the container's.
    rootfs: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError("a workload needs a command")

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
    namespaces: NamespaceSet | None = None
    argv: Sequence[str] = ("catatonit", "-P")


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


class SpawnError(Exception):
    """The workload did not start; nothing of it is left running.

    stage is the step that failed: request, namespace, setns, fork, cgroup, setsid, setgroups,
    setgid, setuid, chdir, stdio, exec, or setup for anything else in the child.
    """

    def __init__(self, stage: str, errno: int, message: str) -> None:
        super().__init__(f"spawn failed at {stage}: {message}")
        self.stage = stage
        self.errno = errno
        self.message = message


class SpawnerClosed(Exception):
    """The spawner is not running: never started, closed, or it died."""


ExitCallback = Callable[[int, ExitStatus], None]


def signal_group(pgid: int, sig: int) -> None:
    """Signal a whole process group; a group that is already gone is not an error."""
    if pgid <= 1:
        # killpg(0) would signal the daemon's own group, and 1 is init's.
        raise ValueError(f"refusing to signal process group {pgid}")
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class _PendingReply:
    def __init__(self) -> None:
        self._done = threading.Event()
        self._reply: dict[str, Any] | None = None

    def resolve(self, reply: dict[str, Any] | None) -> None:
        """reply None: the spawner went away before answering."""
        self._reply = reply
        self._done.set()

    def wait(self, timeout: float) -> dict[str, Any] | None:
        if not self._done.wait(timeout):
            raise TimeoutError("the spawner did not answer in time")
        return self._reply


class Spawner:
    """Runs the fork server and starts workloads through it.

    on_exit(host_pid, status) is called from one reader thread, once per workload, in the order the
    workloads ended, and never before the spawn reply for that pid was handled. It can still run
    before spawn() has returned to its caller (a workload may end at once), so a caller that
    records pids must keep exits of pids it has not recorded yet (e.g. both under one short lock).
    It must not block for long: it delays every later reply and exit. Workloads still running when
    the spawner closes are killed without an on_exit call.
    """

    def __init__(self, on_exit: ExitCallback, *, reply_timeout: float = 30.0,
                 on_lost: Callable[[], None] | None = None) -> None:
        """on_lost: called once, on the reader thread, if the spawner ends
        without close() — its workloads are then unsupervised."""
        self._on_exit = on_exit
        self._on_lost = on_lost
        self._reply_timeout = reply_timeout
        self._lock = threading.Lock()
        self._pending: dict[int, _PendingReply] = {}
        self._request_ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._closed = False

    @property
    def pid(self) -> int:
        """The spawner's own pid: the parent of every workload."""
        if self._process is None:
            raise SpawnerClosed("the spawner was not started")
        return self._process.pid

    def start(self, ready_timeout: float = 10.0) -> None:
        """Launch the spawner and wait until it is ready."""
        if self._process is not None:
            raise RuntimeError("the spawner was already started")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A SEQPACKET message must fit the sender's buffer whole; the default (wmem_default,
        # ~208 KiB) is less than the largest spawn request. Forced: root may exceed wmem_max.
        try:
            ours.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 2 * MAX_MESSAGE_BYTES)
        except PermissionError:  # without CAP_NET_ADMIN: as much as wmem_max allows
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * MAX_MESSAGE_BYTES)
        try:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-S",
                    "-m",
                    "auraed.kernel.spawner",
                    "--socket-fd",
                    str(theirs.fileno()),
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                cwd="/",
                env={"PYTHONPATH": _SOURCE_ROOT},
                # Out of the daemon's terminal session: a ^C is for the daemon to act on.
                start_new_session=True,
            )
        finally:
            theirs.close()
        try:
            self._await_ready(ours, ready_timeout)
        except BaseException:
            ours.close()
            self._process.kill()
            self._process.wait()
            raise
        self._sock = ours
        self._reader = threading.Thread(
            target=self._read_messages, args=(ours,), name="spawner-reader", daemon=True
        )
        self._reader.start()

    def _await_ready(self, sock: socket.socket, timeout: float) -> None:
        readable, _, _ = select.select([sock], [], [], timeout)
        message = sock.recv(MAX_MESSAGE_BYTES) if readable else b""
        if not message or json.loads(message).get("event") != "ready":
            raise SpawnerClosed("the spawner did not start")

    def spawn(self, spec: SpawnSpec) -> SpawnedProcess:
        """Start a workload; returns once it runs its argv (it was exec'd)."""
        return self._request(
            {
                "op": "spawn",
                "argv": spec.argv,
                "uid": spec.uid,
                "gid": spec.gid,
                "cgroup_join": list(spec.cgroup_join),
                "cgroup_birth": spec.cgroup_birth,
                "env": dict(spec.env),
                "cwd": spec.cwd,
                "namespaces": spec.namespaces.paths() if spec.namespaces else None,
                **({"rootfs": dict(spec.rootfs)} if spec.rootfs else {}),
            },
            (spec.stdout_fd, spec.stderr_fd),
        )

    def spawn_holder(self, spec: HolderSpec) -> SpawnedProcess:
        """Start a namespace holder; returns once its init runs in the new namespaces."""
        return self._request(
            {
                "op": "holder",
                "argv": list(spec.argv),
                "uid": 0,
                "gid": 0,
                "cgroup_join": list(spec.cgroup_join),
                "cgroup_birth": spec.cgroup_birth,
                "env": default_env(),
                "cwd": "/",
                "namespaces": spec.namespaces.paths() if spec.namespaces else None,
                "unshare": sorted(spec.unshare),
                "hostname": spec.hostname,
            },
            (spec.stdout_fd, spec.stderr_fd),
        )

    def _request(self, request: dict[str, Any], fds: tuple[int, int]) -> SpawnedProcess:
        request_id = next(self._request_ids)
        # Not ensure_ascii: non-ASCII goes as UTF-8, not as six-byte escapes.
        message = json.dumps({"id": request_id, **request}, ensure_ascii=False).encode()
        if len(message) > MAX_MESSAGE_BYTES:
            raise ValueError(f"spawn request of {len(message)} bytes is over {MAX_MESSAGE_BYTES}")
        pending = _PendingReply()
        with self._lock:
            if self._closed or self._sock is None:
                raise SpawnerClosed("the spawner is not running")
            self._pending[request_id] = pending
            sock = self._sock
        try:
            try:
                # One sendmsg is one SEQPACKET message: concurrent senders need no lock.
                socket.send_fds(sock, [message], list(fds))
            except OSError as error:
                raise SpawnerClosed(f"the spawner is not running: {error}") from error
            reply = pending.wait(self._reply_timeout)
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
        if reply is None:
            raise SpawnerClosed("the spawner went away")
        if "error" in reply:
            failure = reply["error"]
            raise SpawnError(failure["stage"], failure["errno"], failure["message"])
        return SpawnedProcess(
            host_pid=reply["pid"],
            ns_pid=reply["ns_pid"],
            pgid=reply["pid"],
            start_time=reply["start_time"],
        )

    def _read_messages(self, sock: socket.socket) -> None:
        # One buffer for every message: a fresh 256 KiB per recv costs an mmap and a munmap.
        buffer = bytearray(MAX_MESSAGE_BYTES)
        try:
            while size := sock.recv_into(buffer):
                self._dispatch(json.loads(buffer[:size]))
        except (OSError, ValueError):
            _log.exception("reading from the spawner failed")
        finally:
            with self._lock:
                closing, self._closed = self._closed, True
                pending = list(self._pending.values())
            for reply in pending:
                reply.resolve(None)
            if not closing:
                _log.error("the spawner went away: no workload can start any more")
                if self._on_lost is not None:
                    self._on_lost()

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("event") == "exit":
            try:
                self._on_exit(message["pid"], ExitStatus.from_wait_status(message["status"]))
            except Exception:  # noqa: BLE001 - a faulty callback must not stop replies and exits
                _log.exception("on_exit failed for pid %s", message["pid"])
            return
        with self._lock:
            pending = self._pending.get(message["id"])
        # None: its caller timed out and left; the workload runs on, reported by its exit event.
        if pending is not None:
            pending.resolve(message)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the spawner: it kills every workload still running, reaps them, and exits."""
        with self._lock:
            sock, self._sock = self._sock, None
            self._closed = True
        if sock is None or self._process is None:
            return
        try:
            # Wakes our reader and shows the spawner end of file; close() alone would do neither
            # while the reader is blocked in recv.
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join()
        sock.close()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            _log.error("the spawner did not exit within %s s; killing it", timeout)
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> Self:
        """Starts the spawner."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
