"""Spawned instances against a real auraed: a nested daemon in an isolated cell with the
requested limits, driven through the host by metadata, nested again, and gone without a
trace after Free."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import aurae_sdk
from aurae_sdk.wire.generated.pb.instances.instances_pb2 import InstanceStatus
from auraed.kernel.template import PROCESS_NAME
from tests.support.daemon import DaemonProcess, cgroup_dirs, running_daemon

MEMORY_MAX = 512 << 20
PIDS_MAX = 300


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def cgroup_of(root: str, name: str) -> list[Path]:
    return [top / f"instance-{name}" for top in cgroup_dirs(root)
            if (top / f"instance-{name}").is_dir()]


def mounts(under: Path) -> list[str]:
    """Mounts at or below `under` (other work on the machine may mount elsewhere)."""
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(under))]


@pytest.fixture(scope="module")
def build(daemon: DaemonProcess) -> Iterator[InstanceStatus]:
    with daemon.client(timeout=120) as client:
        spawned = client.instances.spawn(instance={
            "name": "build-1",
            "limits": {"memory_max": MEMORY_MAX, "pids_max": PIDS_MAX, "cpu_weight": 200}})
        yield spawned.status
        try:
            client.instances.free(instance_name="build-1")
        except aurae_sdk.NotFound:
            pass


def test_spawn_gives_an_isolated_cell_with_the_requested_limits(
        daemon: DaemonProcess, build: InstanceStatus) -> None:
    memory = Path(f"/sys/fs/cgroup/memory/{daemon.cgroup_root}/instance-build-1")
    assert int((memory / "memory.limit_in_bytes").read_text()) == MEMORY_MAX
    pids = Path(f"/sys/fs/cgroup/pids/{daemon.cgroup_root}/instance-build-1")
    assert int((pids / "pids.max").read_text()) == PIDS_MAX
    shares = Path(f"/sys/fs/cgroup/cpu/{daemon.cgroup_root}/instance-build-1/cpu.shares")
    assert int(shares.read_text()) == 2048
    # Its daemon runs in that cgroup, in namespaces of its own.
    pid = build.host_pid
    assert f"/{daemon.cgroup_root}/instance-build-1" in Path(f"/proc/{pid}/cgroup").read_text()
    for kind in ("pid", "mnt", "net", "uts", "ipc"):
        assert os.readlink(f"/proc/{pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}"), kind
    # A pid in the host's pid namespace and another in the instance's.
    (nspid,) = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("NSpid:")]
    assert len(nspid.split()) == 3 and nspid.split()[1] == str(pid)
    assert build.spiffe_id == "spiffe://unsafe.aurae.io/auraed/instance/build-1"
    # The socket is in the host's runtime dir, the host's own.
    socket = Path(build.socket)
    assert socket.is_socket() and socket.is_relative_to(daemon.runtime_dir)
    assert socket.stat().st_uid == 0 and socket.stat().st_mode & 0o077 == 0


def test_the_instance_spawner_is_a_fork_of_its_daemon_and_keeps_no_spare(
        daemon: DaemonProcess, build: InstanceStatus) -> None:
    pid = build.host_pid
    children = [int(child) for child in
                Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    # Not a new `python -S -m auraed.kernel.spawner`: a fork of the instance's daemon, itself a
    # fork of the template, itself a fork of the host daemon, so it runs under the host's
    # command line.
    host_command = Path(f"/proc/{daemon.process.pid}/cmdline").read_bytes()
    (spawner,) = [child for child in children
                  if Path(f"/proc/{child}/cmdline").read_bytes() == host_command]
    status = Path(f"/proc/{spawner}/status").read_text().splitlines()
    assert next(int(line.split()[1]) for line in status if line.startswith("PPid:")) == pid
    rollup = {line.split()[0].rstrip(":"): int(line.split()[1])
              for line in Path(f"/proc/{spawner}/smaps_rollup").read_text().splitlines()[1:]}
    # Most of what it maps it shares with the template and the instance's daemon.
    assert rollup["Private_Dirty"] < rollup["Rss"] / 2
    # No spare: the instance's cgroup holds its cell's holder, its daemon and that spawner.
    procs = {int(p) for top in cgroup_of(daemon.cgroup_root, "build-1")
             for f in top.rglob("cgroup.procs") for p in f.read_text().split()}
    names = sorted(Path(f"/proc/{p}/comm").read_text().strip() for p in procs)
    assert "aurae-spare" not in names and spawner in procs and pid in procs
    assert len(procs) == 3, names


def test_the_instance_certificate_is_minted_and_the_host_key_stays_out(
        daemon: DaemonProcess, build: InstanceStatus) -> None:
    from cryptography import x509

    pki = Path(build.socket).parent / "pki"
    certificate = x509.load_pem_x509_certificate((pki / "server.crt").read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [build.spiffe_id]
    host_key = daemon.pki.server_key.read_bytes()
    assert all(path.read_bytes() != host_key for path in pki.iterdir())
    # The instance trusts its own CA, not the host's: the host's clients cannot call it
    # directly, only through the host.
    assert (pki / "ca.crt").read_bytes() != daemon.pki.ca_crt.read_bytes()
    direct = aurae_sdk.Client(daemon.config, socket=build.socket, timeout=5,
                              retry=aurae_sdk.RetryPolicy(attempts=1))
    with direct, pytest.raises(aurae_sdk.Unavailable):
        direct.discovery.discover()


def test_a_cell_and_an_executable_inside_driven_through_the_host(
        daemon: DaemonProcess, client: aurae_sdk.Client, build: InstanceStatus) -> None:
    inside = client.instance("build-1")
    inside.cells.allocate(cell={"name": "web", "memory": {"max": 64 << 20}})
    started = inside.cells.start(cell_name="web", executable={
        "name": "app", "command": "echo from-inside; hostname; cat /proc/self/cgroup; exit 3"})
    lines = [r.item.line for r in inside.observe.get_sub_process_stream(
        process_id=started.pid, channel_type="LOG_CHANNEL_TYPE_STDOUT", timeout=30)]
    assert lines[0] == "from-inside"
    assert lines[1] == "instance-build-1"  # the instance's own uts namespace
    assert any(f"/{daemon.cgroup_root}/instance-build-1/auraed/web" in line for line in lines)
    waited = inside.cells.wait(cell_name="web", executable_name="app")
    assert waited.status.exit_code == 3
    # The cell's limit is in cgroupfs, inside the instance's cgroup.
    limit = Path(f"/sys/fs/cgroup/memory/{daemon.cgroup_root}/instance-build-1/auraed/web/"
                 "memory.limit_in_bytes")
    assert int(limit.read_text()) == 64 << 20
    # The host knows the instance's cell, not the cells inside it.
    host_cells = [c.cell.name for c in client.cells.list().cells]
    assert "web" not in host_cells and "instance-build-1" in host_cells
    assert [c.cell.name for c in inside.cells.list().cells] == ["web"]
    inside.cells.free(cell_name="web")
    assert not limit.parent.exists()


def test_statuses_fields_and_deadlines_pass_through(
        client: aurae_sdk.Client, build: InstanceStatus) -> None:
    inside = client.instance("build-1")
    with pytest.raises(aurae_sdk.NotFound) as missing:
        inside.cells.free(cell_name="nope")
    assert missing.value.field == "cell_name" and "nope" in missing.value.message
    with pytest.raises(aurae_sdk.InvalidArgument):
        inside.cells.allocate(cell={"name": "Bad_Name"})
    inside.cells.start(executable={"name": "sleeper", "command": "sleep 600"})
    try:
        started = time.monotonic()
        with pytest.raises(aurae_sdk.DeadlineExceeded):
            inside.cells.wait(executable_name="sleeper", timeout=1.0)
        assert time.monotonic() - started < 20
    finally:
        inside.cells.stop(executable_name="sleeper", grace_period_ms=0)
    with pytest.raises(aurae_sdk.NotFound) as unknown:
        client.instance("no-such").discovery.discover()
    assert "no-such" in unknown.value.message


def test_a_cancelled_stream_ends_inside_too(
        client: aurae_sdk.Client, build: InstanceStatus) -> None:
    inside = client.instance("build-1")
    started = inside.cells.start(executable={
        "name": "ticker", "command": "while true; do echo tick; sleep 0.1; done"})
    try:
        stream = inside.observe.get_sub_process_stream(process_id=started.pid)
        first = next(iter(stream))
        assert first.item.line == "tick"
        stream.cancel()
        # The stream ends (the relayed one with it) although the ticker goes on.
        leftovers = sum(1 for _ in stream)
        assert leftovers < 1000
        assert inside.discovery.discover().healthy
    finally:
        inside.cells.stop(executable_name="ticker", grace_period_ms=0)


def test_the_async_client_and_the_cli_reach_the_instance(
        daemon: DaemonProcess, build: InstanceStatus) -> None:
    async def discover() -> tuple[bool, str | None]:
        async with aurae_sdk.AsyncClient(daemon.config) as client:
            inside = client.instance("build-1")
            answer = await inside.discovery.discover()
            return answer.healthy, inside.instance_name

    assert asyncio.run(discover()) == (True, "build-1")
    listed = daemon.cli("--instance", "build-1", "-o", "json", "instances", "list")
    if listed.returncode != 0:  # the output flag may belong to the command
        listed = daemon.cli("--instance", "build-1", "instances", "list", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert "build-1" not in listed.stdout  # the instance's own (empty) list
    host = daemon.cli("instances", "list")
    assert host.returncode == 0 and "build-1" in host.stdout
    cells = daemon.cli("--instance", "no-such", "cells", "list")
    assert cells.returncode != 0 and "no-such" in cells.stderr


def test_bad_requests_change_nothing(client: aurae_sdk.Client,
                                     build: InstanceStatus) -> None:
    for name in ("", "Build", "a_b", "-x", "x" * 60, "../up"):
        with pytest.raises(aurae_sdk.InvalidArgument) as refused:
            client.instances.spawn(instance={"name": name})
        assert refused.value.field == "instance.name"
    with pytest.raises(aurae_sdk.AlreadyExists):
        client.instances.spawn(instance={"name": "build-1"})
    with pytest.raises(aurae_sdk.NotFound):
        client.instances.free(instance_name="ghost")
    with pytest.raises(aurae_sdk.InvalidArgument):
        client.instances.spawn(instance={"name": "limits", "limits": {"cpu_weight": 0}})
    assert [i.instance.name for i in client.instances.list().instances] == ["build-1"]


def test_nested_instances_and_free_leaves_nothing(daemon: DaemonProcess,
                                                  client: aurae_sdk.Client) -> None:
    mounts_before = mounts(daemon.workdir)
    outer = client.instances.spawn(instance={"name": "outer"}, timeout=120).status
    inner = client.instance("outer").instances.spawn(instance={"name": "inner"},
                                                     timeout=120).status
    assert inner.spiffe_id == "spiffe://unsafe.aurae.io/auraed/instance/outer/instance/inner"
    deep = client.instance("outer").instance("inner")
    assert deep.discovery.discover().healthy
    deep.cells.allocate(cell={"name": "leaf", "isolate_process": True})
    started = deep.cells.start(cell_name="leaf", executable={"name": "s", "command": "sleep 600"})
    # Metadata paths compose: the CLI's "outer/inner" is the same address.
    listed = daemon.cli("--instance", "outer/inner", "cells", "list")
    assert listed.returncode == 0 and "leaf" in listed.stdout, listed.stderr
    leaf_dirs = [top / "instance-outer" / "auraed" / "instance-inner" / "auraed" / "leaf"
                 for top in cgroup_dirs(daemon.cgroup_root)]
    assert any(d.is_dir() for d in leaf_dirs)
    # (started.host_pid is a pid in outer's namespace: the inner daemon's "host".)
    assert started.host_pid != started.pid and alive(outer.host_pid)

    client.instances.free(instance_name="outer")

    assert not cgroup_of(daemon.cgroup_root, "outer")
    deadline = time.monotonic() + 30
    while alive(outer.host_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(outer.host_pid)
    assert not Path(outer.socket).exists() and not Path(outer.socket).parent.exists()
    assert not (daemon.workdir / "lib" / "instances" / "outer").exists()
    assert mounts(daemon.workdir) == mounts_before == []
    assert "outer" not in [i.instance.name for i in client.instances.list().instances]
    assert "instance-outer" not in [c.cell.name for c in client.cells.list().cells]
    with pytest.raises(aurae_sdk.NotFound):
        client.instance("outer").discovery.discover()


def test_the_host_policy_decides_forwarded_calls(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "deny": [{"name": "no-cell-changes", "principals": ["spiffe://unsafe.aurae.io/other"],
                  "methods": ["/aurae.cells.v0.CellService/Allocate"]}],
        "allow": [{"name": "all", "principals": ["spiffe://unsafe.aurae.io/*"],
                   "methods": ["*"]}]}))
    with running_daemon("--authz-policy", str(policy)) as daemon, \
            daemon.client(timeout=120) as admin:
        admin.instances.spawn(instance={"name": "shared"})
        (paths,) = [c for c in daemon.pki.clients if c.name == "other"]
        other = aurae_sdk.Client(daemon.config, client_crt=str(paths.crt),
                                 client_key=str(paths.key))
        with other:
            inside = other.instance("shared")
            assert inside.cells.list().cells == []
            with pytest.raises(aurae_sdk.PermissionDenied):
                inside.cells.allocate(cell={"name": "x"})
        assert admin.instance("shared").cells.list().cells == []
        pid = admin.instances.list().instances[0].host_pid
    # Stopping the host ended its instances (running_daemon checks no cgroup is left).
    assert not alive(pid)


def test_relayed_streams_of_several_callers_are_not_held_to_one_peer_budget(
        daemon: DaemonProcess, build: InstanceStatus) -> None:
    """Every relayed call reaches the instance as the host: 2 x 12 streams (each caller within
    the host's per-peer budget of 16) all run inside, beyond one peer's budget there."""
    (other_paths,) = [c for c in daemon.pki.clients if c.name == "other"]
    admin = daemon.client()
    other = aurae_sdk.Client(daemon.config, client_crt=str(other_paths.crt),
                             client_key=str(other_paths.key))
    streams = []
    with admin, other:
        started = admin.instance("build-1").cells.start(executable={
            "name": "many", "command": "while true; do echo tick; sleep 0.2; done"})
        try:
            for client in (admin, other):
                for _ in range(12):
                    stream = client.instance("build-1").observe.get_sub_process_stream(
                        process_id=started.pid)
                    streams.append(stream)
                    assert next(iter(stream)).item.line == "tick"
        finally:
            for stream in streams:
                stream.cancel()
            admin.instance("build-1").cells.stop(executable_name="many", grace_period_ms=0)


def test_after_a_host_crash_the_next_start_removes_the_instances(tmp_path: Path) -> None:
    import signal
    import subprocess

    cgroup_root = f"aurae-test-crash-{os.getpid()}"
    with running_daemon(cgroup_root=cgroup_root) as first:
        with first.client(timeout=120) as client:
            status = client.instances.spawn(instance={"name": "orphan"}).status
        template = [int(p) for p in subprocess.run(
            ["pgrep", "-P", str(first.process.pid), "-x", PROCESS_NAME],
            capture_output=True, text=True, check=False).stdout.split()]
        first.stop(signal.SIGKILL)
        assert alive(status.host_pid)  # nothing ended it: its cell outlives the host
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in template) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert template and not any(alive(pid) for pid in template)
        directory = Path(status.socket).parent
        assert directory.exists()
        # The same daemon again, on the same directories and cgroup subtree.
        with open(tmp_path / "second.log", "wb") as log:
            second = subprocess.Popen(first.process.args, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while (alive(status.host_pid) or directory.exists()) and time.monotonic() < deadline:
                assert second.poll() is None, (tmp_path / "second.log").read_text()
                time.sleep(0.05)
            assert not alive(status.host_pid) and not directory.exists()
            assert not cgroup_of(cgroup_root, "orphan")
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(60)


def _ppid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("PPid:"))


def _memory_holds(pid: int, needle: bytes) -> bool:
    """Whether any readable private mapping of `pid` holds `needle`."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if not fields[1].startswith("r") or (len(fields) > 5 and fields[5].startswith("[v")):
                continue
            start, end = (int(address, 16) for address in fields[0].split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except OSError:
                continue
    return False


def test_the_template_is_forked_at_the_daemon_start_and_holds_no_key() -> None:
    """Before any Spawn, the daemon has its template: a fork of itself (no new interpreter),
    made before it read its key, so neither the template nor any instance holds that key."""
    with running_daemon() as fresh, fresh.client(timeout=120) as client:
        host_command = Path(f"/proc/{fresh.process.pid}/cmdline").read_bytes()
        deadline = time.monotonic() + 30
        templates: list[int] = []
        while not templates and time.monotonic() < deadline:
            templates = [child for child in map(int, Path(
                f"/proc/{fresh.process.pid}/task/{fresh.process.pid}/children").read_text().split())
                if Path(f"/proc/{child}/comm").read_text().strip() == PROCESS_NAME]
            time.sleep(0.05)
        (template,) = templates
        assert Path(f"/proc/{template}/cmdline").read_bytes() == host_command
        status = client.instances.spawn(instance={"name": "fresh"}).status
        # The instance's daemon is the template's copy: its child (the subreaper's).
        assert _ppid(status.host_pid) == template
        # The PEM line that holds most of the private scalar (the daemon read it after the fork).
        key_line = fresh.pki.server_key.read_bytes().splitlines()[2]
        assert _memory_holds(fresh.process.pid, key_line)  # the check can see it
        assert not _memory_holds(template, key_line)
        assert not _memory_holds(status.host_pid, key_line)
        client.instances.free(instance_name="fresh")


def test_concurrent_spawns_each_answer_in_their_own_cell_and_free_leaves_nothing(
        daemon: DaemonProcess) -> None:
    count = 6
    errors: list[BaseException] = []
    statuses: dict[int, InstanceStatus] = {}

    def spawn(index: int) -> None:
        try:
            with daemon.client(timeout=120) as own:
                statuses[index] = own.instances.spawn(instance={
                    "name": f"many-{index}",
                    "limits": {"memory_max": (256 + index) << 20, "pids_max": 100 + index}},
                    timeout=120).status
                assert own.instance(f"many-{index}").discovery.discover().healthy
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            errors.append(error)

    threads = [threading.Thread(target=spawn, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    with daemon.client(timeout=120) as client:
        for index, status in statuses.items():
            name = f"many-{index}"
            memory = Path(f"/sys/fs/cgroup/memory/{daemon.cgroup_root}/instance-{name}")
            assert int((memory / "memory.limit_in_bytes").read_text()) == (256 + index) << 20
            pids = Path(f"/sys/fs/cgroup/pids/{daemon.cgroup_root}/instance-{name}")
            assert int((pids / "pids.max").read_text()) == 100 + index
            assert (f"/{daemon.cgroup_root}/instance-{name}"
                    in Path(f"/proc/{status.host_pid}/cgroup").read_text())
        assert len({s.host_pid for s in statuses.values()}) == count

        freeing = [threading.Thread(target=client.instances.free,
                                    kwargs={"instance_name": f"many-{i}"}) for i in range(count)]
        for thread in freeing:
            thread.start()
        for thread in freeing:
            thread.join()
        names = [i.instance.name for i in client.instances.list().instances]
        assert not [name for name in names if name.startswith("many-")]
    for index, status in statuses.items():
        assert not cgroup_of(daemon.cgroup_root, f"many-{index}")
        assert not Path(status.socket).parent.exists()
        deadline = time.monotonic() + 30
        while alive(status.host_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(status.host_pid)
