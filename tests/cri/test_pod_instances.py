"""A pod sandbox is a spawned instance: its namespaces, its containers' cgroups below the
instance's cell, kubelet's pid namespace modes, and pods listed again after a --live-restore
restart. Against a real daemon, checked through /proc and cgroupfs."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from auraed.cri.generated import api_pb2 as cri
from auraed.cri.generated import api_pb2_grpc as cri_grpc
from tests.cri.test_cri import IMAGE, _verbose, _wait_for, parents_freed, spares
from tests.support.daemon import DaemonProcess, cgroup_dirs, running_daemon

pytestmark = pytest.mark.daemon


@pytest.fixture
def cri_socket() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("auraed needs root")
    where = Path(tempfile.mkdtemp(prefix="aurae-cri-", dir="/tmp"))
    try:
        yield where / "cri.sock"
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _sandbox(name: str, logs: Path, *, pid: int = cri.POD,
             memory: int = 0) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="ns1",
                                        attempt=2),
        hostname=f"{name}-host", log_directory=str(logs),
        labels={"app": name}, annotations={"kept": "as given ✓", "empty": ""},
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent=f"/kubepods/burstable/pod-{name}",
            resources=cri.LinuxContainerResources(memory_limit_in_bytes=memory),
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(pid=pid))))


def _start(runtime: cri_grpc.RuntimeServiceStub, sandbox_id: str, config: cri.PodSandboxConfig,
           name: str, command: list[str], *, pid: int = cri.CONTAINER) -> str:
    container_id: str = runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, sandbox_config=config, config=cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=IMAGE),
            command=command, labels={"container": name}, annotations={"a": name},
            linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
                namespace_options=cri.NamespaceOption(pid=pid))))),
        timeout=60).container_id
    runtime.StartContainer(cri.StartContainerRequest(container_id=container_id), timeout=60)
    return container_id


def _ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _ns_pids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(part) for part in line.split()[1:]]
    raise AssertionError("no NSpid")


def _cgroup_of(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise AssertionError(f"no {controller} line")


def _exec(runtime: cri_grpc.RuntimeServiceStub, container_id: str, *argv: str) -> bytes:
    answer = runtime.ExecSync(cri.ExecSyncRequest(container_id=container_id, cmd=list(argv),
                                                  timeout=60), timeout=120)
    assert answer.exit_code == 0, answer.stderr
    stdout: bytes = answer.stdout
    return stdout


def _import(daemon: DaemonProcess, image: Path) -> None:
    imported = daemon.cli("images", "import", str(image))
    assert imported.returncode == 0, imported.stderr


def test_pod_is_an_instance_with_kubelets_pid_modes(
        busybox_image: tuple[Path, Path], cri_socket: Path, tmp_path: Path) -> None:
    with running_daemon("--cri-socket", str(cri_socket)) as daemon:
        _import(daemon, busybox_image[0])
        host = os.getpid()
        tops = {d.parent.name: d for d in cgroup_dirs(daemon.cgroup_root)}
        with grpc.insecure_channel(f"unix:{cri_socket}") as channel:
            runtime = cri_grpc.RuntimeServiceStub(channel)
            # kubelet's two cases: containers with pid namespaces of their own (its default),
            # and a pod sharing one (shareProcessNamespace).
            seen: dict[int, tuple[str, dict[str, dict[str, Any]], list[int]]] = {}
            for mode in (cri.CONTAINER, cri.POD):
                name = "own" if mode == cri.CONTAINER else "shared"
                config = _sandbox(name, tmp_path, pid=mode, memory=256 << 20)
                sandbox_id = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                                                   timeout=120).pod_sandbox_id
                pod = _verbose(runtime.PodSandboxStatus, cri.PodSandboxStatusRequest(
                    pod_sandbox_id=sandbox_id, verbose=True))
                instance_pid, instance_cell = pod["pid"], pod["cell"]
                assert instance_cell.startswith(f"kubepods/burstable/pod-{name}/instance-pod-")
                # The pod's limits are the instance cell's.
                if "memory" in tops:
                    limit = tops["memory"] / instance_cell / "memory.limit_in_bytes"
                else:
                    limit = (Path("/sys/fs/cgroup") / daemon.cgroup_root / instance_cell
                             / "memory.max")
                assert limit.read_text().strip() == str(256 << 20)
                assert _ns(instance_pid, "pid") != _ns(host, "pid")
                ids = {c: _start(runtime, sandbox_id, config, c, ["sleep", "300"], pid=mode)
                       for c in ("one", "two")}
                infos = {c: _verbose(runtime.ContainerStatus, cri.ContainerStatusRequest(
                    container_id=i, verbose=True)) for c, i in ids.items()}
                for container, info in infos.items():
                    pid = info["pid"]
                    assert pid > 0, info
                    # The pod's network and uts namespaces are the instance's, not the host's.
                    for kind in ("net", "uts"):
                        assert _ns(pid, kind) == _ns(instance_pid, kind) != _ns(host, kind)
                    # A container's processes are apart from the instance's daemon.
                    assert _ns(pid, "pid") not in (_ns(instance_pid, "pid"), _ns(host, "pid"))
                    # NSpid: the host's, the instance's, the pod's or the container's own.
                    assert len(_ns_pids(pid)) == 3
                    # The container's cgroup is below the instance's cell (in its process
                    # leaf, where the daemon puts a cell's processes).
                    cgroup = (f"/{daemon.cgroup_root}/{instance_cell}/auraed/"
                              f"p{sandbox_id[:24]}/c{ids[container][:24]}")
                    assert info["cgroup"] == cgroup.lstrip("/")
                    assert _cgroup_of(pid, "memory" if "memory" in tops else "").removesuffix(
                        "/_procs") == cgroup
                one, two = (infos[c]["pid"] for c in ("one", "two"))
                listing = _exec(runtime, ids["one"], "ps", "-o", "args")
                assert b"auraed" not in listing and b"python" not in listing
                if mode == cri.CONTAINER:
                    assert _ns(one, "pid") != _ns(two, "pid")
                    assert listing.count(b"sleep 300") == 1
                else:
                    assert _ns(one, "pid") == _ns(two, "pid")
                    assert listing.count(b"sleep 300") == 2
                assert _exec(runtime, ids["one"], "hostname") == f"{name}-host\n".encode()
                seen[mode] = (sandbox_id, infos, [instance_pid])
            # Two pods, two instances: nothing shared between them.
            own, shared = seen[cri.CONTAINER], seen[cri.POD]
            assert _ns(own[2][0], "net") != _ns(shared[2][0], "net")

            for sandbox_id, infos, instance_pids in seen.values():
                runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                                         timeout=120)
                # Nothing of the pod is left on the host: its instance, processes, cgroups.
                assert not Path(f"/proc/{instance_pids[0]}").exists()
                assert not any(Path(f"/proc/{i['pid']}").exists() for i in infos.values())
            parents_freed(daemon.cgroup_root)
            # What is left is the spare started for the next pod (tests/cri/test_pod_spares.py).
            assert sorted(p.name for p in (daemon.runtime_dir / "instances").glob("pod-*")
                          ) == spares(daemon)
            assert runtime.ListContainers(cri.ListContainersRequest(),
                                          timeout=30).containers == []


def test_target_pid_mode_is_refused(busybox_image: tuple[Path, Path], cri_socket: Path,
                                    tmp_path: Path) -> None:
    with running_daemon("--cri-socket", str(cri_socket)) as daemon:
        _import(daemon, busybox_image[0])
        with grpc.insecure_channel(f"unix:{cri_socket}") as channel:
            runtime = cri_grpc.RuntimeServiceStub(channel)
            config = _sandbox("target", tmp_path)
            sandbox_id = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                                               timeout=120).pod_sandbox_id
            with pytest.raises(grpc.RpcError) as refused:
                _start(runtime, sandbox_id, config, "t", ["true"], pid=cri.TARGET)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert runtime.ListContainers(cri.ListContainersRequest(),
                                          timeout=30).containers == []
            runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                                     timeout=120)


def _status(runtime: cri_grpc.RuntimeServiceStub, container_id: str) -> Any:
    return runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id),
                                   timeout=30).status


def test_pods_are_listed_after_a_live_restore_restart(
        busybox_image: tuple[Path, Path], cri_socket: Path, tmp_path: Path) -> None:
    config = _sandbox("kept", tmp_path)
    with running_daemon("--cri-socket", str(cri_socket), "--live-restore") as first:
        _import(first, busybox_image[0])
        with grpc.insecure_channel(f"unix:{cri_socket}") as channel:
            runtime = cri_grpc.RuntimeServiceStub(channel)
            sandbox_id = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                                               timeout=120).pod_sandbox_id
            done = _start(runtime, sandbox_id, config, "done", ["true"])
            running = _start(runtime, sandbox_id, config, "running", ["sleep", "300"])
            _wait_for(lambda: _status(runtime, done).state == cri.CONTAINER_EXITED, 60)
            instance_pid = _verbose(runtime.PodSandboxStatus, cri.PodSandboxStatusRequest(
                pod_sandbox_id=sandbox_id, verbose=True))["pid"]
        assert first.stop(signal.SIGTERM) == 0
        records = list((first.workdir / "lib" / "cri" / "pods").iterdir())
        assert [r.name for r in records] == [f"{sandbox_id}.json"]
        with running_daemon("--cri-socket", str(cri_socket), "--live-restore",
                            after=first) as second:
            assert not Path(f"/proc/{instance_pid}").exists()
            with grpc.insecure_channel(f"unix:{cri_socket}") as channel:
                runtime = cri_grpc.RuntimeServiceStub(channel)
                [listed] = runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=30).items
                assert listed.id == sandbox_id and listed.state == cri.SANDBOX_NOTREADY
                assert listed.metadata == config.metadata
                assert dict(listed.labels) == dict(config.labels)
                assert dict(listed.annotations) == dict(config.annotations)
                containers = runtime.ListContainers(cri.ListContainersRequest(),
                                                    timeout=30).containers
                assert {c.id: (c.metadata.name, dict(c.labels), dict(c.annotations), c.state)
                        for c in containers} == {
                    done: ("done", {"container": "done"}, {"a": "done"}, cri.CONTAINER_EXITED),
                    running: ("running", {"container": "running"}, {"a": "running"},
                              cri.CONTAINER_EXITED)}
                finished = _status(runtime, done)
                assert (finished.exit_code, finished.reason) == (0, "Completed")
                lost = _status(runtime, running)
                assert (lost.exit_code, lost.reason) == (255, "Unknown")
                assert lost.started_at > 0 and lost.finished_at >= lost.started_at
                # A restored pod cannot take containers, and goes as kubelet asks.
                with pytest.raises(grpc.RpcError) as refused:
                    _start(runtime, sandbox_id, config, "late", ["true"])
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                for _ in range(2):
                    runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sandbox_id),
                                           timeout=60)
                    runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(
                        pod_sandbox_id=sandbox_id), timeout=60)
                assert runtime.ListPodSandbox(cri.ListPodSandboxRequest(),
                                              timeout=30).items == []
                assert not list((second.workdir / "lib" / "cri" / "pods").iterdir())
                parents_freed(second.cgroup_root)
