"""TAP devices: made and removed through netlink, and the ones a killed daemon left are removed
at the next start (no guest is booted here)."""

from __future__ import annotations

import os
import subprocess

import pytest

from auraed.kernel import tap
from auraed.runtime.vms import remove_stale_taps

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


def test_the_next_start_removes_taps_a_killed_daemon_left() -> None:
    """What VirtualMachines.start does with the registry's names once it re-adopted its guests:
    a listed TAP no adopted machine uses goes, one in use stays."""
    left, kept = tap.create_tap(), tap.create_tap()
    try:
        remove_stale_taps([left.name, kept.name], in_use={kept.name})
        assert not tap.tap_exists(left.name)
        assert tap.tap_exists(kept.name)
    finally:
        tap.remove_tap(left.name)
        tap.remove_tap(kept.name)
