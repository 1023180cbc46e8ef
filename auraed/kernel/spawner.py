"""The fork server: a small single-threaded process that is the parent of every workload.

The daemon runs many gRPC threads, and running Python between fork and exec in a threaded process
is unsafe. This process runs nothing but its request loop, so its forked children can safely place
themselves in cgroups and namespaces, drop privileges and close stray fds before exec. It also owns
every wait: it is a child subreaper, reaps all children and reports the exits of the workloads it
started. Standard library only, so that it starts fast.

The daemon runs it as `python -m auraed.kernel.spawner --socket-fd N`. Wire protocol: one JSON
object per message on the inherited AF_UNIX SOCK_SEQPACKET socket.

  daemon -> spawner  {"op": "spawn", "id", "argv", "uid", "gid", "cgroup_join", "env", "cwd",
                      "namespaces": {kind: "/proc/<pid>/ns/<kind>"} | null}
                     {"op": "holder", ... the same, plus "unshare": [kind, ...], "hostname"}
                     with SCM_RIGHTS [stdout fd, stderr fd]
  spawner -> daemon  {"event": "ready", "pid"}                       once, at start
                     {"id", "pid", "ns_pid", "start_time"}           spawned, running its argv
                     {"id", "error": {"stage", "errno", "message"}}  nothing left running
                     {"event": "exit", "pid", "status"}              a spawned workload ended;
                                                                     status is the raw wait status

A holder is the process that owns a cell's namespaces: it joins the given
namespaces, unshares the kinds in "unshare" and runs argv (a pause-and-reap
init such as `catatonit -P`) as pid 1 of the new pid namespace, with a fresh
/proc, the hostname, and loopback up in a new network namespace. Its reply
comes once the namespaces are complete, just before that exec when the init
was found beforehand (a later exec failure shows as the holder's exit).

The spawner keeps a spare: a child forked ahead of time as pid 1 of a fresh pid
namespace, which the next holder request with a new pid namespace of ours is
handed to, so that Allocate does not wait for a fork. A used spare is replaced
once the spawner has been idle a few milliseconds.

A spawn reply always precedes the exit event of its pid. End of file on the socket (or SIGTERM)
means the daemon is gone: every workload is killed and reaped, then the spawner exits.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn, TypeVar

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
    set_child_subreaper,
    setns,
    unignore_reserved_signals,
    unshare,
)
from auraed.kernel.rootfs import enter_rootfs

# Room for the longest command exec takes (MAX_ARG_STRLEN, 128 KiB) even when JSON spells each
# of its bytes as a six-byte \u escape (control characters), with its environment.
MAX_MESSAGE_BYTES = 1024 * 1024
_T = TypeVar("_T")
_FD_SIZE = struct.calcsize("i")
# The name (/proc/<pid>/comm) of the spare: a child forked ahead of time, pid 1 of a fresh pid
# namespace, that becomes the next top-level cell's holder.
SPARE_NAME = "aurae-spare"
SPARE_IDLE_MS = 5
# What a holder's pid 1 reports once its namespaces are ready, just before it execs its init.
_HOLDER_READY = b"ready"
# What a holder's child says first, before any step: it runs.
_HOLDER_ALIVE = b"alive"

# The order a child joins namespaces in. The mount namespace comes last so that nothing resolved
# by path before it is looked up in the workload's filesystem. The pid namespace is not here: a
# process cannot change its own, so the spawner enters it before fork and the child is born in it.
_CHILD_NAMESPACES = ("net", "ipc", "uts", "mnt")


class SpawnFailed(Exception):
    """A spawn that left nothing running; stage names the step that failed."""

    def __init__(self, stage: str, errno_code: int, detail: str = "") -> None:
        super().__init__(stage, errno_code, detail)
        self.stage = stage
        self.errno = errno_code
        self.detail = detail

    def as_wire(self) -> dict[str, Any]:
        message = os.strerror(self.errno) if self.errno else "failed"
        if self.detail:
            message = f"{self.detail}: {message}"
        return {"stage": self.stage, "errno": self.errno, "message": message}


class _Spare:
    """A prepared holder: its pid and the socket its request goes down."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock


class DaemonGone(Exception):
    """The daemon closed its end of the socket."""


class ForkServer:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        # Started workloads not yet reaped. Each leads its own process group (setsid).
        self._workloads: set[int] = set()
        # Opened here, not in the child: after joining a mount namespace /dev/null may not exist.
        self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self._max_fd = os.sysconf("SC_OPEN_MAX")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._buffer = bytearray(MAX_MESSAGE_BYTES)
        # A child forked ahead of time as pid 1 of a fresh pid namespace, waiting to become the
        # next top-level cell's holder: Allocate then does not wait for a fork.
        self._spare: _Spare | None = None
        # Set when making a spare failed (no right to make pid namespaces, say): then none is
        # tried again until a holder request comes, instead of every few milliseconds.
        self._spare_refused = False
        # Cleared if a child born in its cgroup (clone3) was killed at birth: some kernels kill
        # such a child when its cgroup once had a cgroup.kill. From then on children join by
        # writing, as on v1.
        self._births_in_cgroup = True

    def serve(self) -> None:
        """Answer requests and report exits until the daemon goes away, then kill everything."""
        set_child_subreaper()
        _leave_no_signal_ignored_or_blocked()
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, _wake)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            self._keep_a_spare()  # before "ready": from then on the spawner is as it stays
            self._send({"event": "ready", "pid": os.getpid()})
            while True:
                # A used spare is replaced once the spawner has been idle a moment, so that the
                # fork and the new child's start delay no request (typically the Start that
                # follows an Allocate).
                wanted = self._spare is None and not self._spare_refused
                events = poller.poll(SPARE_IDLE_MS if wanted else None)
                if not events:
                    self._keep_a_spare()
                for fd, _ in events:
                    if fd == self._wake_r:
                        if signal.SIGTERM in self._drain_wakeups():
                            return
                        self._reap()
                    else:
                        self._handle_message()
        except DaemonGone:
            return
        finally:
            self._kill_everything()

    def _send(self, message: dict[str, Any]) -> None:
        try:
            # No SIGPIPE: it is not ignored here (see _leave_no_signal_ignored_or_blocked).
            self._sock.send(json.dumps(message).encode(), socket.MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError):
            raise DaemonGone from None

    def _drain_wakeups(self) -> bytes:
        signals = b""
        try:
            while chunk := os.read(self._wake_r, 512):
                signals += chunk
        except BlockingIOError:
            pass
        return signals

    def _handle_message(self) -> None:
        data, fds, flags = self._receive()
        try:
            if not data:
                raise DaemonGone
            try:
                request = json.loads(data)
            except ValueError:
                request = None
            if not isinstance(request, dict):
                request = {}  # answered as malformed
            self._send(self._answer(request, fds, truncated=bool(flags & socket.MSG_TRUNC)))
        finally:
            for fd in fds:
                os.close(fd)

    def _receive(self) -> tuple[bytes, list[int], int]:
        """One request, the fds passed with it (at most two), and the message flags; like
        socket.recv_fds, into one buffer kept for every message."""
        size, ancillary, flags, _ = self._sock.recvmsg_into(
            [self._buffer], socket.CMSG_SPACE(2 * _FD_SIZE), socket.MSG_CMSG_CLOEXEC
        )
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _FD_SIZE
                fds.extend(struct.unpack(f"{usable // _FD_SIZE}i", payload[:usable]))
        return bytes(self._buffer[:size]), fds, flags

    def _answer(self, request: dict[str, Any], fds: list[int], truncated: bool) -> dict[str, Any]:
        request_id = request.get("id")
        try:
            if truncated or request.get("op") not in ("spawn", "holder") or len(fds) != 2:
                raise SpawnFailed("request", errno.EINVAL, "malformed request")
            if request["op"] == "holder":
                pid, ns_pid = self._fork_holder(request, stdout=fds[0], stderr=fds[1])
            else:
                pid, ns_pid = self._fork_workload(request, stdout=fds[0], stderr=fds[1])
        except SpawnFailed as failure:
            return {"id": request_id, "error": failure.as_wire()}
        except (LookupError, TypeError, ValueError) as bad:
            return {
                "id": request_id,
                "error": SpawnFailed("request", errno.EINVAL, repr(bad)).as_wire(),
            }
        self._workloads.add(pid)
        return {"id": request_id, "pid": pid, "ns_pid": ns_pid, "start_time": _start_time(pid)}

    def _open_namespaces(self, request: dict[str, Any]) -> dict[str, int]:
        namespace_fds: dict[str, int] = {}
        try:
            for kind, path in (request["namespaces"] or {}).items():
                if kind not in NAMESPACE_FLAGS:
                    raise SpawnFailed("namespace", errno.EINVAL, f"unknown namespace {kind!r}")
                try:
                    namespace_fds[kind] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as error:
                    raise SpawnFailed("namespace", error.errno or 0, path) from None
        except SpawnFailed:
            for fd in namespace_fds.values():
                os.close(fd)
            raise
        return namespace_fds

    def _fork_holder(self, request: dict[str, Any], stdout: int, stderr: int) -> tuple[int, int]:
        """Start a namespace holder; returns its pid, here and in its own pid namespace.

        With a new pid namespace the first child unshares and forks pid 1, hands
        us a pidfd for it (its pid as the first child sees it may be a nested
        namespace's) and exits; pid 1, orphaned, comes to us as subreaper.
        """
        kinds = request["unshare"]
        if not kinds or any(kind not in NAMESPACE_FLAGS for kind in kinds):
            raise SpawnFailed("request", errno.EINVAL, f"bad namespace kinds {kinds!r}")
        self._spare_refused = False  # worth another try once this one is answered
        namespace_fds = self._open_namespaces(request)
        try:
            executables = _executables(
                request["argv"][0], request["env"], in_our_filesystem="mnt" not in namespace_fds
            )
            init_checked = "mnt" not in namespace_fds
            if init_checked and not any(os.access(e, os.X_OK) for e in executables):
                # Refused here: the holder answers before its exec (see _hold_namespaces).
                missing = not executables
                raise SpawnFailed("exec", errno.ENOENT if missing else errno.EACCES,
                                  request["argv"][0])
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
                raise SpawnFailed("holder", errno.ESRCH, "ended before its namespaces were ready")
            if "pid" in kinds:
                return holder, 1  # the init of its new pid namespace
            return holder, _innermost_pid(holder) if "pid" in namespace_fds else holder
        finally:
            for fd in namespace_fds.values():
                os.close(fd)

    def _launch_holder(self, request: dict[str, Any], executables: list[str],
                       namespace_fds: dict[str, int], stdout: int, stderr: int, *,
                       direct: bool, use_spare: bool = False,
                       birth_cgroup: str | None = None) -> int | None:
        """One try at a holder: its pid, or None if it ended without a word (killed)."""
        kinds = request["unshare"]
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
                    _become_holder(request, executables, (self._devnull, stdout, stderr),
                                   namespace_fds, theirs.fileno(), self._max_fd, is_pid_one=direct,
                                   join_cgroups=not born_in_cgroup)
            theirs.close()
            holder, failure = pid, None
            alive, ready, holder_known = False, False, direct or "pid" not in kinds
            while not (ready and holder_known):
                data, fds, _, _ = socket.recv_fds(ours, 4096, 1, socket.MSG_CMSG_CLOEXEC)
                if not data:
                    break
                if data == _HOLDER_ALIVE:
                    alive = True
                elif fds:
                    holder, holder_known = _pid_of_pidfd(fds[0]), True
                    for fd in fds:
                        os.close(fd)
                elif data == _HOLDER_READY:
                    ready = True
                elif failure is None:
                    failure = json.loads(data)
        finally:
            ours.close()
            theirs.close()
        # End of file before the child's first word, or without "ready" where it is sent: the
        # child ended without reporting (killed).
        silent_end = failure is None and (not alive or (init_checked and not ready))
        if ("pid" in kinds and not direct) or failure is not None or silent_end:
            os.waitpid(pid, 0)  # the first child, or one that failed or ended before exec
        if failure is not None:
            raise SpawnFailed(failure["stage"], failure["errno"], failure["detail"])
        return None if silent_end else holder

    def _fork_workload(self, request: dict[str, Any], stdout: int, stderr: int) -> tuple[int, int]:
        """Start a workload; returns its pid, here and in its pid namespace (the same if it
        joined none)."""
        namespace_fds = self._open_namespaces(request)
        try:
            # A container's argv is looked up in its own root filesystem, after the pivot.
            executables = _executables(
                request["argv"][0], request["env"],
                in_our_filesystem="mnt" not in namespace_fds and not request.get("rootfs"),
            )
            started = self._with_birth_fallback(
                self._birth_cgroup(request), lambda cgroup: self._start_workload(
                    request, executables, namespace_fds, stdout, stderr, birth_cgroup=cgroup))
        finally:
            for fd in namespace_fds.values():
                os.close(fd)
        if started is None:
            raise SpawnFailed("fork", errno.ECHILD, "the child ended before it ran")
        return started

    def _birth_cgroup(self, request: dict[str, Any]) -> str | None:
        """The cgroup2 directory the request's child is to be born in, if births are on."""
        return request.get("cgroup_birth") or None if self._births_in_cgroup else None

    def _with_birth_fallback(self, birth_cgroup: str | None,
                             attempt: Callable[[str | None], _T | None]) -> _T | None:
        """attempt(birth_cgroup); if its child was killed at birth (None; see
        _births_in_cgroup), births go off and attempt(None) forks and joins by writing."""
        started = attempt(birth_cgroup)
        if started is None and birth_cgroup is not None:
            self._births_in_cgroup = False
            started = attempt(None)
        return started

    def _start_workload(self, request: dict[str, Any], executables: list[str],
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
                _become_workload(
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
            report = _read_to_end(report_r)
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
            failure = json.loads(report)
            raise SpawnFailed(failure["stage"], failure["errno"], failure["detail"])
        return pid, ns_pid

    def _keep_a_spare(self) -> None:
        if self._spare is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            pid, _ = self._fork(new_pid_namespace=True)
        except SpawnFailed:
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
            # The daemon must see end of file on its socket when the spawner ends, spare or not.
            self._sock.close()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            # What ps shows for it until it execs the holder's init.
            _write_file("/proc/self/comm", SPARE_NAME.encode())
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE_BYTES, 3, socket.MSG_CMSG_CLOEXEC)
        except BaseException:  # noqa: BLE001 - nothing to report to: the spare just ends
            os._exit(127)
        if not data or len(fds) != 3:
            os._exit(0)
        sock.close()
        request, executables = json.loads(data)
        stdout, stderr, report_fd = fds
        _become_holder(request, executables, (self._devnull, stdout, stderr), {}, report_fd,
                       self._max_fd, is_pid_one=True, join_cgroups=True)

    def _hand_to_spare(self, request: dict[str, Any], executables: list[str],
                       fds: tuple[int, int, int]) -> int:
        """Pass a holder request to the spare, which becomes the holder: its pid, or -1 if the
        spare died meanwhile (_reap collects it; the caller forks instead)."""
        spare, self._spare = self._spare, None
        assert spare is not None
        try:
            message = json.dumps([request, executables]).encode()
            socket.send_fds(spare.sock, [message], list(fds), socket.MSG_NOSIGNAL)
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
            raise SpawnFailed(stage, error.errno or 0, "pid") from None
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
            raise SpawnFailed("fork", error.errno or 0) from None
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
            if pid in self._workloads:
                self._workloads.discard(pid)
                self._send({"event": "exit", "pid": pid, "status": status})

    def _kill_everything(self) -> None:
        for pid in self._workloads:
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


class _Step:
    """The step a forked child is on, so that a failure is reported as that step."""

    def __init__(self) -> None:
        self.stage = "setup"
        self.detail = ""

    def at(self, stage: str, detail: str = "") -> None:
        self.stage, self.detail = stage, detail


def _run_in_child(report_fd: int, steps: Callable[[_Step], None]) -> NoReturn:
    """Run a forked child's steps; any failure is written to report_fd as
    {stage, errno, detail}, then the child exits 127. Never returns: the last
    step of a successful child is exec."""
    step = _Step()
    try:
        signal.set_wakeup_fd(-1)
        steps(step)
    except OSError as error:
        _report_failure(report_fd, step.stage, error.errno or 0, step.detail)
    except BaseException as error:  # noqa: BLE001 - the child must report, then _exit, whatever it was
        _report_failure(report_fd, step.stage, 0, f"{step.detail} {error!r}".strip())
    finally:
        os._exit(127)


def _join_cell(step: _Step, request: dict[str, Any], namespace_fds: dict[str, int],
               join_cgroups: bool) -> None:
    # Cgroups first, while the cgroup paths are still the host's (before any
    # mount namespace is joined); not at all for a child born in its cgroup.
    for path in request["cgroup_join"] if join_cgroups else ():
        step.at("cgroup", path)
        _write_file(path, b"0")
    for kind in _CHILD_NAMESPACES:
        if kind in namespace_fds:
            step.at("setns", kind)
            setns(namespace_fds[kind], NAMESPACE_FLAGS[kind])


def _exec_with_stdio(
    step: _Step,
    request: dict[str, Any],
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
    step.at("exec", request["argv"][0])
    _exec(executables, request["argv"], request["env"])


def _become_workload(
    request: dict[str, Any],
    executables: list[str],
    stdio: tuple[int, int, int],
    namespace_fds: dict[str, int],
    report_fd: int,
    max_fd: int,
    join_cgroups: bool,
) -> NoReturn:
    """In the forked child: set up the workload's process and exec it. Never returns.

    Every Python object touched here costs a copied page, so the work is prepared in the parent.
    Signals need no work: the spawner has none ignored or blocked, and exec resets caught ones.
    """

    def steps(step: _Step) -> None:
        # First sign of life; born in its pid namespace, so getpid() is the pid the cell sees.
        os.write(report_fd, b"%d\n" % os.getpid())
        _join_cell(step, request, namespace_fds, join_cgroups)
        if request.get("rootfs"):
            enter_rootfs(request["rootfs"], step.at)
        step.at("setsid")
        os.setsid()
        os.umask(0o022)
        step.at("setgroups")
        os.setgroups([])
        step.at("setgid")
        os.setgid(request["gid"])
        step.at("setuid")
        os.setuid(request["uid"])
        step.at("chdir", request["cwd"])
        os.chdir(request["cwd"])
        _exec_with_stdio(step, request, executables, stdio, report_fd, max_fd)

    _run_in_child(report_fd, steps)


def _become_holder(
    request: dict[str, Any],
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
    kinds = request["unshare"]

    def steps(step: _Step) -> None:
        os.write(report_fd, _HOLDER_ALIVE)
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
    request: dict[str, Any],
    executables: list[str],
    stdio: tuple[int, int, int],
    report_fd: int,
    max_fd: int,
    init_checked: bool,
) -> NoReturn:
    """Inside the new namespaces: fill them in, then exec the holder's init.

    `init_checked`: the init was found in the filesystem it will be exec'd from.
    """
    kinds = request["unshare"]

    def steps(step: _Step) -> None:
        if "pid" in kinds and "mnt" in kinds:
            step.at("mount", "/proc")
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        if "uts" in kinds and request.get("hostname"):
            step.at("sethostname", request["hostname"])
            socket.sethostname(request["hostname"])
        if "net" in kinds:
            step.at("loopback", "lo")
            _loopback_up()
        step.at("setsid")
        os.setsid()
        if init_checked:
            # The namespaces are complete: the daemon may answer now rather than after the
            # exec. An exec failing after this (the init was found when the request came) ends
            # the holder, and the daemon learns of it as of any holder that dies.
            os.write(report_fd, _HOLDER_READY)
        _exec_with_stdio(step, request, executables, stdio, report_fd, max_fd)

    _run_in_child(report_fd, steps)


_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def _loopback_up() -> None:
    """Bring lo up; the kernel then gives it 127.0.0.1 and ::1 by itself."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))


def _pid_of_pidfd(pidfd: int) -> int:
    """The pid a pidfd refers to, in our own pid namespace."""
    for line in _read_small_file(f"/proc/self/fdinfo/{pidfd}").splitlines():
        if line.startswith(b"Pid:"):
            return int(line.split()[1])
    raise SpawnFailed("holder", errno.ESRCH, "pidfd without a pid")


def _report_failure(report_fd: int, stage: str, errno_code: int, detail: str) -> None:
    report = {"stage": stage, "errno": errno_code, "detail": detail}
    os.write(report_fd, json.dumps(report).encode())


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


@contextmanager
def _open_birth_cgroup(path: str | None) -> Iterator[int | None]:
    """The cgroup2 directory to be born in, open for the fork (None for none)."""
    if path is None:
        yield None
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise SpawnFailed("cgroup", error.errno or 0, path) from None
    try:
        yield fd
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read_to_end(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    return data


def _read_small_file(path: str) -> bytes:
    """A /proc file of a few KiB, with plain reads (a file object costs four more syscalls)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _read_to_end(fd)
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


def main(argv: list[str]) -> int:
    # Parsed by hand: argparse would add to the memory that every fork copies.
    if len(argv) != 2 or argv[0] != "--socket-fd" or not argv[1].isdigit():
        print("usage: python -m auraed.kernel.spawner --socket-fd N", file=sys.stderr)
        return 2
    # Hold no directory of the daemon's busy (a mount it may want to unmount).
    os.chdir("/")
    ForkServer(socket.socket(fileno=int(argv[1]))).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
