"""Who is calling: the peer's SPIFFE ID, read from the bytes of its client certificate.

TLS has already proven the certificate chains to our CA; this module only names its holder. A
workload's identity is the one URI SAN of its X.509-SVID, a SPIFFE ID
(spiffe://<trust-domain>/<path>, grammar in aurae_sdk.wire.spiffe). A certificate with no URI
SAN, several, or one that is not a SPIFFE ID has no identity; it keeps its subject's common name,
which the audit log shows instead.

The certificate itself is parsed (grpcio's auth context carries it as PEM, "x509_pem_cert"), not
grpcio's "peer_uri" list: that one is read through C strings, so `spiffe://td/admin<NUL>junk`
arrives as `spiffe://td/admin`. Each URI SAN is checked as the certificate holds it, every byte.

A certificate whose URI SAN holds what no SPIFFE ID can (a control character, NUL, non-ASCII,
percent-encoding) or whose SANs do not parse is `misleading`: it looks like an identity to a
reader that stops early, so it is refused whether or not a policy is in force.
No gRPC imports: callers pass the call's ServicerContext, or its auth context.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from aurae_sdk.wire.spiffe import (
    MAX_SPIFFE_ID_BYTES,
    MAX_TRUST_DOMAIN_BYTES,
    SpiffeId,
    spiffe_id_problem,
)

# Key of grpcio's auth context holding the peer's leaf certificate (grpc_security_constants.h).
PEM_CERT = "x509_pem_cert"
MAX_CACHED_PEERS = 1024


class PeerContext(Protocol):
    """What this module needs of a grpc.ServicerContext."""

    # Values are lists of bytes, whatever grpcio's stubs say.
    def auth_context(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class PeerIdentity:
    """The caller as its certificate names it.

    `spiffe_id` is None when the certificate carries no usable SPIFFE ID, and `problem` says
    why; a policy then refuses the caller. `uris` are the certificate's URI SANs exactly as it
    holds them (for the audit log); `misleading` marks a certificate refused even without a
    policy (see the module's docstring).
    """

    spiffe_id: SpiffeId | None
    common_name: str | None
    problem: str | None = None
    uris: tuple[str, ...] = ()
    misleading: bool = False

    def __str__(self) -> str:
        if self.spiffe_id is not None:
            return str(self.spiffe_id)
        if self.common_name is not None:
            return f"CN={self.common_name}"
        return "unidentified"


def peer_identity_of(context: PeerContext) -> PeerIdentity:
    """The identity of the peer of a call (its certificate is parsed once, then remembered)."""
    return peer_identity(context.auth_context())


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> PeerIdentity:
    """The identity in a call's auth context (grpc `ServicerContext.auth_context()`)."""
    certificates = tuple(auth_context.get(PEM_CERT, ()))
    if not certificates:
        return PeerIdentity(None, None, "the peer presented no client certificate")
    return certificate_identity(certificates[0])


# Keyed by the whole certificate: every call of a connection presents the same bytes.
@lru_cache(maxsize=MAX_CACHED_PEERS)
def certificate_identity(pem: bytes) -> PeerIdentity:
    """The identity a PEM client certificate carries."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as error:
        return PeerIdentity(None, None, f"the client certificate does not parse: {error}",
                            misleading=True)
    common_name = _common_name(certificate)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        uris: tuple[str, ...] = ()
    except ValueError as error:  # a SAN of bytes outside its ASN.1 type, a broken extension
        return PeerIdentity(None, common_name,
                            f"the client certificate's extensions do not parse: {error}",
                            misleading=True)
    else:
        uris = tuple(names.value.get_values_for_type(x509.UniformResourceIdentifier))
    return _identify(uris, common_name)


def _common_name(certificate: x509.Certificate) -> str | None:
    try:
        attributes = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    value = attributes[0].value if attributes else None
    return value if isinstance(value, str) else None


def _identify(uris: tuple[str, ...], common_name: str | None) -> PeerIdentity:
    problems = [(uri, spiffe_id_problem(uri)) for uri in uris]
    misleading = any(problem is not None and _hides_something(uri) for uri, problem in problems)
    if len(uris) != 1:
        count = (
            "the client certificate has no URI SAN"
            if not uris
            else f"the client certificate has {len(uris)} URI SANs"
        )
        return PeerIdentity(None, common_name, f"{count}; a SPIFFE identity needs exactly one",
                            uris, misleading)
    (uri, problem), = problems
    if problem is not None:
        return PeerIdentity(None, common_name,
                            f"the client certificate's URI SAN {uri!r} is not a SPIFFE ID: "
                            f"{problem}", uris, misleading)
    spiffe_id = SpiffeId.parse(uri)
    if not spiffe_id.path:
        # X.509-SVID: a workload's ID names something inside its trust domain.
        return PeerIdentity(
            None, common_name, f"{spiffe_id} names a trust domain, not a workload in it", uris
        )
    return PeerIdentity(spiffe_id, common_name, uris=uris)


def _hides_something(uri: str) -> bool:
    """Whether uri holds what a reader could skip or decode: control, non-ASCII, percent."""
    return not uri.isascii() or "%" in uri or any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri)


__all__ = ["MAX_SPIFFE_ID_BYTES", "MAX_TRUST_DOMAIN_BYTES", "PeerContext", "PeerIdentity",
           "SpiffeId", "certificate_identity", "peer_identity", "peer_identity_of"]
