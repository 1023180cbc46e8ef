"""A child this process forked itself, held through a pidfd: subprocess.Popen's pid, wait and
kill for processes that os.fork made. Signals go through the pidfd, so a pid the kernel has
reused is never signalled.

Standard library only: a VM guest's auraed forks its spawner seed before its heavy imports.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess


class ForkedChild:
    """One forked child; `what` names it in a TimeoutExpired."""

    def __init__(self, pid: int, what: str) -> None:
        self.pid = pid
        self._what = what
        self._pidfd = os.pidfd_open(pid)
        self._reaped = False

    def wait(self, timeout: float | None = None) -> None:
        """subprocess.Popen.wait's contract: reaped, or TimeoutExpired."""
        if self._reaped:
            return
        readable, _, _ = select.select([self._pidfd], [], [], timeout)
        if not readable:
            raise subprocess.TimeoutExpired(f"{self._what} {self.pid}", timeout or 0.0)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass  # reaped by someone else's catch-all wait: it ended all the same
        self._reaped = True
        os.close(self._pidfd)

    def running(self) -> bool:
        if self._reaped:
            return False
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        return not readable

    def kill(self) -> None:
        if not self._reaped:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)


__all__ = ["ForkedChild"]
