"""A child forked ahead to become a daemon's spawner (auraed.kernel.spawner.client.Spawner).

Kept apart from the client and the fork server so that forking one costs an entry point no
imports beyond the standard library's: a VM guest's auraed forks its seed before its first
answer, where every module it imports delays the host's Start. The seed imports the fork server
only once it sprouts (a template's copy has it already: the template imported it).

fork() only while the process is single-threaded: the seed runs Python after the fork, and a
lock another thread held would stay held in it for ever.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import threading
from pathlib import Path
from typing import NoReturn

from auraed.kernel.forked import ForkedChild

# The directory holding the auraed package, for the spawner's import path.
SOURCE_ROOT = str(Path(__file__).resolve().parents[3])
# The options are a short JSON list of arguments.
_OPTIONS_BYTES = 1 << 16


class SpawnerSeed(ForkedChild):
    """A forked child that waits for the spawner's options (a JSON list of arguments) as the
    first message on its socket, then runs the fork server on that same socket. End of file
    before that: it exits. `keeps_spare`: whether the spawner it becomes keeps a spare (see
    auraed.kernel.spawner.server); an instance's does not (a whole process per instance)."""

    def __init__(self, pid: int, sock: socket.socket, keeps_spare: bool = False) -> None:
        super().__init__(pid, "spawner")
        self.sock: socket.socket | None = sock
        self.keeps_spare = keeps_spare

    @classmethod
    def fork(cls, keeps_spare: bool = False) -> SpawnerSeed:
        if threading.active_count() != 1:
            raise RuntimeError("a spawner seed is forked only while single-threaded")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            _grow_from_seed(theirs)
        theirs.close()
        return cls(pid, ours, keeps_spare)

    def sprout(self, options: list[str]) -> socket.socket:
        """Have the seed run the fork server with `options`; the socket it serves on."""
        sock, self.sock = self.sock, None
        if sock is None:
            raise RuntimeError("the spawner seed was used already")
        sock.send(json.dumps(options).encode())
        return sock

    def discard(self) -> None:
        """Not needed (the daemon adopted a spawner): the seed exits."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.wait(10.0)


def _grow_from_seed(sock: socket.socket) -> NoReturn:
    """In the seed: let go of the daemon's fds, session and environment, as a new process
    started by Spawner.start would be without them, wait for the options, serve."""
    code = 1
    try:
        os.setsid()  # out of the daemon's terminal session, as start_new_session would be
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        keep = sock.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        # What the daemon made so far is the seed's for good: keep the collector off it, so
        # its pages stay shared.
        gc.freeze()
        message = sock.recv(_OPTIONS_BYTES)
        if not message:
            os._exit(0)
        options = json.loads(message)
        os.environ.clear()
        os.environ["PYTHONPATH"] = SOURCE_ROOT
        # Imported already where the seed was forked from a template's copy; here otherwise.
        from auraed.kernel.spawner.server import main as serve_spawner

        code = serve_spawner(["--socket-fd", str(keep), *options])
    except BaseException:  # noqa: BLE001 - the daemon's log (our stderr) says what happened
        import traceback

        traceback.print_exc()
    finally:
        import sys

        sys.stderr.flush()
        os._exit(code)
