"""Fixtures shared across the suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.daemon import DaemonProcess, running_daemon

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, processes)")


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """One real auraed per test module; tests use distinct cell names."""
    if os.geteuid() != 0:
        pytest.skip("auraed needs root")
    with running_daemon() as started:
        yield started


@pytest.fixture
def client(daemon: DaemonProcess):  # type: ignore[no-untyped-def]
    with daemon.client() as connected:
        yield connected


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The project's test image (scripts/busybox_image.py): (layout dir, archive file)."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("busybox-image")
    script = Path(__file__).resolve().parents[1] / "scripts" / "busybox_image.py"
    subprocess.run([sys.executable, str(script), str(out / "layout"),
                    "--archive", str(out / "busybox.tar")], check=True, capture_output=True)
    return out / "layout", out / "busybox.tar"
