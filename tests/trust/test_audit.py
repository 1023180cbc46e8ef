"""The audit log: one JSON line per mutating or refused call, written off the
RPC path, rotated by size, and never a reason for a call to wait."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest

import aurae_sdk
from auraed.audit import MAX_TARGET_CHARS, AuditEntry, AuditLog
from tests.support.daemon import DaemonProcess, running_daemon

from .conftest import audit_lines, issue, secure_channel


def entry(cell: str = "web", **overrides: object) -> AuditEntry:
    fields: dict[str, object] = {"peer": "spiffe://td/admin",
                                 "method": "/aurae.cells.v0.CellService/Allocate",
                                 "decision": "allow", "code": "OK", "duration_ms": 1.5,
                                 "target": {"cell": cell}}
    fields.update(overrides)
    return AuditEntry(**fields)  # type: ignore[arg-type]


def wait_for_lines(read: object, count: int, timeout: float = 10) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        lines = read()  # type: ignore[operator]
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.02)


def test_lines_are_json_with_the_documented_keys(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.log")
    audit.start()
    audit.record(entry())
    audit.record(entry(decision="deny", code="PERMISSION_DENIED", reason="no rule allows it"))
    audit.close()
    first, second = (json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines())
    assert list(first) == ["time", "peer", "method", "target", "decision", "code", "duration_ms"]
    assert first["target"] == {"cell": "web"} and first["duration_ms"] == 1.5
    assert str(first["time"]).endswith("Z")
    assert second["decision"] == "deny" and second["reason"] == "no rule allows it"
    assert stat.S_IMODE(os.stat(tmp_path / "audit.log").st_mode) == 0o600


def test_hostile_names_stay_on_one_clipped_line(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.log")
    audit.start()
    audit.record(entry(cell="a\nb\0c\u2028\"}"))
    audit.record(entry(cell="x" * 100_000))
    audit.close()
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["target"]["cell"] == "a\nb\0c\u2028\"}"
    assert len(json.loads(lines[1])["target"]["cell"]) == MAX_TARGET_CHARS + 3


def test_rotation_keeps_a_bounded_number_of_files(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.log", max_bytes=2000, backups=2)
    audit.start()
    for index in range(100):
        audit.record(entry(cell=f"cell-{index}"))
    audit.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.log", "audit.log.1", "audit.log.2"]
    for name in names:
        assert (tmp_path / name).stat().st_size <= 2000
    # The newest entries survive, in order, across the files (oldest file last).
    cells = [json.loads(line)["target"]["cell"]
             for name in reversed(names) for line in (tmp_path / name).read_text().splitlines()]
    assert cells == [f"cell-{i}" for i in range(100 - len(cells), 100)]


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.log", queue_size=2)
    # No writer yet: the queue fills after two entries.
    started = time.monotonic()
    for index in range(1000):
        audit.record(entry(cell=f"c{index}"))
    assert time.monotonic() - started < 0.5
    assert audit.dropped == 998
    audit.start()
    audit.close()
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert lines[0] == {"time": lines[0]["time"], "event": "dropped", "count": 998}
    assert [line["target"]["cell"] for line in lines[1:]] == ["c0", "c1"]


def test_write_failures_are_counted_and_writing_resumes(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.log", max_bytes=300, backups=1)
    audit.start()
    audit.record(entry(cell="before"))
    # Rotation cannot move audit.log onto a directory: every write fails until it is gone.
    (tmp_path / "audit.log.1").mkdir()
    for index in range(3):
        audit.record(entry(cell=f"lost-{index}"))
    deadline = time.monotonic() + 10
    while audit.dropped < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "audit.log.1").rmdir()
    audit.record(entry(cell="after"))
    audit.close()
    assert audit.dropped == 3
    current = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert current[0]["event"] == "dropped" and current[0]["count"] == 3
    assert current[1]["target"] == {"cell": "after"}


def test_a_planted_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "audit.log").symlink_to(target)
    with pytest.raises(OSError):
        AuditLog(tmp_path / "audit.log").start()
    assert target.read_text() == ""


def test_the_daemon_audits_mutating_calls_only(daemon: DaemonProcess,
                                               client: aurae_sdk.Client) -> None:
    before = len(audit_lines(daemon))
    client.cells.allocate(cell={"name": "audited"})
    client.cells.start(cell_name="audited", executable={"name": "job", "command": "sleep 30"})
    client.cells.list()
    client.discovery.discover()
    client.cells.stop(cell_name="audited", executable_name="job", grace_period_ms=0)
    with pytest.raises(aurae_sdk.InvalidArgument):
        client.cells.allocate(cell={"name": "../escape"})
    with pytest.raises(aurae_sdk.NotFound):
        client.vms.free(vm_id="vm-1")
    client.cells.free(cell_name="audited")
    records = wait_for_lines(lambda: audit_lines(daemon)[before:], 6)
    summary = [(r["method"].rpartition(".")[2], r["target"], r["code"]) for r in records]
    assert summary == [
        ("CellService/Allocate", {"cell": "audited"}, "OK"),
        ("CellService/Start", {"cell": "audited", "executable": "job"}, "OK"),
        ("CellService/Stop", {"cell": "audited", "executable": "job"}, "OK"),
        ("CellService/Allocate", {"cell": "../escape"}, "INVALID_ARGUMENT"),
        ("VmService/Free", {"vm": "vm-1"}, "NOT_FOUND"),
        ("CellService/Free", {"cell": "audited"}, "OK"),
    ]
    assert {r["peer"] for r in records} == {"spiffe://unsafe.aurae.io/admin"}
    assert {r["decision"] for r in records} == {"allow"}
    assert all(isinstance(r["duration_ms"], float) and r["duration_ms"] >= 0 for r in records)


def test_refused_calls_are_audited_as_denied(policy_daemon: DaemonProcess) -> None:
    before = len(audit_lines(policy_daemon))
    ci = issue(policy_daemon, "build", ["spiffe://unsafe.aurae.io/ci/build"])
    nameless = issue(policy_daemon, "nameless", [])
    with aurae_sdk.Client(channel=secure_channel(policy_daemon, ci), timeout=5) as client:
        with pytest.raises(aurae_sdk.PermissionDenied):
            client.cells.start(cell_name="web", executable={"name": "x", "command": "true"})
        with pytest.raises(aurae_sdk.PermissionDenied):
            client.vms.list()  # not mutating, but refused: audited
        client.cells.list()  # allowed and not mutating: not audited
    with (aurae_sdk.Client(channel=secure_channel(policy_daemon, nameless), timeout=5) as client,
          pytest.raises(aurae_sdk.Unauthenticated)):
        client.cells.free(cell_name="web")
    records = wait_for_lines(lambda: audit_lines(policy_daemon)[before:], 3)
    assert [(r["peer"], r["method"], r["target"], r["decision"], r["code"]) for r in records] == [
        ("spiffe://unsafe.aurae.io/ci/build", "/aurae.cells.v0.CellService/Start",
         {"cell": "web", "executable": "x"}, "deny", "PERMISSION_DENIED"),
        ("spiffe://unsafe.aurae.io/ci/build", "/aurae.vms.v0.VmService/List", {}, "deny",
         "PERMISSION_DENIED"),
        ("CN=nameless.unsafe.aurae.io", "/aurae.cells.v0.CellService/Free", {"cell": "web"},
         "deny", "UNAUTHENTICATED"),
    ]
    assert "no rule allows it" in records[0]["reason"]
    assert "no-vms-for-ci" in records[1]["reason"]
    assert "no URI SAN" in records[2]["reason"]


def test_a_call_answered_just_before_the_daemon_stops_is_audited() -> None:
    # An entry is queued once its call's answer is out (a grpcio callback): a daemon stopped
    # right after the answer still writes it before it closes the log.
    with running_daemon() as daemon, daemon.client() as client:
        client.cells.allocate(cell={"name": "last"})
        client.cells.free(cell_name="last")
        assert daemon.stop(signal.SIGINT) == 0
        records = [json.loads(line) for line in audit_lines(daemon)]
    assert [(r["method"].rpartition(".")[2], r["target"], r["code"]) for r in records] == [
        ("CellService/Allocate", {"cell": "last"}, "OK"),
        ("CellService/Free", {"cell": "last"}, "OK"),
    ]
