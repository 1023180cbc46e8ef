"""The audit log: one JSON line per mutating call and per denied call.

RPC threads hand entries to a bounded queue and return at once; one writer
thread serialises them, appends them to the file (a write per line, no fsync)
and rotates it by size
(audit.log, audit.log.1, ... audit.log.N, oldest last). The writer is woken
by the first entry after it went idle and then lets WRITE_DELAY pass before it
takes what is queued: calls back to back wake it once per batch rather than
once per call (each wake-up is a thread switch and a turn of the interpreter
lock the calls wait for). When the writer falls behind and the queue is full,
entries are dropped and counted, never waited for: a slow disk must not stall
the API. The next line written after a drop
is an {"event": "dropped", "count": N} record, so gaps are visible.

One line (keys in this order; `target` holds only what the request named):

  {"time": "2025-01-31T12:00:00.123Z", "peer": "spiffe://td/admin",
   "method": "/aurae.cells.v0.CellService/Start",
   "target": {"cell": "web", "executable": "api"},
   "decision": "allow", "code": "OK", "duration_ms": 3.1}

Denied calls add "reason", and a certificate refused for its identity adds
"uris": its URI SANs exactly as parsed. No gRPC imports.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

log = logging.getLogger("auraed.audit")

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5
DEFAULT_QUEUE_SIZE = 10_000
# How long the writer, once woken, lets entries gather before it writes them: at most this
# much of the log is still in memory when the daemon is killed outright.
WRITE_DELAY = 0.01
# A request can name a 4 MiB cell; the log keeps enough of it to recognise.
MAX_TARGET_CHARS = 256


@dataclass(frozen=True)
class AuditEntry:
    peer: str
    method: str
    decision: Literal["allow", "deny"]
    code: str
    duration_ms: float
    target: Mapping[str, str] = field(default_factory=dict)
    reason: str | None = None
    # A refused certificate's URI SANs exactly as parsed; None for calls with an identity.
    uris: tuple[str, ...] | None = None
    time: float = field(default_factory=time.time)

    def to_json(self) -> str:
        record: dict[str, object] = {
            "time": _timestamp(self.time),
            "peer": self.peer,
            "method": self.method,
            "target": {key: _clip(value) for key, value in self.target.items()},
            "decision": self.decision,
            "code": self.code,
            "duration_ms": round(self.duration_ms, 3),
        }
        if self.reason is not None:
            record["reason"] = self.reason
        if self.uris is not None:
            record["uris"] = list(self.uris)
        # ensure_ascii: control characters, NULs and non-ASCII in hostile names stay escaped on
        # one line; DEL too, which json leaves as it is.
        return json.dumps(record, ensure_ascii=True).replace("\x7f", "\\u007f")


class AuditLog:
    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 backups: int = DEFAULT_BACKUPS, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        if max_bytes <= 0 or backups < 1 or queue_size < 1:
            raise ValueError("max_bytes, backups and queue_size must be positive")
        self.path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._queue_size = queue_size
        # Appended by RPC threads, taken by the writer: deque's append and popleft are atomic.
        self._queue: deque[AuditEntry] = deque()
        # Set while entries wait for the writer; cleared by the writer before it takes them,
        # so an entry queued after the clear sets it again and is never left behind.
        self._queued = threading.Event()
        self._closing = False
        self._drop_lock = threading.Lock()
        self._dropped = 0
        self._reported_drops = 0
        self._file: IO[str] | None = None
        self._size = 0
        self._failing = False
        self._writer: threading.Thread | None = None

    @property
    def dropped(self) -> int:
        """Entries lost so far: the queue was full, or the file could not be written."""
        return self._dropped

    def start(self) -> None:
        """Open (or create, mode 0600) the log and start the writer thread."""
        self._open()
        self._writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._writer.start()

    def record(self, entry: AuditEntry) -> None:
        """Queue an entry; never blocks. Dropped (and counted) if the queue is full."""
        if len(self._queue) >= self._queue_size:
            with self._drop_lock:
                self._dropped += 1
            return
        self._queue.append(entry)
        if not self._queued.is_set():  # the writer is idle, or already taking the queue
            self._queued.set()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the writer and close the file."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        self._closing = True
        self._queued.set()
        writer.join(timeout)
        if writer.is_alive():
            log.error("the audit log writer did not finish", extra={"path": str(self.path),
                                                                   "queued": len(self._queue)})
            return  # it still owns the file
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write_loop(self) -> None:
        while True:
            self._queued.wait()
            if not self._closing:
                time.sleep(WRITE_DELAY)  # let the entries of calls back to back gather
            self._queued.clear()
            while self._queue:
                self._write(self._queue.popleft())
            if self._closing:
                return

    def _write(self, entry: AuditEntry) -> None:
        lines = []
        reported = self._reported_drops
        dropped = self._dropped
        if dropped > reported:
            lines.append(json.dumps({"time": _timestamp(time.time()), "event": "dropped",
                                     "count": dropped - reported}))
            self._reported_drops = dropped
        lines.append(entry.to_json())
        data = "".join(line + "\n" for line in lines)
        try:
            if self._size and self._size + len(data) > self._max_bytes:
                self._rotate()
            if self._file is None:
                self._open()
            assert self._file is not None
            self._file.write(data)
            self._size += len(data)
        except OSError as error:
            # Count the loss (the drop report is retried with the next entry); say so once per
            # outage, not once per entry.
            self._reported_drops = reported
            with self._drop_lock:
                self._dropped += 1
            if not self._failing:
                log.error("cannot write the audit log", extra={"path": str(self.path),
                                                               "error": error.strerror})
            self._failing = True
            return
        if self._failing:
            log.info("writing the audit log again", extra={"path": str(self.path)})
            self._failing = False

    def _open(self) -> None:
        # O_NOFOLLOW: never append through a symlink planted where the log goes.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        # Line-buffered: each entry reaches the kernel as the writer takes it, so a daemon
        # killed outright loses only what was still queued.
        self._file = os.fdopen(fd, "a", encoding="ascii", buffering=1)
        self._size = os.fstat(fd).st_size

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for index in range(self._backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()


def _timestamp(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"


def _clip(value: str) -> str:
    return value if len(value) <= MAX_TARGET_CHARS else value[:MAX_TARGET_CHARS] + "..."


__all__ = ["AuditEntry", "AuditLog"]
