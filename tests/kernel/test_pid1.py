"""auraed.pid1 on the host, as init of a fresh pid namespace (unshare): reaping, shutdown order,
exit codes. reboot(POWER_OFF) in a pid namespace other than the first ends its init as if killed
by SIGINT, which is how these tests see that pid 1 powered off instead of exiting."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")

DAEMON = """
trap 'echo daemon: got TERM; sleep 0.3; echo daemon: done; exit 3' TERM
# An orphan: the inner shell exits at once and leaves its sleep to pid 1.
sh -c 'sleep 0.2 & echo $! > {work}/orphan'
# A straggler outside the daemon's process group that ignores SIGTERM.
setsid sh -c 'trap "" TERM; echo $$ > {work}/straggler; exec sleep 600' &
while [ ! -s {work}/straggler ]; do sleep 0.01; done
grep -q ' /run tmpfs' /proc/self/mounts && echo daemon: /run is tmpfs
echo "daemon: pid $$"
{tail}
"""
SERVE = "echo daemon: ready; while :; do sleep 0.05; done"


@pytest.fixture
def work() -> Iterator[Path]:
    # Not under /tmp: pid 1 mounts a tmpfs there, which would hide the test's files.
    directory = Path(tempfile.mkdtemp(prefix="aurae-pid1-", dir="/var/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def start_init(work: Path, tail: str) -> subprocess.Popen[str]:
    script = work / "daemon.sh"
    script.write_text(DAEMON.format(work=work, tail=tail))
    config = work / "pid1.json"
    config.write_text(json.dumps({
        "daemon": ["/bin/sh", str(script)], "daemon_grace": 10, "cgroup": False,
        "interface": None, "power_button": None,
    }))
    return subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--net", "--uts", "--ipc",
         sys.executable, "-m", "auraed.pid1", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(process: subprocess.Popen[str], marker: str, timeout: float = 30) -> list[str]:
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if marker in line:
            return lines
    raise AssertionError(f"no {marker!r} in {lines}")


def init_pid(unshare: subprocess.Popen[str]) -> int:
    children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def finish(process: subprocess.Popen[str]) -> tuple[int, list[str]]:
    out, _ = process.communicate(timeout=60)
    return process.returncode, out.splitlines()


def powered_off(returncode: int) -> bool:
    # unshare re-raises its child's fatal signal on itself, or reports 128+N.
    return returncode in (-signal.SIGINT, 128 + signal.SIGINT)


def test_sigterm_stops_the_daemon_then_everyone_then_powers_off(work: Path) -> None:
    process = start_init(work, SERVE)
    try:
        before = read_until(process, "daemon: ready")
        pid1 = init_pid(process)
        straggler = int((work / "straggler").read_text())  # its pid inside the namespace
        os.kill(pid1, signal.SIGTERM)
        code, after = finish(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = before + after
    assert "daemon: /run is tmpfs" in lines
    assert powered_off(code), (code, lines)
    order = [line for line in lines if line.startswith(("auraed-pid1:", "daemon:"))]
    expected = ["auraed-pid1: shutting down: SIGTERM", "daemon: got TERM", "daemon: done",
                "auraed-pid1: daemon exited with 3", "auraed-pid1: power off"]
    positions = [order.index(line) for line in expected]
    assert positions == sorted(positions), order
    # The straggler, deaf to SIGTERM, needed SIGKILL; it and the orphan were reaped by pid 1.
    assert straggler > 1
    assert order.index("auraed-pid1: processes left 2 s after SIGTERM: SIGKILL") > order.index(
        "auraed-pid1: daemon exited with 3")
    reaped = next(line for line in lines if line.startswith("auraed-pid1: reaped"))
    assert int(reaped.split()[2]) >= 2, lines


def test_a_daemon_that_ends_by_itself_powers_the_machine_off(work: Path) -> None:
    process = start_init(work, "sleep 0.5; exit 5")
    try:
        code, lines = finish(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert powered_off(code), (code, lines)
    assert "auraed-pid1: shutting down: the daemon ended (exited with 5)" in lines
    assert lines.index("auraed-pid1: power off") > lines.index(
        "auraed-pid1: shutting down: the daemon ended (exited with 5)")


def test_pid1_never_exits_without_a_config(work: Path) -> None:
    """A broken config still ends in power-off, never in pid 1 exiting (a kernel panic)."""
    process = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--net",
         sys.executable, "-m", "auraed.pid1", str(work / "missing.json")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    code, lines = finish(process)
    assert powered_off(code), (code, lines)
    assert any("cannot read" in line for line in lines)
