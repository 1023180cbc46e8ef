"""The daemon side of the spawner: `Spawner` runs the fork server and starts workloads through it.

Everything here is safe to call from many threads. The messages are auraed.kernel.spawner.protocol's.
"""

import itertools
import logging
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from auraed.kernel.processes import ExitStatus, HolderSpec, SpawnedProcess, SpawnSpec, default_env
from auraed.kernel.spawner.protocol import (
    MAX_MESSAGE_BYTES,
    Exited,
    Failed,
    HolderRequest,
    Message,
    ProtocolMismatch,
    Ready,
    Spawned,
    SpawnError,
    SpawnRequest,
    check_version,
    decode,
)

__all__ = ["ExitCallback", "SpawnError", "Spawner", "SpawnerClosed"]

_log = logging.getLogger(__name__)

# <asm-generic/socket.h>; Python's socket module does not name it.
SO_SNDBUFFORCE = 32

# The directory holding the auraed package, for the spawner's import path.
_SOURCE_ROOT = str(Path(__file__).resolve().parents[3])


class SpawnerClosed(Exception):
    """The spawner is not running: never started, closed, or it died."""




ExitCallback = Callable[[int, ExitStatus], None]


class _PendingReply:
    def __init__(self) -> None:
        self._done = threading.Event()
        self._reply: Spawned | Failed | None = None

    def resolve(self, reply: Spawned | Failed | None) -> None:
        """reply None: the spawner went away before answering."""
        self._reply = reply
        self._done.set()

    def wait(self, timeout: float) -> Spawned | Failed | None:
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
        _room_for_the_largest_request(ours)
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
        data = sock.recv(MAX_MESSAGE_BYTES) if readable else b""
        try:
            ready = decode(data) if data else None
        except SpawnError:
            ready = None
        if not isinstance(ready, Ready):
            raise SpawnerClosed("the spawner did not start")
        try:
            check_version(ready.version, f"the spawner (pid {ready.pid})")
        except ProtocolMismatch as mismatch:
            raise SpawnerClosed(str(mismatch)) from None

    def spawn(self, spec: SpawnSpec) -> SpawnedProcess:
        """Start a workload; returns once it runs its argv (it was exec'd)."""
        return self._request(
            SpawnRequest(
                id=next(self._request_ids),
                argv=spec.argv,
                uid=spec.uid,
                gid=spec.gid,
                env=dict(spec.env),
                cwd=spec.cwd,
                cgroup_join=list(spec.cgroup_join),
                cgroup_birth=spec.cgroup_birth,
                namespaces=spec.namespaces.paths() if spec.namespaces else {},
                rootfs=dict(spec.rootfs) if spec.rootfs else None,
            ),
            (spec.stdout_fd, spec.stderr_fd),
        )

    def spawn_holder(self, spec: HolderSpec) -> SpawnedProcess:
        """Start a namespace holder; returns once its init runs in the new namespaces."""
        return self._request(
            HolderRequest(
                id=next(self._request_ids),
                argv=list(spec.argv),
                uid=0,
                gid=0,
                env=default_env(),
                cgroup_join=list(spec.cgroup_join),
                cgroup_birth=spec.cgroup_birth,
                namespaces=spec.namespaces.paths() if spec.namespaces else {},
                unshare=sorted(spec.unshare),
                hostname=spec.hostname,
            ),
            (spec.stdout_fd, spec.stderr_fd),
        )

    def _request(self, request: SpawnRequest, fds: tuple[int, int]) -> SpawnedProcess:
        request_id = request.id
        message = request.encode()
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
        if isinstance(reply, Failed):
            raise reply.error()
        return SpawnedProcess(
            host_pid=reply.pid,
            ns_pid=reply.ns_pid,
            pgid=reply.pid,
            start_time=reply.start_time,
        )

    def _read_messages(self, sock: socket.socket) -> None:
        # One buffer for every message: a fresh 256 KiB per recv costs an mmap and a munmap.
        buffer = bytearray(MAX_MESSAGE_BYTES)
        try:
            while size := sock.recv_into(buffer):
                self._dispatch(decode(buffer[:size]))
        except (OSError, SpawnError):
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

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, Exited):
            try:
                self._on_exit(message.pid, ExitStatus.from_wait_status(message.status))
            except Exception:  # noqa: BLE001 - a faulty callback must not stop replies and exits
                _log.exception("on_exit failed for pid %s", message.pid)
            return
        if not isinstance(message, (Spawned, Failed)) or message.id is None:
            _log.error("unexpected message from the spawner: %r", message)
            return
        with self._lock:
            pending = self._pending.get(message.id)
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


def _room_for_the_largest_request(sock: socket.socket) -> None:
    # A SEQPACKET message must fit the sender's buffer whole; the default (wmem_default,
    # ~208 KiB) is less than the largest spawn request. Forced: root may exceed wmem_max.
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 2 * MAX_MESSAGE_BYTES)
    except PermissionError:  # without CAP_NET_ADMIN: as much as wmem_max allows
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * MAX_MESSAGE_BYTES)
