"""Restart policies: when an executable's process ends, start it again — or not.

The semantics are systemd's: `Restart=no | on-failure | always`, a delay before each restart
that doubles with every consecutive one up to a cap (RestartSec, RestartMaxDelaySec), and a
start limit (StartLimitBurst starts within StartLimitIntervalSec; one more and the policy gives
up). A run that lasts the whole start-limit interval counts as a success: the next restart
waits the first delay again. Stop, Free of the cell and the daemon's shutdown end a policy.

Exits arrive on the spawner's reader thread, which must not wait for the workload lock, so the
decision is taken there (it needs only the executable's own state) and the restart itself runs
later on the `RestartTimer`'s thread, which may take the lock.

A policy outlives the daemon (live restore): its state is kept as a record in the spawner
(auraed.runtime.restore), so the next daemon restarts an adopted executable when it exits, or at
once (after what is left of its delay) if it exited while no daemon ran, with the same delay,
count and start limit. `starts` and `due` are CLOCK_MONOTONIC readings, which are the same for
every process on the host until it reboots, and a reboot ends every workload anyway.
"""

from __future__ import annotations

import collections
import enum
import heapq
import itertools
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from auraed.kernel.processes import ExitStatus

if TYPE_CHECKING:
    from auraed.runtime.executables import Executable

log = logging.getLogger("auraed.restarts")

# Signals systemd counts as a clean end for Restart=on-failure.
CLEAN_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE})


class RestartMode(enum.Enum):
    NO = "no"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


@dataclass(frozen=True)
class RestartPolicy:
    mode: RestartMode = RestartMode.NO
    first_delay: float = 0.1  # seconds
    max_delay: float = 30.0
    burst: int = 5  # starts allowed within `interval`, the first included; 0: no limit
    interval: float = 10.0

    def wants_restart(self, status: ExitStatus) -> bool:
        if self.mode is RestartMode.ALWAYS:
            return True
        if self.mode is RestartMode.ON_FAILURE:
            if status.signal is not None:
                return status.signal not in CLEAN_SIGNALS
            return status.exit_code != 0
        return False

    def delay(self, consecutive: int) -> float:
        """The wait before the `consecutive`-th restart in a row (1 for the first)."""
        return min(self.max_delay, self.first_delay * float(2 ** min(consecutive - 1, 62)))


NO_RESTART = RestartPolicy()


@dataclass(eq=False)
class RestartState:
    """One executable's policy and history, shared by every process the policy starts."""

    policy: RestartPolicy = NO_RESTART
    count: int = 0  # restarts so far
    consecutive: int = 0  # restarts since the last run that counted as a success
    last_delay: float = 0.0  # what the latest restart waited, in seconds
    next_at: float = 0.0  # wall-clock time of the pending restart; 0 when none
    due: float = 0.0  # monotonic time of the pending restart; 0 when none
    ended: bool = False  # Stop, Free or shutdown: never again
    gave_up: bool = False  # the start limit was hit
    starts: collections.deque[float] = field(default_factory=collections.deque)  # monotonic

    def record_start(self, now: float | None = None) -> None:
        self.starts.append(time.monotonic() if now is None else now)
        while len(self.starts) > max(self.policy.burst, 1):
            self.starts.popleft()

    def plan(self, status: ExitStatus, ran_for: float, now: float | None = None) -> float | None:
        """The delay before restarting after `status`, or None: no restart (gave_up says
        whether the start limit decided)."""
        policy = self.policy
        if self.ended or self.gave_up or not policy.wants_restart(status):
            return None
        now = time.monotonic() if now is None else now
        if ran_for >= policy.interval:
            self.consecutive = 0
        delay = policy.delay(self.consecutive + 1)
        if policy.burst:
            # The restart would be a start at now + delay: refused if `burst` starts already
            # fell within the interval before it.
            recent = [t for t in self.starts if t > now + delay - policy.interval]
            if len(recent) >= policy.burst:
                self.gave_up = True
                return None
        self.consecutive += 1
        return delay


class RestartTimer:
    """Runs each planned restart when it is due, on one thread of its own."""

    def __init__(self, restart: Callable[[Executable], None],
                 on_give_up: Callable[[Executable], None],
                 on_planned: Callable[[Executable], None] = lambda executable: None) -> None:
        """on_planned: called (on the exit's thread) once a restart is planned or the policy
        gave up: the state changed and must be kept for a later daemon."""
        self._restart = restart
        self._on_give_up = on_give_up
        self._on_planned = on_planned
        self._due: list[tuple[float, int, Executable]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="restarts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._due.clear()
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join()

    def exited(self, executable: Executable, *, resumed: bool = False) -> None:
        """Called once an exit is recorded (on any thread, with no lock held that a restart
        needs): plan the restart, or say the policy gave up.

        resumed: the exit was recorded by an earlier daemon, or happened while none ran (live
        restore). A restart that daemon had planned keeps its due time; one not planned yet is
        planned as at the exit, so the time since then counts towards its delay."""
        state = executable.restart
        status = executable.exit_status
        if state.policy.mode is RestartMode.NO or status is None or state.ended or state.gave_up:
            return
        now = time.monotonic()
        if resumed and state.due:
            delay = state.last_delay
            due = state.due
        else:
            since_exit = max(0.0, time.time() - executable.exited_at) if resumed else 0.0
            delay_or_none = state.plan(status, executable.exited_at - executable.started_at,
                                       now - since_exit)
            if delay_or_none is None:
                if state.gave_up:
                    log.warning("restart policy gave up: start limit hit",
                                extra={"executable": str(executable.key),
                                       "starts": len(state.starts),
                                       "interval": state.policy.interval})
                    self._on_planned(executable)
                    self._on_give_up(executable)
                return
            delay = delay_or_none
            due = now - since_exit + delay
        state.last_delay = delay
        state.due = due
        state.next_at = time.time() + max(0.0, due - now)
        self._on_planned(executable)
        with self._changed:
            if self._closed:
                return
            heapq.heappush(self._due, (due, next(self._order), executable))
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._closed and (not self._due or self._due[0][0] > time.monotonic()):
                    timeout = self._due[0][0] - time.monotonic() if self._due else None
                    self._changed.wait(timeout)
                if self._closed:
                    return
                _, _, executable = heapq.heappop(self._due)
            try:
                self._restart(executable)
            except Exception:
                log.exception("restarting failed", extra={"executable": str(executable.key)})
