"""The fork server: a small single-threaded process that is the parent of every workload.

The daemon runs many gRPC threads, and running Python between fork and exec in a threaded process
is unsafe. This process runs nothing but its request loop, so its forked children can safely place
themselves in cgroups and namespaces, drop privileges and close stray fds before exec (the steps
are in auraed.kernel.spawner.child). A workload that has no root filesystem of its own
needs none of that: it is started with no Python in its child (auraed.kernel.spawner.direct)
while the spawner visits its cgroups (see _visiting) and, in a cell, its namespaces (_inside). It also owns every wait: it is a child subreaper, reaps all
children and reports the exits of the workloads it started. Standard library only, so that it
starts fast.

The daemon runs it as `python -m auraed.kernel.spawner --socket-fd N`; the messages on that
socket are auraed.kernel.spawner.protocol's.

A holder is the process that owns a cell's namespaces: it joins the given
namespaces, unshares the kinds in `unshare` and runs argv (a pause-and-reap
init such as `catatonit -P`) as pid 1 of the new pid namespace, with a fresh
/proc, the hostname, and loopback up in a new network namespace. Its reply
comes once the namespaces are complete, just before that exec when the init
was found beforehand (a later exec failure shows as the holder's exit).

A top-level holder is started from C where the kernel allows (_start_holder_directly): the
spawner makes the namespaces itself, fork_execs the init into them and mounts its /proc for
it (procfs pidns=), then goes back to its own namespaces. Where it cannot, holders are forked
children, and the spawner keeps a spare for them: a child forked ahead of time as pid 1 of a
fresh pid namespace, which the next holder request with a new pid namespace of ours is handed
to, so that Allocate does not wait for a fork. A used spare is replaced once the spawner has
been idle a few milliseconds.

End of file on the socket (or SIGTERM) means the daemon is gone: every workload is killed and
reaped, then the spawner exits.
"""

import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
import termios
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn, TypeVar

from auraed.kernel.libc import (
    CLONE_NEWPID,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_REC,
    NAMESPACE_FLAGS,
    fork_into_cgroup,
    mount,
    procfs_takes_pidns,
    set_child_subreaper,
    setns,
    unignore_reserved_signals,
    unshare,
)
from auraed.kernel.spawner import direct
from auraed.kernel.spawner.child import (
    HOLDER_ALIVE,
    HOLDER_READY,
    become_holder,
    become_workload,
    loopback_up,
    write_file,
)
from auraed.kernel.spawner.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Adopt,
    Adopted,
    Capture,
    Exited,
    Failed,
    Flush,
    Flushed,
    Forget,
    HolderRequest,
    Join,
    Joined,
    Keep,
    Message,
    Output,
    Ready,
    Release,
    Spawned,
    SpawnError,
    SpawnRequest,
    Stop,
    decode,
    message_buffer,
)
from auraed.kernel.spawner.state import write_state
from auraed.output.log import LineAssembler, OutputLog, output_pipe

_T = TypeVar("_T")
_FD_SIZE = struct.calcsize("i")
# The name (/proc/<pid>/comm) of the spare: a child forked ahead of time, pid 1 of a fresh pid
# namespace, that becomes the next top-level cell's holder.
SPARE_NAME = "aurae-spare"
SPARE_IDLE_MS = 5
# The order the spawner enters a cell's namespaces in to start a child from C there (see
# _inside): the mount namespace last, so that every path before it is the host's. It leaves
# them in the reverse order, the mount namespace first, for the same reason.
_ENTRY_ORDER = ("pid", "net", "ipc", "uts", "mnt")


class _Spare:
    """A prepared holder: its pid and the socket its request goes down."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock


class DaemonGone(Exception):
    """The daemon closed its end of the socket, and no other can attach: the end."""


class _Stopping(Exception):
    """The daemon asked for everything to end (Stop)."""


# Bytes read from an output pipe at once.
_READ_BYTES = 64 * 1024
# Reads of a just-ended process's pipes before its exit is reported (up to 16 MiB).
_DRAIN_READS = 256
STATE_FILE = "spawner.state"


class _Capture:
    """One captured output channel of one process: the pipe's read end and its log."""

    def __init__(self, channel: str, fd: int, log: OutputLog) -> None:
        self.channel = channel
        self.fd = fd
        self.log = log
        self.lines = LineAssembler()
        # After a write error (a full disk) the pipe is still drained, so the workload never
        # blocks, but its output is dropped.
        self.failed = False

    def store(self, lines: list[bytes]) -> None:
        if self.failed or not lines:
            return
        try:
            self.log.append(lines, time.time())
        except OSError:
            self.failed = True

    def as_state(self) -> dict[str, object]:
        first, last, committed, complete = self.log.position()
        return {"channel": self.channel, "directory": str(self.log.directory),
                "segment_bytes": self.log.segment_bytes, "max_segments": self.log.max_segments,
                "first": first, "last": last, "committed": committed, "complete": complete}


class _Entry:
    """A process the spawner started, kept until it is reaped, and, if the daemon labelled it,
    until the daemon releases it (so that a daemon adopting later still learns how it ended)."""

    __slots__ = ("argv", "captures", "exited_at", "kind", "label", "ns_pid", "pid",
                 "start_time", "status")

    def __init__(self, pid: int, ns_pid: int, start_time: int, kind: str, argv: list[str],
                 label: dict[str, object] | None, captures: list[_Capture]) -> None:
        self.pid, self.ns_pid, self.start_time, self.argv = pid, ns_pid, start_time, argv
        self.kind, self.label, self.captures = kind, label, captures
        self.status: int | None = None
        self.exited_at = 0.0

    def as_state(self) -> dict[str, object]:
        return {"pid": self.pid, "ns_pid": self.ns_pid, "start_time": self.start_time,
                "kind": self.kind, "argv": self.argv, "label": self.label,
                "status": self.status,
                "exited_at": self.exited_at,
                "outputs": [capture.as_state() for capture in self.captures]}


class ForkServer:
    def __init__(self, sock: socket.socket, listener: socket.socket | None = None,
                 joined: list[str] | None = None) -> None:
        """sock: the first daemon's connection. listener: where later daemons connect; with
        it the spawner outlives a daemon that goes away. joined: the cgroup files the
        spawner joined its own cgroups through (a workload asking for those is spawned
        directly)."""
        self._sock: socket.socket | None = sock
        self._joined = joined or []
        # Held open: the spawner goes back through them after each visit (see _visiting).
        self._home_fds = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in self._joined]
        if os.geteuid() == 0:
            os.setgroups([])  # what every workload gets: then most can be spawned directly
        self._uid, self._gid, self._groups = os.getuid(), os.getgid(), os.getgroups()
        self._listener = listener
        self._state_path = (os.path.join(os.path.dirname(listener.getsockname()), STATE_FILE)
                            if listener is not None else None)
        # Started workloads not yet reaped, by pid. Each leads its own process group (setsid).
        self._processes: dict[int, _Entry] = {}
        # Holders the spawner is not the parent of and never reaps (a nested cell's, whose init
        # the init of its parent cell's pid namespace reaps): watched by pidfd instead, by fd.
        # _fostering: the pidfd of the one just started, until _answer files its entry.
        self._fostered: dict[int, _Entry] = {}
        self._fostering: int | None = None
        # Reaped but labelled: kept until the daemon releases them, by (pid, start time).
        self._ended: dict[tuple[int, int], _Entry] = {}
        # The daemon's records (Keep), kept across daemons.
        self._records: dict[str, dict[str, object]] = {}
        # Captured output, by the read end of its pipe; those written since the last Output.
        self._captures: dict[int, tuple[_Entry, _Capture]] = {}
        # Keyed by the capture, not its fd: a pipe that ended is closed at once, and a spawn
        # handled later in the same wake-up may get its fd number before the report goes out.
        self._written: dict[_Capture, _Entry] = {}
        # epoll, not poll: the spawner holds two pipes per captured process, and poll(2)
        # looks at every one of them at every turn of the loop (with 1,000 cells, most of
        # what a spawn cost beyond the first cell's, measured). An fd leaves it before it is
        # closed (_pump, _detach), as epoll needs.
        self._poller = select.epoll()
        # Opened here, not in the child: after joining a mount namespace /dev/null may not exist.
        self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        # The spawner's own namespaces, to come back to from a cell's (see _inside).
        self._own_namespaces = {kind: os.open(f"/proc/self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
                                for kind in _ENTRY_ORDER}
        self._own_pid_ns = self._own_namespaces["pid"]
        self._max_fd = os.sysconf("SC_OPEN_MAX")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._buffer = message_buffer()
        # A child forked ahead of time as pid 1 of a fresh pid namespace, waiting to become the
        # next top-level cell's holder: Allocate then does not wait for a fork.
        self._spare: _Spare | None = None
        # Set when making a spare failed (no right to make pid namespaces, say): then none is
        # tried again until a holder request comes, instead of every few milliseconds.
        self._spare_refused = False
        self.keeps_spare = True
        # Cleared if a child born in its cgroup (clone3) was killed at birth: some kernels kill
        # such a child when its cgroup once had a cgroup.kill. From then on children join by
        # writing, as on v1.
        self._births_in_cgroup = True
        # Workloads that need no Python in their child are started by fork_exec (see
        # _starts_without_python) where this interpreter's is one we know.
        self._direct = direct.available()
        # Of those, the ones in a cell's namespaces too: the spawner enters them itself around
        # the fork_exec (see _inside). The kernel lets only a single-threaded process enter a
        # mount namespace, which the spawner is (it starts no thread), but a spawner that
        # finds itself with more than one does not try.
        self._direct_in_cells = self._direct and len(os.listdir("/proc/self/task")) == 1
        # And holders: the spawner makes the cell's namespaces itself, fork_execs the init as
        # pid 1 of the new pid namespace and mounts its /proc for it, which needs a kernel
        # whose procfs takes the pid namespace to show (pidns=). Where it cannot, holders are
        # forked children as before, and the spare saves that fork on Allocate.
        self._direct_holders = self._direct_in_cells and procfs_takes_pidns()

    def start_children_in_python(self) -> None:
        """Start every child through a Python fork and its steps (auraed.kernel.spawner.child),
        as on an interpreter or kernel where nothing can start from C (`--direct no`)."""
        self._direct = self._direct_in_cells = self._direct_holders = False

    @property
    def _wants_spare(self) -> bool:
        return (self.keeps_spare and not self._direct_holders and self._spare is None
                and not self._spare_refused)

    def serve(self) -> None:
        """Answer requests, report exits and write captured output until the daemon goes away
        for good (or asks to Stop, or SIGTERM comes), then kill everything."""
        set_child_subreaper()
        _leave_no_signal_ignored_or_blocked()
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, _wake)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        poller = self._poller
        assert self._sock is not None
        poller.register(self._sock, select.EPOLLIN)
        poller.register(self._wake_r, select.EPOLLIN)
        if self._listener is not None:
            poller.register(self._listener, select.EPOLLIN)
        try:
            self._keep_a_spare()  # before "ready": from then on the spawner is as it stays
            self._send(Ready(pid=os.getpid(), continues_output=True, flushes_output=True))
            while True:
                # A used spare is replaced once the spawner has been idle a moment, so that the
                # fork and the new child's start delay no request (typically the Start that
                # follows an Allocate).
                events = poller.poll(SPARE_IDLE_MS / 1000 if self._wants_spare else -1)
                if not events:
                    self._keep_a_spare()
                for fd, _ in events:
                    if fd == self._wake_r:
                        if signal.SIGTERM in self._drain_wakeups():
                            return
                        self._reap()
                    elif fd in self._captures:
                        self._pump(fd)
                    elif fd in self._fostered:
                        self._fostered_ended(fd)
                    elif self._listener is not None and fd == self._listener.fileno():
                        self._accept()
                    elif self._sock is not None and fd == self._sock.fileno():
                        self._handle_message()
                if self._written:
                    self._report_output()
        except (DaemonGone, _Stopping):
            return
        finally:
            self._kill_everything()

    def _send(self, message: Message) -> None:
        """To the attached daemon, if any. A daemon that went away is detached from (or, with
        no listener for another to come, ends everything: DaemonGone)."""
        if self._sock is None:
            return
        try:
            # No SIGPIPE: it is not ignored here (see _leave_no_signal_ignored_or_blocked).
            self._sock.send(message.encode(), socket.MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError):
            self._detach()

    def _detach(self) -> None:
        if self._listener is None:
            raise DaemonGone
        if self._sock is not None:
            self._poller.unregister(self._sock)
            self._sock.close()
            self._sock = None

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            connection, _ = self._listener.accept()
        except OSError:
            return
        connection.setblocking(True)
        if self._sock is not None and _hung_up(self._sock):
            # The old daemon is gone but its last messages are still to be read: first those.
            while self._sock is not None:
                self._handle_message()
        if self._sock is not None:
            try:
                connection.send(Ready(pid=os.getpid(), busy=True).encode(), socket.MSG_NOSIGNAL)
            except OSError:
                pass
            connection.close()
            return
        self._sock = connection
        self._poller.register(connection, select.EPOLLIN)
        self._send(Ready(pid=os.getpid(), continues_output=True, flushes_output=True))

    def _drain_wakeups(self) -> bytes:
        signals = b""
        try:
            while chunk := os.read(self._wake_r, 512):
                signals += chunk
        except BlockingIOError:
            pass
        return signals

    def _handle_message(self) -> None:
        try:
            data, fds, flags = self._receive()
        except (ConnectionResetError, BrokenPipeError):
            data, fds, flags = b"", [], 0
        try:
            if not data:
                self._detach()
                return
            try:
                if flags & socket.MSG_TRUNC:
                    raise SpawnError.malformed("request over MAX_MESSAGE_BYTES")
                message = decode(data)
            except SpawnError as error:
                self._send(Failed.of(None, error))
                return
            if isinstance(message, SpawnRequest):
                self._send(self._answer(message, fds))
            else:
                self._handle_control(message)
        finally:
            for fd in fds:
                os.close(fd)

    def _handle_control(self, message: Message) -> None:
        """The messages that are not spawn requests; none but Adopt and Flush is answered."""
        if isinstance(message, Keep):
            self._records[message.key] = message.value
        elif isinstance(message, Forget):
            self._records.pop(message.key, None)
        elif isinstance(message, Release):
            self._ended.pop((message.pid, message.start_time), None)
            running = self._processes.get(message.pid)
            if running is not None and running.start_time == message.start_time:
                running.label = None  # not kept once it ends
        elif isinstance(message, Adopt):
            self._send(self._write_state())
        elif isinstance(message, Flush):
            self._flush(message)
        elif isinstance(message, Join):
            self._send(self._join(message))
        elif isinstance(message, Stop):
            raise _Stopping
        else:
            self._send(Failed.of(None, SpawnError.malformed(f"unexpected {message.KIND}")))

    def _join(self, request: Join) -> Joined | Failed:
        """The cgroups of request.files become the spawner's own (see Join)."""
        opened: list[int] = []
        try:
            for path in request.files:
                opened.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
            for fd in opened:
                os.write(fd, b"0")
        except OSError as error:
            for fd in opened:
                os.close(fd)
            for fd in self._home_fds:  # refused midway (a full cpuset): back where it was
                os.write(fd, b"0")
            return Failed.of(request.id, SpawnError.at("cgroup", error.errno or 0, str(error)))
        for fd in self._home_fds:
            os.close(fd)
        self._joined, self._home_fds = list(request.files), opened
        return Joined(id=request.id)

    def _write_state(self) -> Adopted | Failed:
        if self._state_path is None:
            return Failed.of(None, SpawnError.malformed("adopt from a spawner without --listen"))
        # Output read so far is in the files and in the state, before the daemon follows it.
        self._written.clear()
        entries = [*self._processes.values(), *self._ended.values()]
        state = {"records": self._records, "processes": [e.as_state() for e in entries]}
        try:
            digest = write_state(self._state_path, PROTOCOL_VERSION, state)
        except OSError as error:
            return Failed.of(None, SpawnError.at("state", error.errno or 0, self._state_path))
        return Adopted(path=self._state_path, digest=digest)

    def _receive(self) -> tuple[bytes, list[int], int]:
        """One request, the fds passed with it (at most two), and the message flags; like
        socket.recv_fds, into one buffer kept for every message."""
        assert self._sock is not None
        size, ancillary, flags, _ = self._sock.recvmsg_into(
            [self._buffer], socket.CMSG_SPACE(2 * _FD_SIZE), socket.MSG_CMSG_CLOEXEC
        )
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _FD_SIZE
                fds.extend(struct.unpack(f"{usable // _FD_SIZE}i", payload[:usable]))
        return bytes(self._buffer[:size]), fds, flags

    def _answer(self, request: SpawnRequest, fds: list[int]) -> Spawned | Failed:
        captures: list[_Capture] = []
        try:
            if request.capture is not None:
                if fds:
                    raise SpawnError.malformed("fds passed with a capture")
                captures, stdio = _open_captures(Capture(**request.capture))  # type: ignore[arg-type]
            elif len(fds) != 2:
                raise SpawnError.malformed("malformed request")
            else:
                stdio = (fds[0], fds[1])
            try:
                if isinstance(request, HolderRequest):
                    pid, ns_pid = self._fork_holder(request, stdout=stdio[0], stderr=stdio[1])
                else:
                    pid, ns_pid = self._fork_workload(request, stdout=stdio[0], stderr=stdio[1])
            finally:
                if captures:
                    for fd in stdio:  # the write ends: the workload has its own now
                        os.close(fd)
        except SpawnError as failure:
            _close_captures(captures)
            self._drop_fostering()
            return Failed.of(request.id, failure)
        except (LookupError, TypeError, ValueError, AttributeError) as bad:
            _close_captures(captures)
            self._drop_fostering()
            return Failed.of(request.id, SpawnError.malformed(repr(bad)))
        entry = _Entry(pid, ns_pid, _start_time(pid), request.KIND, request.argv, request.label,
                       captures)
        self._processes[pid] = entry
        if self._fostering is not None:
            pidfd, self._fostering = self._fostering, None
            self._fostered[pidfd] = entry
            self._poller.register(pidfd, select.EPOLLIN)
        for capture in captures:
            # Read from the next poll on: the reply goes out before any Output of this pid.
            self._captures[capture.fd] = (entry, capture)
            self._poller.register(capture.fd, select.EPOLLIN)
        return Spawned(id=request.id, pid=pid, ns_pid=ns_pid, start_time=entry.start_time)

    def _pump(self, fd: int, size: int = _READ_BYTES) -> int:
        """One read of up to `size` bytes of a capture pipe: the bytes read, 0 at end of file
        (the capture is closed then), -1 if it had nothing to give right now."""
        entry, capture = self._captures[fd]
        try:
            chunk = os.read(fd, size)
        except BlockingIOError:
            return -1
        except OSError:
            chunk = b""
        if chunk:
            capture.store(capture.lines.feed(chunk))
        else:
            self._poller.unregister(fd)
            del self._captures[fd]
            os.close(fd)
            capture.store(capture.lines.flush())
            capture.log.finish()
        self._written[capture] = entry
        return len(chunk)

    def _drain(self, entry: _Entry) -> None:
        """Store what a process wrote before it ended, and report it, before its exit: a
        Wait followed by a read of its output then sees all of it. What a descendant that
        outlives it writes later follows as usual."""
        for capture in entry.captures:
            # Bounded: a descendant writing without pause must not hold up the loop.
            for _ in range(_DRAIN_READS):
                if capture.fd not in self._captures or self._pump(capture.fd) < 0:
                    break
        if self._written:
            self._report_output()

    def _flush(self, request: Flush) -> None:
        """Store and report what the named processes' pipes hold now, then say so: the
        daemon's replay of "what was written so far" waits for this, since the poll loop
        may not have come to those pipes yet (an Observe call just after the write that a
        request's handling made would miss its line)."""
        wanted = {(int(pid), int(start_time)) for pid, start_time in request.processes}
        for fd, (entry, _) in list(self._captures.items()):
            if (entry.pid, entry.start_time) not in wanted:
                continue
            # What is in the pipe now, not what comes while we read: a process that writes
            # without pause must not keep the spawner here.
            left = _bytes_in_pipe(fd)
            while left > 0 and fd in self._captures:
                read = self._pump(fd, min(left, _READ_BYTES))
                if read <= 0:
                    break
                left -= read
        if self._written:
            self._report_output()
        self._send(Flushed(id=request.id))

    def _report_output(self) -> None:
        logs: list[list[object]] = []
        for capture, entry in self._written.items():
            logs.append([entry.pid, capture.channel, *capture.log.position()])
        self._written.clear()
        self._send(Output(logs=logs))

    def _open_namespaces(self, request: SpawnRequest) -> dict[str, int]:
        namespace_fds: dict[str, int] = {}
        try:
            for kind, path in request.namespaces.items():
                if kind not in NAMESPACE_FLAGS:
                    raise SpawnError.at("namespace", errno.EINVAL, f"unknown namespace {kind!r}")
                try:
                    namespace_fds[kind] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as error:
                    raise SpawnError.at("namespace", error.errno or 0, path) from None
        except SpawnError:
            for fd in namespace_fds.values():
                os.close(fd)
            raise
        return namespace_fds

    def _drop_fostering(self) -> None:
        if self._fostering is not None:
            os.close(self._fostering)
            self._fostering = None

    def _fostered_ended(self, pidfd: int) -> None:
        """A holder the spawner does not reap has exited (its pidfd is readable). Its wait
        status goes to its reaper; an init ends by SIGKILL but for a failure before its exec
        (reported then, as Failed), so it is reported killed by SIGKILL."""
        entry = self._fostered.pop(pidfd)
        self._poller.unregister(pidfd)
        os.close(pidfd)
        # Its pid may be a new child's already (reaped and reused before this turn of the
        # loop): that one keeps its entry; the exit names its start time all the same.
        if self._processes.get(entry.pid) is entry:
            del self._processes[entry.pid]
        self._report_end(entry, int(signal.SIGKILL))

    def _fork_holder(self, request: HolderRequest, stdout: int, stderr: int) -> tuple[int, int]:
        """Start a namespace holder; returns its pid, here and in its own pid namespace.

        With a new pid namespace the first child unshares and forks pid 1, hands
        us a pidfd for it (its pid as the first child sees it may be a nested
        namespace's) and exits; pid 1, orphaned, comes to us as subreaper.
        """
        kinds = request.unshare
        if not kinds or any(kind not in NAMESPACE_FLAGS for kind in kinds):
            raise SpawnError.at("request", errno.EINVAL, f"bad namespace kinds {kinds!r}")
        self._spare_refused = False  # worth another try once this one is answered
        namespace_fds = self._open_namespaces(request)
        try:
            executables = _executables(
                request.argv[0], request.env, in_our_filesystem="mnt" not in namespace_fds
            )
            init_checked = "mnt" not in namespace_fds
            if init_checked and not any(os.access(e, os.X_OK) for e in executables):
                # Refused here: the holder answers before its exec (see _hold_namespaces).
                missing = not executables
                raise SpawnError.at("exec", errno.ENOENT if missing else errno.EACCES,
                                  request.argv[0])
            if not namespace_fds and self._direct_holders and self._can_visit(request):
                started = self._start_holder_directly(request, executables, stdout, stderr)
                if started is not None:
                    return started, 1 if "pid" in kinds else started
                # The kernel refused the spawner a step a forked child may still take: from
                # now on holders are forked children (with a spare), this one too.
            # In our own pid namespace we can make the new one ourselves and fork
            # its pid 1 directly (or take the spare, made so); inside a cell's, the
            # kernel refuses (unshare of CLONE_NEWPID needs pid_for_children to be
            # our own), so a first child does it and forks pid 1.
            direct = "pid" in kinds and "pid" not in namespace_fds
            # The spare joins its cgroups by writing; where the child can be born in them
            # instead (cgroup v2), that saves more than the fork costs.
            birth = self._birth_cgroup(request)
            if direct and self._spare is not None and birth is None:
                holder = self._launch_holder(request, executables, namespace_fds, stdout, stderr,
                                             direct=True, use_spare=True)
                if holder is not None:
                    return holder, 1
                # The spare died before it was ready (it was killed): fork one instead.
            holder = self._with_birth_fallback(birth, lambda cgroup: self._launch_holder(
                request, executables, namespace_fds, stdout, stderr, direct=direct,
                birth_cgroup=cgroup))
            if holder is None:
                raise SpawnError.at("holder", errno.ESRCH, "ended before its namespaces were ready")
            if "pid" in kinds:
                return holder, 1  # the init of its new pid namespace
            return holder, _innermost_pid(holder) if "pid" in namespace_fds else holder
        finally:
            for fd in namespace_fds.values():
                os.close(fd)

    def _start_holder_directly(self, request: HolderRequest, executables: list[str],
                               stdout: int, stderr: int) -> int | None:
        """A holder with no Python in it: visiting the cell's cgroups, the spawner makes the
        cell's namespaces itself (unshare), fills them in as a holder's child steps would (no
        mount propagates to the host, the hostname, loopback up), fork_execs the init as pid 1
        of the new pid namespace in a session of its own, mounts the cell's /proc for that pid
        namespace (pidns=, as the init would see it), and goes back to its own namespaces and
        cgroups. Its pid, once the namespaces are complete. None: the kernel refused the
        spawner a step (then nothing of this holder is left, and holders are forked)."""
        kinds = request.unshare
        flags = 0
        for kind in kinds:
            flags |= NAMESPACE_FLAGS[kind]
        made: list[str] = []  # the kinds the spawner is in a new namespace of
        with self._visiting(request.cgroup_join), self._coming_back(made):
            try:
                unshare(flags)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise SpawnError.at("unshare", error.errno or 0, ",".join(kinds)) from None
                self._direct_holders = False  # threads, say: not ours to make here
                return None
            made.extend(kinds)
            stage, subject = "setup", ""
            try:
                if "mnt" in kinds:
                    stage, subject = "mount", "/ private"
                    mount("none", "/", None, MS_REC | MS_PRIVATE)
                if "uts" in kinds and request.hostname:
                    stage, subject = "sethostname", request.hostname
                    socket.sethostname(request.hostname)
                if "net" in kinds:
                    stage, subject = "loopback", "lo"
                    loopback_up()
            except OSError as error:
                raise SpawnError.at(stage, error.errno or 0, subject) from None
            try:
                pid = direct.start(executables, request.argv, request.env,
                                   (self._devnull, stdout, stderr), cwd="/", ids=None)
            except direct.StartFailed as failure:
                raise SpawnError.at(failure.stage, failure.errno, request.argv[0]) from None
            except OSError as error:
                raise SpawnError.at("fork", error.errno or 0) from None
            if "pid" in kinds and "mnt" in kinds:
                try:
                    # Our pid_for_children is the init's pid namespace; /proc still shows ours.
                    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                          "pidns=/proc/self/ns/pid_for_children")
                except OSError as error:
                    _end_at_once(pid)
                    if error.errno != errno.EINVAL:
                        raise SpawnError.at("mount", error.errno or 0, "/proc") from None
                    self._direct_holders = False  # a procfs without pidns=
                    return None
        return pid

    @contextmanager
    def _coming_back(self, kinds: list[str]) -> Iterator[None]:
        """Back in the spawner's own namespaces of `kinds` (as the list is when the block
        ends) afterwards: setns, for the pid namespace its pid_for_children. A failure to come
        back ends the spawner (the OSError is not a SpawnError): it must not go on from
        another's namespaces."""
        try:
            yield
        finally:
            for kind in reversed(_ENTRY_ORDER):  # the mount namespace first: host paths again
                if kind in kinds:
                    setns(self._own_namespaces[kind], NAMESPACE_FLAGS[kind])

    @contextmanager
    def _inside(self, namespace_fds: dict[str, int]) -> Iterator[None]:
        """In a cell's namespaces (namespace_fds) for a fork_exec, whose child is born in
        them (in the pid namespace: as our pid_for_children), then back in our own. The
        spawner is single-threaded: all of it moves, and nothing else of it runs meanwhile."""
        entered: list[str] = []
        with self._coming_back(entered):
            for kind in _ENTRY_ORDER:
                if kind in namespace_fds:
                    try:
                        setns(namespace_fds[kind], NAMESPACE_FLAGS[kind])
                    except OSError as error:
                        raise SpawnError.at("setns", error.errno or 0, kind) from None
                    entered.append(kind)
            yield

    def _launch_holder(self, request: HolderRequest, executables: list[str],
                       namespace_fds: dict[str, int], stdout: int, stderr: int, *,
                       direct: bool, use_spare: bool = False,
                       birth_cgroup: str | None = None) -> int | None:
        """One try at a holder: its pid, or None if it ended without a word (killed)."""
        kinds = request.unshare
        init_checked = "mnt" not in namespace_fds
        # SEQPACKET: a failure report, a pidfd and "ready" arrive as separate messages.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = -1
            if use_spare:
                pid = self._hand_to_spare(request, executables, (stdout, stderr, theirs.fileno()))
                if pid < 0:
                    return None
            else:
                with _open_birth_cgroup(birth_cgroup) as cgroup_fd:
                    pid, born_in_cgroup = self._fork(namespace_fds.get("pid"),
                                                     new_pid_namespace=direct, cgroup_fd=cgroup_fd)
                if pid == 0:
                    ours.close()
                    become_holder(request, executables, (self._devnull, stdout, stderr),
                                   namespace_fds, theirs.fileno(), self._max_fd, is_pid_one=direct,
                                   join_cgroups=not born_in_cgroup)
            theirs.close()
            holder, failure, pidfd = pid, None, None
            alive, ready, holder_known = False, False, direct or "pid" not in kinds
            while not (ready and holder_known):
                data, fds, _, _ = socket.recv_fds(ours, 4096, 1, socket.MSG_CMSG_CLOEXEC)
                if not data:
                    break
                if data == HOLDER_ALIVE:
                    alive = True
                elif fds:
                    # Pid 1 of the new pid namespace, forked by the first child: once that
                    # exits, the init of the namespace the first child was born in reaps it, not
                    # us (the kernel looks for a subreaper only inside that namespace).
                    holder, holder_known = _pid_of_pidfd(fds[0]), True
                    if pidfd is None:
                        pidfd = fds.pop(0)
                    for fd in fds:
                        os.close(fd)
                elif data == HOLDER_READY:
                    ready = True
                elif failure is None:
                    failure = _reported_failure(data)
        finally:
            ours.close()
            theirs.close()
        # End of file before the child's first word, or without "ready" where it is sent: the
        # child ended without reporting (killed).
        silent_end = failure is None and (not alive or (init_checked and not ready))
        if ("pid" in kinds and not direct) or failure is not None or silent_end:
            os.waitpid(pid, 0)  # the first child, or one that failed or ended before exec
        if failure is not None or silent_end:
            if pidfd is not None:
                os.close(pidfd)
            if failure is not None:
                raise failure
            return None
        if pidfd is not None:
            self._drop_fostering()
            self._fostering = pidfd
        return holder

    def _fork_workload(self, request: SpawnRequest, stdout: int, stderr: int) -> tuple[int, int]:
        """Start a workload; returns its pid, here and in its pid namespace (the same if it
        joined none)."""
        namespace_fds = self._open_namespaces(request)
        try:
            # A container's argv is looked up in its own root filesystem, after the pivot.
            executables = _executables(
                request.argv[0], request.env,
                in_our_filesystem="mnt" not in namespace_fds and not request.rootfs,
            )
            if ((not namespace_fds or self._direct_in_cells)
                    and self._starts_without_python(request)):
                # In a cell's namespaces, the spawner enters them around the fork_exec.
                with self._visiting(request.cgroup_join), self._inside(namespace_fds):
                    pid = self._start_directly(request, executables, stdout, stderr)
                return pid, _innermost_pid(pid) if "pid" in namespace_fds else pid
            started = self._with_birth_fallback(
                self._birth_cgroup(request), lambda cgroup: self._start_workload(
                    request, executables, namespace_fds, stdout, stderr, birth_cgroup=cgroup))
        finally:
            for fd in namespace_fds.values():
                os.close(fd)
        if started is None:
            raise SpawnError.at("fork", errno.ECHILD, "the child ended before it ran")
        return started

    def _starts_without_python(self, request: SpawnRequest) -> bool:
        """Whether every step of the workload's child is a fork_exec argument (see
        auraed.kernel.spawner.direct) once the spawner is in its namespaces (_inside): it has
        no root filesystem of its own, and its cgroups are the spawner's own, none, or ones the
        spawner can visit and come back from (see _visiting). A working directory other than "/" needs the
        spawner's ids too: fork_exec changes directory before it changes ids, the child steps
        after, so that a directory the workload's user may not enter is refused."""
        if not self._direct or request.rootfs or not self._can_visit(request):
            return False
        return self._same_ids(request) or request.cwd == "/"

    def _can_visit(self, request: SpawnRequest) -> bool:
        """Whether the spawner can visit the request's cgroups and come back (_visiting), and
        may: not where they limit memory (see SpawnSpec.memory_limited)."""
        if request.memory_limited:
            return False
        if request.cgroup_join and len(request.cgroup_join) != len(self._joined):
            return False
        # Only a birth (clone3) can put it there.
        return not (request.cgroup_birth and not request.cgroup_join)

    def _same_ids(self, request: SpawnRequest) -> bool:
        return request.uid == self._uid and request.gid == self._gid and not self._groups

    @contextmanager
    def _visiting(self, join_files: list[str]) -> Iterator[None]:
        """Move the spawner into the workload's cgroups (its cell's leaf, a host-level
        executable's scope) for a fork_exec, whose child is born where its parent is, then
        back to its own leaf. The workload never runs outside its cgroups, and no code of
        ours runs in it. Two joins per hierarchy cost far less than the Python fork they
        avoid; the spawner is single-threaded, so nothing else of it runs meanwhile (a v1
        `tasks` file would move just this thread; on v2, where threads cannot be split
        between cgroups, it is the whole process either way)."""
        if not join_files or join_files == self._joined:
            yield
            return
        try:
            try:
                for path in join_files:
                    write_file(path, b"0")
            except OSError as error:
                raise SpawnError.at("cgroup", error.errno or 0, str(error)) from None
            yield
        finally:
            for fd in self._home_fds:
                os.write(fd, b"0")

    def _start_directly(self, request: SpawnRequest, executables: list[str], stdout: int,
                        stderr: int) -> int:
        """fork_exec: the child is C code from fork to exec, and a vfork when the ids stay."""
        ids = None if self._same_ids(request) else (request.uid, request.gid)
        try:
            return direct.start(executables, request.argv, request.env,
                                (self._devnull, stdout, stderr), cwd=request.cwd, ids=ids)
        except direct.StartFailed as failure:
            subject = {"chdir": request.cwd, "exec": request.argv[0]}.get(
                failure.stage, f"uid {request.uid} gid {request.gid}")
            raise SpawnError.at(failure.stage, failure.errno, subject) from None
        except OSError as error:  # in the spawner itself: no pipe, no process left
            raise SpawnError.at("fork", error.errno or 0) from None

    def _birth_cgroup(self, request: SpawnRequest) -> str | None:
        """The cgroup2 directory the request's child is to be born in, if births are on."""
        return request.cgroup_birth or None if self._births_in_cgroup else None

    def _with_birth_fallback(self, birth_cgroup: str | None,
                             attempt: Callable[[str | None], _T | None]) -> _T | None:
        """attempt(birth_cgroup); if its child was killed at birth (None; see
        _births_in_cgroup), births go off and attempt(None) forks and joins by writing."""
        started = attempt(birth_cgroup)
        if started is None and birth_cgroup is not None:
            self._births_in_cgroup = False
            started = attempt(None)
        return started

    def _start_workload(self, request: SpawnRequest, executables: list[str],
                        namespace_fds: dict[str, int], stdout: int, stderr: int, *,
                        birth_cgroup: str | None) -> tuple[int, int] | None:
        """One try at a workload: its pid here and in its pid namespace, or None if the child
        ended before it ran a step (it was killed at birth)."""
        # The child reports here: first its pid as its pid namespace sees it ("<pid>\n"); then,
        # if a step fails, the failure. Exec closes it (CLOEXEC): end of file after the pid with
        # no failure means the workload is running.
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        try:
            with _open_birth_cgroup(birth_cgroup) as cgroup_fd:
                pid, born_in_cgroup = self._fork(namespace_fds.get("pid"), cgroup_fd=cgroup_fd)
            if pid == 0:
                become_workload(
                    request,
                    executables=executables,
                    stdio=(self._devnull, stdout, stderr),
                    namespace_fds=namespace_fds,
                    report_fd=report_w,
                    max_fd=self._max_fd,
                    join_cgroups=not born_in_cgroup,
                )
            os.close(report_w)
            report_w = -1
            report = direct.read_to_end(report_r)
        finally:
            for fd in (report_r, report_w):
                if fd >= 0:
                    os.close(fd)
        if not report:
            os.waitpid(pid, 0)
            return None
        ns_pid = pid
        if report[:1].isdigit():  # a failure report starts with "{"
            line, _, report = report.partition(b"\n")
            ns_pid = int(line)
        if report:
            os.waitpid(pid, 0)
            raise _reported_failure(report)
        return pid, ns_pid

    def _keep_a_spare(self) -> None:
        if self._spare is not None or not self.keeps_spare or self._direct_holders:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            pid, _ = self._fork(new_pid_namespace=True)
        except SpawnError:
            ours.close()
            theirs.close()
            self._spare_refused = True
            return  # no spare: holders are forked on demand, as they would be anyway
        if pid == 0:
            ours.close()
            self._wait_as_spare(theirs)
        theirs.close()
        self._spare = _Spare(pid, ours)

    def _wait_as_spare(self, sock: socket.socket) -> NoReturn:
        """In the spare: let go of the spawner's fds and signals, wait for a holder request,
        and become that holder (or exit if the spawner goes first)."""
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)
            # The daemon must see end of file on its socket when the spawner ends, spare or not,
            # and a later daemon must not connect to a listener only a spare holds.
            for inherited in (self._sock, self._listener):
                if inherited is not None:
                    inherited.close()
            for fd in (self._wake_r, self._wake_w, *self._home_fds):
                os.close(fd)
            self._poller.close()  # the spawner's: not to be touched here
            # Nor may it hold captured output's pipes and log files (deleted segments would
            # keep their space) while it waits, perhaps for hours.
            for read_fd, (_, capture) in self._captures.items():
                os.close(read_fd)
                if (segment := capture.log.fileno()) is not None:
                    os.close(segment)
            # What ps shows for it until it execs the holder's init.
            write_file("/proc/self/comm", SPARE_NAME.encode())
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE_BYTES, 3, socket.MSG_CMSG_CLOEXEC)
            if not data or len(fds) != 3:
                os._exit(0)
            request = decode(data)
            executables = json.loads(sock.recv(MAX_MESSAGE_BYTES))
            sock.close()
        except BaseException:  # noqa: BLE001 - nothing to report to: the spare just ends
            os._exit(127)
        assert isinstance(request, HolderRequest)
        stdout, stderr, report_fd = fds
        become_holder(request, executables, (self._devnull, stdout, stderr), {}, report_fd,
                       self._max_fd, is_pid_one=True, join_cgroups=True)

    def _hand_to_spare(self, request: HolderRequest, executables: list[str],
                       fds: tuple[int, int, int]) -> int:
        """Pass a holder request to the spare, which becomes the holder: its pid, or -1 if the
        spare died meanwhile (_reap collects it; the caller forks instead)."""
        spare, self._spare = self._spare, None
        assert spare is not None
        try:
            # Two messages: the request as the daemon sent it, then where its init was found.
            socket.send_fds(spare.sock, [request.encode()], list(fds), socket.MSG_NOSIGNAL)
            spare.sock.send(json.dumps(executables).encode(), socket.MSG_NOSIGNAL)
        except OSError:
            return -1
        finally:
            spare.sock.close()
        return spare.pid

    def _fork(self, pid_namespace: int | None = None, *, new_pid_namespace: bool = False,
              cgroup_fd: int | None = None) -> tuple[int, bool]:
        """Fork a child born in `pid_namespace`, or as pid 1 of a new pid
        namespace; the spawner itself stays in its own either way. With
        `cgroup_fd` (a cgroup2 directory) the child is born in that cgroup
        when the kernel can do it; the second value says whether it was."""
        switched = new_pid_namespace or pid_namespace is not None
        try:
            if new_pid_namespace:
                unshare(CLONE_NEWPID)
            elif pid_namespace is not None:
                setns(pid_namespace, CLONE_NEWPID)
        except OSError as error:
            stage = "unshare" if new_pid_namespace else "setns"
            raise SpawnError.at(stage, error.errno or 0, "pid") from None
        pid, born_in_cgroup = -1, False
        try:
            if cgroup_fd is not None:
                try:
                    pid, born_in_cgroup = fork_into_cgroup(cgroup_fd), True
                except OSError:
                    pass  # an older kernel, say: fork, and the child joins by writing
            if pid < 0:
                pid = os.fork()
        except OSError as error:
            raise SpawnError.at("fork", error.errno or 0) from None
        finally:
            # Back to our own, so that later workloads without a pid namespace are born in ours
            # (if even that fails, the spawner must not go on: the error ends it). Not in the
            # child: its own children belong in the workload's namespace.
            if pid != 0 and switched:
                setns(self._own_pid_ns, CLONE_NEWPID)
        return pid, born_in_cgroup

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self._spare is not None and pid == self._spare.pid:
                self._spare.sock.close()
                self._spare = None
            # Orphaned descendants come to us too (subreaper); they are only reaped.
            entry = self._processes.pop(pid, None)
            if entry is not None:
                self._report_end(entry, status)

    def _report_end(self, entry: _Entry, status: int) -> None:
        """An ended process, no longer in _processes: its last output, then its exit."""
        self._drain(entry)
        entry.status, entry.exited_at = status, time.time()
        if entry.label is not None:
            self._ended[entry.pid, entry.start_time] = entry
        self._send(Exited(pid=entry.pid, status=status, start_time=entry.start_time))

    def _kill_everything(self) -> None:
        # A fostered holder's pid may be another's by now (its reaper reaped it): by pidfd.
        fostered = {entry.pid for entry in self._fostered.values()}
        for pidfd in self._fostered:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self._processes:
            if pid in fostered:
                continue
            # The group reaches the workload's children; the pid, a workload that left its group.
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # Anything else still ours (including orphans adopted meanwhile) goes too.
        while True:
            for pid in _children():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return


def _end_at_once(pid: int) -> None:
    """SIGKILL a child of ours that is not known yet as started, and reap it."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _pid_of_pidfd(pidfd: int) -> int:
    """The pid a pidfd refers to, in our own pid namespace."""
    for line in _read_small_file(f"/proc/self/fdinfo/{pidfd}").splitlines():
        if line.startswith(b"Pid:"):
            return int(line.split()[1])
    raise SpawnError.at("holder", errno.ESRCH, "pidfd without a pid")


def _reported_failure(report: bytes) -> SpawnError:
    """The SpawnError a child reported (as a Failed message) before it exited."""
    failed = decode(report)
    if not isinstance(failed, Failed):
        return SpawnError.malformed(f"unexpected report from a child: {report[:80]!r}")
    return failed.error()


def _leave_no_signal_ignored_or_blocked() -> None:
    """Exec resets caught signals to their default but keeps ignored ones and the mask. With none
    ignored or blocked here, a workload starts with all defaults and its child has nothing to undo.
    (Python ignores SIGPIPE and SIGXFSZ; a daemon thread may have blocked signals.)"""
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    for signum in signal.valid_signals():
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
    unignore_reserved_signals()


def _executables(command: str, env: dict[str, str], in_our_filesystem: bool) -> list[str]:
    """The paths to try for command, like execvp does with the workload's PATH (empty entries, the
    working directory, are skipped). Looked up here when the workload sees our filesystem: a stat
    is cheap, a failed execve after fork is not."""
    if "/" in command:
        return [command]
    directories = env.get("PATH", os.defpath).split(os.pathsep)
    candidates = [os.path.join(directory, command) for directory in directories if directory]
    if in_our_filesystem:
        return [candidate for candidate in candidates if os.path.isfile(candidate)]
    return candidates


@contextmanager
def _open_birth_cgroup(path: str | None) -> Iterator[int | None]:
    """The cgroup2 directory to be born in, open for the fork (None for none)."""
    if path is None:
        yield None
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise SpawnError.at("cgroup", error.errno or 0, path) from None
    try:
        yield fd
    finally:
        os.close(fd)


def _bytes_in_pipe(fd: int) -> int:
    """How many bytes a pipe holds, unread (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]  # type: ignore[no-any-return]


def _read_small_file(path: str) -> bytes:
    """A /proc file of a few KiB, with plain reads (a file object costs four more syscalls)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return direct.read_to_end(fd)
    finally:
        os.close(fd)


def _innermost_pid(pid: int) -> int:
    """The pid of a process as seen inside its own pid namespace."""
    for line in _read_small_file(f"/proc/{pid}/status").splitlines():
        if line.startswith(b"NSpid:"):
            return int(line.split()[-1])
    return pid


def _start_time(pid: int) -> int:
    """Clock ticks from boot to the start of the process: with the pid, names it uniquely."""
    stat = _read_small_file(f"/proc/{pid}/stat")
    # Fields after the command name, which may itself hold spaces and parentheses; starttime is
    # field 22 of proc(5), the 20th after the name.
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def _children() -> list[int]:
    pid = os.getpid()
    with open(f"/proc/{pid}/task/{pid}/children", "rb") as children:
        return [int(child) for child in children.read().split()]


def _wake(signum: int, frame: FrameType | None) -> None:
    """Nothing to do: set_wakeup_fd already woke the loop, which does the work."""


def _hung_up(sock: socket.socket) -> bool:
    probe = select.poll()
    probe.register(sock, select.POLLIN)
    return any(events & select.POLLHUP for _, events in probe.poll(0))


def _open_captures(capture: Capture) -> tuple[list[_Capture], tuple[int, int]]:
    """Pipes and logs for stdout and stderr; the write ends for the workload."""
    captures: list[_Capture] = []
    write_ends: list[int] = []
    try:
        for channel in ("stdout", "stderr"):
            read_fd, write_fd = output_pipe()
            write_ends.append(write_fd)
            os.set_blocking(read_fd, False)
            continues = (capture.continues or {}).get(channel)
            captures.append(_Capture(channel, read_fd, OutputLog(
                capture.directory, channel, segment_bytes=capture.segment_bytes,
                max_segments=capture.max_segments, fresh=True,
                continues=None if continues is None else (int(continues[0]),
                                                          int(continues[1])))))
    except (OSError, ValueError, TypeError, IndexError) as error:
        for fd in write_ends:
            os.close(fd)
        _close_captures(captures)
        if not isinstance(error, OSError):
            raise SpawnError.malformed(f"capture {error!r}") from None
        raise SpawnError.at("capture", error.errno or 0, capture.directory) from None
    return captures, (write_ends[0], write_ends[1])


def _close_captures(captures: list[_Capture]) -> None:
    for capture in captures:
        os.close(capture.fd)
        capture.log.finish()


def main(argv: list[str]) -> int:
    # Parsed by hand: argparse would add to the memory that every fork copies.
    #   --socket-fd N [--listen PATH] [--join FILE]... [--spare no] [--direct no]
    usage = ("usage: python -m auraed.kernel.spawner --socket-fd N [--listen PATH] [--join FILE]..."
             " [--spare no] [--direct no]")
    options: dict[str, list[str]] = {"--socket-fd": [], "--listen": [], "--join": [],
                                     "--spare": [], "--direct": []}
    pairs = iter(argv)
    for option in pairs:
        value = next(pairs, None)
        if option not in options or value is None:
            print(usage, file=sys.stderr)
            return 2
        options[option].append(value)
    if len(options["--socket-fd"]) != 1 or not options["--socket-fd"][0].isdigit() or len(
            options["--listen"]) > 1 or not set(options["--spare"] + options["--direct"]) <= {
                "yes", "no"}:
        print(usage, file=sys.stderr)
        return 2
    # Hold no directory of the daemon's busy (a mount it may want to unmount).
    os.chdir("/")
    # Into the daemon's cgroups (its host leaf): a daemon that finds no spawner to adopt
    # cleans its subtree, and so ends a spawner that outlived a lost runtime directory too.
    for path in options["--join"]:
        write_file(path, b"0")
    listener = None
    for path in options["--listen"]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        previous = os.umask(0o177)  # only root may connect
        try:
            listener.bind(path)
        finally:
            os.umask(previous)
        listener.listen(4)
    first = int(options["--socket-fd"][0])
    os.set_inheritable(first, False)  # passed to us, it was inheritable; no workload may get it
    server = ForkServer(socket.socket(fileno=first), listener, options["--join"])
    server.keeps_spare = options["--spare"][-1:] != ["no"]
    if options["--direct"][-1:] == ["no"]:
        server.start_children_in_python()
    server.serve()
    return 0
