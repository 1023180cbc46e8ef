"""A warm template: a process that has imported a program once and forks copies of itself
into other namespaces and cgroups, so each copy starts without paying for its imports and
shares their memory with the template (copy-on-write) instead of holding its own.

The daemon uses one to start spawned instances: forked from the daemon at its start
(Template.fork_here) or started as `python -m auraed.kernel.template`, the template imports
what the daemon imported (preload); for each instance it forks, the child (the middle) joins
the instance cell's cgroup and namespaces (ipc, uts, net, pid, mnt), forks again so that the
grandchild is inside the new pid namespace, answers the caller on the socket that came with
the request, and exits; the grandchild runs the daemon's entry point. The template does not
wait for the middle, so concurrent requests overlap. An orphan goes to the reaper of its late parent's pid namespace — the host's, not the
cell's, since the middle never entered the new one — so the template is a child subreaper:
the copies become its children and it reaps them as they end. (Left to the host's init, a
copy's zombie can outlive it by seconds, and the cell's init, ending, waits for every process
of its namespace to be reaped.) The caller watches a copy through a pidfd.

Standard library only on the template's side; what it preloads is the caller's list (the
modules the daemon imported), so this module knows nothing of gRPC. The template is single-threaded, so forking it is safe.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from importlib import import_module
from pathlib import Path
from typing import Any

from auraed.kernel import libc
from auraed.kernel.forked import ForkedChild

_SOURCE_ROOT = str(Path(__file__).resolve().parents[2])
_MAX_MESSAGE = 256 * 1024
# The order a copy joins namespaces in: mnt last, since it changes what paths mean.
_JOIN_ORDER = ("ipc", "uts", "net", "pid", "mnt")
# Set in a copy before its entry point runs.
_is_copy = False


def is_copy() -> bool:
    """Whether this process is a template's copy: its memory is shared with the template, so a
    process it forks shares it too (and stays small), as long as the template lives."""
    return _is_copy


class TemplateError(Exception):
    """The template could not start, or could not fork a copy; the message says why."""


# What /proc/<pid>/comm says of a template (a forked one keeps its parent's command line).
PROCESS_NAME = "auraed-template"


class Template:
    """The daemon's handle on one template process: started as a new interpreter at the first
    fork (`Template(entry)`), or forked from the daemon itself at its start
    (`Template.fork_here(entry)`)."""

    def __init__(self, entry: str, python: str = sys.executable) -> None:
        self._entry = entry
        self._python = python
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | ForkedChild | None = None
        self._sock: socket.socket | None = None
        # Modules to import before the next fork (preload()).
        self._preload: list[str] = []

    @classmethod
    def fork_here(cls, entry: str) -> Template:
        """A template forked from this process, which has imported the entry point's module:
        no interpreter to start, and its pages (the interpreter, the daemon's modules) are
        shared with this process as well as with the copies. Only while single-threaded, and
        before the process reads anything its copies must not hold (keys): they are forks of
        this process as it is now."""
        if threading.active_count() != 1:
            raise RuntimeError("a template is forked only while single-threaded")
        # Everything so far lives as long as the process: collected and frozen now, so that
        # no collection, here or in the template, writes the objects' headers after the fork.
        gc.collect()
        gc.freeze()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ours.close()
                os.setsid()  # out of the daemon's session, as start_new_session would be
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                keep = theirs.fileno()
                os.closerange(3, keep)  # stdout and stderr stay: the daemon's log
                os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
                os.chdir("/")
                code = _serve(theirs, entry)
            except BaseException:  # noqa: BLE001 - the daemon's log says what happened
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        theirs.close()
        template = cls(entry)
        template._process = ForkedChild(pid, "template")
        template._sock = ours
        try:
            template._await_ready(ours, 10.0)
        except TemplateError:
            template._process.kill()
            template._process.wait()
            raise
        return template

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def preload(self, modules: list[str]) -> None:
        """Have the template import `modules` (those it lacks) before its next fork: what the
        daemon really imported, so that a copy imports nothing after the fork (an import then
        writes pages all over the template's heap: grpc's lazily imported server alone cost
        each instance 3 MiB). Returns at once; the next fork, or flush(), sends them."""
        with self._lock:
            self._preload = sorted(set(self._preload) | set(modules))

    def flush(self) -> None:
        """Send what preload() was given now (a daemon's idle moment) rather than at the fork."""
        with self._lock:
            if self._sock is not None:
                self._send_preload()

    def _send_preload(self) -> None:
        assert self._sock is not None
        if not self._preload:
            return
        self._ask({"preload": self._preload}, 60.0)
        self._preload = []

    def start(self, ready_timeout: float = 60.0) -> None:
        if self._process is not None:  # one that failed
            self._process.kill()
            self._process.wait()
            self._process = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [self._python, "-m", "auraed.kernel.template", "--socket-fd",
                 str(theirs.fileno()), "--entry", self._entry],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, cwd="/",
                env={**os.environ, "PYTHONPATH": _SOURCE_ROOT}, start_new_session=True)
        finally:
            theirs.close()
        try:
            self._await_ready(ours, ready_timeout)
        except TemplateError:
            ours.close()
            self._process.kill()
            self._process.wait()
            self._process = None
            raise
        self._sock = ours
        # Started from a running daemon: what it imported is what its copies will need.
        self._preload = sorted(set(self._preload) | set(sys.modules))

    @staticmethod
    def _await_ready(sock: socket.socket, timeout: float) -> None:
        readable, _, _ = select.select([sock], [], [], timeout)
        reply = sock.recv(_MAX_MESSAGE) if readable else b""
        if reply != b"ready":
            raise TemplateError("the instance template did not start "
                                f"({'no answer' if not readable else reply[:200]!r})")

    def _ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self._sock is not None
        try:
            self._sock.send(json.dumps(request).encode())
            readable, _, _ = select.select([self._sock], [], [], timeout)
            reply = self._sock.recv(_MAX_MESSAGE) if readable else b""
        except OSError:
            reply = b""
        if not reply:
            self._broken()
            raise TemplateError("the instance template did not answer")
        answer: dict[str, Any] = json.loads(reply)
        return answer

    def fork(self, argv: list[str], *, namespaces: dict[str, str], cgroup_join: list[str],
             log_path: str, timeout: float = 30.0) -> int:
        """Start a copy running the entry point with `argv`; its host pid.

        Safe from many threads at once, and they overlap: the template only forks, and the
        forked middle process, which joins the cgroups and namespaces (writing cgroup.procs in
        each v1 hierarchy waits for an RCU grace period: up to 50 ms on a loaded machine) and
        forks the copy, answers on a socket of this call's own."""
        request = json.dumps({"argv": argv, "namespaces": namespaces,
                              "cgroup_join": cgroup_join, "log": log_path}).encode()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self._lock:
                if self._sock is None:
                    self.start()
                self._send_preload()
                assert self._sock is not None
                try:
                    socket.send_fds(self._sock, [request], [theirs.fileno()])
                except OSError as error:
                    self._broken()
                    raise TemplateError(f"the instance template is gone: {error}") from None
            theirs.close()
            readable, _, _ = select.select([ours], [], [], timeout)
            reply = ours.recv(_MAX_MESSAGE) if readable else b""
        finally:
            ours.close()
            theirs.close()
        if not reply:
            with self._lock:
                if not self._alive():
                    self._broken()
            raise TemplateError("the instance template did not answer")
        answer: dict[str, Any] = json.loads(reply)
        if "pid" not in answer:
            raise TemplateError(str(answer.get("error", "unknown failure")))
        return int(answer["pid"])

    def _alive(self) -> bool:
        if isinstance(self._process, subprocess.Popen):
            return self._process.poll() is None
        return self._process is not None and self._process.running()

    def _broken(self) -> None:
        """Forget a template that failed; the next fork starts a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()  # the template exits when its socket closes
                self._sock = None
            if self._process is not None:
                try:
                    self._process.wait(5)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
                self._process = None


# ---------------------------------------------------------------------- the template's side


def _fork_copy(request: dict[str, Any], entry: str, reply: socket.socket) -> None:
    """Fork the middle process, which answers on `reply`; do not wait for it (its work, the
    cgroup join above all, can take tens of milliseconds, and other requests overlap it)."""
    namespace_fds = {kind: os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                     for kind, path in request["namespaces"].items()}
    try:
        if os.fork() == 0:
            code = 1
            try:
                for path in request["cgroup_join"]:
                    with open(path, "w") as join:
                        join.write("0")
                for kind in _JOIN_ORDER:
                    if kind in namespace_fds:
                        libc.setns(namespace_fds[kind], libc.NAMESPACE_FLAGS[kind])
                copy = os.fork()
                if copy == 0:
                    _become_copy(request, entry)
                reply.send(json.dumps({"pid": copy}).encode())
                code = 0
            except BaseException as error:  # noqa: BLE001 - reported, then this process ends
                try:
                    reply.send(json.dumps({"error": str(error)[:4000]}).encode())
                except OSError:
                    pass  # the caller gave up: nobody to tell
            finally:
                os._exit(code)
    finally:
        for fd in namespace_fds.values():
            os.close(fd)


def _become_copy(request: dict[str, Any], entry: str) -> None:
    # Run as `python -m`, this file is __main__: the copy's code asks the module by its name.
    vars(import_module("auraed.kernel.template"))["_is_copy"] = True
    code: object = 1
    try:
        os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.chdir("/")
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        module, _, function = entry.partition(":")
        code = getattr(import_module(module), function)(request["argv"])
    except SystemExit as exit_:
        code = exit_.code
    except BaseException:  # noqa: BLE001 - the copy's log says what happened
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def _reap_copies(signum: int, frame: object) -> None:
    """Reap every child that ended: the template's only children are its copies (orphaned
    to it, the subreaper) and the middle processes, whose results go to the caller."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _preload(names: list[str]) -> int:
    """Import what the template lacks of `names`; how many it imported."""
    imported = 0
    for name in names:
        if name in sys.modules or name in ("__main__", "__mp_main__"):
            continue
        try:
            import_module(name)
            imported += 1
        except Exception:  # noqa: BLE001, S112 - an alias, or gone since: the copy imports it
            continue
    # Everything loaded so far lives as long as the copies: keep the collector off its pages,
    # so they stay shared, the free pages of the malloc heap out of the copies (none maps
    # garbage, and a malloc there gets a fresh page), and the copies' mallocs out of the holes
    # between the rest. (Objects frozen before are not visited by this collection.)
    gc.collect()
    libc.trim_malloc_heap()
    libc.take_malloc_holes()
    gc.freeze()
    return imported


def _serve(sock: socket.socket, entry: str) -> int:
    """The template's life: fork a copy for each request on `sock`, until it closes."""
    # Ended with its daemon: it is only ever told what to do over this socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc.set_process_name(PROCESS_NAME)
    libc.set_child_subreaper()
    signal.signal(signal.SIGCHLD, _reap_copies)
    import_module(entry.partition(":")[0])
    _preload([])
    sock.send(b"ready")
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 1)
        except InterruptedError:
            continue
        except OSError:
            return 0
        if not message:
            return 0
        # A fork request comes with the socket its answer goes to; a preload with none.
        reply = socket.socket(fileno=fds[0]) if fds else sock
        try:
            request = json.loads(message)
            if "preload" in request:
                reply.send(json.dumps({"imported": _preload(request["preload"])}).encode())
            else:
                _fork_copy(request, entry, reply)
        except (OSError, ValueError, KeyError) as error:
            try:
                reply.send(json.dumps({"error": str(error)}).encode())
            except OSError:
                pass  # the caller gave up
        finally:
            if reply is not sock:
                reply.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="auraed-template")
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--entry", required=True)
    args = parser.parse_args(argv)
    return _serve(socket.socket(fileno=args.socket_fd), args.entry)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
