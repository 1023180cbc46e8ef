"""The authorization policy on its own: pattern matching, rule order, loading
and the errors a bad file gets; and that auraed refuses to start on one."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from aurae_cli.pki import init_pki
from auraed.authz import (
    MethodPattern,
    Policy,
    PolicyError,
    PrincipalPattern,
    load_policy,
    parse_policy,
)
from auraed.identity import PeerIdentity, SpiffeId, peer_identity, peer_identity_of

from .conftest import POLICY_YAML, needs_root

CELLS = "/aurae.cells.v0.CellService"
METHODS = frozenset({
    f"{CELLS}/Allocate", f"{CELLS}/Free", f"{CELLS}/List",
    "/aurae.vms.v0.VmService/List", "/aurae.vms.v0.VmService/Allocate",
    "/aurae.discovery.v0.DiscoveryService/Discover",
    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
})


def sid(text: str) -> SpiffeId:
    return SpiffeId.parse(text)


def policy(document: object) -> Policy:
    return parse_policy(document, METHODS, source="test.yaml")


@pytest.mark.parametrize(("pattern", "peer", "matches"), [
    ("spiffe://td/admin", "spiffe://td/admin", True),
    ("spiffe://td/admin", "spiffe://td/admin2", False),
    ("spiffe://td/admin", "spiffe://td/admin/x", False),
    ("spiffe://td/admin", "spiffe://other/admin", False),
    ("spiffe://td/ci/*", "spiffe://td/ci/build", True),
    ("spiffe://td/ci/*", "spiffe://td/ci/build/42", True),
    ("spiffe://td/ci/*", "spiffe://td/ci", False),
    ("spiffe://td/ci/*", "spiffe://td/cid/x", False),
    ("spiffe://td/ci/*", "spiffe://td2/ci/build", False),
    ("spiffe://td", "spiffe://td/anything/at/all", True),
    ("spiffe://td", "spiffe://td.evil/x", False),
    ("spiffe://td/*", "spiffe://td/x", True),
])
def test_principal_patterns(pattern: str, peer: str, matches: bool) -> None:
    assert PrincipalPattern.parse(pattern).matches(sid(peer)) is matches


@pytest.mark.parametrize("pattern", [
    "*", "spiffe://TD/x", "https://td/x", "spiffe://td/a*", "spiffe://td/../x", "spiffe://td//x",
    "spiffe://td/x/", "spiffe://td/x?y", "spiffe://td:443/x", "spiffe://user@td/x", "",
    "spiffe://td/*/x",
])
def test_bad_principal_patterns(pattern: str) -> None:
    with pytest.raises(ValueError):
        PrincipalPattern.parse(pattern)


@pytest.mark.parametrize(("pattern", "method", "matches"), [
    ("*", f"{CELLS}/Allocate", True),
    (f"{CELLS}/*", f"{CELLS}/Allocate", True),
    (f"{CELLS}/*", "/aurae.vms.v0.VmService/List", False),
    (f"{CELLS}/List", f"{CELLS}/List", True),
    (f"{CELLS}/List", f"{CELLS}/Allocate", False),
])
def test_method_patterns(pattern: str, method: str, matches: bool) -> None:
    assert MethodPattern.parse(pattern, METHODS).matches(method) is matches


@pytest.mark.parametrize(("pattern", "complaint"), [
    (f"{CELLS}/Lsit", "no such method"),
    ("/aurae.cells.v0.CellServce/*", "no service"),
    ("aurae.cells.v0.CellService/List", "is not"),
    (f"{CELLS}/Li*", "is not"),
    ("/*", "is not"),
    (f"{CELLS}", "is not"),
])
def test_bad_method_patterns(pattern: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        MethodPattern.parse(pattern, METHODS)


def test_deny_wins_then_allow_else_deny() -> None:
    rules = policy({
        "deny": [{"name": "no-free", "principals": ["spiffe://td/ops/*"],
                  "methods": [f"{CELLS}/Free"]}],
        "allow": [{"name": "ops", "principals": ["spiffe://td/ops/*"], "methods": [f"{CELLS}/*"]}],
    })
    ops = sid("spiffe://td/ops/alice")
    assert rules.decide(ops, f"{CELLS}/Allocate").allowed
    assert rules.decide(ops, f"{CELLS}/Allocate").rule == "ops"
    freeing = rules.decide(ops, f"{CELLS}/Free")
    assert not freeing.allowed and freeing.rule == "no-free" and "no-free" in freeing.reason
    unlisted = rules.decide(ops, "/aurae.vms.v0.VmService/List")
    assert not unlisted.allowed and unlisted.rule is None
    stranger = rules.decide(sid("spiffe://td/bob"), f"{CELLS}/List")
    assert not stranger.allowed and "no rule allows it" in stranger.reason


def test_health_and_reflection_are_open_unless_denied() -> None:
    rules = policy({"allow": [], "deny": [{"name": "quarantine", "principals": ["spiffe://td/bad"],
                                           "methods": ["*"]}]})
    anyone = sid("spiffe://elsewhere/x")
    for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                   "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
        assert rules.decide(anyone, method).allowed
        assert not rules.decide(sid("spiffe://td/bad"), method).allowed
    assert not rules.decide(anyone, f"{CELLS}/List").allowed


def test_the_documented_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_YAML)
    loaded = load_policy(path, METHODS)
    assert [r.name for r in loaded.deny] == ["no-vms-for-ci"]
    assert [r.name for r in loaded.allow] == ["operators", "ci-reads"]
    as_json = tmp_path / "policy.json"
    as_json.write_text(json.dumps({"deny": [{"name": r.name, "principals": [p.text for p in
                                             r.principals], "methods": [m.text for m in r.methods]}
                                            for r in loaded.deny]}))
    assert load_policy(as_json, METHODS).deny == loaded.deny


@pytest.mark.parametrize(("document", "complaint"), [
    (None, "expected a mapping"),
    ([], "expected a mapping"),
    ({}, "expected a mapping"),
    ({"allow": [], "permit": []}, "unknown key"),
    ({"allow": {"name": "x"}}, "must be a list"),
    ({"allow": ["x"]}, "allow rule #1: expected a mapping"),
    ({"allow": [{"principals": ["spiffe://td/a"], "methods": ["*"]}]}, "needs a 'name'"),
    ({"allow": [{"name": "r", "principals": [], "methods": ["*"]}]},
     "allow rule 'r': 'principals' must be a non-empty list"),
    ({"allow": [{"name": "r", "principals": "spiffe://td/a", "methods": ["*"]}]},
     "'principals' must be a non-empty list"),
    ({"allow": [{"name": "r", "principals": [7], "methods": ["*"]}]}, "must hold strings"),
    ({"allow": [{"name": "r", "principals": ["spiffe://td/a"]}]}, "'methods' must be"),
    ({"deny": [{"name": "typo", "principals": ["spiffe://td/a"], "methods": [f"{CELLS}/Alocate"]}]},
     "deny rule 'typo': method '/aurae.cells.v0.CellService/Alocate'"),
    ({"allow": [{"name": "r", "principals": ["spiffe://TD/a"], "methods": ["*"]}]},
     "allow rule 'r': principal"),
    ({"allow": [{"name": "r", "principals": ["spiffe://td/a"], "methods": ["*"], "effect": "x"}]},
     "allow rule 'r': unknown key"),
    ({"deny": [{"name": "r", "principals": ["spiffe://td/a"], "methods": ["*"]}],
      "allow": [{"name": "r", "principals": ["spiffe://td/a"], "methods": ["*"]}]},
     "used twice"),
])
def test_bad_policies_name_the_rule(document: object, complaint: str) -> None:
    with pytest.raises(PolicyError, match="test.yaml") as refused:
        policy(document)
    assert complaint in str(refused.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml", METHODS)
    broken = tmp_path / "broken.yaml"
    broken.write_text("allow: [unclosed")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(broken, METHODS)
    broken_json = tmp_path / "broken.json"
    broken_json.write_text("{'allow': []}")
    with pytest.raises(PolicyError, match="not valid JSON"):
        load_policy(broken_json, METHODS)
    deny_all = tmp_path / "deny-all.yaml"
    deny_all.write_text("allow: []\n")
    assert load_policy(deny_all, METHODS) == Policy(deny=(), allow=())


def self_signed_pem(san: bytes | None, common_name: str = "admin.unsafe.aurae.io") -> bytes:
    """A certificate whose subjectAltName is exactly the DER `san` (None: no SAN)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)))
    if san is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, san),
            critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _der(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(encoded)]) + encoded + content


def uri_sans(*uris: bytes) -> bytes:
    return _der(0x30, b"".join(_der(0x86, uri) for uri in uris))


@pytest.mark.parametrize(("uris", "spiffe_id", "problem"), [
    ([b"spiffe://td/admin"], "spiffe://td/admin", None),
    ([], None, "no URI SAN"),
    ([b"spiffe://td/a", b"spiffe://td/b"], None, "2 URI SANs"),
    ([b"https://td/a"], None, "not a SPIFFE ID"),
    ([b"spiffe://td"], None, "names a trust domain"),
    ([b"spiffe://td/a/../b"], None, "'..'"),
    ([b"spiffe://td/admin\x00junk"], None, "NUL"),
    ([b"spiffe://td/\xff"], None, "do not parse"),
    ([b"spiffe://td/" + b"a" * 3000], None, "at most 2048 bytes"),
])
def test_peer_identity_from_the_certificate(uris: list[bytes], spiffe_id: str | None,
                                            problem: str | None) -> None:
    pem = self_signed_pem(uri_sans(*uris))
    identity = peer_identity({"x509_pem_cert": [pem], "peer_uri": [b"spiffe://td/admin"]})
    assert (str(identity.spiffe_id) if identity.spiffe_id else None) == spiffe_id
    if problem is None:
        assert identity.problem is None and str(identity) == spiffe_id
    else:
        assert identity.problem is not None and problem in identity.problem
        assert str(identity) == "CN=admin.unsafe.aurae.io"
    assert str(PeerIdentity(None, None, "x")) == "unidentified"


def test_no_certificate_in_the_auth_context_is_no_identity() -> None:
    identity = peer_identity({"peer_uri": [b"spiffe://td/admin"]})
    assert identity.spiffe_id is None and str(identity) == "unidentified"


def test_auraed_refuses_to_start_on_a_bad_policy(tmp_path: Path) -> None:
    needs_root()
    pki = init_pki(tmp_path / "pki", socket=str(tmp_path / "s.sock"))
    bad = tmp_path / "policy.yaml"
    bad.write_text("allow:\n  - name: ci-reads\n    principals: [spiffe://td/ci/*]\n"
                   "    methods: [/aurae.cells.v0.CellService/Lsit]\n")
    started = subprocess.run(
        [sys.executable, "-m", "auraed", "--socket", str(tmp_path / "s.sock"),
         "--ca-crt", str(pki.ca_crt), "--server-crt", str(pki.server_crt),
         "--server-key", str(pki.server_key), "--runtime-dir", str(tmp_path / "run"),
         "--library-dir", str(tmp_path / "lib"), "--cgroup-root", "aurae-test-never",
         "--authz-policy", str(bad)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert started.returncode == 2
    assert "--authz-policy" in started.stderr and "ci-reads" in started.stderr
    assert "Lsit" in started.stderr
    assert not Path("/sys/fs/cgroup/cpu/aurae-test-never").exists()


class CertificateContext:
    """What identity reads of a ServicerContext: the auth context of one certificate."""

    def __init__(self, pem: bytes) -> None:
        self.pem = pem

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self.pem]}


def test_a_dns_name_spelled_like_a_spiffe_id_is_no_identity() -> None:
    admin = CertificateContext(self_signed_pem(uri_sans(b"spiffe://td/admin"), "admin"))
    # [2] dNSName, spelled like the admin's ID.
    impostor = CertificateContext(
        self_signed_pem(_der(0x30, _der(0x82, b"spiffe://td/admin")), "impostor"))
    assert str(peer_identity_of(admin)) == "spiffe://td/admin"
    identity = peer_identity_of(impostor)
    assert identity.spiffe_id is None and str(identity) == "CN=impostor"


def test_decisions_are_remembered() -> None:
    rules = policy({"allow": [{"name": "ops", "principals": ["spiffe://td/ops"],
                               "methods": [f"{CELLS}/*"]}]})
    first = rules.decide(sid("spiffe://td/ops"), f"{CELLS}/List")
    assert rules.decide(sid("spiffe://td/ops"), f"{CELLS}/List") is first
    assert rules == policy({"allow": [{"name": "ops", "principals": ["spiffe://td/ops"],
                                       "methods": [f"{CELLS}/*"]}]})
