"""Two guests carried across two host daemon restarts (--live-restore SIGTERM, then SIGKILL):
one booted from a root drive, started from the CLI on a terminal (its boot progress shown), with
the Python layer; the other (the default root) started after it through the SDK. Each next
daemon re-adopts them and health-checks their guests behind its own start: Restoring, then
Running once a guest's auraed answers. While no daemon runs, the plain guest's QEMU is killed
(the next daemon lists it Shutdown and keeps nothing of it) and the rooted guest's auraed is
frozen (SIGSTOP, by a workload of its own the test signals over UDP on the guest's link): the
next daemon lists it Unresponsive, then Running once it is thawed; Stop and Free work afterwards.

Two boots for all of it (a TCG boot costs tens of seconds on a loaded machine); whatever
happens, no QEMU, TAP or file of this module is left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
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
PLAIN = "plain"
CACHE = guest_image.default_cache_dir()
HEALTH_TIMEOUT = 10  # --vm-health-timeout: how soon a frozen guest is listed Unresponsive
FREEZER_PORT = 9999
# A workload in the rooted guest: on "stop"/"cont" over UDP it sends SIGSTOP/SIGCONT to the
# guest's auraed (pid 1's one child), and answers every datagram (the test's acknowledgement).
FREEZER = """exec /usr/bin/python3 -c '
import os, signal, socket
def daemon():
    for pid in os.listdir("/proc"):
        try:
            status = open("/proc/" + pid + "/status").read()
            command = open("/proc/" + pid + "/cmdline", "rb").read()
        except OSError:
            continue
        if status.split("PPid:")[1].split()[0] == "1" and b"auraed" in command:
            return int(pid)
target = daemon()
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", PORT))
while True:
    data, peer = s.recvfrom(64)
    if data == b"stop":
        os.kill(target, signal.SIGSTOP)
    elif data == b"cont":
        os.kill(target, signal.SIGCONT)
    s.sendto(b"done " + data, peer)
'""".replace("PORT", str(FREEZER_PORT))


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


def machine(host: aurae_sdk.Client, vm_id: str = VM) -> object:
    return {m.id: m for m in host.vms.list().machines}[vm_id]


def wait_for_status(host: aurae_sdk.Client, vm_id: str, status: str, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while True:
        found = machine(host, vm_id)
        if found.status == status:  # type: ignore[attr-defined]
            return found
        assert time.monotonic() < deadline, (vm_id, status, found)
        time.sleep(0.2)


def qemu_of(host: aurae_sdk.Client, vm_id: str) -> int:
    cell = {node.cell.name: node for node in host.cells.list().cells}[f"vm-{vm_id}"]
    return int({e.name: e for e in cell.executables}["qemu"].pid)


def tap_of(summary: object) -> str:
    return str(summary.auraed_address).split("%")[1].split("]")[0]  # type: ignore[attr-defined]


def tell_freezer(tap: str, word: bytes, timeout: float = 120) -> None:
    """Send `word` to the rooted guest's freezer on our TAP's link until it acknowledges."""
    address = socket.getaddrinfo(f"fe80::2%{tap}", FREEZER_PORT, socket.AF_INET6,
                                 socket.SOCK_DGRAM)[0][4]
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sender:
        sender.settimeout(2.0)
        while True:
            sender.sendto(word, address)
            try:
                if sender.recvfrom(64)[0] == b"done " + word:
                    return
            except TimeoutError:
                pass
            assert time.monotonic() < deadline, f"the freezer never acknowledged {word!r}"


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


@pytest.mark.timeout(1500)  # two boots and three daemons, on a loaded machine under TCG
def test_a_root_drive_guest_survives_daemon_restarts(root_image: Path, tmp_path: Path,
                                                     leftovers_checked: list[DaemonProcess]) -> None:
    content = tmp_path / "content"
    content.mkdir()
    (content / "hello.txt").write_text("hello from a drive mount\n")
    data = tmp_path / "data.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(content), str(data), "8M"], check=True)
    flags = ("--live-restore", "--vm-boot-timeout", str(BOOT_TIMEOUT), "--vm-grace-period", "60",
             "--vm-health-timeout", str(HEALTH_TIMEOUT), "--vm-image-dir", str(CACHE))
    with ExitStack() as stack:
        first = stack.enter_context(running_daemon(*flags, vms=True))
        leftovers_checked.append(first)
        with first.client(timeout=60) as host:
            host.vms.allocate(machine={
                "id": VM, "root_drive": {"image_path": str(root_image), "read_only": True},
                "labels": {"aurae-py.io/owner": "node-a"},
                "drive_mounts": [{"image_path": str(data), "vm_path": "/srv/data",
                                  "fs_type": "ext4", "read_only": True}]})
            host.vms.allocate(machine={"id": PLAIN, "mem_size_mb": 256})
        qemus_before = qemus_of(first)
        drawn = start_on_a_terminal(first)
        with first.client(timeout=BOOT_TIMEOUT + 60) as host:
            # After the rooted one, not beside it: two TCG boots at once on a loaded 2-core
            # machine can take longer than the boot timeout.
            host.vms.start(vm_id=PLAIN)
        # The live line: elapsed seconds and the phase read from the console; then the outcome.
        assert re.search(rf"booting {VM} +[0-9]+\.[0-9] s ", drawn), drawn[-2000:]
        assert "pid 1 started the guest's auraed" in drawn or "health check" in drawn, drawn[-2000:]
        assert f"{VM} booted in" in drawn and "fe80::2%avm" in drawn, drawn[-2000:]
        with first.client(timeout=60) as host:
            qemu, plain_qemu = qemu_of(host, VM), qemu_of(host, PLAIN)
            assert qemus_of(first) - qemus_before == {qemu, plain_qemu}
            booted, plain = machine(host), machine(host, PLAIN)
            assert booted.status == "Running" and booted.root_dir_path == str(root_image)
            with host.vm(VM, timeout=120) as guest:
                # / is the image (read-only under a tmpfs overlay), not the host's /usr over 9p;
                # python3 is the image's own; the drive mount is where it was asked for.
                # The Python layer came along: a tmpfs at /python, first on the daemon's path
                # (pid 1's one child; pid 1 is auraed.pid1).
                output, status = run(guest, "look", "grep -E ' / | /usr | /srv/data | /python ' /proc/mounts;"
                                     " ls /usr/bin/python3; cat /srv/data/hello.txt;"
                                     " cat /etc/os-release | grep CODENAME; ls /python/grpc/__init__.pyc;"
                                     " tr '\\000' ' ' < /proc/1/cmdline; echo;"
                                     " for p in /proc/[0-9]*; do grep -q '^PPid:.1$' $p/status 2>/dev/null &&"
                                     " tr '\\000' '\\n' < $p/environ | grep '^PYTHONPATH='; done; true")
                assert status.exit_code == 0, output
                assert "python /python tmpfs" in output and "/python/grpc/__init__.pyc" in output, output
                assert "-m auraed.pid1 /aurae/pid1.json" in output, output
                assert "PYTHONPATH=/python" in output.splitlines(), output
                assert "root / overlay ro" not in output and " / overlay rw," in output and "hostusr" not in output, output
                assert "/dev/vdb /srv/data ext4 ro" in output, output
                assert "hello from a drive mount" in output
                assert f"VERSION_CODENAME={guest_root.release()}" in output
        tap, plain_tap = tap_of(booted), tap_of(plain)

        # A planned restart: SIGTERM with --live-restore leaves the guests running.
        assert first.stop(signal.SIGTERM, timeout=120) == 0
        assert "detached from the virtual machines" in first.log()
        assert {qemu, plain_qemu} <= qemu_pids() and {tap, plain_tap} <= taps()
        second = stack.enter_context(running_daemon(*flags, vms=True, after=first))
        with second.client(timeout=60) as host:
            # Serving already; each guest is Running once its auraed answered the new daemon.
            adopted = machine(host)
            assert adopted.status in ("Restoring", "Running"), adopted
            assert adopted.auraed_address == booted.auraed_address
            adopted = wait_for_status(host, VM, "Running", timeout=120)
            assert not adopted.status_detail  # type: ignore[attr-defined]
            wait_for_status(host, PLAIN, "Running", timeout=120)
            assert adopted.accelerator == booted.accelerator  # type: ignore[attr-defined]
            assert dict(adopted.labels) == {"aurae-py.io/owner": "node-a"}  # type: ignore[attr-defined]
            for vm_id in (VM, PLAIN):
                with host.vm(vm_id, timeout=120) as guest:
                    assert guest.discovery.discover().healthy
            with host.vm(VM, timeout=120) as guest:
                guest.cells.allocate(cell={"name": "kept"})
                guest.cells.start(executable={"name": "freezer", "command": FREEZER})
            tell_freezer(tap, b"ping")
        log = second.log()
        assert 'msg="vm adopted" vm=rooted' in log
        assert re.search(r'msg="vm guest answers" vm=rooted address=\S+ seconds=', log), log[-3000:]

        # A crash: SIGKILL. While no daemon runs, the plain guest's QEMU is killed and the
        # rooted guest's auraed frozen.
        second.stop(signal.SIGKILL)
        os.kill(plain_qemu, signal.SIGKILL)
        tell_freezer(tap, b"stop")
        third = stack.enter_context(running_daemon(*flags, vms=True, after=second))
        with third.client(timeout=120) as host:
            ended = machine(host, PLAIN)
            assert ended.status == "Shutdown", ended
            assert ended.stop_reason.startswith("QEMU ended while no daemon ran"), ended
            assert not ended.auraed_address and plain_tap not in taps()
            assert not (third.runtime_dir / "vms" / PLAIN).exists()
            # The daemon serves while the frozen guest is checked, and says what it is.
            assert machine(host).status in ("Restoring", "Unresponsive")
            frozen = wait_for_status(host, VM, "Unresponsive", timeout=HEALTH_TIMEOUT + 60)
            assert "has not answered a health check" in frozen.status_detail, frozen  # type: ignore[attr-defined]
            with pytest.raises(aurae_sdk.errors.FailedPrecondition) as refused:
                host.vms.start(vm_id=VM)
            assert "Unresponsive" in refused.value.message
            with pytest.raises(aurae_sdk.errors.FailedPrecondition):
                host.cells.free(cell_name=f"vm-{VM}")  # still the VM's own cell
            tell_freezer(tap, b"cont")
            thawed = wait_for_status(host, VM, "Running", timeout=120)
            assert not thawed.status_detail  # type: ignore[attr-defined]
            with host.vm(VM, timeout=120) as guest:
                assert [n.cell.name for n in guest.cells.list().cells] == ["kept"]
            # Stop reaches the adopted QEMU through its re-opened QMP session.
            host.vms.stop(vm_id=VM)
            stopped = machine(host)
            assert (stopped.status, stopped.stop_reason) == ("Shutdown", "stopped by Stop")
            assert qemu not in qemu_pids() and tap not in taps()
            for vm_id in (VM, PLAIN):
                host.vms.free(vm_id=vm_id)
            assert not host.vms.list().machines
            assert not {f"vm-{VM}", f"vm-{PLAIN}"} & {n.cell.name for n in host.cells.list().cells}
        log = third.log()
        assert 'msg="vm guest does not answer" vm=rooted' in log, log[-3000:]
        assert not (third.runtime_dir / "vms" / VM).exists()
        assert not {qemu, plain_qemu} & qemu_pids()
