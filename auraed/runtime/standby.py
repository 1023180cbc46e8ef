"""A spare daemon's claim: how a daemon started ahead (`auraed --standby PATH`, a spare pod
instance) learns where it is to run.

What a daemon's start depends on that a spare cannot know ahead is its cgroup subtree (a pod's
cell sits below kubelet's cgroup parent) and its hostname (the pod's). The spare does all the
rest of its start — it was forked from the warm template, read its credentials, opened its
logs, journal and image store — then listens on PATH, a Unix socket in its instance directory
(mode 0600), for one claim:

    host → spare   one JSON object {"cgroup_root": "...", "hostname": "..." | null}, then EOF
    spare → host   b"ok", or b"error: <why>"; then the spare closes the socket and goes on

Only then does it make its cgroup subtree and serve. The hostname is set by the spare itself:
it is in the instance's own uts namespace, and the host is not. The host moves the spare's
cell (Workloads.rehome) before it sends the claim, so the subtree the spare makes is below the
cell's new place. A spare whose host closes the socket without a claim (it was freed) exits.
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_MAX_CLAIM = 64 * 1024
_POLL = 0.5


class ClaimError(Exception):
    """The claim could not be made or taken; the message says why."""


@dataclass(frozen=True)
class Claim:
    cgroup_root: str
    hostname: str | None = None


def await_claim(path: Path, stopping: threading.Event) -> Claim:
    """Listen on `path` until a claim comes (or `stopping` is set: ClaimError), apply its
    hostname, answer, and return it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    previous = os.umask(0o177)  # born 0600, as every socket of ours
    try:
        path.unlink(missing_ok=True)
        listener.bind(str(path))
    finally:
        os.umask(previous)
    try:
        listener.listen(1)
        while True:
            if stopping.is_set():
                raise ClaimError("stopped before a claim came")
            readable, _, _ = select.select([listener], [], [], _POLL)
            if not readable:
                continue
            connection, _ = listener.accept()
            with connection:
                message = _read_all(connection)
                if not message:
                    raise ClaimError("the host let go of this spare")
                try:
                    claim = _parse(message)
                    if claim.hostname:
                        socket.sethostname(claim.hostname)
                except (ClaimError, OSError) as error:
                    connection.sendall(f"error: {error}".encode())
                    raise ClaimError(str(error)) from None
                connection.sendall(b"ok")
                return claim
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def send_claim(path: Path, claim: Claim, timeout: float,
               alive: Callable[[], bool] = lambda: True) -> None:
    """The host's side: give the spare listening on `path` its claim (waiting up to `timeout`
    seconds for it to listen, if it is still starting and `alive`) and wait for its answer."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as connection:
        while True:
            try:
                connection.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if not alive():
                    raise ClaimError("the spare ended before it listened") from None
                if time.monotonic() > deadline:
                    raise ClaimError("the spare did not listen for its claim in time") from None
                time.sleep(0.003)
        connection.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            connection.sendall(json.dumps({"cgroup_root": claim.cgroup_root,
                                           "hostname": claim.hostname}).encode())
            connection.shutdown(socket.SHUT_WR)
            answer = _read_all(connection)
        except OSError as error:
            raise ClaimError(f"the spare did not take its claim: {error}") from None
    if answer != b"ok":
        raise ClaimError(answer.decode(errors="replace").removeprefix("error: ")
                         or "the spare ended without an answer")


def _read_all(connection: socket.socket) -> bytes:
    chunks = []
    size = 0
    while chunk := connection.recv(4096):
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_CLAIM:
            raise ClaimError("the claim is too large")
    return b"".join(chunks)


def _parse(message: bytes) -> Claim:
    try:
        fields = json.loads(message)
        root, hostname = fields["cgroup_root"], fields.get("hostname")
    except (ValueError, KeyError, TypeError):
        raise ClaimError("the claim does not parse") from None
    if not isinstance(root, str) or not root or not isinstance(hostname, (str, type(None))):
        raise ClaimError("the claim does not parse")
    return Claim(root, hostname)


__all__ = ["Claim", "ClaimError", "await_claim", "send_claim"]
