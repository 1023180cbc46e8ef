"""A command run with its stdout on a pseudo-terminal, as a person at a terminal runs it."""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
import time

from tests.support.daemon import DaemonProcess

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_pty(daemon: DaemonProcess, *args: str, timeout: float = 120) -> tuple[int, str, str]:
    """`aurae-py ARGS` with stdout on a pseudo-terminal (120 columns) and stderr on a pipe;
    returns the status, everything written to the terminal, and stderr."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "AURAE_CONFIG": daemon.config, "TERM": "xterm-256color",
           "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    child = subprocess.Popen([sys.executable, "-m", "aurae_cli", *args], stdin=subprocess.DEVNULL,
                             stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    written = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal has closed it
                break
            if not chunk:
                break
            written += chunk
        status = child.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.stderr is not None
    return status, written.decode(errors="replace"), child.stderr.read().decode(errors="replace")


def plain(text: str) -> str:
    return ANSI.sub(b"", text.encode()).decode().replace("\r", "")
