"""The QMP session against a real QEMU (no guest: `-machine none`, paused): a monitor that does
not answer within one attempt is retried cleanly once it does."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from auraed.kernel import qemu

pytestmark = pytest.mark.skipif(shutil.which(qemu.QEMU) is None, reason="needs QEMU")


def test_a_monitor_slower_than_one_attempt_is_connected_by_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An attempt that timed out used to run on in the loop and connect after all; the retry
    # then found the client "already connected and running" and failed until the deadline.
    monkeypatch.setattr(qemu, "CONNECT_ATTEMPT", 0.3)
    socket = tmp_path / "vm" / "qmp.sock"
    socket.parent.mkdir()
    machine = subprocess.Popen(
        [qemu.QEMU, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
         "-S", "-qmp", f"unix:{socket},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loop = qemu.QmpLoop()
    session = qemu.QmpSession(loop, str(socket), on_event=lambda name, data: None)
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert time.monotonic() < deadline and machine.poll() is None
            time.sleep(0.01)
        # Stopped, QEMU's listening socket still takes the connection but sends no greeting.
        os.kill(machine.pid, signal.SIGSTOP)
        threading.Timer(1.0, os.kill, (machine.pid, signal.SIGCONT)).start()
        session.connect(time.monotonic() + 30, alive=lambda: machine.poll() is None)
        assert session.execute("query-status")["status"] == "prelaunch"
        session.close()
    finally:
        os.kill(machine.pid, signal.SIGCONT)
        machine.kill()
        machine.wait(10)
        loop.close()
