"""The daemon side of the spawner: `Spawner` runs the fork server and starts workloads through it.

Everything here is safe to call from many threads. The messages are auraed.kernel.spawner.protocol's.

Started with `listen` (a socket path in the runtime directory), the fork server outlives this
daemon: detach() (or the daemon's death) leaves it running with every workload, and the next
daemon's attach() connects to the same path and adopts what it holds (an Adoption).

A daemon that is a copy of a warm template (a spawned instance, auraed.kernel.template) does not
start a new interpreter for its spawner: it forks a SpawnerSeed at its very start, while it is
still single-threaded, and the seed becomes the spawner when start() sends it its options. The
seed shares the template's pages, so an instance's spawner costs about 1.2 MiB of its own
where a `python -S` and its spare cost 12 MiB PSS (measured, bench/instances.py), and starts in
a millisecond instead of an interpreter's start-up. An instance's seeded spawner keeps no
spare. A VM guest's auraed forks a seed at its start too (auraed.kernel.spawner.seed, which
imports nothing else, so its first answer does not wait for it), and that one keeps its spare.
"""

import itertools
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from auraed.kernel.processes import ExitStatus, HolderSpec, SpawnedProcess, SpawnSpec, default_env

# What a SpawnerSeed runs once it sprouts, imported with the daemon rather than in the seed: a
# seed is a fork, so a module imported there is written into the seed's own pages, where the
# daemon's imports are shared (with a template's copies: with the template).
from auraed.kernel.spawner import server as _server  # noqa: F401
from auraed.kernel.spawner.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Adopt,
    Adopted,
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
    ProtocolMismatch,
    Ready,
    Release,
    Spawned,
    SpawnError,
    SpawnRequest,
    Stop,
    check_version,
    decode,
    message_buffer,
)
from auraed.kernel.spawner.seed import SOURCE_ROOT as _SOURCE_ROOT
from auraed.kernel.spawner.seed import SpawnerSeed
from auraed.kernel.spawner.state import StateTorn, read_state
from auraed.output.log import OutputLog

__all__ = [
    "AdoptedProcess",
    "Adoption",
    "ExitCallback",
    "SpawnError",
    "Spawner",
    "SpawnerClosed",
    "SpawnerRefused",
    "SpawnerSeed",
    "StateTorn",
]

_log = logging.getLogger(__name__)

# <asm-generic/socket.h>; Python's socket module does not name it.
SO_SNDBUFFORCE = 32

class SpawnerClosed(Exception):
    """The spawner is not running: never started, closed, or it died."""


class SpawnerRefused(Exception):
    """A running spawner cannot be adopted: another protocol version, another daemon attached,
    or its state file is torn. The message says which and what to do."""


@dataclass(frozen=True)
class AdoptedProcess:
    """A process a previous daemon started, as the spawner kept it."""

    process: SpawnedProcess
    kind: str  # "spawn" or "holder"
    argv: list[str]
    label: dict[str, object] | None
    status: ExitStatus | None  # how it ended, if it did
    exited_at: float
    outputs: dict[str, OutputLog]  # channel -> its log, followed from where the writer is


@dataclass(frozen=True)
class Adoption:
    spawner_pid: int
    records: dict[str, dict[str, object]]
    processes: list[AdoptedProcess]




# (host pid, start time, how it ended); the start time is 0 from an older spawner.
ExitCallback = Callable[[int, int, ExitStatus], None]


class _PendingReply:
    def __init__(self, outputs: tuple[OutputLog, OutputLog] | None = None) -> None:
        # Followed from the reply on: the spawner writes them.
        self.outputs = outputs
        self._done = threading.Event()
        self._reply: Spawned | Failed | Flushed | Joined | None = None

    def resolve(self, reply: Spawned | Failed | Flushed | Joined | None) -> None:
        """reply None: the spawner went away before answering."""
        self._reply = reply
        self._done.set()

    def wait(self, timeout: float) -> Spawned | Failed | Flushed | Joined | None:
        if not self._done.wait(timeout):
            raise TimeoutError("the spawner did not answer in time")
        return self._reply


class Spawner:
    """Runs the fork server and starts workloads through it.

    on_exit(host_pid, start_time, status) is called from one reader thread, once per workload, in the order the
    workloads ended, and never before the spawn reply for that pid was handled. It can still run
    before spawn() has returned to its caller (a workload may end at once), so a caller that
    records pids must keep exits of pids it has not recorded yet (e.g. both under one short lock).
    It must not block for long: it delays every later reply and exit. Workloads still running when
    the spawner closes are killed without an on_exit call.
    """

    def __init__(self, on_exit: ExitCallback, *, reply_timeout: float = 30.0,
                 on_lost: Callable[[], None] | None = None, listen: str | None = None,
                 cgroup_join: Sequence[str] = (), seed: SpawnerSeed | None = None,
                 direct: bool = True) -> None:
        """on_lost: called once, on the reader thread, if the spawner ends
        without close() — its workloads are then unsupervised. listen: the socket path a
        later daemon attaches through (then the spawner outlives this one). cgroup_join: the
        files (CgroupBackend.join_files) the spawner joins its cgroups through at start. seed:
        becomes the spawner at start() instead of a new process. direct=False: every child
        starts through a Python fork (`--direct no`), as where the kernel or interpreter allows
        nothing else; for tests of that path."""
        self._on_exit = on_exit
        self._listen = listen
        self._cgroup_join = tuple(cgroup_join)
        self._direct = direct
        self._spawner_pid: int | None = None
        # Captured output the spawner writes, by (pid, channel): advanced by Output.
        self._outputs: dict[tuple[int, str], OutputLog] = {}
        self._on_lost = on_lost
        self._reply_timeout = reply_timeout
        self._lock = threading.Lock()
        self._pending: dict[int, _PendingReply] = {}
        self._request_ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._seed = seed
        self._process: subprocess.Popen[bytes] | SpawnerSeed | None = None
        self._reader: threading.Thread | None = None
        self._closed = False
        # Whether the spawner takes Capture.continues, and Flush (see Ready); known once it
        # is ready.
        self.continues_output = False
        self.flushes_output = False

    @property
    def pid(self) -> int:
        """The spawner's own pid: the parent of every workload."""
        if self._spawner_pid is None:
            raise SpawnerClosed("the spawner was not started")
        return self._spawner_pid

    def join_at(self, cgroup_join: Iterable[str]) -> None:
        """Where the spawner joins its cgroups: before start(), the files it passes the
        spawner; after, the spawner joins them at once (Join). SpawnError if it could not;
        SpawnerClosed if it is gone."""
        files = tuple(cgroup_join)
        if self._spawner_pid is None:
            self._cgroup_join = files
            return
        request_id = next(self._request_ids)
        message = Join(id=request_id, files=list(files)).encode()
        self._answer_to(request_id, lambda sock: sock.send(message), _PendingReply(),
                        self._reply_timeout)
        self._cgroup_join = files

    def start(self, ready_timeout: float = 10.0) -> None:
        """Launch the spawner and wait until it is ready."""
        if self._spawner_pid is not None:
            raise RuntimeError("the spawner was already started")
        options: list[str] = []
        if self._listen is not None:
            options += ["--listen", self._listen]
        for path in self._cgroup_join:
            options += ["--join", path]
        if not self._direct:
            options += ["--direct", "no"]
        if self._seed is not None:
            # An instance's spawner keeps no spare: a spare is a whole process per instance
            # (1.2 MiB of its own, measured) to save a fork on Allocate inside the instance.
            self._process, self._seed = self._seed, None
            spare = [] if self._process.keeps_spare else ["--spare", "no"]
            ours = self._process.sprout([*options, *spare])
            _room_for_the_largest_request(ours)
        else:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            _room_for_the_largest_request(ours)
            try:
                self._process = subprocess.Popen(
                    [sys.executable, "-S", "-m", "auraed.kernel.spawner",
                     "--socket-fd", str(theirs.fileno()), *options],
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
        self._spawner_pid = self._process.pid
        self._serve(ours)

    def _serve(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = threading.Thread(
            target=self._read_messages, args=(sock,), name="spawner-reader", daemon=True
        )
        self._reader.start()

    def attach(self, timeout: float = 10.0) -> Adoption | None:
        """Connect to a spawner that outlived its daemon, at `listen`, and adopt what it holds;
        None if no spawner listens there (a stale socket file is removed). SpawnerRefused if
        one does that cannot be adopted."""
        if self._spawner_pid is not None or self._listen is None:
            raise RuntimeError("attach() needs a listen path and no spawner yet")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        _room_for_the_largest_request(sock)
        try:
            sock.connect(self._listen)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            try:
                os.unlink(self._listen)  # left by a spawner that died
            except FileNotFoundError:
                pass
            return None
        try:
            try:
                ready = self._await_ready(sock, timeout)
            except SpawnerClosed as error:
                raise SpawnerRefused(f"the spawner at {self._listen} cannot be adopted: "
                                     f"{error}") from None
            if ready.busy:
                raise SpawnerRefused(f"the spawner at {self._listen} (pid {ready.pid}) serves "
                                     "another auraed; stop that one first")
            sock.send(Adopt().encode())
            adopted = self._await_adopted(sock, timeout)
            try:
                state = read_state(adopted.path, PROTOCOL_VERSION, adopted.digest)
            except StateTorn as torn:
                raise SpawnerRefused(f"the spawner's state cannot be adopted: {torn}") from None
        except BaseException:
            sock.close()
            raise
        adoption = self._adoption(ready.pid, state)
        self._spawner_pid = ready.pid
        self._serve(sock)
        self._discard_seed()
        return adoption

    def _discard_seed(self) -> None:
        seed, self._seed = self._seed, None
        if seed is not None:
            seed.discard()

    def _await_adopted(self, sock: socket.socket, timeout: float) -> Adopted:
        """The answer to Adopt. Exits and output reported before it are in the state."""
        deadline = time.monotonic() + timeout
        while True:
            readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
            data = sock.recv(MAX_MESSAGE_BYTES) if readable else b""
            if not data:
                raise SpawnerRefused("the spawner did not answer Adopt")
            message = decode(data)
            if isinstance(message, Adopted):
                return message
            if isinstance(message, Failed):
                raise SpawnerRefused(f"the spawner could not write its state: {message.message}")

    def _adoption(self, spawner_pid: int, state: dict[str, object]) -> Adoption:
        try:
            records = state["records"]
            entries = state["processes"]
            assert isinstance(records, dict) and isinstance(entries, list)
            processes = [self._adopted_process(entry) for entry in entries]
        except (KeyError, TypeError, ValueError, AssertionError) as error:
            raise SpawnerRefused(f"the spawner's state is not understood: {error!r}") from None
        return Adoption(spawner_pid, records, processes)

    def _adopted_process(self, entry: dict[str, object]) -> AdoptedProcess:
        pid, ns_pid, start_time = (int(entry[name]) for name in ("pid", "ns_pid", "start_time"))  # type: ignore[call-overload]
        outputs: dict[str, OutputLog] = {}
        for output in entry["outputs"]:  # type: ignore[attr-defined]
            log = OutputLog.mirror(
                output["directory"], output["channel"], segment_bytes=output["segment_bytes"],
                max_segments=output["max_segments"],
                position=(output["first"], output["last"], output["committed"],
                          output["complete"]))
            outputs[log.channel] = log
            if not output["complete"]:
                self._outputs[pid, log.channel] = log
        status = entry["status"]
        label = entry["label"]
        return AdoptedProcess(
            process=SpawnedProcess(host_pid=pid, ns_pid=ns_pid, pgid=pid, start_time=start_time),
            kind=str(entry["kind"]),
            argv=[str(arg) for arg in entry["argv"]],  # type: ignore[attr-defined]
            label=label if isinstance(label, dict) else None,
            status=None if status is None else ExitStatus.from_wait_status(int(status)),  # type: ignore[call-overload]
            exited_at=float(entry["exited_at"]),  # type: ignore[arg-type]
            outputs=outputs,
        )

    def keep(self, key: str, value: dict[str, object]) -> None:
        """Have the spawner hold `value` under `key` for a later daemon (see Adoption.records)."""
        self._send_control(Keep(key=key, value=value))

    def forget(self, key: str) -> None:
        self._send_control(Forget(key=key))

    def release(self, process: SpawnedProcess) -> None:
        """The spawner may drop what it keeps of this (exited) process."""
        self._send_control(Release(pid=process.host_pid, start_time=process.start_time))

    def flush_output(self, processes: Sequence[SpawnedProcess],
                     timeout: float | None = None) -> bool:
        """Have the spawner read what these processes' capture pipes hold now into their logs;
        returns once the logs followed here have advanced past it. False if that is not known
        (a spawner too old to flush, one that is gone, or no answer within `timeout`, by
        default the reply timeout of a spawn): then the logs hold what the spawner reported
        so far, as before."""
        if not self.flushes_output or not processes:
            return False
        request_id = next(self._request_ids)
        message = Flush(id=request_id, processes=[
            [process.host_pid, process.start_time] for process in processes]).encode()
        try:
            # Output goes before Flushed on the one socket, and the reader handles messages in
            # order: by the time this is answered, the logs are advanced.
            return isinstance(self._answer_to(
                request_id, lambda sock: sock.send(message), _PendingReply(),
                self._reply_timeout if timeout is None else timeout), Flushed)
        except (SpawnerClosed, SpawnError, TimeoutError):
            return False

    def _send_control(self, message: Message) -> None:
        with self._lock:
            sock = self._sock
        if sock is None:
            return
        try:
            sock.send(message.encode())
        except OSError:
            pass  # the spawner is gone: on_lost tells

    def _await_ready(self, sock: socket.socket, timeout: float) -> Ready:
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
        self.continues_output = ready.continues_output
        self.flushes_output = ready.flushes_output
        return ready

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
                memory_limited=spec.memory_limited,
                namespaces=spec.namespaces.paths() if spec.namespaces else {},
                rootfs=dict(spec.rootfs) if spec.rootfs else None,
                label=spec.label,
                capture=None if spec.capture is None else _capture(spec.capture),
            ),
            () if spec.capture is not None else (spec.stdout_fd, spec.stderr_fd),
            spec.capture,
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
                memory_limited=spec.memory_limited,
                namespaces=spec.namespaces.paths() if spec.namespaces else {},
                unshare=sorted(spec.unshare),
                hostname=spec.hostname,
                label=spec.label,
            ),
            (spec.stdout_fd, spec.stderr_fd),
        )

    def _request(self, request: SpawnRequest, fds: tuple[int, ...],
                 outputs: tuple[OutputLog, OutputLog] | None = None) -> SpawnedProcess:
        request_id = request.id
        message = request.encode()
        if len(message) > MAX_MESSAGE_BYTES:
            raise ValueError(f"spawn request of {len(message)} bytes is over {MAX_MESSAGE_BYTES}")
        # One sendmsg is one SEQPACKET message: concurrent senders need no lock.
        reply = self._answer_to(request_id, lambda sock: socket.send_fds(sock, [message], list(fds)),
                                _PendingReply(outputs), self._reply_timeout)
        assert isinstance(reply, Spawned)  # a request id is answered by its own kind
        return SpawnedProcess(
            host_pid=reply.pid,
            ns_pid=reply.ns_pid,
            pgid=reply.pid,
            start_time=reply.start_time,
        )

    def _answer_to(self, request_id: int, send: Callable[[socket.socket], object],
                   pending: _PendingReply, timeout: float) -> Spawned | Flushed | Joined:
        """Send a request (`send`) and wait for its answer. SpawnerClosed if the spawner is
        not running or went away; the SpawnError it answered with; TimeoutError."""
        with self._lock:
            if self._closed or self._sock is None:
                raise SpawnerClosed("the spawner is not running")
            self._pending[request_id] = pending
            sock = self._sock
        try:
            try:
                send(sock)
            except OSError as error:
                raise SpawnerClosed(f"the spawner is not running: {error}") from error
            reply = pending.wait(timeout)
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
        if reply is None:
            raise SpawnerClosed("the spawner went away")
        if isinstance(reply, Failed):
            raise reply.error()
        return reply

    def _read_messages(self, sock: socket.socket) -> None:
        # One buffer for every message: a fresh 256 KiB per recv costs an mmap and a munmap.
        buffer = message_buffer()
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
        if isinstance(message, Output):
            for pid, channel, first, last, committed, complete in message.logs:
                key = (int(pid), str(channel))  # type: ignore[call-overload]
                log = self._outputs.get(key)
                if log is not None:
                    log.advance(first, last, committed, complete)  # type: ignore[arg-type]
                    if complete:
                        del self._outputs[key]
            return
        if isinstance(message, Exited):
            try:
                self._on_exit(message.pid, message.start_time,
                              ExitStatus.from_wait_status(message.status))
            except Exception:  # noqa: BLE001 - a faulty callback must not stop replies and exits
                _log.exception("on_exit failed for pid %s", message.pid)
            return
        if not isinstance(message, (Spawned, Failed, Flushed, Joined)) or message.id is None:
            _log.error("unexpected message from the spawner: %r", message)
            return
        with self._lock:
            pending = self._pending.get(message.id)
        # None: its caller timed out and left; the workload runs on, reported by its exit event.
        if pending is not None:
            if isinstance(message, Spawned) and pending.outputs is not None:
                stdout, stderr = pending.outputs
                self._outputs[message.pid, "stdout"] = stdout
                self._outputs[message.pid, "stderr"] = stderr
            pending.resolve(message)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the spawner: it kills every workload still running, reaps them, and exits."""
        self._discard_seed()
        sock = self._let_go(Stop())
        if sock is None:
            return
        if self._process is not None:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                _log.error("the spawner did not exit within %s s; killing it", timeout)
                self._process.kill()
                self._process.wait()
            return
        # Adopted: not our child, so watched by its pid.
        assert self._spawner_pid is not None
        deadline = time.monotonic() + timeout
        while _running(self._spawner_pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if _running(self._spawner_pid):
            _log.error("the spawner did not exit within %s s; killing it", timeout)
            try:
                os.kill(self._spawner_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def detach(self) -> None:
        """Let go of the spawner and leave it running with every workload, for the next
        daemon's attach(). Only for a spawner started with `listen`."""
        if self._listen is None:
            raise RuntimeError("a spawner without a listen path ends when it is let go")
        self._discard_seed()
        self._let_go(None)

    def _let_go(self, last: Message | None) -> socket.socket | None:
        """Send `last`, close the connection and wait for the reader; the socket, or None if
        there was none."""
        with self._lock:
            sock, self._sock = self._sock, None
            self._closed = True
        if sock is None:
            return None
        if last is not None:
            try:
                sock.send(last.encode())
            except OSError:
                pass
        try:
            # Wakes our reader and shows the spawner end of file; close() alone would do neither
            # while the reader is blocked in recv.
            sock.shutdown(socket.SHUT_WR if last is not None else socket.SHUT_RDWR)
        except OSError:
            pass
        if self._reader is not None and self._reader is not threading.current_thread():
            if last is None:
                self._reader.join()
            else:
                # The reader ends at the spawner's exit (its end of file); bounded all the same.
                self._reader.join(30)
        sock.close()
        return sock

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


def _capture(logs: tuple[OutputLog, OutputLog]) -> dict[str, object]:
    """A Capture for the spawner to write these mirrors' logs; a mirror that does not start at
    segment 1 goes on from an earlier run's log (see OutputLog's `continues`)."""
    capture: dict[str, object] = {"directory": str(logs[0].directory),
                                  "segment_bytes": logs[0].segment_bytes,
                                  "max_segments": logs[0].max_segments}
    continues = {log.channel: list(log.position()[:2]) for log in logs
                 if log.position()[:2] != (1, 1)}
    if continues:
        capture["continues"] = continues
    return capture


def _room_for_the_largest_request(sock: socket.socket) -> None:
    # A SEQPACKET message must fit the sender's buffer whole; the default (wmem_default,
    # ~208 KiB) is less than the largest spawn request. Forced: root may exceed wmem_max.
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 2 * MAX_MESSAGE_BYTES)
    except PermissionError:  # without CAP_NET_ADMIN: as much as wmem_max allows
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * MAX_MESSAGE_BYTES)


def _running(pid: int) -> bool:
    """Whether pid is alive (not a zombie, not gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
