"""A warm template: a process that has imported a program once and forks copies of itself
into other namespaces and cgroups, so each copy starts without paying for its imports and
shares their memory with the template (copy-on-write) instead of holding its own.

The daemon uses one to start spawned instances: the template preloads the daemon's modules;
for each instance it forks, the child joins the instance cell's cgroup and namespaces
(ipc, uts, net, pid, mnt), forks again so that the grandchild is inside the new pid
namespace, and the grandchild runs the daemon's entry point. The middle process exits at
once. An orphan goes to the reaper of its late parent's pid namespace — the host's, not the
cell's, since the middle never entered the new one — so the template is a child subreaper:
the copies become its children and it reaps them as they end. (Left to the host's init, a
copy's zombie can outlive it by seconds, and the cell's init, ending, waits for every process
of its namespace to be reaped.) The caller watches a copy through a pidfd.

Standard library only on the template's side; what it preloads is the caller's choice, so
this module knows nothing of gRPC. The template is single-threaded, so forking it is safe.
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


class Template:
    """The daemon's handle on one template process."""

    def __init__(self, preload: list[str], entry: str, python: str = sys.executable) -> None:
        self._preload = preload
        self._entry = entry
        self._python = python
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, ready_timeout: float = 60.0) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [self._python, "-m", "auraed.kernel.template", "--socket-fd",
                 str(theirs.fileno()), "--preload", ",".join(self._preload),
                 "--entry", self._entry],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, cwd="/",
                env={**os.environ, "PYTHONPATH": _SOURCE_ROOT}, start_new_session=True)
        finally:
            theirs.close()
        readable, _, _ = select.select([ours], [], [], ready_timeout)
        reply = ours.recv(_MAX_MESSAGE) if readable else b""
        if reply != b"ready":
            ours.close()
            self._process.kill()
            self._process.wait()
            self._process = None
            raise TemplateError("the instance template did not start "
                                f"({'no answer' if not readable else reply[:200]!r})")
        self._sock = ours

    def fork(self, argv: list[str], *, namespaces: dict[str, str], cgroup_join: list[str],
             log_path: str, timeout: float = 30.0) -> int:
        """Start a copy running the entry point with `argv`; its host pid."""
        request = json.dumps({"argv": argv, "namespaces": namespaces,
                              "cgroup_join": cgroup_join, "log": log_path}).encode()
        with self._lock:
            if self._sock is None:
                self.start()
            assert self._sock is not None
            self._sock.send(request)
            readable, _, _ = select.select([self._sock], [], [], timeout)
            reply = self._sock.recv(_MAX_MESSAGE) if readable else b""
        if not reply:
            self.close()
            raise TemplateError("the instance template did not answer")
        answer: dict[str, Any] = json.loads(reply)
        if "pid" not in answer:
            raise TemplateError(str(answer.get("error", "unknown failure")))
        return int(answer["pid"])

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


def _fork_copy(request: dict[str, Any], entry: str) -> int:
    namespace_fds = {kind: os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                     for kind, path in request["namespaces"].items()}
    report_read, report_write = os.pipe()
    try:
        middle = os.fork()
        if middle == 0:
            os.close(report_read)
            try:
                for path in request["cgroup_join"]:
                    with open(path, "w") as join:
                        join.write("0")
                for kind in _JOIN_ORDER:
                    if kind in namespace_fds:
                        libc.setns(namespace_fds[kind], libc.NAMESPACE_FLAGS[kind])
                copy = os.fork()
                if copy == 0:
                    os.close(report_write)
                    _become_copy(request, entry)
                os.write(report_write, str(copy).encode())
                os._exit(0)
            except BaseException as error:  # noqa: BLE001 - reported, then this process ends
                os.write(report_write, f"error: {error}".encode()[:4000])
                os._exit(1)
        os.close(report_write)
        report_write = -1
        chunks = []
        while chunk := os.read(report_read, 4096):
            chunks.append(chunk)
        try:
            os.waitpid(middle, 0)
        except ChildProcessError:
            pass  # reaped already by _reap_copies
    finally:
        os.close(report_read)
        if report_write >= 0:
            os.close(report_write)
        for fd in namespace_fds.values():
            os.close(fd)
    report = b"".join(chunks).decode(errors="replace")
    if not report.isdigit():
        raise OSError(report or "the copy's parent ended without a word")
    return int(report)


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
    to it, the subreaper) and the middle processes, whose results come through a pipe."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="auraed-template")
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--preload", default="")
    parser.add_argument("--entry", required=True)
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.socket_fd)
    # Ended with its daemon: it is only ever told what to do over this socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc.set_child_subreaper()
    signal.signal(signal.SIGCHLD, _reap_copies)
    for name in filter(None, args.preload.split(",")):
        import_module(name)
    import_module(args.entry.partition(":")[0])
    # Everything loaded so far lives as long as the copies: keep the collector off its pages,
    # so they stay shared, and the copies' mallocs out of the holes between them.
    gc.collect()
    libc.take_malloc_holes()
    gc.freeze()
    sock.send(b"ready")
    while True:
        try:
            message = sock.recv(_MAX_MESSAGE)
        except OSError:
            return 0
        if not message:
            return 0
        try:
            answer: dict[str, Any] = {"pid": _fork_copy(json.loads(message), args.entry)}
        except (OSError, ValueError, KeyError) as error:
            answer = {"error": str(error)}
        sock.send(json.dumps(answer).encode())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
