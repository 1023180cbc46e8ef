"""Who is calling: the peer's SPIFFE ID, read from its client certificate.

TLS has already proven the certificate chains to our CA; this module only
names its holder. A workload's identity is the one URI SAN of its X.509-SVID,
a SPIFFE ID (spiffe://<trust-domain>/<path>). A certificate with no URI SAN,
several, or one that is not a SPIFFE ID has no identity; it keeps its
subject's common name, which the audit log shows instead.

grpcio already lists the certificate's URI SANs and common name in the call's
auth context ("peer_uri", "x509_common_name"), so nothing here parses X.509.
No gRPC imports: callers pass the call's ServicerContext, or its auth context.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from aurae_sdk.wire.spiffe import SpiffeId

# Keys of grpcio's auth context (grpc_security_constants.h).
PEER_URI = "peer_uri"
COMMON_NAME = "x509_common_name"
MAX_CACHED_PEERS = 1024


class PeerContext(Protocol):
    """What this module needs of a grpc.ServicerContext."""

    # Values are lists of bytes, whatever grpcio's stubs say.
    def auth_context(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class PeerIdentity:
    """The caller as its certificate names it.

    `spiffe_id` is None when the certificate carries no usable SPIFFE ID, and
    `problem` says why; a policy then refuses the caller.
    """

    spiffe_id: SpiffeId | None
    common_name: str | None
    problem: str | None = None

    def __str__(self) -> str:
        if self.spiffe_id is not None:
            return str(self.spiffe_id)
        if self.common_name is not None:
            return f"CN={self.common_name}"
        return "unidentified"


def peer_identity_of(context: PeerContext) -> PeerIdentity:
    """The identity of the peer of a call.

    Read from the whole auth context on every call (~15 us). grpcio's cheaper
    peer_identities() lists every SAN without its type, so a certificate with
    a DNS name (or, without SANs, a common name) spelled like a SPIFFE ID would
    look the same as one holding that ID: no cache may be keyed by it.
    """
    return peer_identity(context.auth_context())


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> PeerIdentity:
    """The identity in a call's auth context (grpc `ServicerContext.auth_context()`)."""
    return _identify(
        tuple(auth_context.get(PEER_URI, ())), tuple(auth_context.get(COMMON_NAME, ()))
    )


# Every call of a connection presents the same certificate: parse its SANs once.
@lru_cache(maxsize=MAX_CACHED_PEERS)
def _identify(uris: tuple[bytes, ...], common_names: tuple[bytes, ...]) -> PeerIdentity:
    common_name = common_names[0].decode(errors="replace") if common_names else None
    if len(uris) != 1:
        problem = (
            "the client certificate has no URI SAN"
            if not uris
            else f"the client certificate has {len(uris)} URI SANs"
        )
        return PeerIdentity(None, common_name, f"{problem}; a SPIFFE identity needs exactly one")
    try:
        spiffe_id = SpiffeId.parse(uris[0].decode(errors="replace"))
    except ValueError as error:
        return PeerIdentity(None, common_name, f"the client certificate's URI SAN: {error}")
    if not spiffe_id.path:
        # X.509-SVID: a workload's ID names something inside its trust domain.
        return PeerIdentity(
            None, common_name, f"{spiffe_id} names a trust domain, not a workload in it"
        )
    return PeerIdentity(spiffe_id, common_name)


__all__ = ["PeerContext", "PeerIdentity", "SpiffeId", "peer_identity", "peer_identity_of"]
