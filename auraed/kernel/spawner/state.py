"""The spawner's state file: what a daemon adopts when it re-attaches.

The spawner writes it when a daemon asks to adopt (Adopt), atomically: to a temporary file,
fsync, rename over the old one, fsync the directory. A header line names the format, the
protocol version, the SHA-256 and the length of the JSON body that follows, so a file that is
short, long or altered (a torn write, a disk that lied, a hand edit) is refused on reading
instead of adopted half-way:

  aurae-spawner-state <version> <sha256 hex> <length>\\n
  {"records": {key: value}, "processes": [entry, ...]}

An entry: pid, ns_pid, start_time, kind ("spawn" | "holder"), argv, label (the daemon's, opaque),
status (raw wait status, or null while it runs), exited_at (unix seconds), outputs (per
captured channel: channel, directory, segment_bytes, max_segments, first, last, committed,
complete).

Standard library only: the fork server imports this.
"""

import hashlib
import json
import os
from typing import Any

MAGIC = b"aurae-spawner-state"


class StateTorn(Exception):
    """The state file is not what the spawner wrote."""


def write_state(path: str, version: int, state: dict[str, Any]) -> str:
    """Write `state` to `path` atomically; returns its digest."""
    body = json.dumps(state, separators=(",", ":")).encode()
    digest = hashlib.sha256(body).hexdigest()
    header = b"%s %d %s %d\n" % (MAGIC, version, digest.encode(), len(body))
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(header + body)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return digest


def read_state(path: str, version: int, digest: str | None = None) -> dict[str, Any]:
    """The state in `path`; StateTorn if it is not whole, not of `version`, or (given) not
    the one whose digest the spawner reported."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise StateTorn(f"{path}: {error.strerror}") from None
    header, newline, body = data.partition(b"\n")
    parts = header.split(b" ")
    if not newline or len(parts) != 4 or parts[0] != MAGIC:
        raise StateTorn(f"{path}: no state header")
    if parts[1] != b"%d" % version:
        raise StateTorn(f"{path}: written for protocol version {parts[1].decode(errors='replace')}, "
                        f"not {version}")
    if not parts[3].isdigit() or len(body) != int(parts[3]):
        raise StateTorn(f"{path}: {len(body)} bytes of state where the header says "
                        f"{parts[3].decode(errors='replace')} (a torn write)")
    actual = hashlib.sha256(body).hexdigest()
    if actual != parts[2].decode(errors="replace"):
        raise StateTorn(f"{path}: the state does not match its checksum (a torn write)")
    if digest is not None and actual != digest:
        raise StateTorn(f"{path}: not the state the spawner just wrote (digest {actual[:12]}, "
                        f"expected {digest[:12]})")
    try:
        state = json.loads(body)
    except ValueError as error:
        raise StateTorn(f"{path}: {error}") from None
    if not isinstance(state, dict):
        raise StateTorn(f"{path}: not a state object")
    return state
