"""Signals that reach workloads, as a feed subscribers follow.

The runtime publishes every signal it delivers (Stop's SIGTERM and SIGKILL,
Free's kills) and every signal that ended a workload, whoever sent it. A
subscriber gets its own bounded queue: publishing never waits for a slow
subscriber; one that falls more than `capacity` events behind loses the
oldest.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from auraed.runtime.names import CellName

_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class SignalEvent:
    signal: int
    pid: int  # as the workload's cell sees it (what Start reported)
    host_pid: int
    cell: CellName | None
    executable: str
    timestamp: float
    delivered_by_daemon: bool  # False: the signal ended the workload, sender unknown


class _Subscription:
    def __init__(self, accepts: Callable[[SignalEvent], bool], capacity: int) -> None:
        self.accepts = accepts
        self.events: collections.deque[SignalEvent] = collections.deque(maxlen=capacity)


class SignalFeed:
    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._changed = threading.Condition()
        self._subscriptions: list[_Subscription] = []

    def publish(self, event: SignalEvent) -> None:
        with self._changed:
            for subscription in self._subscriptions:
                if subscription.accepts(event):
                    subscription.events.append(event)
            self._changed.notify_all()

    def follow(self, cancelled: Callable[[], bool], cell: CellName | None = None) -> Iterator[SignalEvent]:
        """Events from now on until `cancelled()`; only those of `cell` and the
        cells nested in it when a cell is given."""

        def accepts(event: SignalEvent) -> bool:
            return cell is None or (event.cell is not None and event.cell.is_within(cell))

        subscription = _Subscription(accepts, self._capacity)
        with self._changed:
            self._subscriptions.append(subscription)
        try:
            while True:
                with self._changed:
                    while not subscription.events and not cancelled():
                        self._changed.wait(_POLL_SECONDS)
                    if cancelled():
                        return
                    batch = list(subscription.events)
                    subscription.events.clear()
                yield from batch
        finally:
            with self._changed:
                self._subscriptions.remove(subscription)

    @property
    def subscriber_count(self) -> int:
        with self._changed:
            return len(self._subscriptions)
