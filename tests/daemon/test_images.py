"""The image service against a real daemon, through the generated CLI and SDK."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.daemon

NAME = "localhost/aurae/busybox:latest"


def test_import_list_inspect_remove(daemon: DaemonProcess, busybox_image: tuple[Path, Path]) -> None:
    layout, archive = busybox_image
    imported = daemon.cli("images", "import", str(layout), "-o", "json")
    assert imported.returncode == 0, imported.stderr
    [image] = json.loads(imported.stdout)["images"]
    assert image["references"] == [NAME]
    blobs = daemon.workdir / "lib" / "images" / "blobs" / "sha256"
    assert image["id"].removeprefix("sha256:") in {p.name for p in blobs.iterdir()}

    again = daemon.cli("images", "import", str(archive), "--reference", "busybox", "-o", "json")
    assert again.returncode == 0, again.stderr
    listed = json.loads(daemon.cli("images", "list", "-o", "json").stdout)["images"]
    assert [i["references"] for i in listed] == [["docker.io/library/busybox:latest", NAME]]

    inspected = json.loads(daemon.cli("images", "inspect", "busybox", "-o", "json").stdout)
    assert inspected["image"]["config"]["cmd"] == ["sh"]
    assert len(inspected["image"]["layers"]) == 2

    removed = daemon.cli("images", "remove", image["id"])
    assert removed.returncode == 0, removed.stderr
    assert list(blobs.iterdir()) == []
    missing = daemon.cli("images", "inspect", "busybox")
    assert missing.returncode != 0 and "NOT_FOUND" in missing.stderr + missing.stdout


def test_corrupt_archive_is_refused_cleanly(daemon: DaemonProcess, tmp_path: Path,
                                            busybox_image: tuple[Path, Path]) -> None:
    data = bytearray(busybox_image[1].read_bytes())
    data[len(data) // 3] ^= 0x55
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    result = daemon.cli("images", "import", str(bad))
    assert result.returncode != 0
    assert "INVALID_ARGUMENT" in result.stderr + result.stdout
    store = daemon.workdir / "lib" / "images"
    assert list((store / "blobs" / "sha256").iterdir()) == []
    assert list((store / "tmp").iterdir()) == []
    relative = daemon.cli("images", "import", "not/absolute")
    assert "INVALID_ARGUMENT" in relative.stderr + relative.stdout
