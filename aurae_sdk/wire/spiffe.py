"""SPIFFE IDs (SPIFFE-ID standard, section 2): the grammar every part checks.

The daemon names its callers by the SPIFFE ID in their certificate, the PKI
tooling refuses to write one that is malformed, and the daemon will mint
children of its own ID for the guests and instances it starts.

    spiffe://<trust-domain><path>

- the scheme is `spiffe` in lowercase, then `://`;
- the trust domain is 1-255 bytes of lowercase ASCII letters, digits, `.`, `-`, `_` (so no
  userinfo `@`, no port `:`);
- the path is empty or `/`-separated segments of ASCII letters, digits, `.`, `-`, `_`: no empty
  segment (no `//`, no trailing `/`), no `.` or `..`, no query `?` or fragment `#`;
- percent-encoding is not allowed: `%41` is not another way to write `A`, it is no SPIFFE ID;
- at most 2048 bytes.

A SPIFFE ID is compared as the text it is: there is no normalisation, so a check must see every
byte of it. A certificate's SAN read through a C string ends at its first NUL; the daemon parses
the value the certificate holds (auraed.identity), so nothing is cut off before it gets here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aurae_sdk.wire.dns import AURAE_DOMAIN

DEFAULT_TRUST_DOMAIN = AURAE_DOMAIN
SCHEME = "spiffe://"
MAX_SPIFFE_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")


def _control_character(text: str) -> str | None:
    """A description of the first control character in text (NUL, C0, DEL, C1), if any."""
    for index, char in enumerate(text):
        code = ord(char)
        if code < 0x20 or 0x7F <= code < 0xA0:
            name = "NUL" if code == 0 else f"U+{code:04X}"
            return f"a control character ({name}) at position {index}"
    return None


def spiffe_id_problem(text: str) -> str | None:
    """What makes text no SPIFFE ID, or None when it is one."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
        return f"a SPIFFE ID has at most {MAX_SPIFFE_ID_BYTES} bytes"
    control = _control_character(text)
    if control is not None:
        return f"it holds {control}"
    if not text.isascii():
        return "it holds a non-ASCII character"
    if "%" in text:
        return "it holds percent-encoding ('%'), which a SPIFFE ID never uses"
    if not text.startswith(SCHEME):
        return "it does not start with spiffe:// (the scheme is lowercase)"
    trust_domain, slash, path = text[len(SCHEME):].partition("/")
    if not trust_domain:
        return "its trust domain is empty"
    if "@" in trust_domain or ":" in trust_domain:
        return "its trust domain holds a user or a port ('@' or ':')"
    if TRUST_DOMAIN.fullmatch(trust_domain) is None:
        return ("its trust domain holds a character other than lowercase letters, digits, "
                "'.', '-' and '_'")
    if len(trust_domain) > MAX_TRUST_DOMAIN_BYTES:
        return f"its trust domain is over {MAX_TRUST_DOMAIN_BYTES} bytes"
    if not slash:
        return None
    for segment in path.split("/"):
        if not segment:
            return "its path has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"its path has a {segment!r} segment"
        if SEGMENT.fullmatch(segment) is None:
            return (f"its path segment {segment!r} holds a character other than letters, "
                    "digits, '.', '-' and '_' (no query or fragment)")
    return None


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A parsed SPIFFE ID; `path` is "" for a trust domain itself, else "/a/b"."""

    trust_domain: str
    path: str

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Raise ValueError, saying what is wrong, unless `text` is a SPIFFE ID."""
        problem = spiffe_id_problem(text)
        if problem is not None:
            raise ValueError(f"{text!r} is not a SPIFFE ID: {problem}")
        trust_domain, slash, path = text[len(SCHEME):].partition("/")
        return cls(trust_domain, slash + path)

    @classmethod
    def of_workload(cls, name: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> SpiffeId:
        """spiffe://<trust_domain>/<name>, checked."""
        return cls.parse(f"{SCHEME}{trust_domain}/{name}")

    def child(self, name: str) -> SpiffeId:
        """The ID of something this workload starts: its own path plus one segment."""
        if not SEGMENT.fullmatch(name) or name in (".", ".."):
            raise ValueError(
                f"{name!r} is not a SPIFFE path segment (letters, digits, '.', '-', '_')"
            )
        return SpiffeId.parse(f"{self}/{name}")

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"


def check_trust_domain(trust_domain: str) -> None:
    """Raise ValueError unless `trust_domain` is a SPIFFE trust domain."""
    if not TRUST_DOMAIN.fullmatch(trust_domain):
        raise ValueError(
            f"invalid trust domain {trust_domain!r}: "
            "use lowercase letters, digits, '.', '-' and '_'"
        )
    if len(trust_domain) > MAX_TRUST_DOMAIN_BYTES:
        raise ValueError(f"trust domain {trust_domain!r} is over {MAX_TRUST_DOMAIN_BYTES} bytes")


__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "MAX_SPIFFE_ID_BYTES",
    "MAX_TRUST_DOMAIN_BYTES",
    "SEGMENT",
    "TRUST_DOMAIN",
    "SpiffeId",
    "check_trust_domain",
    "spiffe_id_problem",
]
