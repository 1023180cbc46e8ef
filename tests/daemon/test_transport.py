"""mTLS on the socket, the socket's mode, reflection, health and discovery."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import grpc
import pytest

import aurae_sdk
from aurae_sdk.config import TLS_SERVER_NAME, channel_options, parse_target
from aurae_sdk.wire.pki import CertificateAuthority
from tests.support.daemon import DaemonProcess


def raw_channel(daemon: DaemonProcess, *, key: bytes | None, cert: bytes | None) -> grpc.Channel:
    target = parse_target(daemon.socket)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=daemon.pki.ca_crt.read_bytes(), private_key=key, certificate_chain=cert
    )
    return grpc.secure_channel(target.grpc_target, credentials, channel_options(target))


def discover(channel: grpc.Channel) -> aurae_sdk.discovery.DiscoverResponse:
    with aurae_sdk.Client(channel=channel, timeout=5, retry=aurae_sdk.RetryPolicy(attempts=1)) as c:
        return c.discovery.discover()


def test_socket_is_private(daemon: DaemonProcess) -> None:
    mode = os.stat(daemon.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.runtime_dir).st_mode) == 0o700


def test_valid_client_certificate_gets_discover(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        response = client.discovery.discover()
    assert response.healthy is True
    assert response.version == aurae_sdk.__version__


def test_client_without_certificate_is_refused(daemon: DaemonProcess) -> None:
    with pytest.raises(aurae_sdk.Unavailable):
        discover(raw_channel(daemon, key=None, cert=None))


def test_client_from_another_ca_is_refused(daemon: DaemonProcess) -> None:
    foreign = CertificateAuthority.create()
    credential = foreign.issue_client("intruder")
    with pytest.raises(aurae_sdk.Unavailable):
        discover(raw_channel(daemon, key=credential.private_key_pem(),
                             cert=credential.certificate_pem()))


def test_plaintext_client_is_refused(daemon: DaemonProcess) -> None:
    channel = grpc.insecure_channel(parse_target(daemon.socket).grpc_target)
    with pytest.raises(aurae_sdk.Unavailable):
        discover(channel)


def test_server_certificate_name_is_checked(daemon: DaemonProcess) -> None:
    # The client verifies the server as server.unsafe.aurae.io; any other name fails.
    target = parse_target(daemon.socket)
    pki = daemon.pki
    client = pki.clients[0]
    credentials = grpc.ssl_channel_credentials(
        pki.ca_crt.read_bytes(), client.key.read_bytes(), client.crt.read_bytes()
    )
    wrong = [("grpc.ssl_target_name_override", "other.unsafe.aurae.io"),
             ("grpc.default_authority", "other.unsafe.aurae.io")]
    with pytest.raises(aurae_sdk.Unavailable):
        discover(grpc.secure_channel(target.grpc_target, credentials, wrong))
    assert TLS_SERVER_NAME == "server.unsafe.aurae.io"


def test_health_reports_every_service_serving(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        for service in ("", "aurae.cells.v0.CellService", "aurae.discovery.v0.DiscoveryService",
                        "aurae.observe.v0.ObserveService"):
            assert client.health.check(service=service).status == 1, service
        with pytest.raises(aurae_sdk.NotFound):
            client.health.check(service="no.such.Service")


def test_reflection_lists_the_services(daemon: DaemonProcess) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with daemon.client() as client:
        stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"aurae.cells.v0.CellService", "aurae.observe.v0.ObserveService",
            "aurae.discovery.v0.DiscoveryService", "grpc.health.v1.Health"} <= names


def test_vm_service_is_served(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        assert list(client.vms.list().machines) == []
        with pytest.raises(aurae_sdk.NotFound):
            client.vms.start(vm_id="absent")


def test_daemon_flags(tmp_path) -> None:  # type: ignore[no-untyped-def]
    version = subprocess.run([sys.executable, "-m", "auraed", "--version"],
                             capture_output=True, text=True, check=False)
    assert version.stdout.strip() == f"auraed {aurae_sdk.__version__}"
    missing = subprocess.run(
        [sys.executable, "-m", "auraed", "--socket", str(tmp_path / "s.sock"),
         "--ca-crt", str(tmp_path / "nope.crt"), "--runtime-dir", str(tmp_path / "run"),
         "--library-dir", str(tmp_path / "lib")],
        capture_output=True, text=True, timeout=30, check=False)
    assert missing.returncode == 2
    assert "--ca-crt" in missing.stderr and "aurae-py pki init" in missing.stderr
