"""Cells against a real auraed: limits land in the host's cgroup files (v1
here), names are validated, nesting works, Free removes everything."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import aurae_sdk
from aurae_sdk import cells
from tests.support.daemon import DaemonProcess, cgroup_dirs

V1 = Path("/sys/fs/cgroup")


def read(daemon: DaemonProcess, controller: str, cell: str, name: str) -> str:
    return (V1 / controller / daemon.cgroup_root / cell / name).read_text().strip()


def test_allocate_writes_limits_to_the_host(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    response = client.cells.allocate(cell=cells.Cell(
        name="limits",
        cpu=cells.CpuController(weight=2, max=50_000, period=200_000),
        cpuset=cells.CpusetController(cpus="0", mems="0"),
        memory=cells.MemoryController(max=256 * 1024 * 1024, low=64 * 1024 * 1024),
    ))
    assert response.cell_name == "limits"
    assert response.cgroup_v2 is False
    try:
        assert read(daemon, "cpu", "limits", "cpu.shares") == "20"  # round(2 * 1024 / 100)
        assert read(daemon, "cpu", "limits", "cpu.cfs_quota_us") == "50000"
        assert read(daemon, "cpu", "limits", "cpu.cfs_period_us") == "200000"
        assert read(daemon, "cpuset", "limits", "cpuset.cpus") == "0"
        assert read(daemon, "cpuset", "limits", "cpuset.mems") == "0"
        assert read(daemon, "memory", "limits", "memory.limit_in_bytes") == str(256 * 1024 * 1024)
        assert read(daemon, "memory", "limits", "memory.soft_limit_in_bytes") == str(64 * 1024 * 1024)
        listed = client.cells.list()
        (node,) = [n for n in listed.cells if n.cell.name == "limits"]
        assert node.cell.cpu.weight == 2 and node.cell.memory.max == 256 * 1024 * 1024
        assert not node.cell.memory.HasField("high")
    finally:
        client.cells.free(cell_name="limits")
    assert not (V1 / "cpu" / daemon.cgroup_root / "limits").exists()


def test_unlimited_cpu_by_default(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "defaults"})
    try:
        assert read(daemon, "cpu", "defaults", "cpu.cfs_quota_us") == "-1"
        assert read(daemon, "cpu", "defaults", "cpu.shares") == "1024"
    finally:
        client.cells.free(cell_name="defaults")


def test_nested_cells(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "outer", "cpu": {"max": 80_000}})
    client.cells.allocate(cell={"name": "outer/inner", "cpu": {"max": 40_000}})
    client.cells.allocate(cell={"name": "outer/inner/leaf"})
    try:
        assert read(daemon, "cpu", "outer/inner", "cpu.cfs_quota_us") == "40000"
        (outer,) = [n for n in client.cells.list().cells if n.cell.name == "outer"]
        assert [c.cell.name for c in outer.children] == ["outer/inner"]
        assert [c.cell.name for c in outer.children[0].children] == ["outer/inner/leaf"]
        with pytest.raises(aurae_sdk.NotFound) as missing:
            client.cells.allocate(cell={"name": "nowhere/child"})
        assert missing.value.field == "cell.name"
        with pytest.raises(aurae_sdk.AlreadyExists):
            client.cells.allocate(cell={"name": "outer/inner"})
        for cell in ("outer", "outer/inner"):
            client.cells.start(cell_name=cell, executable={"name": "say", "command": "echo hi"})
            client.cells.wait(cell_name=cell, executable_name="say", timeout=10)
        logs = daemon.runtime_dir / "logs" / "outer"
        deadline = time.monotonic() + 10  # the pump writes the line on its own thread
        while len(list(logs.glob("**/stdout.000001.log"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(list(logs.glob("**/stdout.000001.log"))) == 2
    finally:
        # Freeing the parent frees its children first.
        client.cells.free(cell_name="outer")
    assert not any((d / "outer").exists() for d in cgroup_dirs(daemon.cgroup_root))
    assert "outer" not in {n.cell.name for n in client.cells.list().cells}
    # Their captured output went with them.
    assert not logs.exists()


@pytest.mark.parametrize(
    "name",
    ["", "..", "a/../b", "_x", "a_b", "-a", "a-", "a//b", "/a", "a/", "x" * 64, "caf\u00e9",
     "a\0b", "cgroup.procs", "memory.max", "tasks.", "a b", "a/" * 17 + "a"],
)
def test_invalid_cell_names_are_refused(daemon: DaemonProcess, client: aurae_sdk.Client, name: str) -> None:
    before = sorted(p for d in cgroup_dirs(daemon.cgroup_root) for p in d.iterdir() if p.is_dir())
    with pytest.raises(aurae_sdk.InvalidArgument) as refused:
        client.cells.allocate(cell={"name": name})
    assert refused.value.field == "cell.name"
    after = sorted(p for d in cgroup_dirs(daemon.cgroup_root) for p in d.iterdir() if p.is_dir())
    assert before == after


@pytest.mark.parametrize(
    "limits,field",
    [
        ({"cpu": {"weight": 0}}, "cell.cpu.weight"),
        ({"cpu": {"weight": 10001}}, "cell.cpu.weight"),
        ({"cpu": {"max": -5}}, "cell.cpu.max"),
        ({"cpu": {"period": 10}}, "cell.cpu.period"),
        ({"cpuset": {"cpus": "0-"}}, "cell.cpuset.cpus"),
        ({"cpuset": {"cpus": "99"}}, "cell.cpuset.cpus"),
        ({"memory": {"max": -1}}, "cell.memory.max"),
    ],
)
def test_invalid_limits_are_refused(daemon: DaemonProcess, client: aurae_sdk.Client,
                                    limits: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(aurae_sdk.InvalidArgument) as refused:
        client.cells.allocate(cell={"name": "badlimits", **limits})
    assert refused.value.field == field
    assert not any((d / "badlimits").exists() for d in cgroup_dirs(daemon.cgroup_root))


def test_v2_only_memory_limits_are_refused_clearly_on_v1(client: aurae_sdk.Client) -> None:
    for field in ("high", "min"):
        with pytest.raises(aurae_sdk.FailedPrecondition) as refused:
            client.cells.allocate(cell={"name": "v2only", "memory": {field: 1 << 20}})
        assert refused.value.field == f"cell.memory.{field}"
        assert "v1" in refused.value.message or "v2" in refused.value.message


def test_free_unknown_cell(client: aurae_sdk.Client) -> None:
    with pytest.raises(aurae_sdk.NotFound) as missing:
        client.cells.free(cell_name="ghost")
    assert missing.value.field == "cell_name"
    with pytest.raises(aurae_sdk.InvalidArgument):
        client.cells.free(cell_name="../etc")
