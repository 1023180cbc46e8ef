"""Who gets in: every kind of client certificate against a daemon with and
without an authorization policy (tests/trust/conftest.py POLICY_YAML).

TLS refuses what the CA did not sign or what is out of its validity (the
SDK sees UNAVAILABLE: no connection). Past TLS, with a policy, a certificate
must carry exactly one SPIFFE ID (else UNAUTHENTICATED) that a rule allows for
the method (else PERMISSION_DENIED); without a policy every certificate the
CA signed may call everything.
"""

from __future__ import annotations

import datetime as dt
import statistics
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import aurae_sdk
from aurae_sdk.wire.pki import CertificateAuthority, Credential
from tests.support.daemon import DaemonProcess

from .conftest import issue, record_figure, secure_channel

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)

Certificate = Callable[[DaemonProcess], Credential | None]


def https_uri_certificate(daemon: DaemonProcess) -> Credential:
    """Signed by the daemon's CA, with an https:// URI SAN (pki only writes SPIFFE IDs)."""
    ca = CertificateAuthority.load(daemon.pki.directory)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web.unsafe.aurae.io")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier("https://unsafe.aurae.io/admin")]), critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )
    return Credential(certificate, key)


CERTIFICATES: dict[str, Certificate] = {
    "none": lambda d: None,
    "other-ca": lambda d: CertificateAuthority.create().issue_client("admin"),
    "expired": lambda d: issue(d, "admin", not_before=NOW - 3 * DAY, not_after=NOW - DAY),
    "not-yet-valid": lambda d: issue(d, "admin", not_before=NOW + DAY, not_after=NOW + 3 * DAY),
    "two-uri-sans": lambda d: issue(d, "admin", ["spiffe://unsafe.aurae.io/admin",
                                                 "spiffe://unsafe.aurae.io/ci/build"]),
    "no-uri-san": lambda d: issue(d, "admin", []),
    "not-spiffe-uri": https_uri_certificate,
    "trust-domain-only": lambda d: issue(d, "admin", ["spiffe://unsafe.aurae.io"]),
    "foreign-trust-domain": lambda d: issue(d, "admin", ["spiffe://evil.example/admin"]),
    "admin": lambda d: issue(d, "admin"),
    "ci": lambda d: issue(d, "build", ["spiffe://unsafe.aurae.io/ci/build"]),
    # Minted the way the daemon will mint a guest's identity: a child of ci.
    "child-of-ci": lambda d: CertificateAuthority.load(d.pki.directory).issue_child(
        "spiffe://unsafe.aurae.io/ci", "build"),
}


CALLS: dict[str, Callable[[aurae_sdk.Client], Any]] = {
    "discover": lambda c: c.discovery.discover(),
    "health": lambda c: c.health.check(service=""),
    "cells.list": lambda c: c.cells.list(),
    # An invalid name: past authorization it fails validation, so nothing is created.
    "cells.allocate": lambda c: c.cells.allocate(cell={"name": "not_a_cell"}),
    "vms.list": lambda c: c.vms.list(),
}

TLS = "UNAVAILABLE"  # the handshake failed: the SDK never reached the daemon
# (certificate, call, with policy, without policy)
MATRIX = [
    ("none", "discover", TLS, TLS),
    ("none", "health", TLS, TLS),
    ("other-ca", "discover", TLS, TLS),
    ("expired", "discover", TLS, TLS),
    ("not-yet-valid", "discover", TLS, TLS),
    ("two-uri-sans", "discover", "UNAUTHENTICATED", "OK"),
    ("two-uri-sans", "health", "UNAUTHENTICATED", "OK"),
    ("no-uri-san", "discover", "UNAUTHENTICATED", "OK"),
    ("not-spiffe-uri", "discover", "UNAUTHENTICATED", "OK"),
    ("trust-domain-only", "discover", "UNAUTHENTICATED", "OK"),
    # Signed by our CA but from another trust domain: identified, allowed nothing but health.
    ("foreign-trust-domain", "discover", "PERMISSION_DENIED", "OK"),
    ("foreign-trust-domain", "health", "OK", "OK"),
    # ci-reads allows VmService/List, but no-vms-for-ci denies it: deny wins.
    ("ci", "vms.list", "PERMISSION_DENIED", "OK"),
    # No rule allows ci to allocate.
    ("ci", "cells.allocate", "PERMISSION_DENIED", "INVALID_ARGUMENT"),
    ("ci", "discover", "OK", "OK"),
    ("ci", "cells.list", "OK", "OK"),
    ("ci", "health", "OK", "OK"),
    ("child-of-ci", "discover", "OK", "OK"),
    ("child-of-ci", "vms.list", "PERMISSION_DENIED", "OK"),
    ("child-of-ci", "cells.allocate", "PERMISSION_DENIED", "INVALID_ARGUMENT"),
    ("admin", "cells.allocate", "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
    ("admin", "vms.list", "OK", "OK"),
    ("admin", "discover", "OK", "OK"),
]


def outcome(daemon: DaemonProcess, certificate: str, call: str) -> str:
    channel = secure_channel(daemon, CERTIFICATES[certificate](daemon))
    with aurae_sdk.Client(channel=channel, timeout=5,
                          retry=aurae_sdk.RetryPolicy(attempts=1)) as client:
        try:
            CALLS[call](client)
        except aurae_sdk.AuraeError as error:
            return error.code
    return "OK"


@pytest.mark.parametrize(("certificate", "call", "expected", "_"), MATRIX,
                         ids=[f"{c}-{m}" for c, m, _, _ in MATRIX])
def test_with_policy(policy_daemon: DaemonProcess, certificate: str, call: str,
                     expected: str, _: str) -> None:
    assert outcome(policy_daemon, certificate, call) == expected


@pytest.mark.parametrize(("certificate", "call", "_", "expected"), MATRIX,
                         ids=[f"{c}-{m}" for c, m, _, _ in MATRIX])
def test_without_policy(daemon: DaemonProcess, certificate: str, call: str,
                        _: str, expected: str) -> None:
    assert outcome(daemon, certificate, call) == expected


def test_refusals_say_why(policy_daemon: DaemonProcess) -> None:
    channel = secure_channel(policy_daemon, CERTIFICATES["ci"](policy_daemon))
    with aurae_sdk.Client(channel=channel, timeout=5) as client:
        with pytest.raises(aurae_sdk.PermissionDenied) as denied:
            client.vms.list()
        assert "spiffe://unsafe.aurae.io/ci/build" in denied.value.message
        assert "no-vms-for-ci" in denied.value.message
        with pytest.raises(aurae_sdk.PermissionDenied) as unlisted:
            client.cells.free(cell_name="web")
        assert "no rule allows it" in unlisted.value.message
    channel = secure_channel(policy_daemon, CERTIFICATES["two-uri-sans"](policy_daemon))
    with aurae_sdk.Client(channel=channel, timeout=5) as client:
        with pytest.raises(aurae_sdk.Unauthenticated) as unidentified:
            client.discovery.discover()
        assert "2 URI SANs" in unidentified.value.message


def test_reflection_is_open_to_identified_peers_only(policy_daemon: DaemonProcess) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def services(certificate: str) -> set[str] | str:
        channel = secure_channel(policy_daemon, CERTIFICATES[certificate](policy_daemon))
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        try:
            responses = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        except grpc.RpcError as error:
            return str(error.code().name)  # type: ignore[attr-defined]
        finally:
            channel.close()
        return {s.name for r in responses for s in r.list_services_response.service}

    listed = services("ci")
    assert isinstance(listed, set) and "aurae.cells.v0.CellService" in listed
    assert services("no-uri-san") == "UNAUTHENTICATED"


def test_pki_issue_mints_a_chosen_identity_the_policy_knows(policy_daemon: DaemonProcess) -> None:
    issued = policy_daemon.cli("pki", "issue", str(policy_daemon.pki.directory), "bot",
                               "--spiffe-id", "spiffe://unsafe.aurae.io/ci/bot")
    assert issued.returncode == 0, issued.stderr
    assert "spiffe://unsafe.aurae.io/ci/bot" in issued.stdout
    directory = policy_daemon.pki.directory
    credential = Credential(
        x509.load_pem_x509_certificate((directory / "_signed.client.bot.crt").read_bytes()),
        serialization.load_pem_private_key((directory / "client.bot.key").read_bytes(), None),
    )
    channel = secure_channel(policy_daemon, credential)
    with aurae_sdk.Client(channel=channel, timeout=5) as client:
        assert client.discovery.discover().healthy
        with pytest.raises(aurae_sdk.PermissionDenied):
            client.cells.allocate(cell={"name": "bot-cell"})


def test_authorization_costs_little_per_call(daemon: DaemonProcess,
                                             policy_daemon: DaemonProcess) -> None:
    """Discover round trips with and without a policy, interleaved to share the noise."""
    def mean_ms(client: aurae_sdk.Client, calls: int) -> float:
        started = time.perf_counter()
        for _ in range(calls):
            client.discovery.discover()
        return (time.perf_counter() - started) / calls * 1000

    with daemon.client() as open_client, policy_daemon.client() as checked_client:
        for client in (open_client, checked_client):
            mean_ms(client, 200)  # warm up
        without: list[float] = []
        with_policy: list[float] = []
        for round_ in range(6):
            # Alternate who goes first: the order alone moves a mean by tens of microseconds.
            for client, times in sorted([(open_client, without), (checked_client, with_policy)],
                                        key=lambda pair: (pair[1] is without) == round_ % 2):
                times.append(mean_ms(client, 400))
    base, checked = statistics.median(without), statistics.median(with_policy)
    record_figure("authz overhead", f"Discover {base:.3f} ms without a policy, {checked:.3f} ms "
                                    f"with one: {(checked - base) * 1000:+.0f} us per call")
    assert checked - base < 0.5


def test_the_daemon_says_once_whether_a_policy_is_in_force(daemon: DaemonProcess,
                                                           policy_daemon: DaemonProcess) -> None:
    assert daemon.log().count("no authorization policy") == 1
    assert "authorization policy loaded" in policy_daemon.log()
    assert "no authorization policy" not in policy_daemon.log()
