"""Helpers for the trust suite: certificates from a daemon's own CA, raw
channels that present them, host snapshots, and the figures (request counts,
RSS) the suite reports at the end of the run."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from aurae_sdk.config import channel_options, parse_target
from aurae_sdk.wire.pki import CertificateAuthority, Credential
from tests.support.daemon import DaemonProcess, cgroup_dirs, cgroup_pids, running_daemon

# Filled by tests, printed by pytest_terminal_summary: the numbers the suite
# exists to produce (request counts, concurrency, memory).
FIGURES: dict[str, str] = {}

TRUST_DOMAIN = "unsafe.aurae.io"

# The policy the identity matrix and the authz integration tests run under.
POLICY_YAML = """\
deny:
  - name: no-vms-for-ci
    principals: ["spiffe://unsafe.aurae.io/ci/*"]
    methods: ["/aurae.vms.v0.VmService/*"]
allow:
  - name: operators
    principals: ["spiffe://unsafe.aurae.io/admin"]
    methods: ["*"]
  - name: ci-reads
    principals: ["spiffe://unsafe.aurae.io/ci/*"]
    methods: ["/aurae.cells.v0.CellService/List", "/aurae.discovery.v0.DiscoveryService/Discover",
              "/aurae.vms.v0.VmService/List"]
"""


def record_figure(name: str, value: object) -> None:
    FIGURES[name] = str(value)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("trust figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("auraed needs root")


@pytest.fixture(scope="module")
def policy_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """An auraed running under POLICY_YAML."""
    needs_root()
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(POLICY_YAML)
    with running_daemon("--authz-policy", str(policy)) as started:
        yield started


def issue(daemon: DaemonProcess, name: str, spiffe_ids: Sequence[str] | None = None, *,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
          ) -> Credential:
    """A client certificate signed by the daemon's own CA."""
    ca = CertificateAuthority.load(daemon.pki.directory)
    return ca.issue_client(name, spiffe_ids=spiffe_ids, not_before=not_before,
                           not_after=not_after)


def secure_channel(daemon: DaemonProcess, credential: Credential | None) -> grpc.Channel:
    """A channel to the daemon presenting `credential` (None: no client certificate)."""
    target = parse_target(daemon.socket)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=daemon.pki.ca_crt.read_bytes(),
        private_key=credential.private_key_pem() if credential else None,
        certificate_chain=credential.certificate_pem() if credential else None,
    )
    return grpc.secure_channel(target.grpc_target, credentials, channel_options(target))


def host_state(daemon: DaemonProcess) -> tuple[list[Path], set[int]]:
    """Every cgroup directory under the daemon's root but its spare host scopes, and every
    process in them but the spawner's own (it lives in the host leaf, with its spare).

    Spare scopes (`_host/_spare.<n>`, auraed/runtime/spare_scopes.py) are the running daemon's
    own, made after its first host-level Start and removed when it stops; a daemon's stop is
    checked for leaving nothing at all elsewhere."""
    dirs = sorted(p for top in cgroup_dirs(daemon.cgroup_root)
                  for p in [top, *top.rglob("*")]
                  if p.is_dir() and not p.name.startswith("_spare."))
    return dirs, {pid for pid in cgroup_pids(daemon.cgroup_root) if not _is_spawner(pid)}


def _is_spawner(pid: int) -> bool:
    try:
        return b"auraed.kernel.spawner" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False


def audit_lines(daemon: DaemonProcess) -> list[str]:
    path = daemon.workdir / "lib" / "audit.log"
    return path.read_text().splitlines() if path.exists() else []
