"""The local image store: blobs by digest, unpacked layers by diff_id, an index of images.

Layout under the store's root (the daemon's library dir + "images"):

  blobs/sha256/<hex>     every manifest, config and layer blob, named by its digest
  layers/sha256/<hex>    each layer unpacked, named by its diff_id: one overlay lower
  index.json             {"images": {manifest digest: {"references": [...], "imported_at"}}}
  tmp/                   work in progress; emptied at every start

An import writes everything to tmp/, verifies each blob's digest and size and each layer's
diff_id there, and only then renames it into place and writes the index (itself by rename),
so a refused or interrupted import leaves nothing behind. Blobs and layers nothing refers to
(after a remove, or a crash between the renames and the index) are removed at open.

A store can also be borrowed (`borrowed=True`): a daemon in a pod instance reads its host's
store, never writes it. It reads the index again when a name is not found (the host may have
imported the image since), and refuses imports and removals; the host holds the images its
pods' containers use, so none goes while they run.

Locking: `_imports` serializes the calls that change the store (import, remove) and is held
across their file work; `_lock` guards the in-memory index and is held only briefly, so List
and Inspect never wait for an import.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from auraed.errors import FailedPrecondition, InvalidArgument, NotFound, Subject
from auraed.images.oci import (
    INDEXES,
    LAYERS,
    MANIFESTS,
    MAX_DOCUMENT_BYTES,
    Descriptor,
    ImageConfig,
    Manifest,
    digest_hex,
    index_manifests,
    parse_document,
    pick_platform,
)
from auraed.images.reference import normalize_reference
from auraed.images.sources import ImageSource
from auraed.images.unpack import unpack_layer

log = logging.getLogger("auraed.images")

_CHUNK = 1024 * 1024
INDEX_FILE = "index.json"


@dataclass(frozen=True)
class Image:
    """One image in the store. id is its config's digest (as containerd and the CRI use)."""

    id: str
    manifest_digest: str
    references: tuple[str, ...]
    config: ImageConfig
    layers: tuple[Descriptor, ...]
    size: int  # bytes of the manifest, config and layer blobs
    imported_at: float

    @property
    def repo_digests(self) -> tuple[str, ...]:
        from auraed.images.reference import repository

        return tuple(sorted({f"{repository(r)}@{self.manifest_digest}" for r in self.references}))


@dataclass
class _Staged:
    """What one import has written to tmp/ so far."""

    blobs: dict[str, Path]
    layers: dict[str, Path]


class ImageStore:
    def __init__(self, root: Path, *, borrowed: bool = False) -> None:
        self.root = root
        self.borrowed = borrowed
        self._blobs = root / "blobs" / "sha256"
        self._layers = root / "layers" / "sha256"
        self._tmp = root / "tmp"
        self._lock = threading.Lock()
        self._imports = threading.Lock()
        self._images: dict[str, Image] = {}
        self._users: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Create the store (or load it), clear unfinished work and unreferenced content."""
        if self.borrowed:
            self._reload()
            return
        for directory in (self._blobs, self._layers):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(mode=0o700)
        entries = self._read_index()
        images: dict[str, Image] = {}
        for manifest_digest, entry in entries.items():
            try:
                images[manifest_digest] = self._load(manifest_digest, entry)
            except (InvalidArgument, OSError) as error:
                log.error("dropping an image whose blobs are damaged or gone",
                          extra={"manifest": manifest_digest, "error": str(error)})
        with self._lock:
            self._images = images
        if len(images) != len(entries):
            self._write_index()
        self._collect_garbage()

    def _reload(self) -> None:
        """A borrowed store's view of its owner's index, as it is now."""
        images: dict[str, Image] = {}
        for manifest_digest, entry in self._read_index().items():
            try:
                images[manifest_digest] = self._load(manifest_digest, entry)
            except (InvalidArgument, OSError):
                continue  # being imported or removed by the owner
        with self._lock:
            self._images = images

    def _read_index(self) -> dict[str, dict[str, object]]:
        try:
            document = json.loads((self.root / INDEX_FILE).read_bytes())
        except FileNotFoundError:
            return {}
        images = document.get("images", {}) if isinstance(document, dict) else {}
        return images if isinstance(images, dict) else {}

    def _load(self, manifest_digest: str, entry: dict[str, object]) -> Image:
        manifest = Manifest.parse(self._blob_bytes(manifest_digest), what="manifest")
        config = ImageConfig.parse(self._blob_bytes(manifest.config.digest), what="config")
        references = entry.get("references") or []
        imported_at = entry.get("imported_at") or 0.0
        return _image(manifest_digest, manifest, config,
                      tuple(str(r) for r in references) if isinstance(references, list) else (),
                      float(imported_at) if isinstance(imported_at, (int, float)) else 0.0,
                      self._blob_size(manifest_digest))

    def _write_index(self) -> None:
        with self._lock:
            document = {"images": {
                image.manifest_digest: {"references": list(image.references),
                                        "imported_at": image.imported_at}
                for image in self._images.values()}}
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="index.")
        with os.fdopen(fd, "w") as out:
            json.dump(document, out, sort_keys=True, indent=1)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.root / INDEX_FILE)

    def _collect_garbage(self) -> None:
        """Remove blobs and unpacked layers that no image refers to."""
        with self._lock:
            images = list(self._images.values())
        blobs = {digest_hex(d) for image in images for d in (
            image.manifest_digest, image.id, *(layer.digest for layer in image.layers))}
        layers = {digest_hex(d) for image in images for d in image.config.diff_ids}
        for directory, keep in ((self._blobs, blobs), (self._layers, layers)):
            for path in directory.iterdir():
                if path.name not in keep:
                    _remove(path)

    # ------------------------------------------------------------------ reading

    def list(self) -> list[Image]:
        with self._lock:
            return sorted(self._images.values(), key=lambda image: (image.references, image.id))

    def find(self, name: str) -> Image | None:
        """The image a reference, an id (sha256:<hex> or a unique prefix of the hex) or a
        manifest digest names; None when there is none."""
        if not name:
            return None
        found = self._find(name)
        if found is None and self.borrowed:
            self._reload()
            found = self._find(name)
        return found

    def _find(self, name: str) -> Image | None:
        with self._lock:
            images = list(self._images.values())
        for image in images:
            if name in (image.id, image.manifest_digest) or name in image.repo_digests:
                return image
        if 12 <= len(name) <= 64 and all(c in "0123456789abcdef" for c in name):
            matches = [i for i in images if digest_hex(i.id).startswith(name)]
            if len(matches) == 1:
                return matches[0]
        try:
            reference = normalize_reference(name)
        except InvalidArgument:
            return None
        for image in images:
            if reference in image.references or reference in image.repo_digests:
                return image
        return None

    def get(self, name: str) -> Image:
        image = self.find(name)
        if image is None:
            raise NotFound(f"no image {name!r} in the store", subject=Subject.IMAGE)
        return image

    def layer_dirs(self, image: Image) -> builtins.list[Path]:
        """The unpacked layers of `image`, lowest first."""
        return [self._layers / digest_hex(diff_id) for diff_id in image.config.diff_ids]

    # ------------------------------------------------------------------ users

    @contextmanager
    def in_use(self, image: Image) -> Iterator[None]:
        """Mark `image` as used (by a container) while the block runs."""
        self.acquire(image)
        try:
            yield
        finally:
            self.release(image)

    def acquire(self, image: Image) -> None:
        with self._lock:
            if image.manifest_digest not in self._images:
                raise NotFound(f"image {image.id} was removed", subject=Subject.IMAGE)
            self._users[image.manifest_digest] = self._users.get(image.manifest_digest, 0) + 1

    def release(self, image: Image) -> None:
        with self._lock:
            count = self._users.get(image.manifest_digest, 0) - 1
            if count > 0:
                self._users[image.manifest_digest] = count
            else:
                self._users.pop(image.manifest_digest, None)

    # ------------------------------------------------------------------ changing

    def remove(self, name: str) -> Image:
        """Remove an image with all its references, and its content no other image uses."""
        self._check_owned()
        with self._imports:
            image = self.get(name)
            with self._lock:
                users = self._users.get(image.manifest_digest, 0)
                if users:
                    raise FailedPrecondition(f"image {name} is used by {users} container(s)",
                                             subject=Subject.IMAGE)
                del self._images[image.manifest_digest]
            self._write_index()
            self._collect_garbage()
        log.info("image removed", extra={"image": image.id, "references": ",".join(
            image.references)})
        return image

    def tag(self, image: Image, reference: str) -> Image:
        """Give `image` one more reference (moved off any image that had it)."""
        reference = normalize_reference(reference)
        self._check_owned()
        with self._imports:
            with self._lock:
                self._take_references({reference})
                current = self._images[image.manifest_digest]
                tagged = _with_references(current, (*current.references, reference))
                self._images[image.manifest_digest] = tagged
            self._write_index()
        return tagged

    def pull(self, source: ImageSource, reference: str | None = None,
             name: str | None = None) -> builtins.list[Image]:
        """Import the images `source` holds (only the one it names `reference`, if given),
        verifying every blob. `name` (a reference) names the single image imported; without
        it images keep the full references the source gives them."""
        wanted = normalize_reference(name) if name else None
        self._check_owned()
        with self._imports:
            entries = source.resolve(reference)
            if not entries:
                raise InvalidArgument("the source holds no image", subject=Subject.IMAGE_SOURCE)
            if wanted is not None and len(entries) != 1:
                raise InvalidArgument(f"the source holds {len(entries)} images; a reference "
                                      "can name only one", subject=Subject.IMAGE_REFERENCE)
            staged = _Staged({}, {})
            try:
                found = [self._stage(source, descriptor, staged) for _, descriptor in entries]
                self._commit(staged)
            finally:
                for path in [*staged.blobs.values(), *staged.layers.values()]:
                    _remove(path)
            now = time.time()
            imported = []
            with self._lock:
                for (source_name, _), (manifest_digest, manifest, config) in zip(
                        entries, found, strict=True):
                    references = {wanted} if wanted else _source_references(source_name)
                    self._take_references(references)
                    previous = self._images.get(manifest_digest)
                    kept = set(previous.references) if previous else set()
                    image = _image(manifest_digest, manifest, config,
                                   tuple(sorted(kept | references)), now,
                                   self._blob_size(manifest_digest))
                    self._images[manifest_digest] = image
                    imported.append(image)
            self._write_index()
            self._collect_garbage()  # references moved off an image leave it, not its blobs
        for image in imported:
            log.info("image imported", extra={"image": image.id, "references": ",".join(
                image.references), "bytes": image.size})
        return imported

    def _check_owned(self) -> None:
        if self.borrowed:
            raise FailedPrecondition("this daemon's image store is its host's: import and "
                                     "remove images on the host")

    def _take_references(self, references: set[str]) -> None:
        """Move `references` off the images that hold them (call under _lock)."""
        for digest, image in list(self._images.items()):
            if references & set(image.references):
                self._images[digest] = _with_references(
                    image, tuple(r for r in image.references if r not in references))

    def _stage(self, source: ImageSource, top: Descriptor,
               staged: _Staged) -> tuple[str, Manifest, ImageConfig]:
        descriptor = top
        if top.media_type in INDEXES:
            index = parse_document(self._document(source, top, staged), what="image index")
            descriptor = pick_platform(index_manifests(index, what="image index"),
                                       what="image index")
        if descriptor.media_type not in MANIFESTS:
            raise InvalidArgument(f"media type {descriptor.media_type!r} is not an image "
                                  "manifest or index", subject=Subject.IMAGE_SOURCE)
        manifest = Manifest.parse(self._document(source, descriptor, staged), what="manifest")
        config = ImageConfig.parse(self._document(source, manifest.config, staged),
                                   what="image config")
        if len(config.diff_ids) != len(manifest.layers):
            raise InvalidArgument(f"the manifest has {len(manifest.layers)} layers but the "
                                  f"config {len(config.diff_ids)} diff_ids", subject=Subject.IMAGE_SOURCE)
        for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
            blob = self._fetch(source, layer, staged)
            target = self._layers / digest_hex(diff_id)
            if target.exists() or diff_id in staged.layers:
                continue
            work = Path(tempfile.mkdtemp(dir=self._tmp, prefix="layer."))
            staged.layers[diff_id] = work
            root = work / "rootfs"
            root.mkdir()
            root.chmod(0o755)  # a layer without an entry for "/" still lets everyone in
            with open(blob, "rb") as stream:
                unpack_layer(stream, LAYERS[layer.media_type], diff_id, root)
        return descriptor.digest, manifest, config

    def _document(self, source: ImageSource, descriptor: Descriptor, staged: _Staged) -> bytes:
        if descriptor.size > MAX_DOCUMENT_BYTES:
            raise InvalidArgument(f"{descriptor.digest}: a {descriptor.size}-byte manifest or "
                                  "config is too large", subject=Subject.IMAGE_SOURCE)
        return self._fetch(source, descriptor, staged).read_bytes()

    def _fetch(self, source: ImageSource, descriptor: Descriptor, staged: _Staged) -> Path:
        """The verified blob: already in the store, already staged, or fetched now."""
        stored = self._blobs / digest_hex(descriptor.digest)
        if stored.exists():
            return stored
        if descriptor.digest in staged.blobs:
            return staged.blobs[descriptor.digest]
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix="blob.")
        path = Path(name)
        staged.blobs[descriptor.digest] = path
        with os.fdopen(fd, "wb") as out, source.fetch(descriptor) as stream:
            _copy_verified(stream, out, descriptor)
        return path

    def _commit(self, staged: _Staged) -> None:
        """Move staged content into place: blobs, then layers (the index comes after)."""
        for digest, path in staged.blobs.items():
            os.replace(path, self._blobs / digest_hex(digest))
        for diff_id, work in staged.layers.items():
            os.rename(work / "rootfs", self._layers / digest_hex(diff_id))
        staged.blobs.clear()
        for work in staged.layers.values():
            _remove(work)
        staged.layers.clear()

    def _blob_bytes(self, digest: str) -> bytes:
        return (self._blobs / digest_hex(digest)).read_bytes()

    def _blob_size(self, manifest_digest: str) -> int:
        manifest = Manifest.parse(self._blob_bytes(manifest_digest), what="manifest")
        return sum(os.stat(self._blobs / digest_hex(d)).st_size for d in (
            manifest_digest, manifest.config.digest, *(layer.digest for layer in manifest.layers)))


def _copy_verified(stream: IO[bytes], out: IO[bytes], descriptor: Descriptor) -> None:
    sha256 = hashlib.sha256()
    size = 0
    while chunk := stream.read(min(_CHUNK, descriptor.size + 1 - size)):
        sha256.update(chunk)
        out.write(chunk)
        size += len(chunk)
        if size > descriptor.size:
            break
    if size != descriptor.size:
        larger = "larger" if size > descriptor.size else "smaller"
        raise InvalidArgument(f"blob {descriptor.digest} is {larger} than the {descriptor.size} "
                              "bytes its descriptor gives", subject=Subject.IMAGE_SOURCE)
    actual = "sha256:" + sha256.hexdigest()
    if actual != descriptor.digest:
        raise InvalidArgument(f"blob content does not match its digest: expected "
                              f"{descriptor.digest}, got {actual}", subject=Subject.IMAGE_SOURCE)
    out.flush()
    os.fsync(out.fileno())


def _source_references(name: str | None) -> set[str]:
    """The references a source's name gives: only full references (a bare tag such as
    "latest", which OCI layouts often carry, names no repository)."""
    if not name or not any(mark in name for mark in "/:@"):
        return set()
    try:
        return {normalize_reference(name)}
    except InvalidArgument:
        return set()


def _image(manifest_digest: str, manifest: Manifest, config: ImageConfig,
           references: tuple[str, ...], imported_at: float, size: int) -> Image:
    return Image(id=manifest.config.digest, manifest_digest=manifest_digest,
                 references=references, config=config, layers=manifest.layers, size=size,
                 imported_at=imported_at)


def _with_references(image: Image, references: tuple[str, ...]) -> Image:
    return Image(id=image.id, manifest_digest=image.manifest_digest,
                 references=tuple(sorted(set(references))), config=image.config,
                 layers=image.layers, size=image.size, imported_at=image.imported_at)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
