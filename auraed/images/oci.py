"""The OCI image format (image-spec v1), as far as the store reads it: descriptors,
indexes, manifests, configs. Docker's v2 schema 2 media types are read as their OCI twins."""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass, field
from typing import Any

from auraed.errors import InvalidArgument

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEXES = frozenset({INDEX, DOCKER_LIST})
MANIFESTS = frozenset({MANIFEST, DOCKER_MANIFEST})
# Layer media types -> the compression of their blob.
LAYERS: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
}
REF_NAME = "org.opencontainers.image.ref.name"
# Manifests and configs are small; anything larger is refused before it is read.
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x", "riscv64": "riscv64"}


def host_architecture() -> str:
    machine = platform.machine()
    return _GO_ARCH.get(machine, machine)


def digest_hex(digest: str, *, what: str = "digest") -> str:
    """The hex of a sha256 digest; other algorithms are refused."""
    found = _DIGEST.fullmatch(digest)
    if found is None:
        raise InvalidArgument(f"{what} {digest!r} is not a sha256 digest")
    return found.group(1)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, compare=False)
    platform: dict[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def parse(cls, raw: Any, *, what: str) -> Descriptor:
        if not isinstance(raw, dict):
            raise InvalidArgument(f"{what}: not a descriptor")
        media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
        if not isinstance(media_type, str) or not isinstance(digest, str):
            raise InvalidArgument(f"{what}: a descriptor needs mediaType and digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"{what}: a descriptor needs a size of 0 or more")
        digest_hex(digest, what=f"{what} digest")
        annotations = raw.get("annotations") or {}
        platform_ = raw.get("platform") or {}
        if not isinstance(annotations, dict) or not isinstance(platform_, dict):
            raise InvalidArgument(f"{what}: malformed annotations or platform")
        return cls(media_type, digest, size, {str(k): str(v) for k, v in annotations.items()},
                   {str(k): str(v) for k, v in platform_.items()})

    def as_json(self) -> dict[str, Any]:
        raw: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.annotations:
            raw["annotations"] = self.annotations
        return raw


def parse_document(data: bytes, *, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(f"{what} is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return document


def index_manifests(document: dict[str, Any], *, what: str) -> list[Descriptor]:
    manifests = document.get("manifests")
    if not isinstance(manifests, list):
        raise InvalidArgument(f"{what} has no manifests list")
    return [Descriptor.parse(raw, what=f"{what} manifest {number}")
            for number, raw in enumerate(manifests)]


def pick_platform(manifests: list[Descriptor], *, what: str) -> Descriptor:
    """The manifest of an index for this host (linux and our architecture)."""
    arch = host_architecture()
    for candidate in manifests:
        wanted = candidate.platform
        if wanted.get("os", "linux") == "linux" and wanted.get("architecture", arch) == arch:
            return candidate
    raise InvalidArgument(f"{what} has no image for linux/{arch}")


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, data: bytes, *, what: str) -> Manifest:
        document = parse_document(data, what=what)
        if document.get("schemaVersion") != 2:
            raise InvalidArgument(f"{what}: schemaVersion must be 2")
        config = Descriptor.parse(document.get("config"), what=f"{what} config")
        layers = document.get("layers")
        if not isinstance(layers, list):
            raise InvalidArgument(f"{what} has no layers list")
        parsed = tuple(Descriptor.parse(raw, what=f"{what} layer {number}")
                       for number, raw in enumerate(layers))
        for layer in parsed:
            if layer.media_type not in LAYERS:
                raise InvalidArgument(f"{what}: layer media type {layer.media_type!r} is not "
                                      "an image layer this daemon reads")
        return cls(config, parsed)


@dataclass(frozen=True)
class ImageConfig:
    """What a container of the image runs, and the uncompressed digests of its layers."""

    architecture: str
    os: str
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: tuple[str, ...]
    working_dir: str
    user: str
    diff_ids: tuple[str, ...]
    labels: dict[str, str] = field(default_factory=dict, compare=False)
    created: str = ""

    @classmethod
    def parse(cls, data: bytes, *, what: str) -> ImageConfig:
        document = parse_document(data, what=what)
        run = document.get("config") or {}
        rootfs = document.get("rootfs") or {}
        if not isinstance(run, dict) or not isinstance(rootfs, dict):
            raise InvalidArgument(f"{what}: malformed config or rootfs")
        diff_ids = rootfs.get("diff_ids")
        if rootfs.get("type") != "layers" or not isinstance(diff_ids, list):
            raise InvalidArgument(f"{what}: rootfs must be of type layers with diff_ids")
        for diff_id in diff_ids:
            digest_hex(str(diff_id), what=f"{what} diff_id")

        def strings(key: str) -> tuple[str, ...]:
            value = run.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidArgument(f"{what}: config.{key} must be a list of strings")
            return tuple(value)

        labels = run.get("Labels") or {}
        return cls(
            architecture=str(document.get("architecture", "")),
            os=str(document.get("os", "")),
            entrypoint=strings("Entrypoint"),
            cmd=strings("Cmd"),
            env=strings("Env"),
            working_dir=str(run.get("WorkingDir") or ""),
            user=str(run.get("User") or ""),
            diff_ids=tuple(str(d) for d in diff_ids),
            labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
            created=str(document.get("created") or ""),
        )
