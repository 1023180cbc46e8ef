"""TAP devices: made and removed through netlink, and the ones a killed daemon left are removed
at the next start (no guest is booted here)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from auraed.kernel import tap
from auraed.runtime.vms import VirtualMachines, VmSettings

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netlink)")


def test_a_tap_gets_the_host_link_local_address_and_goes_away() -> None:
    made = tap.create_tap()
    try:
        assert len(made.name) <= 15 and made.name.startswith("avm")
        shown = subprocess.run(["ip", "-6", "addr", "show", "dev", made.name],
                               capture_output=True, text=True, check=True).stdout
        assert "fe80::1/64" in shown and "nodad" in shown
    finally:
        tap.remove_tap(made.name)
    assert not tap.tap_exists(made.name)
    tap.remove_tap(made.name)  # idempotent


def test_the_next_start_removes_taps_a_killed_daemon_left(tmp_path: Path) -> None:
    left = tap.create_tap()
    registry = tmp_path / "vm-taps"
    registry.write_text(f"{left.name}\n")
    settings = VmSettings(runtime_dir=tmp_path / "run", image_cache=tmp_path / "images",
                          ca_crt=tmp_path / "ca.crt", ca_key=None, server_crt=tmp_path / "s.crt",
                          tap_registry=registry)
    try:
        VirtualMachines(workloads=None, settings=settings).start()  # type: ignore[arg-type]
        assert not tap.tap_exists(left.name)
        assert not registry.exists()
    finally:
        tap.remove_tap(left.name)
