#!/usr/bin/env python3
"""Build the project's test image, an OCI image layout, from Debian's busybox-static.

    python3 scripts/busybox_image.py OUT_DIR [--archive FILE] [--name REF]

Writes OUT_DIR as an OCI image layout (oci-layout, index.json, blobs/sha256/*) and, with
--archive, also a tar of that layout (what `skopeo copy ... oci-archive:FILE` writes). Nothing is
downloaded: the only input is /bin/busybox from the busybox-static package (scripts/install.sh
installs it). The output is byte for byte the same on every run on the same busybox, so digests
are stable and the result can be cached.

Two layers, so that importing and running exercise what real images have:
  1. busybox with a symlink per applet in /bin, /etc/passwd and /etc/group (root, nobody),
     /tmp, and two things layer 2 deletes: /etc/removed and /data/old.
  2. a whiteout of /etc/removed, an opaque /data holding only /data/new, and /etc/motd.
Config: Cmd ["sh"], Env PATH=/bin, WorkingDir /, no User (root).
Standard library only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
DEFAULT_NAME = "localhost/aurae/busybox:latest"

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnogroup:x:65534:\n"


class Layer:
    """A tar built in memory with fixed owners and times, in the order entries are added."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buffer, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, 0
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._tar.addfile(self._info(name, tarfile.DIRTYPE, mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        info = self._info(name, tarfile.REGTYPE, mode)
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))

    def symlink(self, name: str, target: str) -> None:
        info = self._info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self._tar.addfile(info)

    def finish(self) -> tuple[bytes, bytes]:
        """(the uncompressed tar, its gzip)."""
        self._tar.close()
        raw = self._buffer.getvalue()
        compressed = io.BytesIO()
        with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0) as stream:
            stream.write(raw)
        return raw, compressed.getvalue()


def applets() -> list[str]:
    listed = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    return sorted(name for name in listed.stdout.split() if name and name != "busybox")


def base_layer() -> Layer:
    layer = Layer()
    for directory in ("bin", "etc", "root", "data", "proc", "sys", "dev"):
        layer.directory(directory, 0o700 if directory == "root" else 0o755)
    layer.directory("tmp", 0o1777)
    layer.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in applets():
        layer.symlink(f"bin/{applet}", "busybox")
    layer.file("etc/passwd", PASSWD)
    layer.file("etc/group", GROUP)
    layer.file("etc/removed", b"deleted by the second layer\n")
    layer.file("data/old", b"hidden by the second layer's opaque /data\n")
    return layer


def top_layer() -> Layer:
    layer = Layer()
    layer.directory("etc")
    layer.file("etc/.wh.removed", b"")
    layer.file("etc/motd", b"aurae-py test image\n")
    layer.directory("data")
    layer.file("data/.wh..wh..opq", b"")
    layer.file("data/new", b"from the second layer\n")
    return layer


def descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
            "size": len(data)}


def canonical(document: object) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def build(out: Path, name: str) -> dict[str, object]:
    """Write the layout in `out`; returns the manifest's descriptor."""
    blobs: dict[str, bytes] = {}

    def blob(media_type: str, data: bytes) -> dict[str, object]:
        found = descriptor(media_type, data)
        blobs[str(found["digest"])] = data
        return found

    layers, diff_ids = [], []
    for layer in (base_layer(), top_layer()):
        raw, compressed = layer.finish()
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        layers.append(blob(LAYER_GZIP, compressed))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "scripts/busybox_image.py: busybox-static"},
                    {"created_by": "scripts/busybox_image.py: whiteouts"}],
    }
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST,
                "config": blob(CONFIG, canonical(config)), "layers": layers}
    manifest_descriptor = blob(MANIFEST, canonical(manifest))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{**manifest_descriptor,
                            "annotations": {"org.opencontainers.image.ref.name": name}}]}

    (out / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    for digest, data in blobs.items():
        (out / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
    (out / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))
    (out / "index.json").write_bytes(canonical(index))
    return manifest_descriptor


def write_archive(layout: Path, archive: Path) -> None:
    """A tar of the layout with fixed owners and times, as oci-archive transports write."""
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(layout.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(layout).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
            if info.isfile():
                with open(path, "rb") as data:
                    tar.addfile(info, data)
            else:
                tar.addfile(info)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the OCI layout in")
    parser.add_argument("--archive", type=Path, help="also write a tar of the layout here")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"image reference ({DEFAULT_NAME})")
    args = parser.parse_args(argv)
    if not BUSYBOX.is_file():
        print(f"{BUSYBOX} is missing: install busybox-static (scripts/install.sh)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = build(args.out, args.name)
    if args.archive:
        write_archive(args.out, args.archive)
    print(f"{args.name} {manifest['digest']}{os.linesep if not args.archive else ''}", end="")
    if args.archive:
        print(f" archive {args.archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
