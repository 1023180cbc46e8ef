"""Declared state against a real auraed: apply, re-apply, edit, diff, prune, dry-run, delete, through
the CLI and from Python, with the cgroup files and processes checked on the host."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

import aurae_sdk
from aurae_sdk.declared import Cell, Executable, Node
from aurae_sdk.manifest import loads
from tests.support.daemon import DaemonProcess

V1 = Path("/sys/fs/cgroup")

MANIFEST = """\
owner: shop
cells:
  - name: shop-web
    cpu: {weight: 200, max: 50000}
    memory: {max: 256M}
    labels: {team: payments}
    executables:
      - name: app
        command: sleep 600
        uid: 1000
        gid: 1000
    cells:
      - name: cache
        memory: {max: 64M}
  - name: shop-batch
    isolation: {process: false}
    executables:
      - name: job
        command: sleep 601
"""


def cgroup(daemon: DaemonProcess, controller: str, cell: str, name: str) -> str:
    return (V1 / controller / daemon.cgroup_root / cell / name).read_text().strip()


def cell_paths(client: aurae_sdk.Client) -> set[str]:
    found: set[str] = set()

    def walk(nodes: object) -> None:
        for node in nodes:  # type: ignore[attr-defined]
            found.add(node.cell.name)
            walk(node.children)

    walk(client.cells.list().cells)
    return found


def write(tmp_path: Path, text: str, name: str = "shop.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def host_pid(client: aurae_sdk.Client, cell: str, name: str) -> int:
    for path, observed in aurae_sdk.declared.observe(client).items():
        if path == cell:
            return observed.executables[name].host_pid
    raise AssertionError(f"no {cell}:{name}")


def proc_ids(pid: int) -> tuple[str, str]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uid = next(line for line in status if line.startswith("Uid:")).split()[1]
    gid = next(line for line in status if line.startswith("Gid:")).split()[1]
    return uid, gid


def test_apply_reapply_edit_diff_apply_delete(daemon: DaemonProcess, client: aurae_sdk.Client,
                                              tmp_path: Path) -> None:
    manifest = write(tmp_path, MANIFEST)
    try:
        first = daemon.cli("apply", "-f", manifest)
        assert first.returncode == 0, first.stderr
        assert "Plan: 5 to create, 0 to update, 0 to replace, 0 to delete, 0 unchanged." in first.stdout
        # The limits are in the kernel, the processes run as declared.
        assert cgroup(daemon, "cpu", "shop-web", "cpu.cfs_quota_us") == "50000"
        assert cgroup(daemon, "cpu", "shop-web", "cpu.shares") == "2048"
        assert cgroup(daemon, "memory", "shop-web", "memory.limit_in_bytes") == str(256 << 20)
        assert cgroup(daemon, "memory", "shop-web/cache", "memory.limit_in_bytes") == str(64 << 20)
        app_pid = host_pid(client, "shop-web", "app")
        assert proc_ids(app_pid) == ("1000", "1000")
        # Ownership is recorded on the node.
        listed = {n.cell.name: n.cell for n in client.cells.list().cells}
        assert listed["shop-web"].labels["aurae-py.io/owner"] == "shop"
        assert listed["shop-web"].labels["team"] == "payments"

        again = daemon.cli("apply", "-f", manifest)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == "No changes: the node matches (5 unchanged)."
        assert host_pid(client, "shop-web", "app") == app_pid
        assert daemon.cli("diff", "-f", manifest).returncode == 0

        edited = (MANIFEST.replace("max: 50000", "max: 20000")
                  .replace("command: sleep 601", "command: sleep 602")
                  .replace("isolation: {process: false}", "isolation: {process: true}")
                  .replace("team: payments", "team: checkout"))
        write(tmp_path, edited)
        diff = daemon.cli("diff", "-f", manifest)
        assert diff.returncode == 2, diff.stderr
        assert diff.stdout == textwrap.dedent("""\
            ~ update   cell       shop-web
                  cpu.max: 50000 -> 20000
                  labels.team: 'payments' -> 'checkout'
            ± replace  cell       shop-batch  (isolation.process cannot change in place)
                  isolation.process: false -> true
            + create   executable shop-batch:job  (shop-batch is replaced)
                  command: (unset) -> 'sleep 602'
            Plan: 1 to create, 1 to update, 1 to replace, 0 to delete, 2 unchanged.
            """)
        applied = daemon.cli("apply", "-f", manifest)
        assert applied.returncode == 0, applied.stderr
        assert cgroup(daemon, "cpu", "shop-web", "cpu.cfs_quota_us") == "20000"
        assert host_pid(client, "shop-web", "app") == app_pid  # updated in place: same process
        job = host_pid(client, "shop-batch", "job")
        assert Path(f"/proc/{job}/ns/pid").readlink() != Path("/proc/self/ns/pid").readlink()
        assert Path(f"/proc/{job}/cmdline").read_bytes().split(b"\0")[-2] == b"sleep 602"
        assert daemon.cli("diff", "-f", manifest).returncode == 0

        deleted = daemon.cli("delete", "-f", manifest)
        assert deleted.returncode == 0, deleted.stderr
        assert "- delete   cell       shop-web" in deleted.stdout
        assert "shop-web/cache" not in deleted.stdout  # freed with its parent
        assert cell_paths(client) == set()
        assert not (V1 / "cpu" / daemon.cgroup_root / "shop-web").exists()
        assert not os.path.exists(f"/proc/{app_pid}")
    finally:
        for name in ("shop-web", "shop-batch"):
            if name in cell_paths(client):
                client.cells.free(cell_name=name)


def test_prune_removes_only_what_the_owner_made(daemon: DaemonProcess, client: aurae_sdk.Client,
                                                tmp_path: Path) -> None:
    manifest = write(tmp_path, "owner: pr\ncells:\n  - name: pr-a\n  - name: pr-b\n", "pr.yaml")
    client.cells.allocate(cell={"name": "pr-foreign"})
    try:
        assert daemon.cli("apply", "-f", manifest).returncode == 0
        write(tmp_path, "owner: pr\ncells:\n  - name: pr-a\n", "pr.yaml")
        # Without --prune, pr-b stays.
        kept = daemon.cli("apply", "-f", manifest)
        assert kept.stdout.strip() == "No changes: the node matches (1 unchanged)."
        assert "pr-b" in cell_paths(client)
        pruned = daemon.cli("apply", "-f", manifest, "--prune")
        assert pruned.returncode == 0, pruned.stderr
        assert "- delete   cell       pr-b  (no longer declared)" in pruned.stdout
        assert cell_paths(client) == {"pr-a", "pr-foreign"}
        assert not (V1 / "cpu" / daemon.cgroup_root / "pr-b").exists()
    finally:
        for name in ("pr-a", "pr-b", "pr-foreign"):
            if name in cell_paths(client):
                client.cells.free(cell_name=name)


def test_dry_run_changes_nothing(daemon: DaemonProcess, client: aurae_sdk.Client,
                                 tmp_path: Path) -> None:
    manifest = write(tmp_path, MANIFEST)
    before = sorted(p.name for p in (V1 / "cpu" / daemon.cgroup_root).iterdir())
    dry = daemon.cli("apply", "-f", manifest, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "Plan: 5 to create" in dry.stdout and "Dry run: nothing was changed." in dry.stdout
    assert cell_paths(client) == set()
    assert sorted(p.name for p in (V1 / "cpu" / daemon.cgroup_root).iterdir()) == before
    assert daemon.cli("diff", "-f", manifest).returncode == 2


def test_manifest_errors_name_their_line(daemon: DaemonProcess, client: aurae_sdk.Client,
                                         tmp_path: Path) -> None:
    bad_key = write(tmp_path, "owner: x\ncells:\n  - name: x1\n    memroy: {max: 1G}\n", "k.yaml")
    result = daemon.cli("apply", "-f", bad_key)
    assert result.returncode == 1
    assert result.stderr.startswith(f"aurae-py: {bad_key}:4: unknown key 'memroy' in a cell")
    bad_size = write(tmp_path, "owner: x\ncells:\n  - name: x1\n    memory:\n      max: 1Q\n",
                     "s.yaml")
    result = daemon.cli("diff", "-f", bad_size)
    assert result.returncode == 1
    assert f"{bad_size}:5: cell x1: memory.max: '1Q' is not a size" in result.stderr
    # The daemon's refusal is placed at the field's line too.
    refused = write(tmp_path, "owner: x\ncells:\n  - name: x1\n    cpu:\n      weight: 99999\n",
                    "r.yaml")
    result = daemon.cli("apply", "-f", refused)
    assert result.returncode == 64 + 3, result.stderr
    assert result.stderr.startswith(f"aurae-py: INVALID_ARGUMENT: {refused}:5: create cell x1:")
    assert cell_paths(client) == set()


def test_foreign_cell_is_not_taken_over(daemon: DaemonProcess, client: aurae_sdk.Client,
                                        tmp_path: Path) -> None:
    client.cells.allocate(cell={"name": "taken", "labels": {"aurae-py.io/owner": "someone"}})
    try:
        manifest = write(tmp_path, "owner: me\ncells:\n  - name: taken\n", "me.yaml")
        result = daemon.cli("apply", "-f", manifest)
        assert result.returncode == 1
        assert f"{manifest}:3: cell taken exists on the node with owner 'someone'" in result.stderr
        deleted = daemon.cli("delete", "-f", manifest)
        assert "kept: owned by someone" in deleted.stdout
        assert "taken" in cell_paths(client)
    finally:
        client.cells.free(cell_name="taken")


def test_python_front_end_gives_the_yaml_plan(daemon: DaemonProcess, client: aurae_sdk.Client) -> None:
    from_yaml = loads(MANIFEST, "shop.yaml")
    from_python = Node(owner="shop", cells=[
        Cell("shop-web", cpu_weight=200, cpu_max=50_000, memory_max=256 * 1024 * 1024,
             labels={"team": "payments"},
             executables=[Executable("app", "sleep 600", uid=1000, gid=1000)],
             cells=[Cell("cache", memory_max="64M")]),
        Cell("shop-batch", executables=[Executable("job", "sleep 601")]),
    ])
    try:
        assert aurae_sdk.plan(client, from_python) == aurae_sdk.plan(client, from_yaml)
        aurae_sdk.apply(client, from_python)
        assert aurae_sdk.plan(client, from_yaml).steps == aurae_sdk.plan(client, from_python).steps
        assert not aurae_sdk.plan(client, from_yaml).changed
    finally:
        aurae_sdk.delete(client, from_python)
    assert cell_paths(client) == set()


def test_update_refuses_what_cannot_change_in_place(daemon: DaemonProcess,
                                                    client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "inplace", "cpu": {"max": 40_000},
                                "labels": {"a": "1"}})
    try:
        with pytest.raises(aurae_sdk.FailedPrecondition) as unset:
            client.cells.update(cell={"name": "inplace", "labels": {"a": "1"}})
        assert unset.value.field == "cell.cpu.max"
        with pytest.raises(aurae_sdk.FailedPrecondition) as isolation:
            client.cells.update(cell={"name": "inplace", "cpu": {"max": 40_000},
                                      "isolate_network": True})
        assert isolation.value.field == "cell.isolate_network"
        with pytest.raises(aurae_sdk.InvalidArgument) as label:
            client.cells.update(cell={"name": "inplace", "cpu": {"max": 40_000},
                                      "labels": {"bad key": "x"}})
        assert label.value.field == "cell.labels"
        assert cgroup(daemon, "cpu", "inplace", "cpu.cfs_quota_us") == "40000"
        updated = client.cells.update(cell={"name": "inplace", "cpu": {"max": 30_000},
                                            "memory": {"max": 128 << 20}, "labels": {"b": "2"}})
        assert dict(updated.cell.labels) == {"b": "2"}
        assert cgroup(daemon, "cpu", "inplace", "cpu.cfs_quota_us") == "30000"
        assert cgroup(daemon, "memory", "inplace", "memory.limit_in_bytes") == str(128 << 20)
        (node,) = [n for n in client.cells.list().cells if n.cell.name == "inplace"]
        assert dict(node.cell.labels) == {"b": "2"} and node.cell.memory.max == 128 << 20
    finally:
        client.cells.free(cell_name="inplace")


def test_a_refused_update_changes_no_cgroup_file(daemon: DaemonProcess,
                                                 client: aurae_sdk.Client) -> None:
    """Update is all or nothing: the kernel refuses the child's quota above its parent's only
    when cpu.cfs_quota_us is written, after cpu.shares and cpu.cfs_period_us; those two are
    put back, and the cell's recorded spec stays as it was."""
    client.cells.allocate(cell={"name": "atomic", "cpu": {"max": 50_000}})
    try:
        client.cells.allocate(cell={"name": "atomic/inner", "cpu": {"weight": 100, "max": 20_000},
                                    "memory": {"max": 64 << 20}})
        files = ("cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us")
        before = {f: cgroup(daemon, "cpu", "atomic/inner", f) for f in files}
        memory_before = cgroup(daemon, "memory", "atomic/inner", "memory.limit_in_bytes")
        with pytest.raises(aurae_sdk.FailedPrecondition) as refused:
            client.cells.update(cell={"name": "atomic/inner",
                                      "cpu": {"weight": 300, "max": 180_000, "period": 200_000},
                                      "memory": {"max": 32 << 20}})
        assert refused.value.field == "cell.cpu.max"
        assert {f: cgroup(daemon, "cpu", "atomic/inner", f) for f in files} == before
        assert before == {"cpu.shares": "1024", "cpu.cfs_period_us": "100000",
                          "cpu.cfs_quota_us": "20000"}
        assert cgroup(daemon, "memory", "atomic/inner", "memory.limit_in_bytes") == memory_before
        (node,) = [n for n in client.cells.list().cells if n.cell.name == "atomic"]
        (inner,) = node.children
        assert inner.cell.cpu.weight == 100 and inner.cell.cpu.max == 20_000
        # The same update within the parent's quota goes through, every file of it.
        client.cells.update(cell={"name": "atomic/inner",
                                  "cpu": {"weight": 300, "max": 40_000, "period": 200_000},
                                  "memory": {"max": 32 << 20}})
        assert {f: cgroup(daemon, "cpu", "atomic/inner", f) for f in files} == {
            "cpu.shares": "3072", "cpu.cfs_period_us": "200000", "cpu.cfs_quota_us": "40000"}
        assert cgroup(daemon, "memory", "atomic/inner", "memory.limit_in_bytes") == str(32 << 20)
    finally:
        client.cells.free(cell_name="atomic")


RESTARTING = """\
owner: rs
cells:
  - name: rs-web
    executables:
      - name: app
        command: sleep 600
        restart:
          policy: on-failure
          delay_ms: 50
          start_limit: {burst: 10, interval_ms: 60000}
"""


def wait_for(check, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_restart_policies_are_declared_diffed_and_replaced(
        daemon: DaemonProcess, client: aurae_sdk.Client, tmp_path: Path) -> None:
    import signal

    manifest = write(tmp_path, RESTARTING, "rs.yaml")
    try:
        applied = daemon.cli("apply", "-f", manifest)
        assert applied.returncode == 0, applied.stderr
        status = aurae_sdk.declared.observe(client)["rs-web"].executables["app"]
        assert status.restart_policy == 1  # EXECUTABLE_RESTART_POLICY_ON_FAILURE
        # The node restarts it when it fails: killed, a new process takes its place.
        first = status.host_pid
        os.kill(first, signal.SIGKILL)
        restarted = wait_for(lambda: (s := aurae_sdk.declared.observe(client)["rs-web"]
                                      .executables["app"]).state == 1
                             and s.host_pid != first and s)
        assert restarted.restart_count == 1
        assert Path(f"/proc/{restarted.host_pid}/cmdline").read_bytes().split(b"\0")[-2] == \
            b"sleep 600"
        assert daemon.cli("diff", "-f", manifest).returncode == 0
        # The Python front end declares the same thing.
        same = Node(owner="rs", cells=[Cell("rs-web", executables=[Executable(
            "app", "sleep 600", restart="on-failure", restart_delay_ms=50,
            start_limit_burst=10, start_limit_interval_ms=60000)])])
        assert not aurae_sdk.plan(client, same).changed

        write(tmp_path, RESTARTING.replace("policy: on-failure", "policy: always")
              .replace("delay_ms: 50", "delay_ms: 200"), "rs.yaml")
        diff = daemon.cli("diff", "-f", manifest)
        assert diff.returncode == 2, diff.stderr
        assert diff.stdout == textwrap.dedent("""\
            ± replace  executable rs-web:app  (a restart policy cannot change in place: no call changes a running executable)
                  restart.policy: 'on-failure' -> 'always'
                  restart.delay_ms: 50 -> 200
            Plan: 0 to create, 0 to update, 1 to replace, 0 to delete, 1 unchanged.
            """)
        assert daemon.cli("apply", "-f", manifest).returncode == 0
        replaced = aurae_sdk.declared.observe(client)["rs-web"].executables["app"]
        assert replaced.restart_policy == 2 and replaced.host_pid != restarted.host_pid
        assert not os.path.exists(f"/proc/{restarted.host_pid}")
        assert daemon.cli("diff", "-f", manifest).returncode == 0

        # A value the node refuses is placed at its line.
        write(tmp_path, RESTARTING.replace("delay_ms: 50", "delay_ms: 0"), "rs.yaml")
        refused = daemon.cli("apply", "-f", manifest)
        assert refused.returncode == 64 + 3, refused.stderr
        assert f"{manifest}:9: replace executable rs-web:app" in refused.stderr
        bad = write(tmp_path, RESTARTING.replace("policy: on-failure", "policy: sometimes"),
                    "bad.yaml")
        result = daemon.cli("diff", "-f", bad)
        assert result.returncode == 1
        assert f"{bad}:8: restart policy of rs-web:app must be one of no, on-failure, always" \
            in result.stderr
    finally:
        if "rs-web" in cell_paths(client):
            client.cells.free(cell_name="rs-web")


HOST_LEVEL = """\
owner: hl
executables:
  - name: hl-agent
    command: sleep 603
  - name: hl-shipper
    command: sleep 604
    restart: on-failure
"""


def host_executables(client: aurae_sdk.Client) -> dict[str, object]:
    return {e.name: e for e in client.cells.list().host_executables}


def test_host_level_executables_are_owned_and_pruned(daemon: DaemonProcess,
                                                      client: aurae_sdk.Client,
                                                      tmp_path: Path) -> None:
    manifest = write(tmp_path, HOST_LEVEL, "hl.yaml")
    # Started by hand, not by the manifest: never pruned.
    client.cells.start(executable={"name": "hl-manual", "command": "sleep 605"})
    try:
        applied = daemon.cli("apply", "-f", manifest)
        assert applied.returncode == 0, applied.stderr
        assert "+ create   executable :hl-agent" in applied.stdout
        running = host_executables(client)
        agent = running["hl-agent"]
        # The node keeps the ownership with the process itself.
        assert agent.labels["aurae-py.io/owner"] == "hl"  # type: ignore[attr-defined]
        assert "aurae-py.io/owner" not in running["hl-manual"].labels  # type: ignore[attr-defined]
        agent_pid = agent.host_pid  # type: ignore[attr-defined]
        assert Path(f"/proc/{agent_pid}/cmdline").read_bytes().split(b"\0")[-2] == b"sleep 603"
        assert daemon.cli("diff", "-f", manifest).returncode == 0

        write(tmp_path, HOST_LEVEL.replace("sleep 603", "sleep 606"), "hl.yaml")
        diff = daemon.cli("diff", "-f", manifest)
        assert diff.returncode == 2
        assert "± replace  executable :hl-agent  (a process cannot change in place)" in diff.stdout
        assert daemon.cli("apply", "-f", manifest).returncode == 0
        assert not os.path.exists(f"/proc/{agent_pid}")

        write(tmp_path, "owner: hl\nexecutables:\n  - name: hl-shipper\n    command: sleep 604\n"
                        "    restart: on-failure\n", "hl.yaml")
        kept = daemon.cli("apply", "-f", manifest)
        assert kept.stdout.strip() == "No changes: the node matches (1 unchanged)."
        agent_pid = host_executables(client)["hl-agent"].host_pid  # type: ignore[attr-defined]
        assert os.path.exists(f"/proc/{agent_pid}")
        pruned = daemon.cli("apply", "-f", manifest, "--prune")
        assert pruned.returncode == 0, pruned.stderr
        assert "- delete   executable :hl-agent  (no longer declared)" in pruned.stdout
        assert "hl-manual" not in pruned.stdout
        assert not os.path.exists(f"/proc/{agent_pid}")
        left = host_executables(client)
        assert left["hl-manual"].state == 1 and left["hl-shipper"].state == 1  # type: ignore[attr-defined]
        assert "hl-agent" not in left or left["hl-agent"].state != 1  # type: ignore[attr-defined]

        # One running under the same name with no aurae-py owner is not taken over.
        foreign = write(tmp_path, "owner: hl\nexecutables:\n  - name: hl-manual\n"
                                  "    command: sleep 605\n", "foreign.yaml")
        refused = daemon.cli("apply", "-f", foreign)
        assert refused.returncode == 1
        assert f"{foreign}:3: executable hl-manual runs at host level with no aurae-py owner" \
            in refused.stderr
        deleted = daemon.cli("delete", "-f", manifest)
        assert deleted.returncode == 0, deleted.stderr
        assert "- delete   executable :hl-shipper" in deleted.stdout
        assert host_executables(client).get("hl-shipper") is None or \
            host_executables(client)["hl-shipper"].state != 1  # type: ignore[attr-defined]
    finally:
        for name, status in host_executables(client).items():
            if name.startswith("hl-") and status.state == 1:  # type: ignore[attr-defined]
                client.cells.stop(executable_name=name, grace_period_ms=0)


def test_host_level_ownership_outlives_the_daemon(tmp_path: Path) -> None:
    """The records live with the process in the spawner, which outlives auraed: the next
    daemon adopts the executable with its labels, so the manifest still knows it is its own."""
    import signal

    from tests.support.daemon import running_daemon

    manifest = write(tmp_path, "owner: keep\nexecutables:\n  - name: kept-agent\n"
                               "    command: sleep 607\n", "keep.yaml")
    with running_daemon() as first:
        assert first.cli("apply", "-f", manifest).returncode == 0
        with first.client() as client:
            pid = host_executables(client)["kept-agent"].host_pid  # type: ignore[attr-defined]
        first.stop(signal.SIGKILL)
        with running_daemon(after=first) as second:
            with second.client() as client:
                adopted = host_executables(client)["kept-agent"]
                assert adopted.host_pid == pid  # type: ignore[attr-defined]
                assert adopted.labels["aurae-py.io/owner"] == "keep"  # type: ignore[attr-defined]
            assert second.cli("diff", "-f", manifest).returncode == 0
            write(tmp_path, "owner: keep\n", "keep.yaml")
            pruned = second.cli("apply", "-f", manifest, "--prune")
            assert pruned.returncode == 0, pruned.stderr
            assert "- delete   executable :kept-agent" in pruned.stdout
            assert not os.path.exists(f"/proc/{pid}")


INSTANCE = """\
owner: ins
instances:
  - name: ins-a
    limits: {memory_max: 256M, pids_max: 200}
    cells:
      - name: web
        memory: {max: 64M}
        executables:
          - name: app
            command: sleep 611
    executables:
      - name: agent
        command: sleep 612
"""


def commands_in(cgroup_dir: Path) -> dict[str, list[int]]:
    """The command lines (`sh -c` ones by their command) of every process in a cgroup tree."""
    found: dict[str, list[int]] = {}
    for procs in cgroup_dir.rglob("cgroup.procs"):
        for pid in procs.read_text().split():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
            except OSError:
                continue
            if argv:
                found.setdefault(argv[-1].decode(errors="replace"), []).append(int(pid))
    return found


def test_instances_and_what_runs_inside_them(daemon: DaemonProcess, client: aurae_sdk.Client,
                                             tmp_path: Path) -> None:
    manifest = write(tmp_path, INSTANCE, "ins.yaml")
    memory = V1 / "memory" / daemon.cgroup_root / "instance-ins-a"
    try:
        applied = daemon.cli("apply", "-f", manifest)
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout.splitlines()[0] == "+ create   instance   ins-a"
        assert "+ create   cell       [ins-a] web" in applied.stdout
        assert "+ create   executable [ins-a] :agent" in applied.stdout
        # The instance's limits and its own cell's, in the kernel.
        assert (memory / "memory.limit_in_bytes").read_text().strip() == str(256 << 20)
        assert (memory / "auraed" / "web" / "memory.limit_in_bytes").read_text().strip() == \
            str(64 << 20)
        (status,) = [i for i in client.instances.list().instances if i.instance.name == "ins-a"]
        assert status.instance.labels["aurae-py.io/owner"] == "ins"
        inside = client.instance("ins-a")
        # Its pids are the instance's pid namespace's: find the process by its cgroup.
        (app_pid,) = commands_in(memory / "auraed" / "web")["sleep 611"]
        assert aurae_sdk.declared.observe(inside)["web"].executables["app"].state == 1
        assert "sleep 612" in commands_in(memory)
        again = daemon.cli("diff", "-f", manifest)
        assert again.returncode == 0, again.stdout
        assert again.stdout.strip() == "No changes: the node matches (4 unchanged)."

        # Inside the instance: an update in place, and a prune.
        write(tmp_path, INSTANCE.replace("max: 64M", "max: 32M").split("    executables:\n"
                                                                       "      - name: agent")[0],
              "ins.yaml")
        diff = daemon.cli("diff", "-f", manifest, "--prune")
        assert diff.returncode == 2
        assert diff.stdout == textwrap.dedent("""\
            ~ update   cell       [ins-a] web
                  memory.max: 64M -> 32M
            - delete   executable [ins-a] :agent  (no longer declared)
            Plan: 0 to create, 1 to update, 0 to replace, 1 to delete, 2 unchanged.
            """)
        assert daemon.cli("apply", "-f", manifest, "--prune").returncode == 0
        assert (memory / "auraed" / "web" / "memory.limit_in_bytes").read_text().strip() == \
            str(32 << 20)
        assert commands_in(memory / "auraed" / "web")["sleep 611"] == [app_pid]  # kept running
        assert "sleep 612" not in commands_in(memory)
        assert all(e.state != 1 for e in inside.cells.list().host_executables)

        # The instance's own limits cannot change in place: a replace, and the plan says so.
        write(tmp_path, INSTANCE.replace("pids_max: 200", "pids_max: 150"), "ins.yaml")
        diff = daemon.cli("diff", "-f", manifest)
        assert diff.returncode == 2
        assert diff.stdout.splitlines()[:3] == [
            ("± replace  instance   ins-a  (an instance's limits cannot change in place: no "
             "call changes a spawned instance)"),
            "      limits.pids_max: 200 -> 150",
            "+ create   cell       [ins-a] web  (instance ins-a is replaced)"]
        assert daemon.cli("apply", "-f", manifest).returncode == 0
        pids = V1 / "pids" / daemon.cgroup_root / "instance-ins-a" / "pids.max"
        assert pids.read_text().strip() == "150"
        assert not os.path.exists(f"/proc/{app_pid}")
        assert daemon.cli("diff", "-f", manifest).returncode == 0

        deleted = daemon.cli("delete", "-f", manifest)
        assert deleted.returncode == 0, deleted.stderr
        assert deleted.stdout.splitlines()[0] == "- delete   instance   ins-a"
        assert not memory.exists()
        assert not [i for i in client.instances.list().instances if i.instance.name == "ins-a"]
    finally:
        if any(i.instance.name == "ins-a" for i in client.instances.list().instances):
            client.instances.free(instance_name="ins-a", timeout=120)


VM_MANIFEST = """\
owner: vmo
vms:
  - id: vmo-1
    memory_mb: 128
    vcpus: 1
    kernel_args: [quiet]
    running: false        # allocated, not booted: a TCG boot takes about a minute here
"""


def test_vms_are_planned_allocated_and_freed_without_booting(
        daemon: DaemonProcess, client: aurae_sdk.Client, tmp_path: Path) -> None:
    """The VM part of a manifest, short of a boot: plan, Allocate (its cell is made), the
    replace a new memory size needs, Free. tests/daemon/test_declared.py's progress test
    shows apply's boot step; tests/vms boot real guests."""
    manifest = write(tmp_path, VM_MANIFEST, "vmo.yaml")
    try:
        diff = daemon.cli("diff", "-f", manifest)
        assert diff.returncode == 2
        assert diff.stdout == textwrap.dedent("""\
            + create   vm         vmo-1  (allocated, not started)
                  memory_mb: (unset) -> 128
                  vcpus: (unset) -> 1
                  running: (unset) -> false
            Plan: 1 to create, 0 to update, 0 to replace, 0 to delete, 0 unchanged.
            """)
        applied = daemon.cli("apply", "-f", manifest)
        assert applied.returncode == 0, applied.stderr
        (machine,) = [m for m in client.vms.list().machines if m.id == "vmo-1"]
        assert (machine.status, machine.mem_size_mb, machine.vcpu_count) == ("Created", 128, 1)
        assert machine.labels["aurae-py.io/owner"] == "vmo"
        assert (V1 / "cpu" / daemon.cgroup_root / "vm-vmo-1").is_dir()  # the VMM's cell
        assert daemon.cli("diff", "-f", manifest).returncode == 0

        write(tmp_path, VM_MANIFEST.replace("memory_mb: 128", "memory_mb: 192")
              .replace("[quiet]", "[quiet, loglevel=3]"), "vmo.yaml")
        diff = daemon.cli("diff", "-f", manifest)
        assert diff.returncode == 2
        assert diff.stdout.splitlines()[:2] == [
            "± replace  vm         vmo-1  (a virtual machine's hardware cannot change in place)",
            "      memory_mb: 128 -> 192"]
        assert daemon.cli("apply", "-f", manifest).returncode == 0
        (machine,) = [m for m in client.vms.list().machines if m.id == "vmo-1"]
        assert machine.mem_size_mb == 192
        assert daemon.cli("diff", "-f", manifest).returncode == 0
        # Only the kernel arguments differ: List does not show them, the recorded digest does.
        write(tmp_path, VM_MANIFEST.replace("memory_mb: 128", "memory_mb: 192"), "vmo.yaml")
        diff = daemon.cli("diff", "-f", manifest)
        assert diff.returncode == 2 and "kernel_args, drives: '(recorded differs)'" in diff.stdout
        # Undeclared, it is pruned (here only planned: delete -f below frees it).
        empty = write(tmp_path, "owner: vmo\n", "vmo-empty.yaml")
        pruning = daemon.cli("diff", "-f", empty, "--prune")
        assert pruning.returncode == 2
        assert "- delete   vm         vmo-1  (no longer declared)" in pruning.stdout

        deleted = daemon.cli("delete", "-f", manifest)
        assert deleted.returncode == 0, deleted.stderr
        assert deleted.stdout.splitlines()[0] == "- delete   vm         vmo-1"
        assert not [m for m in client.vms.list().machines if m.id == "vmo-1"]
        assert not (V1 / "cpu" / daemon.cgroup_root / "vm-vmo-1").exists()
    finally:
        if any(m.id == "vmo-1" for m in client.vms.list().machines):
            client.vms.free(vm_id="vmo-1")


PRUNED_INSTANCE = """\
owner: inp
instances:
  - name: inp-a
    cells:
      - name: web
        executables:
          - {name: app, command: sleep 621}
      - name: batch
        executables:
          - {name: job, command: sleep 622}
        cells:
          - name: part
"""


def test_prune_inside_an_instance_removes_only_what_the_owner_made(
        daemon: DaemonProcess, client: aurae_sdk.Client, tmp_path: Path) -> None:
    manifest = write(tmp_path, PRUNED_INSTANCE, "inp.yaml")
    instance_cgroup = V1 / "memory" / daemon.cgroup_root / "instance-inp-a" / "auraed"
    try:
        applied = daemon.cli("apply", "-f", manifest)
        assert applied.returncode == 0, applied.stderr
        inside = client.instance("inp-a")
        # A cell made by hand inside the instance, with a process of its own: no owner label.
        inside.cells.allocate(cell={"name": "manual"})
        inside.cells.start(cell_name="manual", executable={"name": "mine", "command": "sleep 623"})
        assert cell_paths(inside) == {"web", "batch", "batch/part", "manual"}

        write(tmp_path, PRUNED_INSTANCE.split("      - name: batch\n")[0], "inp.yaml")
        diff = daemon.cli("diff", "-f", manifest, "--prune")
        assert diff.returncode == 2, diff.stdout + diff.stderr
        assert diff.stdout == textwrap.dedent("""\
            - delete   cell       [inp-a] batch  (no longer declared)
            Plan: 0 to create, 0 to update, 0 to replace, 1 to delete, 3 unchanged.
            """)
        without_prune = daemon.cli("diff", "-f", manifest)
        assert without_prune.returncode == 0, without_prune.stdout  # prune is asked for

        pruned = daemon.cli("apply", "-f", manifest, "--prune")
        assert pruned.returncode == 0, pruned.stderr
        assert cell_paths(inside) == {"web", "manual"}
        assert not (instance_cgroup / "batch").exists()
        running = commands_in(instance_cgroup)
        assert "sleep 622" not in running
        assert "sleep 621" in running and "sleep 623" in running  # the hand-made cell runs on
        assert daemon.cli("diff", "-f", manifest, "--prune").returncode == 0
    finally:
        if any(i.instance.name == "inp-a" for i in client.instances.list().instances):
            client.instances.free(instance_name="inp-a", timeout=120)
