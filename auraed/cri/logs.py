"""Container logs in the CRI format kubelet reads: one record per line,

    <RFC 3339 time with nanoseconds> <stdout|stderr> <F|P> <line>

F marks a full line, P a partial one (a line the runtime split). The daemon captures each
channel as lines (auraed.output); a follower thread per channel copies them here as they come.
Lines longer than the capture's piece size (64 KiB) arrive as pieces and are each written as F:
kubelet then shows them as separate lines.
"""

from __future__ import annotations

import datetime
import os
import threading
from pathlib import Path

from auraed.output import OutputLog


def rfc3339_nano(timestamp: float) -> str:
    seconds = int(timestamp)
    nanos = round((timestamp - seconds) * 1e9)
    if nanos >= 1_000_000_000:
        seconds, nanos = seconds + 1, nanos - 1_000_000_000
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z"


class CriLog:
    """One container's log file; both channels write to it, a record at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = self._open()
        self._cancel = threading.Event()
        self._followers: list[threading.Thread] = []

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)

    def write(self, stream: str, lines: list[tuple[float, bytes]]) -> None:
        records = b"".join(b"%s %s F %s\n" % (rfc3339_nano(when).encode(), stream.encode(), line)
                           for when, line in lines)
        with self._lock:
            if self._fd >= 0:
                os.write(self._fd, records)

    def reopen(self) -> None:
        """After kubelet rotated the file: continue in a new one at the same path."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = self._open()

    def follow(self, stdout: OutputLog, stderr: OutputLog) -> None:
        """Copy both channels here until they end (or close() is called)."""
        for stream, output in (("stdout", stdout), ("stderr", stderr)):
            thread = threading.Thread(target=self._copy, args=(stream, output), daemon=True,
                                      name=f"cri-log-{stream}")
            thread.start()
            self._followers.append(thread)

    def _copy(self, stream: str, output: OutputLog) -> None:
        for batch in output.follow_batches(self._cancel):
            self.write(stream, batch)

    def drain(self, timeout: float) -> None:
        """Wait until the followers have copied everything (the channels ended)."""
        for thread in self._followers:
            thread.join(timeout)

    def close(self) -> None:
        self._cancel.set()
        self.drain(5.0)
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
