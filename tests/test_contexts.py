"""Contexts in the client config: which one is chosen, how a context's keys fall back to the
top-level ones, and that use-context edits only the line it owns."""

from __future__ import annotations

from pathlib import Path

import pytest

from aurae_sdk.config import ConfigError, load_config, load_contexts, read_contexts, use_context

FLEET = """\
# the fleet's shared PKI
[auth]
ca_crt = "pki/ca.crt"
client_crt = "pki/admin.crt"
client_key = "pki/admin.key"

[system]
socket = "/run/aurae/aurae.sock"

[contexts.edge-1.system]
socket = "10.0.0.1:8080"

[contexts.edge-2.auth]
client_crt = "/other/ops.crt"
client_key = "/other/ops.key"
[contexts.edge-2.system]
socket = "[fe80::1%eth0]:8080"
"""


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("AURAE_CONTEXT", raising=False)
    path = tmp_path / "config"
    path.write_text(FLEET)
    return path


def test_top_level_is_the_default_context(fleet: Path) -> None:
    config = load_config(fleet)
    assert (config.context, config.socket) == ("default", "/run/aurae/aurae.sock")
    assert config.ca_crt == str(fleet.parent / "pki/ca.crt")


def test_a_context_falls_back_to_the_top_level_keys(fleet: Path) -> None:
    edge1 = load_config(fleet, context="edge-1")
    assert (edge1.context, edge1.socket) == ("edge-1", "10.0.0.1:8080")
    assert edge1.client_crt == str(fleet.parent / "pki/admin.crt")
    edge2 = load_config(fleet, context="edge-2")
    assert edge2.client_crt == "/other/ops.crt" and edge2.ca_crt == str(fleet.parent / "pki/ca.crt")
    assert edge2.target.grpc_target == "ipv6:[fe80::1%25eth0]:8080"


def test_argument_beats_environment_beats_file(fleet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_context("edge-1", fleet)
    assert load_config(fleet).context == "edge-1"
    monkeypatch.setenv("AURAE_CONTEXT", "edge-2")
    assert load_config(fleet).context == "edge-2"
    assert load_config(fleet, context="default").context == "default"


def test_unknown_context_names_the_known_ones(fleet: Path) -> None:
    with pytest.raises(ConfigError, match=r"no context 'edge-9' \(known: default, edge-1, edge-2\)"):
        load_config(fleet, context="edge-9")
    with pytest.raises(ConfigError, match="no context 'edge-9'"):
        use_context("edge-9", fleet)
    assert fleet.read_text() == FLEET


def test_use_context_keeps_comments_and_replaces_its_line(fleet: Path) -> None:
    use_context("edge-2", fleet)
    assert fleet.read_text() == 'current_context = "edge-2"\n' + FLEET
    use_context("edge-1", fleet)
    assert fleet.read_text() == 'current_context = "edge-1"\n' + FLEET
    assert read_contexts(fleet).current == "edge-1"


def test_every_context_in_file_order(fleet: Path) -> None:
    assert [c.context for c in load_contexts(fleet)] == ["default", "edge-1", "edge-2"]
    assert [c.socket for c in load_contexts(fleet, ["edge-2", "edge-1"])] == [
        "[fe80::1%eth0]:8080", "10.0.0.1:8080"]


def test_a_bad_context_socket_is_reported_with_the_file(fleet: Path) -> None:
    fleet.write_text(FLEET + '[contexts.bad.system]\nsocket = "10.0.0.1"\n')
    with pytest.raises(ConfigError, match="has no port"):
        load_config(fleet, context="bad")
