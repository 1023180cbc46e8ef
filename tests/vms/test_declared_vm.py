"""A VM declared in a manifest, booted for real by `aurae-py apply` (TCG here: a boot takes from
seconds to about a minute on a loaded machine), with its progress drawn on a terminal; then
deleted, which frees the running machine: this is the suite's Free of a running VM (its QEMU,
TAP, files and cell go), so that tests/vms/test_vms.py need not boot a guest only to free it.
tests/daemon/test_declared.py covers the plan, Allocate and Free without a boot."""

from __future__ import annotations

from pathlib import Path

from auraed.kernel import guest_image
from tests.support.daemon import running_daemon
from tests.support.guests import GUEST_MARKS, host_taps, qemus_of, taps_of
from tests.support.terminal import plain, run_on_pty
from tests.vms.test_vms import qemu_pids

pytestmark = GUEST_MARKS

BOOT_TIMEOUT = 300


def test_apply_boots_the_declared_vm_and_delete_frees_it(tmp_path: Path) -> None:
    guest_image.build(guest_image.default_cache_dir())  # cached
    made: set[str] = set()
    manifest = tmp_path / "vm.yaml"
    manifest.write_text("owner: dv\nvms:\n  - id: dv-1\n    memory_mb: 256\n    vcpus: 1\n")
    with running_daemon("--vm-boot-timeout", str(BOOT_TIMEOUT), "--vm-grace-period", "30",
                        "--vm-image-dir", str(guest_image.default_cache_dir()),
                        vms=True) as daemon:
        try:
            status, shown, stderr = run_on_pty(daemon, "apply", "-f", str(manifest),
                                               timeout=BOOT_TIMEOUT + 60)
            assert status == 0, stderr + plain(shown)
            assert "booting vm dv-1" in plain(shown)
            # Under the bar, the boot's phase from the guest's console, as `vms start` shows it.
            assert "QEMU started; the guest kernel boots" in plain(shown)
            assert "+ create   vm         dv-1" in plain(shown)
            made = taps_of(daemon)
            assert len(made) == 1, made
            qemus = qemus_of(daemon)
            assert len(qemus) == 1, qemus
            with daemon.client(timeout=60) as host:
                (machine,) = host.vms.list().machines
                assert (machine.id, machine.status) == ("dv-1", "Running")
                assert machine.labels["aurae-py.io/owner"] == "dv"
                with host.vm("dv-1", timeout=60) as guest:
                    assert guest.discovery.discover().healthy  # the guest's own auraed answers
            again = daemon.cli("diff", "-f", str(manifest))
            assert again.returncode == 0, again.stdout + again.stderr
            deleted = daemon.cli("delete", "-f", str(manifest), timeout=BOOT_TIMEOUT)
            assert deleted.returncode == 0, deleted.stderr
            # Free of the running machine left nothing of it behind.
            assert not made & host_taps() and not qemus & qemu_pids()
            assert not (daemon.runtime_dir / "vms" / "dv-1").exists()
            with daemon.client() as host:
                assert not host.vms.list().machines
                assert "vm-dv-1" not in [node.cell.name for node in host.cells.list().cells]
        finally:
            with daemon.client(timeout=BOOT_TIMEOUT) as host:
                if host.vms.list().machines:
                    host.vms.free(vm_id="dv-1")
            daemon.stop(timeout=180)
    left = made & host_taps()
    assert not left, f"TAPs left behind: {left}"
