"""What every test that boots a real guest is marked with: such tests are slow (TCG here) and
need root and QEMU, which scripts/install.sh installs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.support.daemon import DaemonProcess

GUEST_MARKS = [
    pytest.mark.vm,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86 is not installed (scripts/install.sh)"),
]


# Other runs boot guests on the same machine at the same time (another checkout's tests or
# benchmarks): a test counts, kills and deletes only the QEMUs and TAPs of its own daemon, never
# "whatever appeared meanwhile".

def qemus_of(daemon: DaemonProcess) -> set[int]:
    """The QEMU processes in this daemon's cgroup subtree (its VMs' cells), alive now."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "qemu-system-x86":
                continue
            lines = (entry / "cgroup").read_text().splitlines()
        except OSError:
            continue
        if any(daemon.cgroup_root in line.split(":", 2)[-1].split("/") for line in lines):
            found.add(int(entry.name))
    return found


def taps_of(daemon: DaemonProcess) -> set[str]:
    """The TAPs this daemon made that exist now: those its QEMUs use, those its logs gave as a
    guest's address, and those its registry lists."""
    names: set[str] = set()
    for log in daemon.workdir.glob("auraed*.log"):
        names |= set(re.findall(r"%(avm[0-9a-f]{8})", log.read_text(errors="replace")))
    registry = daemon.workdir / "lib" / "vm-taps"
    if registry.exists():
        names |= set(registry.read_text().split())
    for pid in qemus_of(daemon):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        names |= {part.split("=", 1)[1] for arg in argv for part in arg.split(",")
                  if part.startswith("ifname=")}
    return names & host_taps()


def host_taps() -> set[str]:
    """Every TUN/TAP device on the host (to look at, not to delete)."""
    out = subprocess.run(["ip", "-o", "link", "show", "type", "tun"], capture_output=True,
                         text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()}
