"""runtime.v1 RuntimeService on a daemon whose pods are spawned instances
(auraed.cri.pod_instances): sandbox calls answered here, container calls relayed to the
instance that runs the container. The calls of a pod's start and end hold back the refill of
spares while they run (PodInstances.busy). Every RPC this daemon does not implement answers
UNIMPLEMENTED."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import grpc

from auraed.cri.generated import api_pb2 as cri
from auraed.cri.generated import api_pb2_grpc as cri_grpc
from auraed.cri.pod_instances import Pod, PodInstances, _call
from auraed.cri.service import RuntimeIdentity, _answer_unimplemented
from auraed.errors import InvalidArgument, NotFound


def _state(pod: Pod) -> cri.PodSandboxState.ValueType:
    return cri.SANDBOX_READY if pod.ready else cri.SANDBOX_NOTREADY


def _remaining(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e6 else remaining


@_answer_unimplemented(cri_grpc.RuntimeServiceServicer)
class CriPodInstanceService(RuntimeIdentity):
    def __init__(self, pods: PodInstances, ready: Callable[[], bool]) -> None:
        self.pods = pods
        self._ready = ready

    # ------------------------------------------------------------------ sandboxes

    def RunPodSandbox(self, request: cri.RunPodSandboxRequest,
                      context: grpc.ServicerContext) -> cri.RunPodSandboxResponse:
        with self.pods.busy():
            pod = self.pods.run(request.config, request.runtime_handler)
        return cri.RunPodSandboxResponse(pod_sandbox_id=pod.id)

    def StopPodSandbox(self, request: cri.StopPodSandboxRequest,
                       context: grpc.ServicerContext) -> cri.StopPodSandboxResponse:
        with self.pods.busy():
            self.pods.stop(request.pod_sandbox_id)
        return cri.StopPodSandboxResponse()

    def RemovePodSandbox(self, request: cri.RemovePodSandboxRequest,
                         context: grpc.ServicerContext) -> cri.RemovePodSandboxResponse:
        with self.pods.busy():
            self.pods.remove(request.pod_sandbox_id)
        return cri.RemovePodSandboxResponse()

    def PodSandboxStatus(self, request: cri.PodSandboxStatusRequest,
                         context: grpc.ServicerContext) -> cri.PodSandboxStatusResponse:
        pod = self.pods.sandbox(request.pod_sandbox_id)
        config = pod.config
        options = config.linux.security_context.namespace_options
        status = cri.PodSandboxStatus(
            id=pod.id, metadata=config.metadata, state=_state(pod), created_at=pod.created_at,
            labels=config.labels, annotations=config.annotations,
            runtime_handler=pod.runtime_handler,
            linux=cri.LinuxPodSandboxStatus(namespaces=cri.Namespace(options=options)))
        info = {}
        if request.verbose:
            instance = pod.instance
            info["info"] = json.dumps({
                "instance": pod.instance_name,
                "cell": instance.cell.path if instance else "",
                "pid": instance.host_pid if instance else 0,
                "cgroupParent": pod.parent.path,
            })
        return cri.PodSandboxStatusResponse(status=status, info=info, timestamp=time.time_ns(),
                                            containers_statuses=self.pods.statuses(pod))

    def ListPodSandbox(self, request: cri.ListPodSandboxRequest,
                       context: grpc.ServicerContext) -> cri.ListPodSandboxResponse:
        wanted = request.filter
        ready = wanted.state.state == cri.SANDBOX_READY if wanted.HasField("state") else None
        return cri.ListPodSandboxResponse(items=[
            cri.PodSandbox(id=p.id, metadata=p.config.metadata, state=_state(p),
                           created_at=p.created_at, labels=p.config.labels,
                           annotations=p.config.annotations, runtime_handler=p.runtime_handler)
            for p in self.pods.sandboxes(sandbox_id=wanted.id, ready=ready,
                                         labels=dict(wanted.label_selector))])

    # ------------------------------------------------------------------ containers

    def CreateContainer(self, request: cri.CreateContainerRequest,
                        context: grpc.ServicerContext) -> cri.CreateContainerResponse:
        with self.pods.busy():
            container = self.pods.create_container(request)
        return cri.CreateContainerResponse(container_id=container.id)

    def StartContainer(self, request: cri.StartContainerRequest,
                       context: grpc.ServicerContext) -> cri.StartContainerResponse:
        with self.pods.busy():
            stub, container_id = self.pods.live_container(request.container_id)
            return _call(stub.StartContainer,
                         cri.StartContainerRequest(container_id=container_id))

    def StopContainer(self, request: cri.StopContainerRequest,
                      context: grpc.ServicerContext) -> cri.StopContainerResponse:
        try:
            pod, container = self.pods.container(request.container_id)
        except NotFound:
            return cri.StopContainerResponse()  # removed already: stop is idempotent
        if pod.stub is None:
            return cri.StopContainerResponse()  # its instance is gone: nothing runs
        return _call(pod.stub.StopContainer, cri.StopContainerRequest(
            container_id=container.id, timeout=request.timeout),
            timeout=max(request.timeout, 0) + 60.0)

    def RemoveContainer(self, request: cri.RemoveContainerRequest,
                        context: grpc.ServicerContext) -> cri.RemoveContainerResponse:
        with self.pods.busy():
            self.pods.remove_container(request.container_id)
        return cri.RemoveContainerResponse()

    def ListContainers(self, request: cri.ListContainersRequest,
                       context: grpc.ServicerContext) -> cri.ListContainersResponse:
        wanted = request.filter
        found = []
        for pod in self.pods.sandboxes(sandbox_id=wanted.pod_sandbox_id):
            for container in self.pods.containers(pod):
                if (container.id.startswith(wanted.id)
                        and (not wanted.HasField("state")
                             or container.state == wanted.state.state)
                        and all(container.labels.get(k) == v
                                for k, v in wanted.label_selector.items())):
                    found.append(container)
        found.sort(key=lambda c: c.created_at)
        return cri.ListContainersResponse(containers=found)

    def ContainerStatus(self, request: cri.ContainerStatusRequest,
                        context: grpc.ServicerContext) -> cri.ContainerStatusResponse:
        with self.pods.busy():
            return self.pods.container_status(request.container_id, request.verbose)

    def UpdateContainerResources(self, request: cri.UpdateContainerResourcesRequest,
                                 context: grpc.ServicerContext
                                 ) -> cri.UpdateContainerResourcesResponse:
        stub, container_id = self.pods.live_container(request.container_id)
        relayed = cri.UpdateContainerResourcesRequest()
        relayed.CopyFrom(request)
        relayed.container_id = container_id
        return _call(stub.UpdateContainerResources, relayed)

    def ReopenContainerLog(self, request: cri.ReopenContainerLogRequest,
                           context: grpc.ServicerContext) -> cri.ReopenContainerLogResponse:
        stub, container_id = self.pods.live_container(request.container_id)
        return _call(stub.ReopenContainerLog,
                     cri.ReopenContainerLogRequest(container_id=container_id))

    def ExecSync(self, request: cri.ExecSyncRequest,
                 context: grpc.ServicerContext) -> cri.ExecSyncResponse:
        if not request.cmd:
            raise InvalidArgument("a command is required", field="cmd")
        stub, container_id = self.pods.live_container(request.container_id)
        relayed = cri.ExecSyncRequest()
        relayed.CopyFrom(request)
        relayed.container_id = container_id
        # The instance enforces the command's timeout; this call waits a little longer.
        timeout = request.timeout + 30.0 if request.timeout > 0 else _remaining(context)
        return _call(stub.ExecSync, relayed, timeout=timeout)

    def ContainerStats(self, request: cri.ContainerStatsRequest,
                       context: grpc.ServicerContext) -> cri.ContainerStatsResponse:
        stub, container_id = self.pods.live_container(request.container_id)
        return _call(stub.ContainerStats, cri.ContainerStatsRequest(container_id=container_id))

    def ListContainerStats(self, request: cri.ListContainerStatsRequest,
                           context: grpc.ServicerContext) -> cri.ListContainerStatsResponse:
        wanted = request.filter
        stats: list[cri.ContainerStats] = []
        for pod in self.pods.sandboxes(sandbox_id=wanted.pod_sandbox_id):
            if pod.stub is None:
                continue
            relayed = cri.ListContainerStatsRequest(filter=cri.ContainerStatsFilter(
                id=wanted.id, pod_sandbox_id=pod.id, label_selector=wanted.label_selector))
            try:
                stats.extend(_call(pod.stub.ListContainerStats, relayed).stats)
            except NotFound:
                pass  # stopped meanwhile
        return cri.ListContainerStatsResponse(stats=stats)
