"""Progress on long work, against a real auraed: drawn when stdout is a terminal (a pty made
here), absent when it is a pipe; what the command prints is the same either way.

The VM case uses a daemon that has no CA key to mint a guest identity with, so its Start is
refused at once: the progress line of apply's boot step is drawn and goes, without the minute a
TCG boot takes on this machine (tests/vms/test_declared_vm.py boots one through apply)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aurae_sdk
from tests.support.daemon import DaemonProcess
from tests.support.terminal import plain, run_on_pty


def test_image_import_shows_progress_on_a_terminal_only(
        daemon: DaemonProcess, busybox_image: tuple[Path, Path]) -> None:
    _, archive = busybox_image
    client = daemon.client()
    try:
        status, shown, stderr = run_on_pty(daemon, "images", "import", str(archive),
                                           "--reference", "progress-pty", "-o", "json")
        assert status == 0, stderr
        assert "importing " + str(archive) in plain(shown)
        assert "0:00:0" in plain(shown)  # the time elapsed
        assert "\x1b[" in shown  # drawn, and taken away again (transient)
        assert "progress-pty" in plain(shown)  # then the response, as ever

        piped = daemon.cli("images", "import", str(archive), "--reference", "progress-pipe",
                           "-o", "json")
        assert piped.returncode == 0, piped.stderr
        assert "importing" not in piped.stdout + piped.stderr
        assert "\x1b[" not in piped.stdout + piped.stderr
        assert "progress-pipe" in piped.stdout
        assert json.loads(piped.stdout)["images"]  # nothing but the response
        # `images list` is a table by default, one row per image.
        table = daemon.cli("images", "list")
        assert table.returncode == 0, table.stderr
        header, *rows = table.stdout.splitlines()
        assert header.split() == ["REFERENCES", "ID", "SIZE", "IMPORTED"], header
        (row,) = [r for r in rows if "progress-pipe" in r]
        assert re.fullmatch(r"\S*progress-pipe\S* +[0-9a-f]{12} +[0-9.]+[KMG]? +\d+[smhd]", row), row
        assert len(rows) == len(json.loads(daemon.cli("images", "list", "-o", "json").stdout)[
            "images"])
        wide = daemon.cli("images", "list", "-o", "wide").stdout.splitlines()[0].split()
        assert wide[-3:] == ["LAYERS", "MANIFEST", "DIGEST"], wide
    finally:
        for reference in ("progress-pty", "progress-pipe"):
            daemon.cli("images", "remove", reference)
        client.close()


VM_MANIFEST = """\
owner: pv
vms:
  - id: pv-1
    memory_mb: 128
"""


def test_apply_shows_a_vm_boot_on_a_terminal_only(daemon: DaemonProcess, tmp_path: Path) -> None:
    manifest = tmp_path / "pv.yaml"
    manifest.write_text(VM_MANIFEST)
    with daemon.client() as client:
        try:
            status, shown, stderr = run_on_pty(daemon, "apply", "-f", str(manifest))
            # This daemon cannot boot guests: Allocate succeeds, Start is refused at once.
            assert status == 64 + 9, stderr  # FAILED_PRECONDITION
            assert f"{manifest}:3: create vm pv-1" in stderr
            assert "booting vm pv-1" in plain(shown)
            assert "0:00:0" in plain(shown)
            assert "\x1b[" in shown
            (machine,) = [m for m in client.vms.list().machines if m.id == "pv-1"]
            assert machine.labels["aurae-py.io/owner"] == "pv"
            client.vms.free(vm_id="pv-1")

            piped = daemon.cli("apply", "-f", str(manifest))
            assert piped.returncode == 64 + 9, piped.stderr
            assert "booting" not in piped.stdout + piped.stderr
            assert "\x1b[" not in piped.stdout + piped.stderr
            assert piped.stderr.startswith(f"aurae-py: FAILED_PRECONDITION: {manifest}:3: ")
        finally:
            if any(m.id == "pv-1" for m in client.vms.list().machines):
                client.vms.free(vm_id="pv-1")


def test_apply_draws_nothing_on_a_pipe_and_its_plan_on_a_terminal(
        daemon: DaemonProcess, tmp_path: Path) -> None:
    manifest = tmp_path / "pc.yaml"
    manifest.write_text("owner: pc\ncells:\n  - name: pc-a\n  - name: pc-b\n")
    with daemon.client() as client:
        try:
            status, shown, stderr = run_on_pty(daemon, "apply", "-f", str(manifest))
            assert status == 0, stderr
            assert "Plan: 2 to create" in plain(shown)
            names = {n.cell.name for n in client.cells.list().cells}
            assert {"pc-a", "pc-b"} <= names
            manifest.write_text("owner: pc\n")
            piped = daemon.cli("apply", "-f", str(manifest), "--prune")
            assert piped.returncode == 0, piped.stderr
            assert "\x1b[" not in piped.stdout and piped.stderr == ""
            assert piped.stdout.splitlines()[-1].startswith("Plan: 0 to create")
        finally:
            for name in ("pc-a", "pc-b"):
                if name in {n.cell.name for n in client.cells.list().cells}:
                    client.cells.free(cell_name=name)
        assert isinstance(client, aurae_sdk.Client)
