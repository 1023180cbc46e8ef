"""`aurae-py describe` from the embedded schema, and `aurae-py doctor` against a
live daemon and against each way a setup can be broken."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aurae_cli.describe import MessageInfo, MethodInfo, Schema, ServiceInfo, UnknownName
from aurae_cli.pki import write_client_config
from aurae_sdk import cells
from aurae_sdk.wire.pki import CertificateAuthority, write_credential
from tests.support.daemon import DaemonProcess


def aurae_py(
    *args: str, config: str | None = None, home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "AURAE_CONFIG"}
    if config is not None:
        env["AURAE_CONFIG"] = config
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "aurae_cli", *args],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --------------------------------------------------------------------------
# describe


def test_describe_lists_every_service_and_rpc() -> None:
    result = aurae_py("describe")
    assert result.returncode == 0
    for service, rpc in [
        ("aurae.cells.v0.CellService", "Allocate"),
        ("aurae.observe.v0.ObserveService", "GetSubProcessStream"),
        ("grpc.health.v1.Health", "Watch"),
    ]:
        assert service in result.stdout
        assert f"  {rpc} " in result.stdout


@pytest.mark.parametrize("name", ["CellService", "cells", "aurae.cells.v0.CellService"])
def test_describe_a_service_by_any_of_its_names(name: str) -> None:
    result = aurae_py("describe", name)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "service aurae.cells.v0.CellService"
    assert (
        "  rpc Allocate(CellServiceAllocateRequest) returns (CellServiceAllocateResponse)" in lines
    )
    assert "      Reserve a new cell: create its cgroup with the requested limits and," in lines
    assert any(
        line.startswith("      unary, retried on UNAVAILABLE; SDK client.cells.list(")
        for line in lines
    )


def test_describe_a_streaming_rpc_shows_its_messages() -> None:
    result = aurae_py("describe", "observe", "get-sub-process-stream")
    assert result.returncode == 0
    assert (
        "  rpc GetSubProcessStream(GetSubProcessStreamRequest) returns "
        "(stream GetSubProcessStreamResponse)"
    ) in result.stdout
    assert "server streaming, not retried" in result.stdout
    assert "max_batch_lines" in result.stdout  # a request field, with its doc


def test_describe_a_message_shows_numbered_typed_documented_fields() -> None:
    result = aurae_py("describe", "Cell")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "message aurae.cells.v0.Cell"
    [cpu] = [line for line in lines if " cpu " in line]
    assert cpu.split()[:3] == ["2", "cpu", "aurae.cells.v0.CpuController"]
    assert cpu.endswith("CPU time limits.")
    optional = aurae_py("describe", "aurae.cells.v0.CellServiceStartRequest").stdout
    assert any(
        line.split()[:4] == ["1", "cell_name", "string", "optional"]
        for line in optional.splitlines()
    )


def test_describe_json_matches_the_descriptors() -> None:
    result = aurae_py("describe", "-o", "json", "aurae.cells.v0.Cell")
    described = json.loads(result.stdout)
    assert described["kind"] == "message"
    assert [(f["number"], f["name"]) for f in described["fields"]] == [
        (f.number, f.name) for f in cells.Cell.DESCRIPTOR.fields
    ]
    services = json.loads(aurae_py("describe", "-o", "json").stdout)["services"]
    health = next(s for s in services if s["name"] == "Health")
    assert [m["name"] for m in health["methods"]] == ["Check", "Watch"]
    assert health["methods"][1]["streaming"] == "server streaming"


def test_an_unknown_name_suggests_close_ones() -> None:
    result = aurae_py("describe", "CellServce")
    assert result.returncode == 2
    assert "did you mean CellService" in result.stderr


def test_schema_lookups() -> None:
    schema = Schema.load()
    assert isinstance(schema.find("cells"), ServiceInfo)
    method = schema.find("/aurae.cells.v0.CellService/Wait")
    assert isinstance(method, MethodInfo) and method.cli == "aurae-py cells wait"
    status = schema.find("HealthCheckResponse")
    assert isinstance(status, MessageInfo)
    assert status.fields[0].type == "grpc.health.v1.HealthCheckResponse.ServingStatus"
    enum = schema.find("ExecutableState")
    assert enum.doc == "aurae-py addition: lifecycle of an executable."
    with pytest.raises(UnknownName):
        schema.find("Nothing")


# --------------------------------------------------------------------------
# doctor


def test_doctor_passes_against_the_live_daemon(daemon: DaemonProcess) -> None:
    result = aurae_py("doctor", config=daemon.config)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == f"✓ config {daemon.config} (from $AURAE_CONFIG)"
    assert all(line.startswith("✓") for line in lines[:-1])
    assert "✓ mTLS Discover: auraed 0.1.0, healthy" in lines
    assert "✓ health of aurae.cells.v0.CellService: SERVING" in lines
    assert lines[-1] == "All checks passed."


def test_doctor_without_a_config(tmp_path: Path) -> None:
    if any(os.path.exists(p) for p in ("/etc/aurae/config", "/var/lib/aurae/config")):
        pytest.skip("this machine has a system-wide Aurae config")
    result = aurae_py("doctor", home=tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines()[:2] == [
        (
            f"✗ no client config: $AURAE_CONFIG is not set and none of {tmp_path}/.aurae/config, "
            "/etc/aurae/config, /var/lib/aurae/config exists"
        ),
        (
            "  fix: create one with `aurae-py pki init DIR --socket SOCKET`, then "
            "`export AURAE_CONFIG=DIR/config` (or pass --config PATH)"
        ),
    ]
    missing = aurae_py("--config", str(tmp_path / "nope"), "doctor")
    assert missing.returncode == 1
    assert missing.stdout.startswith(
        f"✗ config {tmp_path}/nope (given with --config) does not exist"
    )


def _config(
    tmp_path: Path,
    daemon: DaemonProcess,
    *,
    ca_crt: Path | None = None,
    client: tuple[Path, Path] | None = None,
    socket: str | None = None,
) -> str:
    crt, key = client or (daemon.pki.clients[0].crt, daemon.pki.clients[0].key)
    path = tmp_path / "config"
    write_client_config(path, ca_crt or daemon.pki.ca_crt, crt, key, socket or daemon.socket)
    return str(path)


def _issue(
    tmp_path: Path, ca: CertificateAuthority, name: str, **validity: dt.datetime
) -> tuple[Path, Path]:
    crt, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    write_credential(ca.issue_client(name, **validity), crt, key)
    return crt, key


def test_doctor_on_an_expired_client_certificate(daemon: DaemonProcess, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = _issue(
        tmp_path,
        CertificateAuthority.load(daemon.pki.directory),
        "expired",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    result = aurae_py("--config", _config(tmp_path, daemon, client=expired), "doctor")
    assert result.returncode == 1
    failures = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    assert failures[0].startswith("✗ client certificate (client_crt) expired on ")
    assert "  fix: issue a new one: `aurae-py pki issue PKI_DIR NAME --force`" in result.stdout
    # The daemon refuses it too, and the doctor says why.
    assert failures[1].startswith("✗ TLS handshake failed: auraed ")
    assert failures[1].endswith("after seeing the client certificate: it has expired")


def test_doctor_on_a_config_with_another_ca(daemon: DaemonProcess, tmp_path: Path) -> None:
    foreign = CertificateAuthority.create()
    ca_crt = tmp_path / "other-ca.crt"
    write_credential(foreign, ca_crt, tmp_path / "other-ca.key")
    config = _config(tmp_path, daemon, ca_crt=ca_crt)
    result = aurae_py("--config", config, "doctor")
    assert result.returncode == 1
    failures = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    assert failures == [
        (
            "✗ client certificate is not signed by the CA in ca_crt: its issuer is named "
            "CN=unsafe.aurae.io like the CA, but a different CA of that name signed it"
        ),
        (
            "✗ TLS handshake failed: auraed's certificate (issuer CN=unsafe.aurae.io) is not signed "
            "by the CA in ca_crt (CN=unsafe.aurae.io): the daemon uses a different CA"
        ),
    ]
    assert (
        f"  fix: set [auth] ca_crt in {config} to the CA auraed was started with (its --ca-crt)"
    ) in result.stdout


def test_doctor_on_a_client_certificate_the_daemon_does_not_trust(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    stranger = _issue(tmp_path, CertificateAuthority.create(), "stranger")
    result = aurae_py("--config", _config(tmp_path, daemon, client=stranger), "doctor")
    assert result.returncode == 1
    assert (
        "✗ TLS handshake failed: auraed closed the connection after seeing the client "
        "certificate: it is not signed by the CA in ca_crt"
    ) in result.stdout.splitlines()


def test_doctor_when_the_daemon_is_not_running(daemon: DaemonProcess, tmp_path: Path) -> None:
    socket = str(tmp_path / "gone.sock")
    config = _config(tmp_path, daemon, socket=socket)
    result = aurae_py("--config", config, "doctor")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"✗ socket {socket} does not exist: auraed is not running there" in lines
    assert ("- mTLS Discover and health: not checked without a reachable socket") in lines
    assert all(
        line.startswith(("✓", "  fix"))
        for line in lines[
            : lines.index(f"✗ socket {socket} does not exist: auraed is not running there")
        ]
    )
