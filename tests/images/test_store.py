"""The image store on a real filesystem: imports verified blob by blob, overlay-ready layers,
nothing left of a refused import."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from auraed.errors import FailedPrecondition, InvalidArgument, NotFound
from auraed.images import ImageStore, normalize_reference, open_source

NAME = "localhost/aurae/busybox:latest"


def _contents(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    opened = ImageStore(tmp_path / "images")
    opened.open()
    return opened


def _copy_layout(layout: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "layout-copy"
    shutil.copytree(layout, copy)
    return copy


def _manifest(layout: Path) -> tuple[dict, Path]:  # type: ignore[type-arg]
    index = json.loads((layout / "index.json").read_bytes())
    digest = index["manifests"][0]["digest"].removeprefix("sha256:")
    path = layout / "blobs" / "sha256" / digest
    return json.loads(path.read_bytes()), path


def test_import_layout_names_and_layers(store: ImageStore, busybox_image: tuple[Path, Path]) -> None:
    layout, _ = busybox_image
    [image] = store.pull(open_source(str(layout)))
    assert image.references == (NAME,)
    assert image.id.startswith("sha256:") and image.config.cmd == ("sh",)
    assert image.size == sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())
    # Every stored blob hashes to its name.
    for blob in (store.root / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    base, top = store.layer_dirs(image)
    assert os.access(base / "bin" / "busybox", os.X_OK)
    assert os.readlink(base / "bin" / "sh") == "busybox"
    # OCI whiteouts became overlayfs's: a 0/0 char device and an opaque directory.
    removed = os.lstat(top / "etc" / "removed")
    assert stat.S_ISCHR(removed.st_mode) and removed.st_rdev == os.makedev(0, 0)
    assert os.getxattr(top / "data", "trusted.overlay.opaque") == b"y"
    assert not (top / "data" / ".wh..wh..opq").exists()
    assert os.listdir(store.root / "tmp") == []


def test_import_archive_with_a_reference_and_lookups(
        store: ImageStore, busybox_image: tuple[Path, Path]) -> None:
    _, archive = busybox_image
    [image] = store.pull(open_source(str(archive)), name="busybox:1.0")
    assert image.references == ("docker.io/library/busybox:1.0",)
    for name in ("busybox:1.0", "docker.io/library/busybox:1.0", image.id,
                 image.id.removeprefix("sha256:")[:12], image.repo_digests[0]):
        assert store.get(name) == image
    with pytest.raises(NotFound):
        store.get("busybox")  # :latest was never given


def test_store_survives_reopen(tmp_path: Path, busybox_image: tuple[Path, Path]) -> None:
    first = ImageStore(tmp_path / "images")
    first.open()
    [image] = first.pull(open_source(str(busybox_image[0])))
    second = ImageStore(tmp_path / "images")
    second.open()
    assert second.get(NAME) == image


def test_corrupted_layer_is_refused_and_nothing_stays(
        store: ImageStore, busybox_image: tuple[Path, Path], tmp_path: Path) -> None:
    layout = _copy_layout(busybox_image[0], tmp_path)
    manifest, _ = _manifest(layout)
    layer = layout / "blobs" / "sha256" / manifest["layers"][1]["digest"].removeprefix("sha256:")
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    layer.write_bytes(bytes(data))
    before = _contents(store.root)
    with pytest.raises(InvalidArgument, match="does not match its digest"):
        store.pull(open_source(str(layout)))
    assert _contents(store.root) == before  # not even the first, intact layer
    assert store.list() == []


def test_short_blob_is_refused(store: ImageStore, busybox_image: tuple[Path, Path],
                               tmp_path: Path) -> None:
    layout = _copy_layout(busybox_image[0], tmp_path)
    manifest, _ = _manifest(layout)
    layer = layout / "blobs" / "sha256" / manifest["layers"][0]["digest"].removeprefix("sha256:")
    layer.write_bytes(layer.read_bytes()[:-10])
    with pytest.raises(InvalidArgument, match="smaller than"):
        store.pull(open_source(str(layout)))
    assert list((store.root / "blobs" / "sha256").iterdir()) == []


def _layout_with_layer(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]],
                       diff_id: str | None = None) -> Path:
    """A one-layer layout around a hand-made (uncompressed) layer tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    layer = buffer.getvalue()
    out = tmp_path / "handmade"
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = put(json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": [
                                 diff_id or "sha256:" + hashlib.sha256(layer).hexdigest()]}}
                            ).encode())
    manifest = put(json.dumps({"schemaVersion": 2, "config": {
        **config, "mediaType": "application/vnd.oci.image.config.v1+json"}, "layers": [
        {**put(layer), "mediaType": "application/vnd.oci.image.layer.v1.tar"}]}).encode())
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        **manifest, "mediaType": "application/vnd.oci.image.manifest.v1+json"}]}))
    return out


def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> tuple[
        tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), link
    return info, data


@pytest.mark.parametrize("members", [
    [_entry("../escape", data=b"x")],
    [_entry("etc", tarfile.SYMTYPE, link="/etc"), _entry("etc/owned", data=b"x")],
    [_entry("hard", tarfile.LNKTYPE, link="../../etc/passwd")],
], ids=["dotdot", "through-symlink", "hardlink-out"])
def test_hostile_layers_are_refused(store: ImageStore, tmp_path: Path,
                                    members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    layout = _layout_with_layer(tmp_path, members)
    with pytest.raises(InvalidArgument, match="refused"):
        store.pull(open_source(str(layout)))
    assert not (tmp_path / "escape").exists()
    assert list((store.root / "layers" / "sha256").iterdir()) == []
    assert os.listdir(store.root / "tmp") == []


def test_wrong_diff_id_is_refused(store: ImageStore, tmp_path: Path) -> None:
    layout = _layout_with_layer(tmp_path, [_entry("file", data=b"x")],
                                diff_id="sha256:" + "0" * 64)
    with pytest.raises(InvalidArgument, match="diff_id"):
        store.pull(open_source(str(layout)))
    assert list((store.root / "layers" / "sha256").iterdir()) == []


def test_unnamed_image_and_retag(store: ImageStore, tmp_path: Path) -> None:
    [image] = store.pull(open_source(str(_layout_with_layer(tmp_path, [_entry("f", data=b"1")]))))
    assert image.references == ()
    tagged = store.tag(image, "localhost/handmade")
    assert store.get("localhost/handmade:latest") == tagged


def test_remove_keeps_shared_content_and_refuses_in_use(
        store: ImageStore, busybox_image: tuple[Path, Path]) -> None:
    [image] = store.pull(open_source(str(busybox_image[0])))
    with store.in_use(image), pytest.raises(FailedPrecondition, match="used by 1"):
        store.remove(NAME)
    store.remove(NAME)
    assert store.list() == []
    assert list((store.root / "blobs" / "sha256").iterdir()) == []
    assert list((store.root / "layers" / "sha256").iterdir()) == []
    with pytest.raises(NotFound):
        store.remove(NAME)


def test_not_a_layout(store: ImageStore, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgument, match="oci-layout"):
        store.pull(open_source(str(tmp_path / "empty")))
    with pytest.raises(NotFound):
        open_source(str(tmp_path / "missing"))
    with pytest.raises(InvalidArgument):
        open_source("relative/path")


@pytest.mark.parametrize(("text", "full"), [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("quay.io/a/b", "quay.io/a/b:latest"),
    ("localhost:5000/app:v1", "localhost:5000/app:v1"),
    ("localhost/app", "localhost/app:latest"),
    ("user/app@sha256:" + "a" * 64, "docker.io/user/app@sha256:" + "a" * 64),
])
def test_references_normalize(text: str, full: str) -> None:
    assert normalize_reference(text) == full


@pytest.mark.parametrize("text", ["", "UPPER", "a b", "x:", "a@sha256:short", "/abs"])
def test_bad_references(text: str) -> None:
    with pytest.raises(InvalidArgument):
        normalize_reference(text)


def _docker_archive(layout: Path, out: Path, *, corrupt: bool = False) -> Path:
    """What `docker save` of Docker before 25 writes for the test image: manifest.json, the
    config as <hex>.json, uncompressed layers as <dir>/layer.tar (one of them a symlink)."""
    import gzip

    manifest, _ = _manifest(layout)
    blobs = layout / "blobs" / "sha256"
    config_hex = manifest["config"]["digest"].removeprefix("sha256:")
    files: dict[str, bytes] = {f"{config_hex}.json": (blobs / config_hex).read_bytes()}
    names = []
    for number, layer in enumerate(manifest["layers"]):
        raw = gzip.decompress((blobs / layer["digest"].removeprefix("sha256:")).read_bytes())
        if corrupt and number == 0:
            raw = raw[:1000] + bytes([raw[1000] ^ 0xFF]) + raw[1001:]
        files[f"layer{number}/layer.tar"] = raw
        names.append(f"layer{number}/layer.tar")
    files["manifest.json"] = json.dumps([{"Config": f"{config_hex}.json",
                                          "RepoTags": ["busybox:docker"],
                                          # the second layer through the symlink
                                          "Layers": [names[0], "alias/layer.tar"]}]).encode()
    with tarfile.open(out, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        alias = tarfile.TarInfo("alias/layer.tar")
        alias.type, alias.linkname = tarfile.SYMTYPE, "../layer1/layer.tar"
        tar.addfile(alias)
    return out


def test_import_docker_archive(store: ImageStore, busybox_image: tuple[Path, Path],
                               tmp_path: Path) -> None:
    layout = busybox_image[0]
    [image] = store.pull(open_source(str(_docker_archive(layout, tmp_path / "docker.tar"))))
    assert image.references == ("docker.io/library/busybox:docker",)
    config_digest = _manifest(layout)[0]["config"]["digest"]
    assert image.id == config_digest  # the same image as the OCI layout holds
    base, top = store.layer_dirs(image)
    assert os.access(base / "bin" / "busybox", os.X_OK)
    assert stat.S_ISCHR(os.lstat(top / "etc" / "removed").st_mode)


def test_corrupt_docker_archive_layer_is_refused(store: ImageStore,
                                                 busybox_image: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    archive = _docker_archive(busybox_image[0], tmp_path / "bad.tar", corrupt=True)
    with pytest.raises(InvalidArgument):
        store.pull(open_source(str(archive)))
    assert store.list() == []
    assert list((store.root / "blobs" / "sha256").iterdir()) == []
    assert list((store.root / "layers" / "sha256").iterdir()) == []
