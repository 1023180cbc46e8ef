"""The daemon's own log stream, kept in memory for followers: a LogRing behind a logging.Handler."""

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from auraed.output.log import Cancelled, as_predicate

LogEntry = tuple[float, str]

_POLL_SECONDS = 0.2


class LogRing:
    """The last `capacity` log lines. Writers never wait for followers: a follower that falls
    more than capacity lines behind skips what was dropped."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._entries: deque[LogEntry] = deque(maxlen=capacity)
        self._changed = threading.Condition()
        # How many entries were ever appended: an entry's position in the whole stream.
        self._appended = 0
        self._closed = False

    def append(self, line: str, timestamp: float | None = None) -> None:
        with self._changed:
            self._entries.append((time.time() if timestamp is None else timestamp, line))
            self._appended += 1
            self._changed.notify_all()

    def close(self) -> None:
        """End every follow() once it has caught up (the daemon is shutting down)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def follow(self, cancelled: Cancelled, replay: int = 0) -> Iterator[LogEntry]:
        """Up to `replay` of the latest lines, then the lines appended from this call on, until
        cancelled (noticed within about 0.2 s while waiting) or the ring is closed."""
        with self._changed:
            position = self._appended - min(replay, len(self._entries))
        return self._entries_from(position, as_predicate(cancelled))

    def _entries_from(self, position: int, is_cancelled: Callable[[], bool]) -> Iterator[LogEntry]:
        while True:
            with self._changed:
                while position == self._appended and not self._closed and not is_cancelled():
                    self._changed.wait(_POLL_SECONDS)
                if is_cancelled() or position == self._appended:
                    return
                oldest = self._appended - len(self._entries)
                position = max(position, oldest)
                batch = list(itertools.islice(self._entries, position - oldest, None))
                position = self._appended
            yield from batch


class LogRingHandler(logging.Handler):
    """A logging.Handler that appends each formatted record to a LogRing."""

    def __init__(self, ring: LogRing, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.ring = ring

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.ring.append(self.format(record), record.created)
        except Exception:  # noqa: BLE001 - logging.Handler's contract: report, never raise
            self.handleError(record)
