"""Contexts and fleets against four real auraed nodes, each in a network namespace this test
makes and reached over TCP on a veth pair; one node is stopped to show how a node down reads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import aurae_sdk
from tests.support.daemon import NetnsNode, fleet_config, netns_nodes

V1 = Path("/sys/fs/cgroup")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 (network namespaces)")


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[NetnsNode]]:
    with netns_nodes(4) as made:
        yield made
    # Nothing of ours is left: no namespace, no veth.
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=True).stdout
    assert not any(node.netns in names for node in made)


@pytest.fixture
def config(nodes: list[NetnsNode], tmp_path: Path) -> Path:
    return fleet_config(tmp_path / "config", nodes)


def cli(config: Path, *args: str, context: str | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AURAE_CONFIG", "AURAE_CONTEXT")}
    env["AURAE_CONFIG"] = str(config)
    if context is not None:
        env["AURAE_CONTEXT"] = context
    return subprocess.run([sys.executable, "-m", "aurae_cli", *args], env=env, text=True,
                          capture_output=True, timeout=120, input=stdin, check=False)


def summary_rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("CONTEXT"))
    rows = {}
    for line in lines[start + 1:]:
        if not line.startswith("node"):
            break
        words = line.split()
        rows[words[0]] = words[1:]
    return rows


def test_contexts_are_listed_selected_and_switched(nodes: list[NetnsNode], config: Path) -> None:
    listed = cli(config, "config", "get-contexts")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split() == ["CURRENT", "NAME", "SOCKET"]
    assert [line.split()[-2] for line in listed.stdout.splitlines()[1:]] == [
        "node1", "node2", "node3", "node4"]
    # No current_context and no top-level [system]: commands say which contexts exist.
    assert "no context 'default'" in cli(config, "cells", "list").stderr
    switched = cli(config, "config", "use-context", "node2")
    assert switched.returncode == 0, switched.stderr
    assert config.read_text().startswith('current_context = "node2"\n')
    assert cli(config, "config", "current-context").stdout == "node2\n"
    assert cli(config, "config", "current-context", context="node3").stdout == "node3\n"
    assert cli(config, "--context", "node4", "config", "current-context",
               context="node3").stdout == "node4\n"
    # The current context is the node commands reach: allocate on node2 lands in its cgroups.
    allocated = cli(config, "cells", "allocate", "ctx-only")
    assert allocated.returncode == 0, allocated.stderr
    try:
        assert (V1 / "cpu" / nodes[1].daemon.cgroup_root / "ctx-only").is_dir()
        assert not (V1 / "cpu" / nodes[0].daemon.cgroup_root / "ctx-only").exists()
    finally:
        assert cli(config, "cells", "free", "ctx-only").returncode == 0


def test_one_command_on_four_nodes_with_one_down(nodes: list[NetnsNode], config: Path) -> None:
    allocated = cli(config, "--all-contexts", "cells", "allocate", "fleet-web",
                    "--cpu-max", "30000")
    assert allocated.returncode == 0, allocated.stdout + allocated.stderr
    assert summary_rows(allocated.stdout).keys() == {"node1", "node2", "node3", "node4"}
    for node in nodes:
        quota = V1 / "cpu" / node.daemon.cgroup_root / "fleet-web" / "cpu.cfs_quota_us"
        assert quota.read_text().strip() == "30000"
    nodes[3].daemon.stop()  # node4 goes down
    freed = cli(config, "--context", "node1,node2,node3,node4", "cells", "free", "fleet-web")
    assert freed.returncode == 1
    rows = summary_rows(freed.stdout)
    assert [rows[n][1] for n in ("node1", "node2", "node3")] == ["ok", "ok", "ok"]
    assert rows["node4"][1] == "FAILED" and "UNAVAILABLE" in " ".join(rows["node4"])
    assert "3 of 4 nodes succeeded, 1 failed." in freed.stdout
    assert "aurae-py doctor" in freed.stderr
    for node in nodes[:3]:
        assert not (V1 / "cpu" / node.daemon.cgroup_root / "fleet-web").exists()


def test_a_script_on_three_nodes(nodes: list[NetnsNode], config: Path, tmp_path: Path) -> None:
    script = tmp_path / "where.py"
    script.write_text(textwrap.dedent("""\
        import sys
        client.cells.allocate(cell={"name": sys.argv[1]})
        print("cells", [n.cell.name for n in client.cells.list().cells])
        client.cells.free(cell_name=sys.argv[1])
    """))
    result = cli(config, "--context", "node1,node2,node3", "--parallel", "2", str(script), "s1")
    assert result.returncode == 0, result.stdout + result.stderr
    for node in nodes[:3]:
        assert f"=== {node.name} ({node.socket})\ncells ['s1']\n" in result.stdout
    assert "3 of 3 nodes succeeded." in result.stdout


def test_fleet_from_python(nodes: list[NetnsNode], config: Path) -> None:
    fleet = aurae_sdk.Fleet(["node1", "node2", "node3"], config=str(config), concurrency=2)

    async def allocate_and_list(client: aurae_sdk.AsyncClient) -> list[str]:
        await client.cells.allocate(cell={"name": "py-fleet"})
        listed = await client.cells.list()
        await client.cells.free(cell_name="py-fleet")
        return [n.cell.name for n in listed.cells]

    results = fleet.run(allocate_and_list)
    assert [(r.context, r.ok, r.value) for r in results] == [
        ("node1", True, ["py-fleet"]), ("node2", True, ["py-fleet"]), ("node3", True, ["py-fleet"])]
    everyone = aurae_sdk.Fleet(config=str(config), timeout=10).run(allocate_and_list)
    assert [r.context for r in everyone] == ["node1", "node2", "node3", "node4"]
    down = everyone[3]
    if nodes[3].daemon.process.poll() is not None:  # stopped by the test before
        assert isinstance(down.error, aurae_sdk.Unavailable)


def test_an_rpc_on_two_nodes_goes_to_the_instance_named(nodes: list[NetnsNode],
                                                        config: Path) -> None:
    """--instance with several contexts: the in-process fleet call is addressed to the spawned
    instance on each node, not to the node itself."""
    live = [node for node in nodes if node.daemon.process.poll() is None][:2]
    assert len(live) == 2
    names = ",".join(node.name for node in live)
    spawned = cli(config, "--context", names, "--timeout", "120", "instances", "spawn",
                  "fl-inst")
    assert spawned.returncode == 0, spawned.stdout + spawned.stderr
    try:
        allocated = cli(config, "--context", names, "--instance", "fl-inst", "cells",
                        "allocate", "in-inst", "--memory-max", "64M")
        assert allocated.returncode == 0, allocated.stdout + allocated.stderr
        assert "2 of 2 nodes succeeded." in allocated.stdout
        for node in live:
            root = V1 / "memory" / node.daemon.cgroup_root
            # In the instance's own cgroup subtree, not a cell of the node.
            limit = root / "instance-fl-inst" / "auraed" / "in-inst" / "memory.limit_in_bytes"
            assert limit.read_text().strip() == str(64 << 20)
            assert not (root / "in-inst").exists()
        listed = cli(config, "--context", names, "--instance", "fl-inst", "cells", "list",
                     "-o", "json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert listed.stdout.count('"in-inst"') == 2
    finally:
        freed = cli(config, "--context", names, "--timeout", "120", "instances", "free",
                    "fl-inst")
        assert freed.returncode == 0, freed.stdout + freed.stderr
    for node in live:
        assert not (V1 / "memory" / node.daemon.cgroup_root / "instance-fl-inst").exists()
