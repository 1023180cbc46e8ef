"""SPIFFE IDs (SPIFFE-ID standard, section 2): the grammar every part checks.

The daemon names its callers by the SPIFFE ID in their certificate, the PKI
tooling refuses to write one that is malformed, and the daemon will mint
children of its own ID for the guests and instances it starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aurae_sdk.wire.dns import AURAE_DOMAIN

DEFAULT_TRUST_DOMAIN = AURAE_DOMAIN
MAX_SPIFFE_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

# A lowercase trust domain, then path segments of letters, digits, '.', '-'
# and '_' (no empty, "." or ".." segments).
_TRUST_DOMAIN = r"[a-z0-9._-]+"
SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
TRUST_DOMAIN = re.compile(_TRUST_DOMAIN)
_SPIFFE_ID = re.compile(rf"spiffe://({_TRUST_DOMAIN})((?:/{SEGMENT.pattern})*)")


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A parsed SPIFFE ID; `path` is "" for a trust domain itself, else "/a/b"."""

    trust_domain: str
    path: str

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Raise ValueError, saying what is wrong, unless `text` is a SPIFFE ID."""
        if len(text.encode()) > MAX_SPIFFE_ID_BYTES:
            raise ValueError(f"a SPIFFE ID has at most {MAX_SPIFFE_ID_BYTES} bytes")
        match = _SPIFFE_ID.fullmatch(text)
        if match is None:
            raise ValueError(
                f"{text!r} is not a SPIFFE ID (spiffe://<trust-domain>/<path>: a lowercase trust "
                "domain of letters, digits, '.', '-', '_', then non-empty path segments)"
            )
        trust_domain, path = match.groups()
        check_trust_domain(trust_domain)
        if any(segment in (".", "..") for segment in path.split("/")):
            raise ValueError(f"{text!r} has a '.' or '..' path segment")
        return cls(trust_domain, path)

    @classmethod
    def of_workload(cls, name: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> SpiffeId:
        """spiffe://<trust_domain>/<name>, checked."""
        return cls.parse(f"spiffe://{trust_domain}/{name}")

    def child(self, name: str) -> SpiffeId:
        """The ID of something this workload starts: its own path plus one segment."""
        if not SEGMENT.fullmatch(name) or name in (".", ".."):
            raise ValueError(
                f"{name!r} is not a SPIFFE path segment (letters, digits, '.', '-', '_')"
            )
        return SpiffeId.parse(f"{self}/{name}")

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def check_trust_domain(trust_domain: str) -> None:
    """Raise ValueError unless `trust_domain` is a SPIFFE trust domain."""
    if not TRUST_DOMAIN.fullmatch(trust_domain):
        raise ValueError(
            f"invalid trust domain {trust_domain!r}: "
            "use lowercase letters, digits, '.', '-' and '_'"
        )
    if len(trust_domain) > MAX_TRUST_DOMAIN_BYTES:
        raise ValueError(f"trust domain {trust_domain!r} is over {MAX_TRUST_DOMAIN_BYTES} bytes")
