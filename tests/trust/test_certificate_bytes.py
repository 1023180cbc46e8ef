"""Identity is read from the bytes of the client certificate, not from a C string of it.

Each certificate here is signed by the daemon's own CA (so TLS accepts it) and carries a URI SAN
encoded byte for byte as given: the DER is written here, since the pki module and cryptography's
builder refuse most of these values. `spiffe://<td>/admin<NUL>junk` reads as the admin's ID to
anything that stops at the NUL; the daemon must refuse it, and every other SAN no SPIFFE ID can
be, with UNAUTHENTICATED, and audit it with the SAN as the certificate holds it.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

import aurae_sdk
from aurae_sdk.wire.pki import CertificateAuthority, Credential
from tests.support.daemon import DaemonProcess

from .conftest import TRUST_DOMAIN, audit_lines, secure_channel

NOW = dt.datetime.now(dt.UTC)
ADMIN = f"spiffe://{TRUST_DOMAIN}/admin".encode()
LIST = "/aurae.cells.v0.CellService/List"


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def _san_extension(uris: list[bytes]) -> x509.UnrecognizedExtension:
    """A subjectAltName of these URIs ([6] IA5String each), as raw DER."""
    names = b"".join(b"\x86" + _der_length(len(uri)) + uri for uri in uris)
    return x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                                      b"\x30" + _der_length(len(names)) + names)


def certificate_with_uris(daemon: DaemonProcess, uris: list[bytes],
                          common_name: str = "mallory.unsafe.aurae.io") -> Credential:
    ca = CertificateAuthority.load(daemon.pki.directory)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(_san_extension(uris), critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )
    return Credential(certificate, key)


def call_list(daemon: DaemonProcess, credential: Credential) -> aurae_sdk.AuraeError | None:
    channel = secure_channel(daemon, credential)
    with aurae_sdk.Client(channel=channel, timeout=10,
                          retry=aurae_sdk.RetryPolicy(attempts=1)) as client:
        try:
            client.cells.list()
        except aurae_sdk.AuraeError as error:
            return error
    return None


# (SAN bytes, what the refusal says): each one a SPIFFE ID can never be.
MISLEADING = {
    "nul-after-admin": (ADMIN + b"\x00junk", "NUL"),
    "nul-alone": (ADMIN + b"\x00", "NUL"),
    "newline": (ADMIN + b"\nspiffe://x/y", "control character"),
    "escape-sequence": (ADMIN + b"\x1b[2K", "control character"),
    "del": (ADMIN + b"\x7f", "control character"),
    "percent-encoded-letter": (f"spiffe://{TRUST_DOMAIN}/%61dmin".encode(), "percent"),
    "percent-encoded-slash": (f"spiffe://{TRUST_DOMAIN}/ci%2fbuild".encode(), "percent"),
    "percent-encoded-nul": (ADMIN + b"%00", "percent"),
    "utf8-lookalike": (f"spiffe://{TRUST_DOMAIN}/adm\u0456n".encode(), "non-ASCII"),
    # Not UTF-8 at all: the SAN does not even parse as its ASN.1 type.
    "raw-high-byte": (ADMIN + b"\xff", "do not parse"),
}
# Plain ASCII, but not SPIFFE IDs: refused under a policy, named by CN without one.
MALFORMED = {
    "uppercase-scheme": (f"SPIFFE://{TRUST_DOMAIN}/admin".encode(), "lowercase"),
    "uppercase-trust-domain": (f"spiffe://{TRUST_DOMAIN.upper()}/admin".encode(), "trust domain"),
    "port": (f"spiffe://{TRUST_DOMAIN}:443/admin".encode(), "port"),
    "userinfo": (f"spiffe://admin@{TRUST_DOMAIN}/admin".encode(), "user"),
    "trailing-slash": (ADMIN + b"/", "empty segment"),
    "empty-segment": (f"spiffe://{TRUST_DOMAIN}//admin".encode(), "empty segment"),
    "dot-dot": (f"spiffe://{TRUST_DOMAIN}/ci/../admin".encode(), "'..'"),
    "query": (ADMIN + b"?as=root", "query"),
    "fragment": (ADMIN + b"#x", "fragment"),
    "too-long": (ADMIN + b"/" + b"a" * 2100, "2048 bytes"),
}


def _refusal_lines(daemon: DaemonProcess, before: int) -> list[str]:
    """The audit lines of refused Lists since line `before`, once there is one: the audit log
    is written by its own thread, a moment after the call is answered."""
    deadline = time.monotonic() + 30
    while True:
        lines = [line for line in audit_lines(daemon)[before:]
                 if LIST in line and '"decision": "deny"' in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def _audited_refusal(daemon: DaemonProcess, before: int) -> dict[str, object]:
    refusals = [json.loads(line) for line in _refusal_lines(daemon, before)]
    assert len(refusals) == 1, refusals
    return refusals[0]


@pytest.mark.parametrize("case", [*MISLEADING, *MALFORMED])
def test_with_a_policy_every_bad_san_is_unauthenticated_and_audited_as_held(
        policy_daemon: DaemonProcess, case: str) -> None:
    san, reason = {**MISLEADING, **MALFORMED}[case]
    before = len(audit_lines(policy_daemon))
    error = call_list(policy_daemon, certificate_with_uris(policy_daemon, [san]))
    assert error is not None and error.code == "UNAUTHENTICATED", error
    assert reason in error.message
    entry = _audited_refusal(policy_daemon, before)
    assert entry["code"] == "UNAUTHENTICATED" and entry["peer"] == "CN=mallory.unsafe.aurae.io"
    if reason != "do not parse":
        # Exactly the SAN the certificate holds, every byte of it, escaped on one line.
        assert entry["uris"] == [san.decode()]


@pytest.mark.parametrize("case", MISLEADING)
def test_without_a_policy_a_misleading_san_is_still_refused(daemon: DaemonProcess,
                                                            case: str) -> None:
    san, reason = MISLEADING[case]
    error = call_list(daemon, certificate_with_uris(daemon, [san]))
    assert error is not None and error.code == "UNAUTHENTICATED", error
    assert reason in error.message


@pytest.mark.parametrize("case", MALFORMED)
def test_without_a_policy_a_malformed_san_is_named_by_its_common_name(daemon: DaemonProcess,
                                                                      case: str) -> None:
    assert call_list(daemon, certificate_with_uris(daemon, [MALFORMED[case][0]])) is None


def test_the_audit_line_escapes_the_nul_and_stays_one_line(policy_daemon: DaemonProcess) -> None:
    before = len(audit_lines(policy_daemon))
    call_list(policy_daemon, certificate_with_uris(policy_daemon, [ADMIN + b"\x00junk\n{}"]))
    raw = _refusal_lines(policy_daemon, before)
    assert len(raw) == 1
    assert "/admin\\u0000junk\\n{}" in raw[0] and "\x00" not in raw[0]


def test_a_second_uri_san_is_refused_even_when_the_first_is_admin(
        policy_daemon: DaemonProcess) -> None:
    for uris in ([ADMIN, f"spiffe://{TRUST_DOMAIN}/ci/build".encode()], [ADMIN, ADMIN],
                 [ADMIN, ADMIN + b"\x00"]):
        error = call_list(policy_daemon, certificate_with_uris(policy_daemon, uris))
        assert error is not None and error.code == "UNAUTHENTICATED", uris
        assert "URI SANs" in error.message


def test_the_same_bytes_without_the_tail_are_the_admin(policy_daemon: DaemonProcess) -> None:
    """The control case: the raw-DER certificate of a proper admin ID gets through."""
    assert call_list(policy_daemon, certificate_with_uris(policy_daemon, [ADMIN])) is None
