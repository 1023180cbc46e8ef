"""One guest booted from a root drive, started from the CLI on a terminal (its boot progress
shown), then carried across two host daemon restarts (--live-restore SIGTERM, then SIGKILL):
each next daemon re-adopts it, the guest still answers, and Stop and Free work afterwards.

One boot for all of it (a TCG boot costs tens of seconds on a loaded machine); whatever happens,
no QEMU, TAP or file of this module is left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

import aurae_sdk
from auraed.kernel import guest_image, guest_root
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.guests import GUEST_MARKS, qemus_of, taps_of
from tests.vms.test_vms import BOOT_TIMEOUT, qemu_pids, run, taps

pytestmark = [
    *GUEST_MARKS,
    pytest.mark.skipif(shutil.which("mmdebstrap") is None,
                       reason="mmdebstrap is not installed (scripts/install.sh)"),
]

VM = "rooted"
CACHE = guest_image.default_cache_dir()


@pytest.fixture(scope="module")
def root_image() -> Path:
    guest_image.build(CACHE)
    return guest_root.build(CACHE)  # cached; the first build fetches Debian packages (~1-3 min)


@pytest.fixture
def leftovers_checked() -> Iterator[list[DaemonProcess]]:
    """The test adds its first daemon (the later ones share its directories and cgroups)."""
    daemons: list[DaemonProcess] = []
    try:
        yield daemons
    finally:
        left_taps = {name for daemon in daemons for name in taps_of(daemon)}
        left_qemus = {pid for daemon in daemons for pid in qemus_of(daemon)}
        for pid in left_qemus:  # only our daemons' own, should one have died
            os.kill(pid, signal.SIGKILL)
        for name in left_taps:
            subprocess.run(["ip", "link", "del", name], check=False)
        assert not left_taps and not left_qemus, (left_taps, left_qemus)


def machine(host: aurae_sdk.Client) -> object:
    return {m.id: m for m in host.vms.list().machines}[VM]


def start_on_a_terminal(daemon: DaemonProcess) -> str:
    """`aurae-py vms start` on a pseudo-terminal; returns what it drew and printed."""
    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "aurae_cli", "vms", "start", VM],
                          env={**os.environ, "AURAE_CONFIG": daemon.config, "TERM": "xterm"},
                          timeout=BOOT_TIMEOUT + 60, dimensions=(24, 200), encoding="utf-8")
    child.expect(pexpect.EOF)
    child.close()
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", str(child.before))  # rich's colours
    assert child.exitstatus == 0, drawn[-3000:]
    return drawn


@pytest.mark.timeout(1500)  # one boot and three daemons, on a loaded machine under TCG
def test_a_root_drive_guest_survives_daemon_restarts(root_image: Path, tmp_path: Path,
                                                     leftovers_checked: list[DaemonProcess]) -> None:
    content = tmp_path / "content"
    content.mkdir()
    (content / "hello.txt").write_text("hello from a drive mount\n")
    data = tmp_path / "data.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(content), str(data), "8M"], check=True)
    flags = ("--live-restore", "--vm-boot-timeout", str(BOOT_TIMEOUT), "--vm-grace-period", "60",
             "--vm-image-dir", str(CACHE))
    with ExitStack() as stack:
        first = stack.enter_context(running_daemon(*flags, vms=True))
        leftovers_checked.append(first)
        with first.client(timeout=60) as host:
            host.vms.allocate(machine={
                "id": VM, "root_drive": {"image_path": str(root_image), "read_only": True},
                "labels": {"aurae-py.io/owner": "node-a"},
                "drive_mounts": [{"image_path": str(data), "vm_path": "/srv/data",
                                  "fs_type": "ext4", "read_only": True}]})
        qemus_before = qemus_of(first)
        drawn = start_on_a_terminal(first)
        # The live line: elapsed seconds and the phase read from the console; then the outcome.
        assert re.search(rf"booting {VM} +[0-9]+\.[0-9] s ", drawn), drawn[-2000:]
        assert "pid 1 started the guest's auraed" in drawn or "health check" in drawn, drawn[-2000:]
        assert f"{VM} booted in" in drawn and "fe80::2%avm" in drawn, drawn[-2000:]
        (qemu,) = qemus_of(first) - qemus_before
        with first.client(timeout=60) as host:
            booted = machine(host)
            assert booted.status == "Running" and booted.root_dir_path == str(root_image)
            with host.vm(VM, timeout=120) as guest:
                # / is the image (read-only under a tmpfs overlay), not the host's /usr over 9p;
                # python3 is the image's own; the drive mount is where it was asked for.
                output, status = run(guest, "look", "grep -E ' / | /usr | /srv/data ' /proc/mounts;"
                                     " ls /usr/bin/python3; cat /srv/data/hello.txt;"
                                     " cat /etc/os-release | grep CODENAME")
                assert status.exit_code == 0, output
                assert "root / overlay ro" not in output and " / overlay rw," in output and "hostusr" not in output, output
                assert "/dev/vdb /srv/data ext4 ro" in output, output
                assert "hello from a drive mount" in output
                assert f"VERSION_CODENAME={guest_root.release()}" in output
        tap = booted.auraed_address.split("%")[1].split("]")[0]

        # A planned restart: SIGTERM with --live-restore leaves the guest running.
        assert first.stop(signal.SIGTERM, timeout=120) == 0
        assert "detached from the virtual machines" in first.log()
        assert qemu in qemu_pids() and tap in taps()
        second = stack.enter_context(running_daemon(*flags, vms=True, after=first))
        with second.client(timeout=60) as host:
            adopted = machine(host)
            assert (adopted.status, adopted.auraed_address) == ("Running", booted.auraed_address)
            assert adopted.accelerator == booted.accelerator
            assert dict(adopted.labels) == {"aurae-py.io/owner": "node-a"}  # ownership kept
            with host.vm(VM, timeout=120) as guest:
                assert guest.discovery.discover().healthy
                guest.cells.allocate(cell={"name": "kept"})
        assert 'msg="vm adopted" vm=rooted' in second.log()

        # A crash: SIGKILL; the next daemon adopts it again, and the guest kept its state.
        second.stop(signal.SIGKILL)
        third = stack.enter_context(running_daemon(*flags, vms=True, after=second))
        with third.client(timeout=120) as host:
            assert machine(host).status == "Running"
            with pytest.raises(aurae_sdk.errors.FailedPrecondition):
                host.cells.free(cell_name=f"vm-{VM}")  # still the VM's own cell
            with host.vm(VM, timeout=120) as guest:
                assert [n.cell.name for n in guest.cells.list().cells] == ["kept"]
            # Stop reaches the adopted QEMU through its re-opened QMP session.
            host.vms.stop(vm_id=VM)
            stopped = machine(host)
            assert (stopped.status, stopped.stop_reason) == ("Shutdown", "stopped by Stop")
            assert qemu not in qemu_pids() and tap not in taps()
            host.vms.free(vm_id=VM)
            assert not host.vms.list().machines
        assert not (third.runtime_dir / "vms" / VM).exists()
