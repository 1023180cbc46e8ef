"""Image references in the form Docker and kubelet use: "busybox" means
"docker.io/library/busybox:latest"."""

from __future__ import annotations

import re

from auraed.errors import InvalidArgument, Subject

DEFAULT_DOMAIN = "docker.io"
DEFAULT_TAG = "latest"
# The grammar of distribution/reference, in short: lowercase path components, an optional
# domain (with a dot or a port, or "localhost"), a tag of word characters, or a digest.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_REFERENCE = 255


def normalize_reference(text: str) -> str:
    """The full form of an image reference: domain/path:tag or domain/path@digest."""
    if not text or len(text) > MAX_REFERENCE:
        raise InvalidArgument(f"an image reference of 1 to {MAX_REFERENCE} characters is "
                              "required", subject=Subject.IMAGE_REFERENCE)
    name, digest = text, ""
    if "@" in text:
        name, _, digest = text.partition("@")
        if not _DIGEST.fullmatch(digest):
            raise InvalidArgument(f"invalid digest in image reference {text!r}", subject=Subject.IMAGE_REFERENCE)
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise InvalidArgument(f"invalid tag in image reference {text!r}", subject=Subject.IMAGE_REFERENCE)
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, rest
    else:
        domain, path = DEFAULT_DOMAIN, name
        if "/" not in path:
            path = f"library/{path}"
    if not _PATH.fullmatch(path) or not re.fullmatch(r"[A-Za-z0-9.-]+(?::[0-9]+)?", domain):
        raise InvalidArgument(f"invalid image reference {text!r}", subject=Subject.IMAGE_REFERENCE)
    if digest:
        return f"{domain}/{path}@{digest}" if not tag else f"{domain}/{path}:{tag}@{digest}"
    return f"{domain}/{path}:{tag or DEFAULT_TAG}"


def repository(reference: str) -> str:
    """The repository part of a normalized reference ("docker.io/library/busybox")."""
    name = reference.partition("@")[0]
    slash, colon = name.rfind("/"), name.rfind(":")
    return name[:colon] if colon > slash else name
