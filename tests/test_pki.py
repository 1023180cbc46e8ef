"""The development PKI: files, modes, certificate contents, and real mTLS handshakes with grpc."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from aurae_cli import pki, pki_commands
from aurae_sdk.config import channel_credentials, channel_options, load_config, parse_target
from aurae_sdk.wire import pki as wire_pki

PING = "/test.Echo/Ping"
NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


# --- a tiny mTLS echo server, configured as auraed configures its own -----------------------------


class EchoServer:
    """A grpc server on a Unix socket that requires a client certificate signed by its CA."""

    def __init__(self, socket_path: Path, ca_crt: bytes, server_crt: bytes, server_key: bytes):
        self.target = parse_target(str(socket_path))
        # The auth context of the last call, as the daemon would see its caller.
        self.peer: dict[str, object] = {}
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_unary_rpc_method_handler(self._ping)
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("test.Echo", {"Ping": handler})]
        )
        credentials = grpc.ssl_server_credentials(
            [(server_key, server_crt)],
            root_certificates=ca_crt,
            require_client_auth=True,
        )
        self._server.add_secure_port(self.target.grpc_target, credentials)

    def _ping(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.peer = dict(context.auth_context())
        return request

    def __enter__(self) -> Self:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)


def ping(
    target: str,
    credentials: grpc.ChannelCredentials,
    options: list[tuple[str, str]] | None = None,
) -> bytes:
    with grpc.secure_channel(target, credentials, options=options) as channel:
        # No serializers: the echo method sends and receives raw bytes.
        call = channel.unary_unary(PING, request_serializer=None, response_deserializer=None)
        response: bytes = call(b"ping", timeout=10)
        return response


def client_credentials(
    ca: wire_pki.Credential, client: wire_pki.Credential | None
) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.certificate_pem())
    return grpc.ssl_channel_credentials(
        root_certificates=ca.certificate_pem(),
        private_key=client.private_key_pem(),
        certificate_chain=client.certificate_pem(),
    )


@pytest.fixture
def ca() -> wire_pki.CertificateAuthority:
    return wire_pki.CertificateAuthority.create()


def serve(socket_path: Path, ca: wire_pki.CertificateAuthority, server: wire_pki.Credential) -> EchoServer:
    return EchoServer(
        socket_path, ca.certificate_pem(), server.certificate_pem(), server.private_key_pem()
    )


def serve_pki_directory(directory: Path, socket_path: Path) -> EchoServer:
    """An echo server started from the files of a PKI directory, as auraed starts."""
    return EchoServer(
        socket_path,
        (directory / "ca.crt").read_bytes(),
        (directory / "_signed.server.crt").read_bytes(),
        (directory / "server.key").read_bytes(),
    )


@pytest.fixture
def echo_server(tmp_path: Path, ca: wire_pki.CertificateAuthority) -> Iterator[EchoServer]:
    with serve(tmp_path / "aurae.sock", ca, ca.issue_server()) as server:
        yield server


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def uri_sans(certificate: x509.Certificate) -> list[str]:
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def common_name(certificate: x509.Certificate) -> str:
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# --- files ------------------------------------------------------------------------------------


def test_init_writes_aurae_file_layout(tmp_path: Path) -> None:
    paths = pki.init_pki(tmp_path / "pki", clients=("admin", "ops"))

    assert sorted(os.listdir(tmp_path / "pki")) == [
        "_signed.client.admin.crt",
        "_signed.client.ops.crt",
        "_signed.server.crt",
        "ca.crt",
        "ca.key",
        "client.admin.key",
        "client.ops.key",
        "config",
        "server.key",
    ]
    assert paths.directory == tmp_path / "pki"
    assert paths.server_crt == tmp_path / "pki" / "_signed.server.crt"
    assert [(c.name, c.spiffe_id) for c in paths.clients] == [
        ("admin", "spiffe://unsafe.aurae.io/admin"),
        ("ops", "spiffe://unsafe.aurae.io/ops"),
    ]


def test_config_points_at_first_client_with_absolute_paths(tmp_path: Path) -> None:
    pki.init_pki(tmp_path / "pki", clients=("admin", "ops"), socket="[::1]:8080")

    document = tomllib.loads((tmp_path / "pki" / "config").read_text())

    assert document == {
        "auth": {
            "ca_crt": str(tmp_path / "pki" / "ca.crt"),
            "client_crt": str(tmp_path / "pki" / "_signed.client.admin.crt"),
            "client_key": str(tmp_path / "pki" / "client.admin.key"),
        },
        "system": {"socket": "[::1]:8080"},
    }


def test_private_keys_are_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    with umask(0):
        paths = pki.init_pki(tmp_path / "pki")

    keys = [paths.ca_key, paths.server_key, paths.clients[0].key]
    assert [mode(key) for key in keys] == [0o600] * 3
    assert [mode(crt) for crt in (paths.ca_crt, paths.server_crt, paths.clients[0].crt)] == [
        0o644
    ] * 3
    assert mode(paths.directory) == 0o700


def test_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    directory.mkdir()
    (directory / "config").write_text("mine")

    with pytest.raises(pki.RefusedOverwrite, match="config") as refusal:
        pki.init_pki(directory)

    assert refusal.value.paths == (directory / "config",)
    assert os.listdir(directory) == ["config"]
    assert (directory / "config").read_text() == "mine"


def test_force_replaces_every_file_and_keeps_key_modes(tmp_path: Path) -> None:
    first = pki.init_pki(tmp_path / "pki")
    old_ca = first.ca_crt.read_bytes()
    with pytest.raises(pki.RefusedOverwrite):
        pki.init_pki(tmp_path / "pki")
    assert first.ca_crt.read_bytes() == old_ca

    second = pki.init_pki(tmp_path / "pki", force=True)

    assert second.ca_crt.read_bytes() != old_ca
    assert mode(second.ca_key) == 0o600
    # The new server certificate is signed by the new CA, not by the old one.
    load_certificate(second.server_crt).verify_directly_issued_by(load_certificate(second.ca_crt))


def test_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    directory.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (directory / "ca.key").symlink_to(victim)

    with pytest.raises(pki.RefusedOverwrite):
        pki.init_pki(directory)
    pki.init_pki(directory, force=True)

    assert victim.read_text() == "precious"
    assert not (directory / "ca.key").is_symlink()


def test_issue_client_extends_an_existing_pki(tmp_path: Path) -> None:
    paths = pki.init_pki(tmp_path / "pki")

    client = pki.issue_client(tmp_path / "pki", "ci", not_after=NOW + 2 * DAY)

    certificate = load_certificate(client.crt)
    certificate.verify_directly_issued_by(load_certificate(paths.ca_crt))
    assert uri_sans(certificate) == ["spiffe://unsafe.aurae.io/ci"]
    assert mode(client.key) == 0o600
    with pytest.raises(pki.RefusedOverwrite):
        pki.issue_client(tmp_path / "pki", "ci")


def test_issue_client_without_a_ca_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match=r"ca\.crt does not exist"):
        pki.issue_client(tmp_path, "ci")
    assert os.listdir(tmp_path) == []


def test_issue_client_rejects_a_key_that_does_not_match_the_ca(tmp_path: Path) -> None:
    pki.init_pki(tmp_path / "a")
    pki.init_pki(tmp_path / "b")
    (tmp_path / "a" / "ca.key").unlink()
    (tmp_path / "b" / "ca.key").rename(tmp_path / "a" / "ca.key")

    with pytest.raises(pki.PkiError, match="is not the private key of the certificate"):
        pki.issue_client(tmp_path / "a", "ci")


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "-lead", "trail-", "has space", "x" * 64])
def test_client_names_must_be_dns_labels(tmp_path: Path, name: str) -> None:
    with pytest.raises(pki.PkiError, match="invalid client name"):
        pki.init_pki(tmp_path / "pki", clients=(name,))
    assert not (tmp_path / "pki").exists()


@pytest.mark.parametrize(
    "spiffe_id",
    ["https://unsafe.aurae.io/x", "spiffe://UPPER.io/x", "spiffe://td/a/../b", "spiffe://td/a//b"],
)
def test_spiffe_ids_are_checked(tmp_path: Path, spiffe_id: str) -> None:
    pki.init_pki(tmp_path / "pki")
    with pytest.raises(pki.PkiError, match="not a SPIFFE ID"):
        pki.issue_client(tmp_path / "pki", "ci", spiffe_id=spiffe_id)


def test_client_config_escapes_toml_strings(tmp_path: Path) -> None:
    awkward = 'dir "quoted" \\back\\ tab\t nl\n del\x7f bell\x07 ünï'

    pki.write_client_config(
        tmp_path / "config", f"/{awkward}/ca.crt", "/c.crt", "/c.key", f"/run/{awkward}.sock"
    )

    document = tomllib.loads((tmp_path / "config").read_text(encoding="utf-8"))
    assert document["auth"]["ca_crt"] == f"/{awkward}/ca.crt"
    assert document["system"]["socket"] == f"/run/{awkward}.sock"


# --- certificate contents -----------------------------------------------------------------------


def test_ca_is_a_ca(ca: wire_pki.CertificateAuthority) -> None:
    constraints = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.certificate.extensions.get_extension_for_class(x509.KeyUsage).value

    assert common_name(ca.certificate) == "unsafe.aurae.io"
    assert constraints.critical and constraints.value.ca
    assert usage.key_cert_sign
    lifetime = ca.certificate.not_valid_after_utc - ca.certificate.not_valid_before_utc
    assert lifetime >= dt.timedelta(days=3650)


def test_server_certificate_verifies_as_server_name(ca: wire_pki.CertificateAuthority) -> None:
    server = ca.issue_server(extra_names=["localhost", "127.0.0.1", "::1"])
    verifier = (
        PolicyBuilder()
        .store(Store([ca.certificate]))
        .build_server_verifier(x509.DNSName("server.unsafe.aurae.io"))
    )

    chain = verifier.verify(server.certificate, [])

    assert chain[-1] == ca.certificate
    san = server.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server.unsafe.aurae.io", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    usage = server.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_client_certificate_carries_one_spiffe_id(ca: wire_pki.CertificateAuthority) -> None:
    client = ca.issue_client("admin", trust_domain="example.org")
    verifier = PolicyBuilder().store(Store([ca.certificate])).build_client_verifier()

    verified = verifier.verify(client.certificate, [])

    assert verified.chain[-1] == ca.certificate
    assert common_name(client.certificate) == "admin.unsafe.aurae.io"
    assert uri_sans(client.certificate) == ["spiffe://example.org/admin"]
    san = client.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["admin.unsafe.aurae.io"]
    usage = client.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = client.certificate.not_valid_after_utc - client.certificate.not_valid_before_utc
    assert dt.timedelta(days=365) <= lifetime <= dt.timedelta(days=366)


def test_client_certificate_variants(ca: wire_pki.CertificateAuthority) -> None:
    assert uri_sans(ca.issue_client("anon", spiffe_ids=[]).certificate) == []
    two = ca.issue_client("two", spiffe_ids=["spiffe://a/x", "spiffe://b/y"])
    assert uri_sans(two.certificate) == [
        "spiffe://a/x",
        "spiffe://b/y",
    ]
    expired = ca.issue_client("old", not_before=NOW - 2 * DAY, not_after=NOW - DAY)
    assert expired.certificate.not_valid_after_utc < NOW
    future = ca.issue_client("new", not_before=NOW + DAY)
    assert future.certificate.not_valid_before_utc > NOW
    foreign = wire_pki.CertificateAuthority.create().issue_client("admin")
    with pytest.raises(InvalidSignature):
        foreign.certificate.verify_directly_issued_by(ca.certificate)


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [(NOW - 2 * DAY, NOW - DAY), (NOW + DAY, NOW + 2 * DAY)],
    ids=["expired", "not-yet-valid"],
)
def test_verifier_refuses_certificates_out_of_their_validity(
    ca: wire_pki.CertificateAuthority, not_before: dt.datetime, not_after: dt.datetime
) -> None:
    client = ca.issue_client("admin", not_before=not_before, not_after=not_after)
    verifier = PolicyBuilder().store(Store([ca.certificate])).time(NOW).build_client_verifier()

    with pytest.raises(VerificationError):
        verifier.verify(client.certificate, [])


def test_validity_must_not_end_before_it_starts(ca: wire_pki.CertificateAuthority) -> None:
    with pytest.raises(pki.PkiError, match="must end after it starts"):
        ca.issue_client("admin", not_before=NOW, not_after=NOW - DAY)


# --- real mTLS handshakes -----------------------------------------------------------------------


def test_mtls_handshake_with_the_generated_client(
    ca: wire_pki.CertificateAuthority, echo_server: EchoServer
) -> None:
    target = echo_server.target

    response = ping(
        target.grpc_target,
        client_credentials(ca, ca.issue_client("admin")),
        channel_options(target),
    )

    assert response == b"ping"
    assert echo_server.peer["peer_spiffe_id"] == [b"spiffe://unsafe.aurae.io/admin"]
    assert echo_server.peer["x509_common_name"] == [b"admin.unsafe.aurae.io"]


@pytest.mark.parametrize("spiffe_ids", [[], ["spiffe://a/x", "spiffe://b/y"]], ids=["none", "two"])
def test_handshake_gives_no_spiffe_id_unless_exactly_one(
    ca: wire_pki.CertificateAuthority, echo_server: EchoServer, spiffe_ids: list[str]
) -> None:
    client = ca.issue_client("admin", spiffe_ids=spiffe_ids)
    target = echo_server.target

    ping(target.grpc_target, client_credentials(ca, client), channel_options(target))

    # TLS accepts the certificate; it is up to the daemon to refuse a caller with no identity.
    assert "peer_spiffe_id" not in echo_server.peer


REFUSED_CLIENTS: dict[str, Callable[[wire_pki.CertificateAuthority], wire_pki.Credential | None]] = {
    "foreign-ca": lambda ca: wire_pki.CertificateAuthority.create().issue_client("admin"),
    "expired": lambda ca: ca.issue_client("admin", not_before=NOW - 2 * DAY, not_after=NOW - DAY),
    "not-yet-valid": lambda ca: ca.issue_client("admin", not_before=NOW + DAY),
    "server-certificate": lambda ca: ca.issue_server(),  # serverAuth only: not a client
    "no-certificate": lambda ca: None,
}


@pytest.mark.parametrize("case", REFUSED_CLIENTS)
def test_server_refuses_the_handshake(
    ca: wire_pki.CertificateAuthority, echo_server: EchoServer, case: str
) -> None:
    client = REFUSED_CLIENTS[case](ca)
    target = echo_server.target

    with pytest.raises(grpc.RpcError) as failure:
        ping(target.grpc_target, client_credentials(ca, client), channel_options(target))

    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert echo_server.peer == {}


def test_client_refuses_a_server_of_another_ca(
    tmp_path: Path, ca: wire_pki.CertificateAuthority
) -> None:
    impostor = wire_pki.CertificateAuthority.create()
    with (
        serve(tmp_path / "s.sock", ca, impostor.issue_server()) as server,
        pytest.raises(grpc.RpcError) as failure,
    ):
        ping(
            server.target.grpc_target,
            client_credentials(ca, ca.issue_client("admin")),
            channel_options(server.target),
        )
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


def test_unix_socket_needs_the_server_name_override(
    ca: wire_pki.CertificateAuthority, echo_server: EchoServer
) -> None:
    # Without channel_options grpc checks the certificate against "localhost" and fails.
    with pytest.raises(grpc.RpcError) as failure:
        ping(echo_server.target.grpc_target, client_credentials(ca, ca.issue_client("admin")))
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_init_writes_a_working_pki(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    socket_path = tmp_path / "aurae.sock"

    result = CliRunner().invoke(
        pki_commands.pki_group,
        [
            "init",
            str(directory),
            "--client",
            "admin",
            "--client",
            "ops",
            "--socket",
            str(socket_path),
        ],
    )

    assert result.exit_code == 0, result.output
    assert f"export AURAE_CONFIG={directory / 'config'}" in result.output
    assert (
        f"auraed --ca-crt {directory / 'ca.crt'} --server-crt {directory / '_signed.server.crt'} "
        f"--server-key {directory / 'server.key'} --socket {socket_path}"
    ) in result.output
    config = load_config(directory / "config")
    with serve_pki_directory(directory, socket_path) as server:
        response = ping(
            config.target.grpc_target, channel_credentials(config), channel_options(config.target)
        )
        assert response == b"ping"
        assert server.peer["peer_spiffe_id"] == [b"spiffe://unsafe.aurae.io/admin"]


def test_cli_init_refuses_to_overwrite(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(pki_commands.pki_group, ["init", str(tmp_path)]).exit_code == 0

    result = runner.invoke(pki_commands.pki_group, ["init", str(tmp_path)])

    assert result.exit_code == 1
    assert "refusing to overwrite existing files" in result.output
    assert "--force" in result.output
    assert runner.invoke(pki_commands.pki_group, ["init", str(tmp_path), "--force"]).exit_code == 0


def test_cli_issue_signs_a_working_client(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    runner = CliRunner()
    assert runner.invoke(pki_commands.pki_group, ["init", str(directory)]).exit_code == 0

    issued = dt.datetime.now(dt.UTC)
    result = runner.invoke(
        pki_commands.pki_group,
        [
            "issue",
            str(directory),
            "ci",
            "--spiffe-id",
            "spiffe://unsafe.aurae.io/ci/runner",
            "--days",
            "2",
        ],
    )

    assert result.exit_code == 0, result.output
    assert "spiffe://unsafe.aurae.io/ci/runner" in result.output
    certificate = load_certificate(directory / "_signed.client.ci.crt")
    # Measured from the issue itself: NOW is when this module was imported,
    # which in a long test run is minutes earlier.
    lifetime = certificate.not_valid_after_utc - issued
    assert abs(lifetime - 2 * DAY) < dt.timedelta(minutes=1)
    config = load_config(
        directory / "config",
        client_crt=str(directory / "_signed.client.ci.crt"),
        client_key=str(directory / "client.ci.key"),
        socket=str(tmp_path / "aurae.sock"),
    )
    with serve_pki_directory(directory, tmp_path / "aurae.sock") as server:
        ping(config.target.grpc_target, channel_credentials(config), channel_options(config.target))
        assert server.peer["peer_spiffe_id"] == [b"spiffe://unsafe.aurae.io/ci/runner"]


def test_cli_issue_reports_a_missing_ca(tmp_path: Path) -> None:
    result = CliRunner().invoke(pki_commands.pki_group, ["issue", str(tmp_path), "ci"])

    assert result.exit_code == 1
    assert "ca.crt does not exist" in result.output


def test_cli_module_does_not_import_cryptography() -> None:
    # The CLI loads pki_commands for every run, `aurae-py --help` included.
    code = "import sys, aurae_cli.pki_commands; print('cryptography' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_a_child_identity_extends_its_parents_spiffe_id() -> None:
    ca = wire_pki.CertificateAuthority.create()
    child = ca.issue_child("spiffe://unsafe.aurae.io/auraed/node-1", "vm-7")
    certificate = child.certificate
    certificate.verify_directly_issued_by(ca.certificate)
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://unsafe.aurae.io/auraed/node-1/vm-7"
    ]
    assert sans.get_values_for_type(x509.DNSName) == []
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime <= wire_pki.CHILD_VALIDITY + wire_pki.CLOCK_SKEW_ALLOWANCE
    # The key pair belongs together: the key signs what the certificate verifies.
    assert child.private_key.public_key() == certificate.public_key()


@pytest.mark.parametrize(("parent", "name", "complaint"), [
    ("spiffe://unsafe.aurae.io", "vm-1", "names a trust domain"),
    ("spiffe://unsafe.aurae.io/auraed", "a/b", "not a SPIFFE path segment"),
    ("spiffe://unsafe.aurae.io/auraed", "..", "not a SPIFFE path segment"),
    ("https://unsafe.aurae.io/auraed", "vm-1", "is not a SPIFFE ID"),
    ("spiffe://unsafe.aurae.io/" + "a" * 2040, "vm-1", "at most 2048 bytes"),
])
def test_a_child_identity_refuses_what_is_no_spiffe_id(
    parent: str, name: str, complaint: str
) -> None:
    ca = wire_pki.CertificateAuthority.create()
    with pytest.raises(wire_pki.PkiError, match=complaint):
        ca.issue_child(parent, name)


def test_a_child_can_carry_the_server_name_aurae_clients_verify() -> None:
    from cryptography import x509

    from aurae_sdk.wire.pki import CertificateAuthority, PkiError

    authority = CertificateAuthority.create()
    child = authority.issue_child("spiffe://unsafe.aurae.io/auraed/instance", "b1",
                                  dns_names=["server.unsafe.aurae.io"])
    names = child.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://unsafe.aurae.io/auraed/instance/b1"]
    assert names.value.get_values_for_type(x509.DNSName) == ["server.unsafe.aurae.io"]
    with pytest.raises(PkiError, match="not a DNS name"):
        authority.issue_child("spiffe://unsafe.aurae.io/auraed", "b2", dns_names=["bad name"])


def test_a_child_can_carry_ip_addresses_for_clients_that_check_the_address() -> None:
    import ipaddress

    from cryptography import x509

    from aurae_sdk.wire.pki import CertificateAuthority, PkiError

    authority = CertificateAuthority.create()
    guest = authority.issue_child("spiffe://unsafe.aurae.io/auraed/vm", "web",
                                  dns_names=["server.unsafe.aurae.io"], server_names=["fe80::2"])
    names = guest.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("fe80::2")]
    assert names.get_values_for_type(x509.DNSName) == ["server.unsafe.aurae.io"]
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://unsafe.aurae.io/auraed/vm/web"]
    with pytest.raises(PkiError, match="not a DNS name or IP address"):
        authority.issue_child("spiffe://unsafe.aurae.io/auraed", "b3", server_names=["bad name"])


def test_a_ca_loads_from_a_certificate_and_key_kept_apart(tmp_path: Path) -> None:
    from aurae_sdk.wire.pki import CertificateAuthority, PkiError, write_credential

    authority = CertificateAuthority.create()
    write_credential(authority, tmp_path / "ca.crt", tmp_path / "ca.key")
    other = CertificateAuthority.create()
    write_credential(other, tmp_path / "other.crt", tmp_path / "other.key")
    loaded = CertificateAuthority.load_files(tmp_path / "ca.crt", tmp_path / "ca.key")
    assert loaded.certificate == authority.certificate
    with pytest.raises(PkiError, match="is not the private key"):
        CertificateAuthority.load_files(tmp_path / "ca.crt", tmp_path / "other.key")
