"""Where images come from: an OCI image layout directory, a tar archive of one, and — through
the same interface — a registry.

The store pulls only through `ImageSource`: it asks for the top-level descriptors of a
reference and then for blobs by descriptor, and verifies every byte itself. A registry client
implements the same two calls (resolve: GET /v2/<name>/manifests/<tag>; fetch: GET
/v2/<name>/blobs/<digest>) and slots in without the store changing.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import IO, Protocol

from auraed.errors import FailedPrecondition, InvalidArgument, NotFound
from auraed.images.oci import (
    MAX_DOCUMENT_BYTES,
    REF_NAME,
    Descriptor,
    digest_hex,
    index_manifests,
    parse_document,
)

LAYOUT_FILE = "oci-layout"
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
                                  "image layout (docker-archive tars of old Docker versions "
                                  "are not read; `skopeo copy docker-archive:F oci-archive:G` "
                                  "converts one)", field="file_name") from None
        if not str(layout.get("imageLayoutVersion", "")).startswith("1."):
            raise InvalidArgument(f"{self.description}: unsupported imageLayoutVersion "
                                  f"{layout.get('imageLayoutVersion')!r}", field="file_name")
        try:
            index = parse_document(self._read(INDEX_FILE), what=f"{self.description} index.json")
        except FileNotFoundError:
            raise InvalidArgument(f"{self.description} has no {INDEX_FILE}",
                                  field="file_name") from None
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
                                  field="file_name") from None


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
                                  f"{error}", field="file_name") from None
        self._members = {os.path.normpath(m.name).lstrip("/"): m for m in members if m.isfile()}

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


def open_source(path: str) -> ImageSource:
    """The source at `path` on this host: a layout directory or an archive file."""
    if not path or "\0" in path or not os.path.isabs(path):
        raise InvalidArgument("an absolute path of an image layout or archive on the daemon's "
                              "host is required", field="file_name")
    location = Path(path)
    if location.is_dir():
        return LayoutSource(location)
    if location.is_file():
        return ArchiveSource(location)
    if location.exists():
        raise FailedPrecondition(f"{path} is neither a directory nor a file", field="file_name")
    raise NotFound(f"{path} does not exist on the daemon's host", field="file_name")
