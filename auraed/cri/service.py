"""runtime.v1 RuntimeService and ImageService: the CRI messages to and from `Pods` and the
image store. Every RPC this daemon does not implement answers UNIMPLEMENTED."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import grpc

from auraed import __version__
from auraed.cri.generated import api_pb2 as cri
from auraed.cri.generated import api_pb2_grpc as cri_grpc
from auraed.cri.pods import (
    ContainerConfig,
    CriContainer,
    ExecTimedOut,
    Pods,
    Sandbox,
    SandboxConfig,
)
from auraed.errors import InvalidArgument, NotFound, Subject
from auraed.images import Image, ImageStore
from auraed.kernel.cgroups import CgroupLimits
from auraed.runtime.containers import Mount
from auraed.validation import FieldsBySubject, blaming

# Which CRI request field each subject of the image store and containers came from.
CREATE_CONTAINER_FIELDS: FieldsBySubject = {
    Subject.IMAGE: "config.image.image",
    Subject.COMMAND: "config.command",
    Subject.WORKING_DIR: "config.working_dir",
    Subject.USER: "config.linux.security_context.run_as_username",
    Subject.GROUP: "config.linux.security_context.run_as_group",
    Subject.MOUNT: "config.mounts",
}
EXEC_FIELDS: FieldsBySubject = {Subject.COMMAND: "cmd"}

RUNTIME_NAME = "aurae-py"
RUNTIME_API_VERSION = "v1"
_STATES = {"CREATED": cri.CONTAINER_CREATED, "RUNNING": cri.CONTAINER_RUNNING,
           "EXITED": cri.CONTAINER_EXITED}
_STATE_NAMES = {value: name for name, value in _STATES.items()}
# cgroup v1 cpu.shares 2..262144 onto cgroup v2 cpu.weight 1..10000, as kubelet and runc do.
_MIN_SHARES, _MAX_SHARES = 2, 262144


def limits_of(resources: cri.LinuxContainerResources) -> CgroupLimits:
    """The cgroup limits of CRI resources; 0 means unset, as the CRI says."""
    weight = None
    if resources.cpu_shares:
        shares = min(max(resources.cpu_shares, _MIN_SHARES), _MAX_SHARES)
        weight = 1 + ((shares - _MIN_SHARES) * 9999) // (_MAX_SHARES - _MIN_SHARES)
    return CgroupLimits(
        cpu_weight=weight,
        cpu_max=resources.cpu_quota if resources.cpu_quota > 0 else None,
        cpu_period=resources.cpu_period if resources.cpu_period > 0 else None,
        cpuset_cpus=resources.cpuset_cpus or None,
        cpuset_mems=resources.cpuset_mems or None,
        memory_max=resources.memory_limit_in_bytes or None,
    )


def _sandbox_config(config: cri.PodSandboxConfig, runtime_handler: str) -> SandboxConfig:
    options = config.linux.security_context.namespace_options
    return SandboxConfig(
        name=config.metadata.name, uid=config.metadata.uid,
        namespace=config.metadata.namespace, attempt=config.metadata.attempt,
        hostname=config.hostname, log_directory=config.log_directory,
        labels=dict(config.labels), annotations=dict(config.annotations),
        network=options.network, pid=options.pid, ipc=options.ipc,
        cgroup_parent=config.linux.cgroup_parent,
        limits=limits_of(config.linux.resources), runtime_handler=runtime_handler,
    )


def _container_config(config: cri.ContainerConfig) -> ContainerConfig:
    security = config.linux.security_context
    if config.tty or config.stdin:
        raise InvalidArgument("interactive containers (stdin, tty) need Attach, which this "
                              "runtime does not implement", field="config.tty")
    for mount in config.mounts:
        if mount.HasField("image") and mount.image.image:
            raise InvalidArgument("image volume mounts are not supported", field="config.mounts")
        if not os.path.isabs(mount.host_path) or not os.path.isabs(mount.container_path):
            raise InvalidArgument("mount paths must be absolute", field="config.mounts")
    return ContainerConfig(
        name=config.metadata.name, attempt=config.metadata.attempt, image=config.image.image,
        command=list(config.command), args=list(config.args), working_dir=config.working_dir,
        env={kv.key: kv.value for kv in config.envs},
        mounts=[Mount(os.path.realpath(m.host_path), m.container_path, m.readonly)
                for m in config.mounts],
        labels=dict(config.labels), annotations=dict(config.annotations),
        log_path=config.log_path, limits=limits_of(config.linux.resources),
        run_as_user=security.run_as_user.value if security.HasField("run_as_user") else None,
        run_as_group=security.run_as_group.value if security.HasField("run_as_group") else None,
        run_as_username=security.run_as_username,
        read_only_rootfs=security.readonly_rootfs,
        pid=security.namespace_options.pid,
    )


def _metadata(sandbox: Sandbox) -> cri.PodSandboxMetadata:
    config = sandbox.config
    return cri.PodSandboxMetadata(name=config.name, uid=config.uid, namespace=config.namespace,
                                  attempt=config.attempt)


def _sandbox_state(sandbox: Sandbox) -> cri.PodSandboxState.ValueType:
    return cri.SANDBOX_READY if sandbox.ready else cri.SANDBOX_NOTREADY


def _image_spec(container: CriContainer) -> cri.ImageSpec:
    return cri.ImageSpec(image=container.config.image, user_specified_image=container.config.image)


def _container_message(container: CriContainer) -> cri.Container:
    return cri.Container(
        id=container.id, pod_sandbox_id=container.sandbox_id,
        metadata=cri.ContainerMetadata(name=container.config.name,
                                       attempt=container.config.attempt),
        image=_image_spec(container), image_ref=container.image.id, image_id=container.image.id,
        state=_STATES[container.state], created_at=container.created_at,
        labels=dict(container.config.labels), annotations=dict(container.config.annotations),
    )


def _container_status(container: CriContainer) -> cri.ContainerStatus:
    config = container.config
    limits = config.limits
    return cri.ContainerStatus(
        id=container.id,
        metadata=cri.ContainerMetadata(name=config.name, attempt=config.attempt),
        state=_STATES[container.state], created_at=container.created_at,
        started_at=container.started_at, finished_at=container.finished_at,
        exit_code=container.exit_code, image=_image_spec(container),
        image_ref=container.image.id, image_id=container.image.id,
        reason=container.reason, message=container.message,
        labels=dict(config.labels), annotations=dict(config.annotations),
        mounts=[cri.Mount(container_path=m.destination, host_path=m.source, readonly=m.read_only)
                for m in config.mounts],
        log_path=str(container.log_path) if container.log_path else "",
        resources=cri.ContainerResources(linux=cri.LinuxContainerResources(
            memory_limit_in_bytes=limits.memory_max or 0, cpu_quota=limits.cpu_max or 0,
            cpu_period=limits.cpu_period or 0, cpuset_cpus=limits.cpuset_cpus or "",
            cpuset_mems=limits.cpuset_mems or "")),
        user=cri.ContainerUser(linux=cri.LinuxContainerUser(uid=container.spec.uid,
                                                            gid=container.spec.gid)),
    )


def _unimplemented(name: str) -> Callable[..., Any]:
    def method(self: object, request: object, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      f"runtime.v1 {name} is not implemented by {RUNTIME_NAME}")

    method.__name__ = name
    return method


def _answer_unimplemented(servicer: type) -> Callable[[type], type]:
    """Give every RPC of the generated `servicer` that the class does not define a handler
    that answers UNIMPLEMENTED (the generated default raises, which would surface as an
    internal error)."""

    def fill(cls: type) -> type:
        for name, value in vars(servicer).items():
            if callable(value) and not name.startswith("_") and not any(
                    name in vars(ancestor) for ancestor in cls.__mro__[:-1]):
                setattr(cls, name, _unimplemented(name))
        return cls

    return fill


class RuntimeIdentity:
    """Version, Status and RuntimeConfig: the same from every runtime.v1 servicer of ours
    (pods as host cells, or pods as spawned instances)."""

    _ready: Callable[[], bool]

    def Version(self, request: cri.VersionRequest,
                context: grpc.ServicerContext) -> cri.VersionResponse:
        return cri.VersionResponse(version="0.1.0", runtime_name=RUNTIME_NAME,
                                   runtime_version=__version__,
                                   runtime_api_version=RUNTIME_API_VERSION)

    def Status(self, request: cri.StatusRequest,
               context: grpc.ServicerContext) -> cri.StatusResponse:
        conditions = [
            cri.RuntimeCondition(type="RuntimeReady", status=self._ready()),
            # Pods get a network namespace with only loopback: there is no CNI plugin yet.
            cri.RuntimeCondition(type="NetworkReady", status=False,
                                 reason="NetworkPluginNotReady",
                                 message="no CNI: pod network namespaces have loopback only"),
        ]
        return cri.StatusResponse(status=cri.RuntimeStatus(conditions=conditions),
                                  runtime_handlers=[cri.RuntimeHandler(
                                      name="", features=cri.RuntimeHandlerFeatures())])

    def RuntimeConfig(self, request: cri.RuntimeConfigRequest,
                      context: grpc.ServicerContext) -> cri.RuntimeConfigResponse:
        return cri.RuntimeConfigResponse(linux=cri.LinuxRuntimeConfiguration(
            cgroup_driver=cri.CGROUPFS))


@_answer_unimplemented(cri_grpc.RuntimeServiceServicer)
class CriRuntimeService(RuntimeIdentity):
    def __init__(self, pods: Pods, ready: Callable[[], bool]) -> None:
        self.pods = pods
        self._ready = ready

    def RunPodSandbox(self, request: cri.RunPodSandboxRequest,
                      context: grpc.ServicerContext) -> cri.RunPodSandboxResponse:
        sandbox = self.pods.run_sandbox(_sandbox_config(request.config, request.runtime_handler))
        return cri.RunPodSandboxResponse(pod_sandbox_id=sandbox.id)

    def StopPodSandbox(self, request: cri.StopPodSandboxRequest,
                       context: grpc.ServicerContext) -> cri.StopPodSandboxResponse:
        self.pods.stop_sandbox(request.pod_sandbox_id)
        return cri.StopPodSandboxResponse()

    def RemovePodSandbox(self, request: cri.RemovePodSandboxRequest,
                         context: grpc.ServicerContext) -> cri.RemovePodSandboxResponse:
        self.pods.remove_sandbox(request.pod_sandbox_id)
        return cri.RemovePodSandboxResponse()

    def PodSandboxStatus(self, request: cri.PodSandboxStatusRequest,
                         context: grpc.ServicerContext) -> cri.PodSandboxStatusResponse:
        sandbox = self.pods.sandbox(request.pod_sandbox_id)
        config = sandbox.config
        status = cri.PodSandboxStatus(
            id=sandbox.id, metadata=_metadata(sandbox), state=_sandbox_state(sandbox),
            created_at=sandbox.created_at, labels=dict(config.labels),
            annotations=dict(config.annotations), runtime_handler=config.runtime_handler,
            linux=cri.LinuxPodSandboxStatus(namespaces=cri.Namespace(options=cri.NamespaceOption(
                network=cri.NamespaceMode.ValueType(config.network),
                pid=cri.NamespaceMode.ValueType(config.pid),
                ipc=cri.NamespaceMode.ValueType(config.ipc)))),
        )
        info = {}
        if request.verbose:
            info["info"] = (f'{{"cell": "{sandbox.cell.path}", '
                            f'"cgroupParentRequested": "{config.cgroup_parent}"}}')
        return cri.PodSandboxStatusResponse(
            status=status, info=info, timestamp=time.time_ns(),
            containers_statuses=[_container_status(c)
                                 for c in self.pods.list_containers(sandbox_id=sandbox.id)])

    def ListPodSandbox(self, request: cri.ListPodSandboxRequest,
                       context: grpc.ServicerContext) -> cri.ListPodSandboxResponse:
        wanted = request.filter
        ready = None
        if wanted.HasField("state"):
            ready = wanted.state.state == cri.SANDBOX_READY
        return cri.ListPodSandboxResponse(items=[
            cri.PodSandbox(id=s.id, metadata=_metadata(s), state=_sandbox_state(s),
                           created_at=s.created_at, labels=dict(s.config.labels),
                           annotations=dict(s.config.annotations),
                           runtime_handler=s.config.runtime_handler)
            for s in self.pods.sandboxes(sandbox_id=wanted.id, ready=ready,
                                         labels=dict(wanted.label_selector))])

    def CreateContainer(self, request: cri.CreateContainerRequest,
                        context: grpc.ServicerContext) -> cri.CreateContainerResponse:
        with blaming(CREATE_CONTAINER_FIELDS):
            container = self.pods.create_container(request.pod_sandbox_id,
                                                   _container_config(request.config))
        return cri.CreateContainerResponse(container_id=container.id)

    def StartContainer(self, request: cri.StartContainerRequest,
                       context: grpc.ServicerContext) -> cri.StartContainerResponse:
        self.pods.start_container(request.container_id)
        return cri.StartContainerResponse()

    def StopContainer(self, request: cri.StopContainerRequest,
                      context: grpc.ServicerContext) -> cri.StopContainerResponse:
        self.pods.stop_container(request.container_id, timeout=float(request.timeout))
        return cri.StopContainerResponse()

    def RemoveContainer(self, request: cri.RemoveContainerRequest,
                        context: grpc.ServicerContext) -> cri.RemoveContainerResponse:
        self.pods.remove_container(request.container_id)
        return cri.RemoveContainerResponse()

    def ListContainers(self, request: cri.ListContainersRequest,
                       context: grpc.ServicerContext) -> cri.ListContainersResponse:
        wanted = request.filter
        state = _STATE_NAMES.get(wanted.state.state, "UNKNOWN") if wanted.HasField(
            "state") else None
        return cri.ListContainersResponse(containers=[
            _container_message(c) for c in self.pods.list_containers(
                container_id=wanted.id, sandbox_id=wanted.pod_sandbox_id, state=state,
                labels=dict(wanted.label_selector))])

    def ContainerStatus(self, request: cri.ContainerStatusRequest,
                        context: grpc.ServicerContext) -> cri.ContainerStatusResponse:
        container = self.pods.container(request.container_id)
        info = {}
        if request.verbose and container.executable is not None:
            info["info"] = f'{{"pid": {container.executable.process.host_pid}}}'
        return cri.ContainerStatusResponse(status=_container_status(container), info=info)

    def UpdateContainerResources(self, request: cri.UpdateContainerResourcesRequest,
                                 context: grpc.ServicerContext
                                 ) -> cri.UpdateContainerResourcesResponse:
        self.pods.update_resources(request.container_id, limits_of(request.linux))
        return cri.UpdateContainerResourcesResponse()

    def ReopenContainerLog(self, request: cri.ReopenContainerLogRequest,
                           context: grpc.ServicerContext) -> cri.ReopenContainerLogResponse:
        self.pods.reopen_log(request.container_id)
        return cri.ReopenContainerLogResponse()

    def ExecSync(self, request: cri.ExecSyncRequest,
                 context: grpc.ServicerContext) -> cri.ExecSyncResponse:
        if not request.cmd:
            raise InvalidArgument("a command is required", field="cmd")
        timeout = float(request.timeout) if request.timeout > 0 else None
        try:
            with blaming(EXEC_FIELDS):
                stdout, stderr, code = self.pods.exec_sync(request.container_id,
                                                           list(request.cmd), timeout)
        except ExecTimedOut as error:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(error))
        return cri.ExecSyncResponse(stdout=stdout, stderr=stderr, exit_code=code)

    def ContainerStats(self, request: cri.ContainerStatsRequest,
                       context: grpc.ServicerContext) -> cri.ContainerStatsResponse:
        return cri.ContainerStatsResponse(stats=self._stats(
            self.pods.container(request.container_id)))

    def ListContainerStats(self, request: cri.ListContainerStatsRequest,
                           context: grpc.ServicerContext) -> cri.ListContainerStatsResponse:
        wanted = request.filter
        stats = []
        for container in self.pods.list_containers(
                container_id=wanted.id, sandbox_id=wanted.pod_sandbox_id, state="RUNNING",
                labels=dict(wanted.label_selector)):
            try:
                stats.append(self._stats(container))
            except NotFound:
                pass  # removed meanwhile
        return cri.ListContainerStatsResponse(stats=stats)

    def _stats(self, container: CriContainer) -> cri.ContainerStats:
        cpu_usec, memory, layer_bytes, layer_inodes = self.pods.usage(container)
        now = time.time_ns()
        config = container.config
        stats = cri.ContainerStats(
            attributes=cri.ContainerAttributes(
                id=container.id,
                metadata=cri.ContainerMetadata(name=config.name, attempt=config.attempt),
                labels=dict(config.labels), annotations=dict(config.annotations)),
            cpu=cri.CpuUsage(timestamp=now, usage_core_nano_seconds=cri.UInt64Value(
                value=cpu_usec * 1000)),
            writable_layer=cri.FilesystemUsage(
                timestamp=now, fs_id=cri.FilesystemIdentifier(
                    mountpoint=str(container.spec.directory or "")),
                used_bytes=cri.UInt64Value(value=layer_bytes),
                inodes_used=cri.UInt64Value(value=layer_inodes)),
        )
        if memory is not None:
            # The cgroup's whole usage (page cache included): kubelet's working set would
            # subtract inactive file pages, which the backend does not read yet.
            stats.memory.CopyFrom(cri.MemoryUsage(
                timestamp=now, working_set_bytes=cri.UInt64Value(value=memory),
                usage_bytes=cri.UInt64Value(value=memory)))
        return stats


def _image_message(image: Image) -> cri.Image:
    tags = [r for r in image.references if "@" not in r]
    user = image.config.user.partition(":")[0]
    message = cri.Image(id=image.id, repo_tags=tags, repo_digests=list(image.repo_digests),
                        size=image.size, spec=cri.ImageSpec(image=image.id))
    if user.isdigit():
        message.uid.value = int(user)
    else:
        message.username = user
    return message


@_answer_unimplemented(cri_grpc.ImageServiceServicer)
class CriImageService:
    def __init__(self, store: ImageStore) -> None:
        self.store = store

    def ListImages(self, request: cri.ListImagesRequest,
                   context: grpc.ServicerContext) -> cri.ListImagesResponse:
        wanted = request.filter.image.image
        if wanted:
            found = self.store.find(wanted)
            return cri.ListImagesResponse(images=[_image_message(found)] if found else [])
        return cri.ListImagesResponse(images=[_image_message(i) for i in self.store.list()])

    def ImageStatus(self, request: cri.ImageStatusRequest,
                    context: grpc.ServicerContext) -> cri.ImageStatusResponse:
        found = self.store.find(request.image.image)
        if found is None:
            return cri.ImageStatusResponse()  # absent: no image, and no error
        return cri.ImageStatusResponse(image=_image_message(found))

    def PullImage(self, request: cri.PullImageRequest,
                  context: grpc.ServicerContext) -> cri.PullImageResponse:
        name = request.image.image
        found = self.store.find(name)
        if found is None:
            # The pull path's registry client would slot in here (auraed.images.sources).
            raise NotFound(f"image {name!r} is not in the local store and this daemon reaches "
                           "no registry; import it with `aurae-py images import`",
                           field="image.image")
        return cri.PullImageResponse(image_ref=found.id)

    def RemoveImage(self, request: cri.RemoveImageRequest,
                    context: grpc.ServicerContext) -> cri.RemoveImageResponse:
        found = self.store.find(request.image.image)
        if found is not None:
            self.store.remove(found.id)
        return cri.RemoveImageResponse()

    def ImageFsInfo(self, request: cri.ImageFsInfoRequest,
                    context: grpc.ServicerContext) -> cri.ImageFsInfoResponse:
        used = inodes = 0
        for directory, subdirectories, files in os.walk(self.store.root):
            for name in files:
                try:
                    used += os.lstat(os.path.join(directory, name)).st_size
                except OSError:
                    pass
            inodes += len(files) + len(subdirectories)
        usage = cri.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=cri.FilesystemIdentifier(mountpoint=str(self.store.root)),
            used_bytes=cri.UInt64Value(value=used), inodes_used=cri.UInt64Value(value=inodes))
        return cri.ImageFsInfoResponse(image_filesystems=[usage])
