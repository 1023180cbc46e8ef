"""Containers in cells against a real daemon: an image's rootfs under overlayfs, pivot_root,
the image config, read-only rootfs, and nothing left mounted or on disk afterwards."""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import aurae_sdk
from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.daemon

IMAGE = "localhost/aurae/busybox:latest"


@pytest.fixture(scope="module")
def imported(daemon: DaemonProcess, busybox_image: tuple[Path, Path]) -> str:
    result = daemon.cli("images", "import", str(busybox_image[0]))
    assert result.returncode == 0, result.stderr
    return IMAGE


@pytest.fixture
def cell(client: aurae_sdk.Client, request: pytest.FixtureRequest) -> Iterator[str]:
    name = request.node.name.replace("_", "-").lower()[5:40].strip("-")
    client.cells.allocate(cell={"name": name, "isolate_process": True, "isolate_network": True})
    try:
        yield name
    finally:
        client.cells.free(cell_name=name)


def _stdout(daemon: DaemonProcess, cell: str, name: str, stream: str = "stdout") -> list[str]:
    lines = []
    for path in sorted(glob.glob(str(daemon.runtime_dir / "logs" / cell / f"{name}.*" /
                                     f"{stream}.*.log"))):
        lines += [line.split(" ", 1)[1] for line in Path(path).read_text().splitlines()]
    return lines


def _mounted_anywhere(path: Path) -> list[str]:
    """Lines of any process's mountinfo that mention `path`."""
    found = []
    for info in glob.glob("/proc/[0-9]*/mountinfo"):
        try:
            found += [line for line in Path(info).read_text().splitlines() if str(path) in line]
        except OSError:
            pass  # the process ended meanwhile
    return found


def _run(client: aurae_sdk.Client, cell: str, name: str, command: str, **executable: object
         ) -> Any:
    client.cells.start(cell_name=cell, executable={"name": name, "command": command,
                                                   "image": IMAGE, **executable})
    return client.cells.wait(cell_name=cell, executable_name=name, timeout=60).status


def test_image_filesystem_and_config(daemon: DaemonProcess, client: aurae_sdk.Client,
                                     imported: str, cell: str) -> None:
    status = _run(client, cell, "look", "sh -c 'cat /etc/motd; ls /data; "
                  "test -e /etc/removed || echo removed-is-gone; echo $PATH; pwd; id -u'")
    assert status.exit_code == 0
    # The second layer's file; its opaque /data and its whiteout of /etc/removed applied.
    assert _stdout(daemon, cell, "look") == ["aurae-py test image", "new", "removed-is-gone",
                                             "/bin", "/", "0"]


def test_default_cmd_and_uid_from_the_images_passwd(daemon: DaemonProcess,
                                                    client: aurae_sdk.Client,
                                                    imported: str, cell: str) -> None:
    # No command: the image's Cmd ("sh") runs and ends at end of input (stdin is /dev/null).
    assert _run(client, cell, "default", "").exit_code == 0
    client.cells.start(cell_name=cell, uid=65534, gid=65534, executable={
        "name": "nobody", "command": "id", "image": IMAGE})
    client.cells.wait(cell_name=cell, executable_name="nobody", timeout=60)
    assert _stdout(daemon, cell, "nobody") == ["uid=65534(nobody) gid=65534(nogroup)"]


def test_mounts_live_only_in_the_container(daemon: DaemonProcess, client: aurae_sdk.Client,
                                           imported: str, cell: str) -> None:
    started = client.cells.start(cell_name=cell, executable={
        "name": "sleeper", "command": "sleep 300", "image": IMAGE})
    [directory] = list((daemon.runtime_dir / "containers").iterdir())
    mountinfo = Path(f"/proc/{started.host_pid}/mountinfo").read_text().splitlines()
    root = next(line for line in mountinfo if line.split()[4] == "/")
    assert " - overlay " in root and f"upperdir={directory}/upper" in root
    # volatile: the container's end does not sync the host filesystem under its upper dir.
    # (shown as fsync=volatile by kernels that have the fsync= option, 6.6+).
    options = root.split(" - ")[1].split()[2].split(",")
    assert {"volatile", "fsync=volatile"} & set(options)
    points = {line.split()[4]: line for line in mountinfo}
    assert {"/proc", "/dev", "/dev/pts", "/dev/shm", "/sys", "/dev/null"} <= set(points)
    assert " ro," in points["/sys"] or points["/sys"].split()[5].startswith("ro")
    # Never in the host's (nor the daemon's) mount table.
    assert str(directory) not in Path("/proc/self/mountinfo").read_text()
    assert str(directory) not in Path(f"/proc/{daemon.process.pid}/mountinfo").read_text()
    client.cells.stop(cell_name=cell, executable_name="sleeper", grace_period_ms=2000)
    assert not directory.exists()
    deadline = time.monotonic() + 30
    while _mounted_anywhere(directory) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _mounted_anywhere(directory) == []


def test_read_only_rootfs(daemon: DaemonProcess, client: aurae_sdk.Client, imported: str,
                          cell: str) -> None:
    status = _run(client, cell, "ro", "sh -c 'touch /x || echo refused; touch /tmp/y || "
                  "echo tmp-refused'", read_only_rootfs=True)
    assert status.exit_code == 0
    assert _stdout(daemon, cell, "ro") == ["refused", "tmp-refused"]
    assert any("Read-only file system" in line for line in _stdout(daemon, cell, "ro", "stderr"))
    rw = _run(client, cell, "rw", "sh -c 'touch /x && echo written'")
    assert rw.exit_code == 0 and _stdout(daemon, cell, "rw") == ["written"]


def test_free_with_a_running_container_leaves_nothing(
        daemon: DaemonProcess, client: aurae_sdk.Client, imported: str) -> None:
    client.cells.allocate(cell={"name": "freed", "isolate_process": True})
    started = client.cells.start(cell_name="freed", executable={
        "name": "c", "command": "sleep 300", "image": IMAGE})
    [directory] = list((daemon.runtime_dir / "containers").iterdir())
    client.cells.free(cell_name="freed")
    assert not os.path.exists(f"/proc/{started.host_pid}")
    assert not directory.exists()
    assert list((daemon.runtime_dir / "containers").iterdir()) == []


def test_bad_requests_change_nothing(daemon: DaemonProcess, client: aurae_sdk.Client,
                                     imported: str, cell: str) -> None:
    with pytest.raises(aurae_sdk.NotFound):
        client.cells.start(cell_name=cell, executable={"name": "x", "command": "",
                                                       "image": "no/such:image"})
    with pytest.raises(aurae_sdk.InvalidArgument):
        client.cells.start(cell_name=cell, executable={"name": "x", "command": "true",
                                                       "read_only_rootfs": True})
    with pytest.raises(aurae_sdk.FailedPrecondition):
        client.cells.start(cell_name=cell, executable={"name": "x", "command": "/no/such",
                                                       "image": IMAGE})
    assert list((daemon.runtime_dir / "containers").iterdir()) == []
    # An image in use cannot be removed.
    client.cells.start(cell_name=cell, executable={"name": "holds", "command": "sleep 300",
                                                   "image": IMAGE})
    with pytest.raises(aurae_sdk.FailedPrecondition):
        client.images.remove(image_name=IMAGE)
    client.cells.stop(cell_name=cell, executable_name="holds", grace_period_ms=2000)


def test_cli_starts_a_container(daemon: DaemonProcess, client: aurae_sdk.Client, imported: str,
                                cell: str) -> None:
    started = daemon.cli("cells", "start", cell, "cli", "--image", IMAGE, "--read-only-rootfs",
                         "--command", "sh -c 'cat /etc/motd; touch /x'")
    assert started.returncode == 0, started.stderr
    status = client.cells.wait(cell_name=cell, executable_name="cli", timeout=60).status
    assert status.exit_code == 1
    assert _stdout(daemon, cell, "cli") == ["aurae-py test image"]


def test_an_argv_exec_would_refuse_is_refused(daemon: DaemonProcess, client: aurae_sdk.Client,
                                              imported: str, cell: str) -> None:
    with pytest.raises(aurae_sdk.InvalidArgument) as refused:
        client.cells.start(cell_name=cell, executable={"name": "big", "image": IMAGE,
                                                       "command": "echo " + "x" * 200_000})
    assert "too long for exec" in refused.value.message
    assert list((daemon.runtime_dir / "containers").iterdir()) == []
