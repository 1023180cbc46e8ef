"""TAP devices: made and removed through netlink, and the ones a killed daemon left are removed
at the next start (no guest is booted here)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

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


def test_a_listener_on_the_link_is_found_soon_after_it_listens() -> None:
    """await_listener retries with fresh connects: a listener that appears later is found
    within a probe or two (the host's own end stands in for the guest's)."""
    made = tap.create_tap()
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        target = (tap.HOST_ADDRESS, 0, 0, socket.if_nametoindex(made.name))
        listener.bind(target)
        port = listener.getsockname()[1]
        started = time.monotonic()
        assert not tap.await_listener(made.name, tap.HOST_ADDRESS, port, started + 0.5,
                                      alive=lambda: True)  # bound, not listening: refused
        assert time.monotonic() - started >= 0.5
        listening_at: list[float] = []

        def listen() -> None:
            listener.listen(1)
            listening_at.append(time.monotonic())

        threading.Timer(0.3, listen).start()
        assert tap.await_listener(made.name, tap.HOST_ADDRESS, port, time.monotonic() + 30,
                                  alive=lambda: True)
        assert listening_at and time.monotonic() - listening_at[0] < 5
        assert not tap.await_listener(made.name, tap.HOST_ADDRESS, port, time.monotonic() + 30,
                                      alive=lambda: False)  # the guest ended: no wait
    finally:
        listener.close()
        tap.remove_tap(made.name)
