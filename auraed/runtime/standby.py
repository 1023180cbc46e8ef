"""A spare daemon's claim: how a daemon started ahead (`auraed --standby PATH`, a spare pod
instance) learns where it is to run.

What a daemon's start depends on that a spare cannot know ahead is its cgroup subtree (a pod's
cell sits below kubelet's cgroup parent) and its hostname (the pod's). The spare does all the
rest of its start — it was forked from the warm template, read its credentials, opened its
logs, journal and image store — then listens on PATH, a Unix socket in its instance directory
(mode 0600), for one claim, in two steps:

    host → spare   one JSON object {"cgroup_root": "...", "hostname": "..." | null}, "\n"
    spare → host   b"ok\n", or b"error: <why>\n"
    host → spare   b"moved\n", then EOF: every process of the spare is in its new cell now

The host sends the first line once the spare's new cell exists (with the pod's limits), and
moves the spare's processes there while the spare, told its place, sets its hostname (it is in
the instance's own uts namespace, the host is not) and makes its cgroup subtree: the move
waits for an RCU grace period of the kernel's (the first cgroup.procs write after a quiet
while; 6-16 ms on an idle machine, more under load), which the spare's own start then
overlaps instead of following. The spare's spawner, started before the claim, joins the
subtree only after "moved" (Claim.settled), and no workload starts before: a process moved by
the host after it joined a cgroup of the subtree would land back in the cell's own leaf. A spare still starting when it is
claimed (not listening yet) gets both lines once its processes have moved. A host that closes
the socket before "moved" (the move failed, or the spare was freed) ends the spare's start.
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

_MAX_CLAIM = 64 * 1024
_POLL = 0.5
MOVED = b"moved\n"
# How long a claimed spare waits for the host's "moved": the host moves a handful of processes.
SETTLE_TIMEOUT = 60.0


class ClaimError(Exception):
    """The claim could not be made or taken; the message says why."""


@dataclass(frozen=True)
class Claim:
    cgroup_root: str
    hostname: str | None = None
    # The spare's end of the claim's connection, until settled() has read the host's "moved".
    connection: socket.socket | None = field(default=None, compare=False, repr=False)
    stream: BinaryIO | None = field(default=None, compare=False, repr=False)

    def settled(self) -> None:
        """Wait until the host has moved every process of the spare into its new cell (the
        spare may start processes then); ClaimError if the host let go instead."""
        if self.connection is None or self.stream is None:
            return
        try:
            message = self.stream.read(_MAX_CLAIM)
        except ConnectionResetError:
            message = b""  # closed with our answer unread: let go
        except OSError as error:
            raise ClaimError(f"the host did not finish the claim: {error}") from None
        finally:
            self.stream.close()
            self.connection.close()
        if message != MOVED:
            raise ClaimError("the host let go of this spare before it moved it")


def await_claim(path: Path, stopping: threading.Event) -> Claim:
    """Listen on `path` until a claim comes (or `stopping` is set: ClaimError), apply its
    hostname, answer, and return it; its settled() waits for the host's "moved"."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # Bound under a private name and renamed once it listens: a host that finds `path` can
    # connect at once. Bound at `path` itself, a connect between bind and listen is refused
    # and the host's send() would take the spare for one that does not listen yet.
    binding = path.with_name(f".{path.name}.{os.getpid()}")
    previous = os.umask(0o177)  # born 0600, as every socket of ours
    try:
        binding.unlink(missing_ok=True)
        listener.bind(str(binding))
    finally:
        os.umask(previous)
    try:
        listener.listen(1)
        os.replace(binding, path)
        while True:
            if stopping.is_set():
                raise ClaimError("stopped before a claim came")
            readable, _, _ = select.select([listener], [], [], _POLL)
            if not readable:
                continue
            connection, _ = listener.accept()
            stream = connection.makefile("rb")
            try:
                connection.settimeout(SETTLE_TIMEOUT)
                message = _read_line(stream)
                if not message:
                    raise ClaimError("the host let go of this spare")
                try:
                    claim = _parse(message)
                    if claim.hostname:
                        socket.sethostname(claim.hostname)
                except (ClaimError, OSError) as error:
                    connection.sendall(f"error: {error}\n".encode())
                    raise ClaimError(str(error)) from None
                connection.sendall(b"ok\n")
            except BaseException:
                stream.close()
                connection.close()
                raise
            return Claim(claim.cgroup_root, claim.hostname, connection, stream)
    finally:
        listener.close()
        binding.unlink(missing_ok=True)
        path.unlink(missing_ok=True)


class ClaimOffer:
    """The host's side of one claim (offer_claim). send(), once the spare's new cell exists,
    tells a spare that listens already its place, so that it makes its subtree while its
    processes move; one still starting is told at the offer's end, after the move (it gets
    the pod's limits, not the spare's, for the rest of its start). The offer's end tells the
    spare its processes are there and reads its answer."""

    def __init__(self, path: Path, claim: Claim, deadline: float,
                 alive: Callable[[], bool]) -> None:
        self._path = path
        self._claim = claim
        self._deadline = deadline
        self._alive = alive
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.connected = self.sent = False

    def send(self) -> None:
        """Tell the spare its place now, if it listens."""
        if self._connect(wait=False):
            self._send_claim()

    def _connect(self, *, wait: bool) -> bool:
        while not self.connected:
            try:
                self._connection.connect(str(self._path))
                self.connected = True
            except (FileNotFoundError, ConnectionRefusedError):
                if not wait:
                    return False
                if not self._alive():
                    raise ClaimError("the spare ended before it listened") from None
                if time.monotonic() > self._deadline:
                    raise ClaimError("the spare did not listen for its claim in time") from None
                time.sleep(0.003)
        self._connection.settimeout(max(0.1, self._deadline - time.monotonic()))
        return True

    def _send_claim(self) -> None:
        try:
            self._connection.sendall(json.dumps({"cgroup_root": self._claim.cgroup_root,
                                                 "hostname": self._claim.hostname}).encode()
                                     + b"\n")
        except OSError as error:
            raise ClaimError(f"the spare did not take its claim: {error}") from None
        self.sent = True

    def _settle(self) -> None:
        self._connect(wait=True)
        if not self.sent:
            self._send_claim()
        failure: OSError | None = None
        try:
            self._connection.sendall(MOVED)
            self._connection.shutdown(socket.SHUT_WR)
        except OSError as error:
            failure = error  # a spare that refused closed its end: its answer says why
        try:
            with self._connection.makefile("rb") as stream:
                answer = _read_line(stream)
        except OSError as error:
            answer, failure = b"", failure or error
        if answer.startswith(b"error: ") or (failure is None and answer != b"ok"):
            raise ClaimError(answer.decode(errors="replace").removeprefix("error: ")
                             or "the spare ended without an answer")
        if failure is not None:
            raise ClaimError(f"the spare did not take its claim: {failure}")

    def close(self) -> None:
        self._connection.close()


@contextmanager
def offer_claim(path: Path, claim: Claim, timeout: float,
                alive: Callable[[], bool] = lambda: True) -> Iterator[ClaimOffer]:
    """The host's side of a claim to the spare listening (or about to) on `path`. In the
    block, the caller makes the spare's new cell, calls send(), and moves the spare's
    processes; a block that ends normally then tells the spare "moved" (sending the claim
    first if it did not listen at send(): waiting up to `timeout` seconds for it, while it is
    `alive`) and waits for its answer (ClaimError if it refused). A block that raises lets the
    spare go without "moved": its start fails."""
    offer = ClaimOffer(path, claim, time.monotonic() + timeout, alive)
    try:
        yield offer
        offer._settle()
    finally:
        offer.close()


def _read_line(stream: BinaryIO) -> bytes:
    """One line, without its newline (what came before EOF if no newline did)."""
    line = stream.readline(_MAX_CLAIM + 1)
    if len(line) > _MAX_CLAIM:
        raise ClaimError("the claim is too large")
    return line.removesuffix(b"\n")


def _parse(message: bytes) -> Claim:
    try:
        fields = json.loads(message)
        root, hostname = fields["cgroup_root"], fields.get("hostname")
    except (ValueError, KeyError, TypeError):
        raise ClaimError("the claim does not parse") from None
    if not isinstance(root, str) or not root or not isinstance(hostname, (str, type(None))):
        raise ClaimError("the claim does not parse")
    return Claim(root, hostname)


__all__ = ["Claim", "ClaimError", "ClaimOffer", "await_claim", "offer_claim"]
