"""VmService with real QEMU guests whose pid 1 is auraed (TCG here; see docs/vms.md).

One daemon and few boots for the whole module (each costs seconds under TCG, more on a loaded
machine): the guest booted first serves the lifecycle, drive, console and cgroup v2 tests, then
powers itself off; a second boot is stopped through QMP, and that stopped machine freed; a third
is stopped by the host daemon's own shutdown. A running machine's Free is
tests/vms/test_declared_vm.py's (`aurae-py delete` frees the guest `apply` booted).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import aurae_sdk
from aurae_sdk import errors
from auraed.kernel import guest_image
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.guests import GUEST_MARKS, qemus_of, taps_of
from tests.support.guests import host_taps as taps

pytestmark = GUEST_MARKS

BOOT_TIMEOUT = 300  # TCG on a busy 2-core machine; a boot usually takes 5-25 s
VM = "t1"


def qemu_pids() -> set[int]:
    """Every QEMU on the host: to see whether one of ours still runs, never to count ours."""
    out = subprocess.run(["pgrep", "-x", "qemu-system-x86"], capture_output=True, text=True,
                         check=False).stdout
    return {int(pid) for pid in out.split()}


@pytest.fixture(scope="module")
def vm_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    guest_image.build(guest_image.default_cache_dir())  # cached; first build ~30 s
    with running_daemon("--vm-boot-timeout", str(BOOT_TIMEOUT), "--vm-grace-period", "60",
                        "--vm-image-dir", str(guest_image.default_cache_dir()), vms=True) as daemon:
        try:
            yield daemon
        finally:
            daemon.stop(timeout=180)
            left = taps_of(daemon)
            for name in left:  # only ones this daemon made, should it have died
                subprocess.run(["ip", "link", "del", name], check=False)
            assert not left, f"TAPs left behind: {left}"


@pytest.fixture(scope="module")
def host(vm_daemon: DaemonProcess) -> Iterator[aurae_sdk.Client]:
    with vm_daemon.client(timeout=BOOT_TIMEOUT + 30) as client:
        yield client


@pytest.fixture(scope="module")
def data_drive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    content = tmp_path_factory.mktemp("drive")
    (content / "hello.txt").write_text("hello from an ext4 drive\n")
    image = tmp_path_factory.mktemp("image") / "data.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(content), str(image), "8M"], check=True)
    return image


@pytest.fixture(scope="module")
def guest(host: aurae_sdk.Client, data_drive: Path) -> Iterator[aurae_sdk.Client]:
    host.vms.allocate(machine={
        "id": VM, "mem_size_mb": 4096, "vcpu_count": 2, "kernel_args": ["aurae.test=42"],
        "drive_mounts": [{"image_path": str(data_drive), "vm_path": "/mnt/data",
                          "fs_type": "ext4", "read_only": True}],
    })
    address = host.vms.start(vm_id=VM).auraed_address
    assert re.fullmatch(r"\[fe80::2%avm[0-9a-f]{8}\]:8080", address), address
    with host.vm(VM, timeout=60) as client:
        yield client


def status_of(host: aurae_sdk.Client, vm_id: str) -> str:
    for machine in host.vms.list().machines:
        if machine.id == vm_id:
            return machine.status
    raise AssertionError(f"{vm_id} not listed")


def wait_status(host: aurae_sdk.Client, vm_id: str, status: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while status_of(host, vm_id) != status:
        assert time.monotonic() < deadline, f"{vm_id} never became {status}"
        time.sleep(0.2)


def run(client: aurae_sdk.Client, name: str, command: str, cell: str | None = None,
        timeout: float = 120) -> tuple[str, object]:
    """Start `command` (in `cell`), wait for it, return its stdout and its final status."""
    started = client.cells.start(cell_name=cell, executable={"name": name, "command": command})
    status = client.cells.wait(cell_name=cell, executable_name=name, timeout=timeout).status
    lines = [item.line for item in aurae_sdk.follow(client, started.pid, "stdout", timeout=30)]
    return "\n".join(lines), status


# ----------------------------------------------------------------------------- refusals


def test_allocate_refuses_bad_machines_with_the_right_codes(host: aurae_sdk.Client,
                                                            tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument) as missing:
        host.vms.allocate()
    assert missing.value.field == "machine"
    with pytest.raises(errors.InvalidArgument) as bad_id:
        host.vms.allocate(machine={"id": "Not_Valid"})
    assert bad_id.value.field == "machine.id"
    absent = tmp_path / "no-such-vmlinux"
    with pytest.raises(errors.InvalidArgument) as kernel:
        host.vms.allocate(machine={"id": "nokernel", "kernel_img_path": str(absent)})
    assert str(absent) in kernel.value.message and kernel.value.field == "machine.kernel_img_path"
    with pytest.raises(errors.InvalidArgument):
        host.vms.allocate(machine={"id": "tiny", "mem_size_mb": 16})
    absent_root = tmp_path / "no-such-root.ext4"
    with pytest.raises(errors.InvalidArgument) as root:
        host.vms.allocate(machine={"id": "rooted", "root_drive": {"image_path": str(absent_root)}})
    assert root.value.field == "machine.root_drive.image_path"
    assert str(absent_root) in root.value.message
    for call in (host.vms.start, host.vms.stop, host.vms.free):
        with pytest.raises(errors.NotFound):
            call(vm_id="ghost")
    assert not host.vms.list().machines  # nothing was defined by the refused requests


def test_duplicate_and_not_running_are_refused(host: aurae_sdk.Client) -> None:
    host.vms.allocate(machine={"id": "dup"})
    try:
        with pytest.raises(errors.AlreadyExists):
            host.vms.allocate(machine={"id": "dup"})
        with pytest.raises(errors.FailedPrecondition):
            host.vms.stop(vm_id="dup")  # Created, not running
        assert status_of(host, "dup") == "Created"
        with pytest.raises(errors.FailedPrecondition):
            host.vm("dup")
    finally:
        host.vms.free(vm_id="dup")
    assert all(m.id != "dup" for m in host.vms.list().machines)


def test_a_guest_that_does_not_answer_in_time_is_deadline_exceeded() -> None:
    """Its own daemon, with a boot timeout no TCG boot meets: Start fails cleanly."""
    with running_daemon("--vm-boot-timeout", "1",
                        "--vm-image-dir", str(guest_image.default_cache_dir()), vms=True) as daemon, \
            daemon.client(timeout=120) as client:
        client.vms.allocate(machine={"id": "late"})
        with pytest.raises(errors.DeadlineExceeded) as late:
            client.vms.start(vm_id="late")
        assert "did not answer" in late.value.message
        listed = client.vms.list().machines[0]
        assert listed.status == "Shutdown" and listed.stop_reason.startswith("the boot failed")
        assert not listed.auraed_address
        assert not taps_of(daemon) and not qemus_of(daemon)
        client.vms.free(vm_id="late")


# ----------------------------------------------------------------------------- a running guest


def test_start_boots_a_guest_that_answers_discover(host: aurae_sdk.Client,
                                                   guest: aurae_sdk.Client) -> None:
    listed = {m.id: m for m in host.vms.list().machines}[VM]
    assert listed.status == "Running"
    assert listed.mem_size_mb == 4096 and listed.vcpu_count == 2
    assert listed.accelerator in ("kvm", "tcg")  # tcg on our machines: their KVM is nested
    tap = listed.auraed_address.split("%")[1].split("]")[0]
    assert tap in taps()
    assert "fe80::1/64" in subprocess.run(["ip", "-6", "addr", "show", "dev", tap],
                                          capture_output=True, text=True, check=False).stdout
    found = guest.discovery.discover()
    assert found.healthy and found.version
    with pytest.raises(errors.FailedPrecondition):
        host.vms.start(vm_id=VM)  # already running


def test_the_cli_drives_the_guest_with_vm(guest: aurae_sdk.Client,
                                         vm_daemon: DaemonProcess) -> None:
    allocated = vm_daemon.cli("--vm", VM, "cells", "allocate", "from-cli", timeout=120)
    assert allocated.returncode == 0, allocated.stderr
    listed = vm_daemon.cli("--vm", VM, "cells", "list", timeout=120)
    assert listed.returncode == 0 and "from-cli" in listed.stdout, listed.stderr
    assert [node.cell.name for node in guest.cells.list().cells] == ["from-cli"]
    guest.cells.free(cell_name="from-cli")
    missing = vm_daemon.cli("--vm", "ghost", "cells", "list", timeout=120)
    assert missing.returncode != 0 and "no virtual machine ghost" in missing.stderr


def test_a_cell_lifecycle_inside_the_guest(guest: aurae_sdk.Client) -> None:
    allocated = guest.cells.allocate(cell={"name": "inside"})
    assert allocated.cgroup_v2  # pid 1 mounted cgroup2; the host here is v1/hybrid
    output, status = run(guest, "facts", "cat /proc/cmdline; nproc; "
                         "grep MemTotal /proc/meminfo; cat /mnt/data/hello.txt; "
                         "cat /proc/self/cgroup", cell="inside")
    assert status.exit_code == 0
    assert "aurae.test=42" in output
    assert output.splitlines()[1] == "2"
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", output).group(1))  # type: ignore[union-attr]
    assert mem_kb > 3_500_000  # 4 GiB asked; the kernel keeps a little
    assert "hello from an ext4 drive" in output
    assert "0::/aurae/inside/_procs" in output
    names = [node.cell.name for node in guest.cells.list().cells]
    assert names == ["inside"]
    guest.cells.free(cell_name="inside")
    assert not guest.cells.list().cells


# ----------------------------------------------------------------------------- cgroup v2, for real
# The host is cgroup v1/hybrid; inside the guest pid 1 mounted cgroup2 with every controller, so
# these limits are enforced by the kernel and their effects read back from the guest.


def test_memory_max_kills_and_the_kill_is_reported_as_oom(guest: aurae_sdk.Client) -> None:
    guest.cells.allocate(cell={"name": "small", "memory": {"max": 32 * 1024 * 1024}})
    try:
        output, status = run(guest, "hog", "cat /sys/fs/cgroup/aurae/small/memory.max; "
                             "exec python3 -c 'b = bytearray(256 * 1024 * 1024); print(len(b))'",
                             cell="small")
        assert output.splitlines()[0] == str(32 * 1024 * 1024)
        assert status.oom_killed is True
        assert status.signal == signal.SIGKILL
        events, _ = run(guest, "events", "cat /sys/fs/cgroup/aurae/small/memory.events")
        assert re.search(r"^oom_kill [1-9]", events, re.MULTILINE), events
    finally:
        guest.cells.free(cell_name="small")


def test_cpu_max_throttles(guest: aurae_sdk.Client) -> None:
    guest.cells.allocate(cell={"name": "slow", "cpu": {"max": 10_000, "period": 100_000}})
    try:
        output, _ = run(guest, "spin", "cat /sys/fs/cgroup/aurae/slow/cpu.max; "
                        "timeout 2 sh -c 'while :; do :; done'; "
                        "cat /sys/fs/cgroup/aurae/slow/cpu.stat", cell="slow")
        assert output.splitlines()[0] == "10000 100000"
        stat = dict(line.split() for line in output.splitlines()[1:] if len(line.split()) == 2)
        assert int(stat["nr_throttled"]) > 0, output
        # 10 % of one CPU for 2 s: far below the 2 s a free spin would use.
        assert int(stat["usage_usec"]) < 1_200_000, output
    finally:
        guest.cells.free(cell_name="slow")


def test_cpuset_pins_and_weight_is_written_verbatim(guest: aurae_sdk.Client) -> None:
    guest.cells.allocate(cell={"name": "pinned", "cpuset": {"cpus": "1"}, "cpu": {"weight": 37}})
    try:
        output, _ = run(guest, "where", "grep Cpus_allowed_list /proc/self/status; "
                        "cat /sys/fs/cgroup/aurae/pinned/cpu.weight "
                        "/sys/fs/cgroup/aurae/pinned/cpuset.cpus", cell="pinned")
        assert output.split() == ["Cpus_allowed_list:", "1", "37", "1"], output
    finally:
        guest.cells.free(cell_name="pinned")


def test_nested_cells_inherit_their_parents_limit(guest: aurae_sdk.Client) -> None:
    guest.cells.allocate(cell={"name": "outer", "memory": {"max": 64 * 1024 * 1024}})
    try:
        guest.cells.allocate(cell={"name": "outer/inner"})
        output, status = run(guest, "deep", "cat /proc/self/cgroup; "
                             "exec python3 -c 'b = bytearray(256 * 1024 * 1024)'",
                             cell="outer/inner")
        assert "0::/aurae/outer/inner/_procs" in output
        assert status.oom_killed is True  # the outer cell's limit bounds the inner
    finally:
        guest.cells.free(cell_name="outer")
    assert not guest.cells.list().cells


def test_an_isolated_cell_sees_only_its_own_processes(guest: aurae_sdk.Client) -> None:
    guest.cells.allocate(cell={"name": "alone", "isolate_process": True})
    try:
        started = guest.cells.start(cell_name="alone", executable={
            "name": "look", "command": "ls /proc | grep -c '^[0-9]'; hostname"})
        status = guest.cells.wait(cell_name="alone", executable_name="look", timeout=60).status
        lines = [i.line for i in aurae_sdk.follow(guest, started.pid, "stdout", timeout=30)]
        assert status.exit_code == 0
        # Its pid namespace holds its init, the shell, ls and grep: a handful, not the guest's.
        assert int(lines[0]) <= 6, lines
        assert started.host_pid != started.pid
    finally:
        guest.cells.free(cell_name="alone")


def test_the_serial_console_is_captured_like_an_executables_output(
        host: aurae_sdk.Client, guest: aurae_sdk.Client) -> None:
    cell = {node.cell.name: node for node in host.cells.list().cells}[f"vm-{VM}"]
    qemu = {e.name: e for e in cell.executables}["qemu"]
    assert "tcg" in qemu.command or "kvm" in qemu.command
    for item in aurae_sdk.follow(host, qemu.pid, "stdout", timeout=30):
        if "auraed-pid1: daemon started" in item.line:
            break
    else:
        raise AssertionError("the console never showed pid 1 starting the daemon")


def test_the_vms_cell_belongs_to_it(host: aurae_sdk.Client, guest: aurae_sdk.Client) -> None:
    with pytest.raises(errors.FailedPrecondition):
        host.cells.free(cell_name=f"vm-{VM}")
    with pytest.raises(errors.FailedPrecondition):
        host.cells.start(cell_name=f"vm-{VM}", executable={"name": "x", "command": "true"})
    with pytest.raises(errors.FailedPrecondition):
        host.cells.stop(cell_name=f"vm-{VM}", executable_name="qemu")
    with pytest.raises(errors.AlreadyExists):
        host.cells.allocate(cell={"name": f"vm-{VM}"})


def test_guest_initiated_power_off_shows_in_list(host: aurae_sdk.Client,
                                                 guest: aurae_sdk.Client,
                                                 vm_daemon: DaemonProcess) -> None:
    guest.cells.start(executable={"name": "poweroff", "command": "kill -s TERM 1"})
    wait_status(host, VM, "Shutdown")
    log = vm_daemon.log()
    assert re.search(r'event=SHUTDOWN data="guest=True,reason=guest-shutdown"', log), log[-3000:]
    cell = {node.cell.name: node for node in host.cells.list().cells}[f"vm-{VM}"]
    qemu = {e.name: e for e in cell.executables}["qemu"]
    assert qemu.exit_code == 0  # QEMU ended because the guest powered off, not a crash
    assert {m.id: m for m in host.vms.list().machines}[VM].stop_reason == "the guest powered off"


def test_stop_presses_the_power_button_and_the_guest_shuts_down_in_order(
        host: aurae_sdk.Client) -> None:
    host.vms.start(vm_id=VM)  # a Shutdown machine boots again
    assert status_of(host, VM) == "Running"
    with host.vm(VM) as guest:
        guest.cells.allocate(cell={"name": "busy"})
        guest.cells.start(cell_name="busy", executable={"name": "sleeper", "command": "sleep 600"})
    host.vms.stop(vm_id=VM)
    assert status_of(host, VM) == "Shutdown"
    assert {m.id: m for m in host.vms.list().machines}[VM].stop_reason == "stopped by Stop"
    cell = {node.cell.name: node for node in host.cells.list().cells}[f"vm-{VM}"]
    qemu = {e.name: e for e in cell.executables}["qemu"]
    console = [item.line for item in aurae_sdk.follow(host, qemu.pid, "stdout", timeout=30)]
    text = "\n".join(console)
    # KEY_POWER reached pid 1, which stopped the daemon (and its workloads) before powering off.
    order = ["auraed-pid1: shutting down: power button", 'msg="shutting down"',
             'msg="auraed stopped"', "auraed-pid1: daemon exited with 0", "auraed-pid1: power off"]
    positions = [text.find(marker) for marker in order]
    assert -1 not in positions and positions == sorted(positions), text[-3000:]
    assert qemu.exit_code == 0


def test_free_leaves_no_tap_process_or_file(host: aurae_sdk.Client,
                                            vm_daemon: DaemonProcess) -> None:
    """The machine the test above stopped, which has booted twice (two TAPs, two QEMUs)."""
    assert status_of(host, VM) == "Shutdown"
    host.vms.free(vm_id=VM)
    assert not host.vms.list().machines
    assert not taps_of(vm_daemon) and not qemus_of(vm_daemon)
    assert not (vm_daemon.runtime_dir / "vms" / VM).exists()
    assert f"vm-{VM}" not in [node.cell.name for node in host.cells.list().cells]


def test_the_host_daemons_shutdown_powers_its_vms_off_first(host: aurae_sdk.Client,
                                                             vm_daemon: DaemonProcess) -> None:
    """Last in the module: it ends the module's daemon."""
    qemus_before = qemus_of(vm_daemon)
    host.vms.allocate(machine={"id": "last"})
    address = host.vms.start(vm_id="last").auraed_address
    tap = address.split("%")[1].split("]")[0]
    ours = qemus_of(vm_daemon) - qemus_before
    assert vm_daemon.stop(signal.SIGTERM, timeout=180) == 0
    log = vm_daemon.log()
    stopping = log.index('msg="vm stopping" vm=last')
    freed = log.index('msg="cell freed" cell=vm-last')
    assert stopping < freed
    assert 'event=SHUTDOWN data="guest=True,reason=guest-shutdown"' in log[stopping:]
    assert "hard stop" not in log
    assert tap not in taps()
    assert len(ours) == 1 and not (ours & qemu_pids())
