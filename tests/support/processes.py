"""Whether a process lives, as tests see it from /proc.

By its state in /proc/<pid>/stat, never by its cmdline: a process is without one (it reads
empty) not only as a zombie but also in the middle of an execve (between the kernel's switch to
the new memory map and the new argv being set up; milliseconds on a loaded machine). A check
by cmdline just after a start took a live workload for a dead one (issue 12).
"""

from __future__ import annotations

import os
import select
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """Running, sleeping or stopped; not a zombie (dead, only not yet reaped), not gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it went while being read
        return False
    # The state follows the command name, which may itself hold spaces and parentheses.
    return stat.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")


def read_fifo_line(fd: int, timeout: float = 30.0) -> bytes:
    """One line from a fifo the test holds open both ways (so it never sees end of file)."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert readable, "the workload did not signal within the time"
        data += os.read(fd, 1)
    return data
