"""Where images come from: an OCI image layout directory, a tar archive of one, and — through
the same interface — a registry.

The store pulls only through `ImageSource`: it asks for the top-level descriptors of a
reference and then for blobs by descriptor, and verifies every byte itself. A registry client
implements the same two calls (resolve: GET /v2/<name>/manifests/<tag>; fetch: GET
/v2/<name>/blobs/<digest>) and slots in without the store changing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import IO, Protocol

from auraed.errors import FailedPrecondition, InvalidArgument, NotFound, Subject
from auraed.images.oci import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    MAX_DOCUMENT_BYTES,
    REF_NAME,
    Descriptor,
    digest_hex,
    index_manifests,
    parse_document,
)

LAYOUT_FILE = "oci-layout"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
INDEX_FILE = "index.json"


class ImageSource(Protocol):
    """A place that serves images by reference and blobs by descriptor, unverified."""

    def resolve(self, reference: str | None) -> list[tuple[str | None, Descriptor]]:
        """The top-level descriptors (a manifest or an index) the source names `reference`,
        or all it holds when reference is None, each with the name the source gives it."""
        ...

    def fetch(self, descriptor: Descriptor) -> IO[bytes]:
        """The bytes of a blob, as the source has them; the caller checks digest and size."""
        ...

    def close(self) -> None: ...


class _Layout:
    """What OCI layouts and their archives share: the index and its names."""

    description = "image layout"

    def _read(self, name: str) -> bytes:
        raise NotImplementedError

    def _open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def _entries(self) -> list[tuple[str | None, Descriptor]]:
        try:
            layout = parse_document(self._read(LAYOUT_FILE), what=f"{self.description} "
                                    f"{LAYOUT_FILE}")
        except FileNotFoundError:
            raise InvalidArgument(f"{self.description} has no {LAYOUT_FILE} file: not an OCI "
                                  "image layout (nor a docker-archive)",
                                  subject=Subject.IMAGE_SOURCE) from None
        if not str(layout.get("imageLayoutVersion", "")).startswith("1."):
            raise InvalidArgument(f"{self.description}: unsupported imageLayoutVersion "
                                  f"{layout.get('imageLayoutVersion')!r}", subject=Subject.IMAGE_SOURCE)
        try:
            index = parse_document(self._read(INDEX_FILE), what=f"{self.description} index.json")
        except FileNotFoundError:
            raise InvalidArgument(f"{self.description} has no {INDEX_FILE}",
                                  subject=Subject.IMAGE_SOURCE) from None
        manifests = index_manifests(index, what=f"{self.description} index.json")
        return [(d.annotations.get(REF_NAME), d) for d in manifests]

    def resolve(self, reference: str | None) -> list[tuple[str | None, Descriptor]]:
        entries = self._entries()
        if reference is None:
            return entries
        found: list[tuple[str | None, Descriptor]] = [
            (name, d) for name, d in entries if name == reference]
        if not found:
            raise NotFound(f"{self.description} holds no image named {reference!r}")
        return found

    def fetch(self, descriptor: Descriptor) -> IO[bytes]:
        name = f"blobs/sha256/{digest_hex(descriptor.digest)}"
        try:
            return self._open(name)
        except FileNotFoundError:
            raise InvalidArgument(f"{self.description} lacks blob {descriptor.digest}",
                                  subject=Subject.IMAGE_SOURCE) from None


class LayoutSource(_Layout):
    """An OCI image layout directory (what `skopeo copy ... oci:DIR` or buildah write)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"image layout {path}"

    def _read(self, name: str) -> bytes:
        with self._open(name) as stream:
            data = stream.read(MAX_DOCUMENT_BYTES + 1)
        if len(data) > MAX_DOCUMENT_BYTES:
            raise InvalidArgument(f"{self.description}: {name} is too large")
        return data

    def _open(self, name: str) -> IO[bytes]:
        # O_NOFOLLOW on the last part: a blob is a file of the layout, never a link out of it.
        fd = os.open(self.path / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        return os.fdopen(fd, "rb")

    def close(self) -> None:
        pass


class DockerArchiveSource:
    """A tar that `docker save` wrote before Docker 25: manifest.json naming a config file and
    uncompressed layer tars per image. Served as OCI: each image gets a manifest made here
    (deterministically, so importing twice gives one image), whose descriptors carry the
    digests of the archive's own files; the store verifies them like any blob."""

    def __init__(self, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo],
                 path: Path) -> None:
        self._tar = tar
        self._members = members
        self.description = f"docker archive {path}"
        self._made: dict[str, bytes] = {}
        self._files: dict[str, str] = {}  # digest -> member name

    def _member_bytes(self, name: str, limit: int) -> bytes:
        member = self._members.get(os.path.normpath(name).lstrip("/"))
        if member is None:
            raise InvalidArgument(f"{self.description} lacks {name}", subject=Subject.IMAGE_SOURCE)
        if member.size > limit:
            raise InvalidArgument(f"{self.description}: {name} is too large", subject=Subject.IMAGE_SOURCE)
        stream = self._tar.extractfile(member)
        assert stream is not None
        return stream.read()

    def _digest_of(self, name: str) -> tuple[str, int]:
        member = self._members.get(os.path.normpath(name).lstrip("/"))
        if member is None:
            raise InvalidArgument(f"{self.description} lacks {name}", subject=Subject.IMAGE_SOURCE)
        stream = self._tar.extractfile(member)
        assert stream is not None
        sha256 = hashlib.sha256()
        while chunk := stream.read(1024 * 1024):
            sha256.update(chunk)
        digest = "sha256:" + sha256.hexdigest()
        self._files[digest] = member.name
        return digest, member.size

    def resolve(self, reference: str | None) -> list[tuple[str | None, Descriptor]]:
        entries = parse_json_list(self._member_bytes("manifest.json", MAX_DOCUMENT_BYTES),
                                  what=f"{self.description} manifest.json")
        found: list[tuple[str | None, Descriptor]] = []
        for entry in entries:
            config_name, layers = entry.get("Config"), entry.get("Layers")
            if not isinstance(config_name, str) or not isinstance(layers, list):
                raise InvalidArgument(f"{self.description}: manifest.json entries need Config "
                                      "and Layers", subject=Subject.IMAGE_SOURCE)
            config_digest, config_size = self._digest_of(config_name)
            # docker save names the config by its digest: the one check of the config's bytes.
            named = os.path.basename(config_name).removesuffix(".json")
            if len(named) == 64 and named != config_digest.removeprefix("sha256:"):
                raise InvalidArgument(f"{self.description}: config {config_name} does not "
                                      f"match its name (sha256 {config_digest})",
                                      subject=Subject.IMAGE_SOURCE)
            layer_descriptors = []
            for layer in layers:
                digest, size = self._digest_of(str(layer))
                layer_descriptors.append({"mediaType": DOCKER_LAYER, "digest": digest,
                                          "size": size})
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                "config": {"mediaType": DOCKER_CONFIG, "digest": config_digest,
                           "size": config_size},
                "layers": layer_descriptors}, sort_keys=True, separators=(",", ":")).encode()
            digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
            self._made[digest] = manifest
            descriptor = Descriptor(DOCKER_MANIFEST, digest, len(manifest))
            tags = entry.get("RepoTags") or [None]
            for tag in tags if isinstance(tags, list) else [None]:
                if reference is None or tag == reference:
                    found.append((str(tag) if tag else None, descriptor))
        if reference is not None and not found:
            raise NotFound(f"{self.description} holds no image named {reference!r}")
        return found

    def fetch(self, descriptor: Descriptor) -> IO[bytes]:
        if descriptor.digest in self._made:
            return io.BytesIO(self._made[descriptor.digest])
        name = self._files.get(descriptor.digest)
        if name is None:
            raise InvalidArgument(f"{self.description} lacks blob {descriptor.digest}",
                                  subject=Subject.IMAGE_SOURCE)
        stream = self._tar.extractfile(self._members[os.path.normpath(name).lstrip("/")])
        assert stream is not None
        return stream

    def close(self) -> None:
        self._tar.close()


def parse_json_list(data: bytes, *, what: str) -> list[dict[str, object]]:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(f"{what} is not valid JSON", subject=Subject.IMAGE_SOURCE) from None
    if not isinstance(document, list) or not all(isinstance(e, dict) for e in document):
        raise InvalidArgument(f"{what} is not a list of objects", subject=Subject.IMAGE_SOURCE)
    return document


class ArchiveSource(_Layout):
    """A tar (optionally compressed) of an OCI image layout: oci-archive, or `docker save`
    of Docker 25 and later."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"image archive {path}"
        try:
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
            members = self._tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as error:
            raise InvalidArgument(f"{self.description} is not a readable tar archive: "
                                  f"{error}", subject=Subject.IMAGE_SOURCE) from None
        self._members = {os.path.normpath(m.name).lstrip("/"): m for m in members if m.isfile()}
        # docker save links a layer shared by two images to its first copy.
        for link in (m for m in members if m.issym()):
            name = os.path.normpath(link.name).lstrip("/")
            target = os.path.normpath(os.path.join(os.path.dirname(name), link.linkname))
            if target in self._members:
                self._members[name] = self._members[target]

    def _read(self, name: str) -> bytes:
        member = self._members.get(name)
        if member is None:
            raise FileNotFoundError(name)
        if member.size > MAX_DOCUMENT_BYTES:
            raise InvalidArgument(f"{self.description}: {name} is too large")
        with self._open(name) as stream:
            return stream.read()

    def _open(self, name: str) -> IO[bytes]:
        member = self._members.get(name)
        if member is None:
            raise FileNotFoundError(name)
        stream = self._tar.extractfile(member)
        assert stream is not None  # a regular file
        return stream

    def close(self) -> None:
        self._tar.close()

    def names(self) -> set[str]:
        return set(self._members)

    def as_docker_archive(self) -> DockerArchiveSource:
        return DockerArchiveSource(self._tar, self._members, self.path)


def open_source(path: str) -> ImageSource:
    """The source at `path` on this host: a layout directory or an archive file."""
    if not path or "\0" in path or not os.path.isabs(path):
        raise InvalidArgument("an absolute path of an image layout or archive on the daemon's "
                              "host is required", subject=Subject.IMAGE_SOURCE)
    location = Path(path)
    if location.is_dir():
        return LayoutSource(location)
    if location.is_file():
        archive = ArchiveSource(location)
        if LAYOUT_FILE not in archive.names() and "manifest.json" in archive.names():
            return archive.as_docker_archive()
        return archive
    if location.exists():
        raise FailedPrecondition(f"{path} is neither a directory nor a file", subject=Subject.IMAGE_SOURCE)
    raise NotFound(f"{path} does not exist on the daemon's host", subject=Subject.IMAGE_SOURCE)
