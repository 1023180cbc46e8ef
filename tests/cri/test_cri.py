"""The CRI socket against a real daemon, with a client generated from the vendored api.proto:
critest's core flow, OOMKilled, idempotent stop/remove, UNIMPLEMENTED for the rest."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from auraed.cri.generated import api_pb2 as cri
from auraed.cri.generated import api_pb2_grpc as cri_grpc
from auraed.cri.pod_instances import PARENT_LINGER
from tests.support.daemon import DaemonProcess, cgroup_dirs, running_daemon

pytestmark = pytest.mark.daemon

IMAGE = "localhost/aurae/busybox:latest"
CRI_LINE = re.compile(rb"^(\S+) (stdout|stderr) (F|P) (.*)$")


class Cri:
    def __init__(self, daemon: DaemonProcess, socket: Path, channel: grpc.Channel) -> None:
        self.daemon = daemon
        self.socket = socket
        self.runtime = cri_grpc.RuntimeServiceStub(channel)
        self.images = cri_grpc.ImageServiceStub(channel)


@pytest.fixture(scope="module")
def crid(busybox_image: tuple[Path, Path]) -> Iterator[Cri]:
    if os.geteuid() != 0:
        pytest.skip("auraed needs root")
    where = Path(tempfile.mkdtemp(prefix="aurae-cri-", dir="/tmp"))
    socket = where / "cri.sock"
    try:
        with running_daemon("--cri-socket", str(socket)) as daemon:
            imported = daemon.cli("images", "import", str(busybox_image[0]))
            assert imported.returncode == 0, imported.stderr
            with grpc.insecure_channel(f"unix:{socket}") as channel:
                yield Cri(daemon, socket, channel)
        assert not socket.exists()
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _sandbox_config(name: str, log_directory: Path) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="default"),
        hostname=f"{name}-host", log_directory=str(log_directory),
        labels={"app": name, "tier": "test"}, annotations={"note": "kept as given ✓"},
        linux=cri.LinuxPodSandboxConfig(cgroup_parent="/kubepods/besteffort/pod1"),
    )


def _verbose(call: Any, request: Any) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(call(request, timeout=30).info["info"])
    return info


def _container_cgroup(runtime: cri_grpc.RuntimeServiceStub, container_id: str) -> str:
    return str(_verbose(runtime.ContainerStatus, cri.ContainerStatusRequest(
        container_id=container_id, verbose=True))["cgroup"])


def spares(daemon: DaemonProcess) -> list[str]:
    """The spare pod instances: instances at the top of the daemon's cells (pods sit below
    kubepods), by name."""
    return sorted({d.name.removeprefix("instance-") for top in cgroup_dirs(daemon.cgroup_root)
                   for d in top.glob("instance-pod-*")})


def parents_freed(cgroup_root: str) -> None:
    """The cgroup parent `kubepods` is gone from every hierarchy once no pod has used it for
    PARENT_LINGER seconds (it is kept that long for the next pod)."""
    _wait_for(lambda: all(not (d / "kubepods").exists() for d in cgroup_dirs(cgroup_root)),
              PARENT_LINGER + 10)


def _wait_for(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _code(call: Any, request: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        response = call(request, timeout=30)
        if hasattr(response, "__iter__") and not hasattr(response, "ListFields"):
            list(response)
    return raised.value.code()


def test_socket_is_private_and_answers_version(crid: Cri) -> None:
    assert stat.S_IMODE(os.stat(crid.socket).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(crid.socket).st_mode)
    version = crid.runtime.Version(cri.VersionRequest(version="v1"), timeout=10)
    assert (version.runtime_name, version.runtime_api_version) == ("aurae-py", "v1")
    status = crid.runtime.Status(cri.StatusRequest(), timeout=10)
    conditions = {c.type: c.status for c in status.status.conditions}
    assert conditions == {"RuntimeReady": True, "NetworkReady": False}


def test_images_over_the_local_store(crid: Cri) -> None:
    pulled = crid.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=IMAGE)),
                                   timeout=30)
    [listed] = crid.images.ListImages(cri.ListImagesRequest(), timeout=10).images
    assert pulled.image_ref == listed.id and listed.id.startswith("sha256:")
    assert listed.repo_tags == [IMAGE] and listed.size > 1_000_000
    status = crid.images.ImageStatus(cri.ImageStatusRequest(
        image=cri.ImageSpec(image=listed.id)), timeout=10)
    assert status.image.id == listed.id and status.image.uid.value == 0
    absent = crid.images.ImageStatus(cri.ImageStatusRequest(
        image=cri.ImageSpec(image="no/such:image")), timeout=10)
    assert not absent.HasField("image")
    assert _code(crid.images.PullImage, cri.PullImageRequest(
        image=cri.ImageSpec(image="docker.io/library/nginx:latest"))) == grpc.StatusCode.NOT_FOUND
    # Removing an absent image is not an error.
    crid.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image="no/such")),
                            timeout=10)
    usage = crid.images.ImageFsInfo(cri.ImageFsInfoRequest(), timeout=10)
    assert usage.image_filesystems[0].used_bytes.value >= listed.size


def test_core_flow(crid: Cri, tmp_path: Path) -> None:
    runtime = crid.runtime
    logs = tmp_path / "pods" / "default_web_uid"
    config = _sandbox_config("web", logs)
    sandbox_id = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                                       timeout=30).pod_sandbox_id
    status = runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id),
                                      timeout=10).status
    assert status.state == cri.SANDBOX_READY and status.created_at > 0
    assert dict(status.labels) == dict(config.labels)
    assert dict(status.annotations) == dict(config.annotations)
    assert status.metadata == config.metadata
    listed = runtime.ListPodSandbox(cri.ListPodSandboxRequest(filter=cri.PodSandboxFilter(
        label_selector={"app": "web"})), timeout=10).items
    assert [s.id for s in listed] == [sandbox_id]

    pulled = crid.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=IMAGE)),
                                   timeout=30)
    container_config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="main", attempt=0),
        image=cri.ImageSpec(image=pulled.image_ref),
        command=["sh", "-c"], args=[("echo out; echo err >&2; hostname; echo $GREETING; "
                                    "exec sleep 300")],
        envs=[cri.KeyValue(key="GREETING", value="hello from env")],
        labels={"c": "1"}, annotations={"ca": "x"}, log_path="main/0.log",
    )
    container_id = runtime.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=sandbox_id, config=container_config, sandbox_config=config),
        timeout=30).container_id
    created = runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id),
                                      timeout=10).status
    assert created.state == cri.CONTAINER_CREATED and created.started_at == 0
    assert created.image_id == pulled.image_ref
    assert dict(created.labels) == {"c": "1"} and dict(created.annotations) == {"ca": "x"}

    runtime.StartContainer(cri.StartContainerRequest(container_id=container_id), timeout=30)
    running = runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id),
                                      timeout=10).status
    assert running.state == cri.CONTAINER_RUNNING and running.started_at >= created.created_at
    assert [c.id for c in runtime.ListContainers(cri.ListContainersRequest(
        filter=cri.ContainerFilter(state=cri.ContainerStateValue(state=cri.CONTAINER_RUNNING),
                                   pod_sandbox_id=sandbox_id)), timeout=10).containers] == [
        container_id]

    motd = runtime.ExecSync(cri.ExecSyncRequest(container_id=container_id,
                                                cmd=["cat", "/etc/motd"], timeout=30), timeout=60)
    assert (motd.stdout, motd.exit_code) == (b"aurae-py test image\n", 0)
    failing = runtime.ExecSync(cri.ExecSyncRequest(
        container_id=container_id, cmd=["sh", "-c", "echo oops >&2; exit 3"]), timeout=60)
    assert (failing.stderr, failing.exit_code) == (b"oops\n", 3)
    # The exec shares the container's processes: pid 1 of the pod and the container's sleep.
    ps = runtime.ExecSync(cri.ExecSyncRequest(container_id=container_id, cmd=["ps", "-o",
                                                                             "args"]), timeout=60)
    assert b"sleep 300" in ps.stdout
    assert _code(runtime.ExecSync, cri.ExecSyncRequest(
        container_id=container_id, cmd=["sleep", "30"], timeout=1)) == \
        grpc.StatusCode.DEADLINE_EXCEEDED

    stats = runtime.ContainerStats(cri.ContainerStatsRequest(container_id=container_id),
                                   timeout=10).stats
    assert stats.attributes.id == container_id and stats.memory.usage_bytes.value > 0
    assert stats.cpu.usage_core_nano_seconds.value > 0
    listed_stats = runtime.ListContainerStats(cri.ListContainerStatsRequest(
        filter=cri.ContainerStatsFilter(pod_sandbox_id=sandbox_id)), timeout=10).stats
    assert [s.attributes.id for s in listed_stats] == [container_id]

    runtime.UpdateContainerResources(cri.UpdateContainerResourcesRequest(
        container_id=container_id, linux=cri.LinuxContainerResources(
            memory_limit_in_bytes=96 * 1024 * 1024, cpu_quota=50000, cpu_period=100000)),
        timeout=10)
    cell = _container_cgroup(runtime, container_id).removeprefix(
        crid.daemon.cgroup_root + "/")
    assert cell.startswith("kubepods/besteffort/pod1/instance-pod-")
    assert cell.endswith(f"/auraed/p{sandbox_id[:24]}/c{container_id[:24]}")
    tops = {d.parent.name: d for d in cgroup_dirs(crid.daemon.cgroup_root)}
    if "memory" in tops:  # cgroup v1
        assert (tops["memory"] / cell / "memory.limit_in_bytes").read_text().strip() == str(
            96 << 20)
        assert (tops["cpu"] / cell / "cpu.cfs_quota_us").read_text().strip() == "50000"
    else:
        unified = Path("/sys/fs/cgroup") / crid.daemon.cgroup_root / cell
        assert (unified / "memory.max").read_text().strip() == str(96 << 20)
        assert (unified / "cpu.max").read_text().split()[0] == "50000"
    updated = runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id),
                                      timeout=10).status.resources.linux
    assert (updated.memory_limit_in_bytes, updated.cpu_quota) == (96 << 20, 50000)

    log_file = logs / "main" / "0.log"
    _wait_for(lambda: log_file.exists() and len(log_file.read_bytes().splitlines()) >= 4)
    records = [CRI_LINE.match(line) for line in log_file.read_bytes().splitlines()]
    assert all(records)
    entries = {(m.group(2), m.group(4)) for m in records if m}
    assert entries == {(b"stdout", b"out"), (b"stderr", b"err"), (b"stdout", b"web-host"),
                       (b"stdout", b"hello from env")}
    for match in records:
        assert match is not None
        stamp = match.group(1).decode()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", stamp)
        when = datetime.datetime.fromisoformat(stamp[:26] + "+00:00")
        assert abs(when.timestamp() - time.time()) < 300

    for _ in range(2):  # idempotent
        runtime.StopContainer(cri.StopContainerRequest(container_id=container_id, timeout=2),
                              timeout=30)
    stopped = runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id),
                                      timeout=10).status
    assert stopped.state == cri.CONTAINER_EXITED
    assert stopped.exit_code == 128 + 15 and stopped.reason == "Error"
    assert stopped.finished_at >= stopped.started_at > 0
    for _ in range(2):
        runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=container_id), timeout=30)
    assert _code(runtime.ContainerStatus, cri.ContainerStatusRequest(
        container_id=container_id)) == grpc.StatusCode.NOT_FOUND
    assert log_file.exists()  # kubelet's file outlives the container, as kubelet expects

    for _ in range(2):
        runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)
    assert runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id),
                                    timeout=10).status.state == cri.SANDBOX_NOTREADY
    for _ in range(2):
        runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                                 timeout=30)
    assert runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=10).items == []
    parents_freed(crid.daemon.cgroup_root)
    assert list((crid.daemon.runtime_dir / "containers").iterdir()) == []
    # What is left is the spare started for the next pod (tests/cri/test_pod_spares.py).
    assert sorted(p.name for p in (crid.daemon.runtime_dir / "instances").glob("pod-*")
                  ) == spares(crid.daemon)


def test_memory_limit_shows_oom_killed(crid: Cri, tmp_path: Path) -> None:
    runtime = crid.runtime
    config = _sandbox_config("oom", tmp_path)
    sandbox_id = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                                       timeout=30).pod_sandbox_id
    try:
        container_id = runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=sandbox_id, sandbox_config=config, config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name="hog"), image=cri.ImageSpec(image=IMAGE),
                # dd's 256 MiB buffer, filled from /dev/zero, outgrows the 32 MiB limit.
                command=["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"],
                linux=cri.LinuxContainerConfig(resources=cri.LinuxContainerResources(
                    memory_limit_in_bytes=32 * 1024 * 1024)))), timeout=30).container_id
        runtime.StartContainer(cri.StartContainerRequest(container_id=container_id), timeout=30)

        def exited() -> bool:
            return bool(runtime.ContainerStatus(cri.ContainerStatusRequest(
                container_id=container_id), timeout=10).status.state == cri.CONTAINER_EXITED)

        _wait_for(exited, timeout=60)
        status = runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id),
                                         timeout=10).status
        assert (status.reason, status.exit_code) == ("OOMKilled", 137)
        assert status.resources.linux.memory_limit_in_bytes == 32 * 1024 * 1024
    finally:
        runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                                 timeout=60)


def test_bad_requests_and_unimplemented(crid: Cri, tmp_path: Path) -> None:
    runtime = crid.runtime
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert _code(runtime.RunPodSandbox, cri.RunPodSandboxRequest(
        config=cri.PodSandboxConfig())) == invalid
    assert _code(runtime.RunPodSandbox, cri.RunPodSandboxRequest(
        config=_sandbox_config("h", tmp_path), runtime_handler="kata")) == invalid
    assert _code(runtime.CreateContainer, cri.CreateContainerRequest(
        pod_sandbox_id="0" * 64, config=cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="x"), image=cri.ImageSpec(image=IMAGE)))
        ) == grpc.StatusCode.NOT_FOUND
    sandbox_id = runtime.RunPodSandbox(cri.RunPodSandboxRequest(
        config=_sandbox_config("bad", tmp_path)), timeout=30).pod_sandbox_id
    for log_path in ("../../escape.log", "/etc/escape.log"):
        assert _code(runtime.CreateContainer, cri.CreateContainerRequest(
            pod_sandbox_id=sandbox_id, config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name="x"), image=cri.ImageSpec(image=IMAGE),
                log_path=log_path))) == invalid
    runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=30)
    assert _code(runtime.StartContainer, cri.StartContainerRequest(
        container_id="nope")) == grpc.StatusCode.NOT_FOUND
    # Stop and remove of what never existed are not errors.
    runtime.StopContainer(cri.StopContainerRequest(container_id="nope"), timeout=10)
    runtime.RemoveContainer(cri.RemoveContainerRequest(container_id="nope"), timeout=10)
    runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id="nope"), timeout=10)
    runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id="nope"), timeout=10)
    unimplemented = grpc.StatusCode.UNIMPLEMENTED
    for call, request in [
        (runtime.Attach, cri.AttachRequest(container_id="x")),
        (runtime.Exec, cri.ExecRequest(container_id="x")),
        (runtime.PortForward, cri.PortForwardRequest()),
        (runtime.CheckpointContainer, cri.CheckpointContainerRequest()),
        (runtime.StreamPodSandboxes, cri.StreamPodSandboxesRequest()),
        (runtime.GetContainerEvents, cri.GetEventsRequest()),
        (crid.images.StreamImages, cri.StreamImagesRequest()),
    ]:
        assert _code(call, request) == unimplemented, call
    # Still serving after all that.
    assert crid.runtime.Version(cri.VersionRequest(), timeout=10).runtime_name == "aurae-py"
    assert "Traceback" not in crid.daemon.log()


def test_mounts_user_and_read_only_rootfs(crid: Cri, tmp_path: Path) -> None:
    runtime = crid.runtime
    shared = tmp_path / "volume"
    shared.mkdir()
    (shared / "file").write_text("from the host\n")
    config = _sandbox_config("vol", tmp_path / "logs")
    sandbox_id = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                                       timeout=30).pod_sandbox_id
    try:
        container_id = runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=sandbox_id, sandbox_config=config, config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name="reader"), image=cri.ImageSpec(image=IMAGE),
                command=["sleep", "300"], working_dir="/tmp",
                mounts=[cri.Mount(container_path="/mnt/volume", host_path=str(shared),
                                  readonly=True)],
                linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(
                    run_as_user=cri.Int64Value(value=65534), readonly_rootfs=True)))),
            timeout=30).container_id
        runtime.StartContainer(cri.StartContainerRequest(container_id=container_id), timeout=30)

        def run(*argv: str) -> cri.ExecSyncResponse:
            return runtime.ExecSync(cri.ExecSyncRequest(container_id=container_id, cmd=argv),
                                    timeout=60)

        read = run("cat", "/mnt/volume/file")
        assert read.stdout == b"from the host\n", read.stderr
        assert run("id", "-u").stdout == b"65534\n"
        assert run("pwd").stdout == b"/tmp\n"
        assert run("touch", "/mnt/volume/new").exit_code != 0
        assert run("sh", "-c", "echo x > /rootfs-write").exit_code != 0
        assert not (shared / "new").exists()
        status = runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id),
                                         timeout=10).status
        assert status.user.linux.uid == 65534
        assert [(m.container_path, m.readonly) for m in status.mounts] == [("/mnt/volume", True)]
    finally:
        runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                                 timeout=60)


def test_daemon_stop_with_a_running_pod_leaves_nothing(busybox_image: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("auraed needs root")
    socket = Path(tempfile.mkdtemp(prefix="aurae-cri-", dir="/tmp")) / "cri.sock"
    try:
        with running_daemon("--cri-socket", str(socket)) as daemon:
            assert daemon.cli("images", "import", str(busybox_image[1])).returncode == 0
            with grpc.insecure_channel(f"unix:{socket}") as channel:
                runtime = cri_grpc.RuntimeServiceStub(channel)
                config = _sandbox_config("left", tmp_path)
                sandbox_id = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config),
                                                   timeout=30).pod_sandbox_id
                container_id = runtime.CreateContainer(cri.CreateContainerRequest(
                    pod_sandbox_id=sandbox_id, sandbox_config=config, config=cri.ContainerConfig(
                        metadata=cri.ContainerMetadata(name="sleeper"),
                        image=cri.ImageSpec(image=IMAGE), command=["sleep", "300"])),
                    timeout=30).container_id
                runtime.StartContainer(cri.StartContainerRequest(container_id=container_id),
                                       timeout=30)
                pid = _verbose(runtime.ContainerStatus, cri.ContainerStatusRequest(
                    container_id=container_id, verbose=True))["pid"]
                instance_pid = _verbose(runtime.PodSandboxStatus, cri.PodSandboxStatusRequest(
                    pod_sandbox_id=sandbox_id, verbose=True))["pid"]
                assert pid > 0 and instance_pid > 0
            assert daemon.stop() == 0
            assert not Path(f"/proc/{pid}").exists()
            assert not Path(f"/proc/{instance_pid}").exists()
            assert not socket.exists()
            assert not (daemon.runtime_dir / "containers").exists()
        # running_daemon has checked that no cgroup of the daemon is left.
    finally:
        shutil.rmtree(socket.parent, ignore_errors=True)
