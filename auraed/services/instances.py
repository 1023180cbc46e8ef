"""aurae.instances.v0.InstanceService on the runtime's Instances."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from aurae_sdk.wire.generated.pb.discovery import discovery_pb2
from aurae_sdk.wire.generated.pb.instances import instances_pb2 as pb
from auraed.errors import FailedPrecondition, Unavailable
from auraed.forwarding import InstanceChannels
from auraed.generated.instances import InstanceServiceBase
from auraed.kernel.cgroups import CgroupLimits
from auraed.runtime.instances import Instance, Instances, InstanceSpec, check_instance_name
from auraed.runtime.names import parse_labels
from auraed.validation import blamed

# How long a new instance's daemon gets to answer its first Discover. Generous: a loaded
# machine starts a Python interpreter slowly, and the caller's deadline is the real bound.
READY_TIMEOUT = 60.0
_DISCOVER = "/aurae.discovery.v0.DiscoveryService/Discover"
# Each readiness attempt waits this long for the socket, then checks the daemon still runs.
_ATTEMPT = 0.5
_SOCKET_POLL = 0.003


def _optional(message: Message, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def limits_from_instance(limits: pb.InstanceLimits) -> CgroupLimits:
    return CgroupLimits(
        cpu_weight=_optional(limits, "cpu_weight"),
        cpu_max=_optional(limits, "cpu_max"),
        cpuset_cpus=_optional(limits, "cpuset_cpus"),
        memory_max=_optional(limits, "memory_max"),
        pids_max=_optional(limits, "pids_max"),
    )


def instance_status(instance: Instance) -> pb.InstanceStatus:
    limits = pb.InstanceLimits()
    spec = instance.spec.limits
    for name in ("cpu_weight", "cpu_max", "cpuset_cpus", "memory_max", "pids_max"):
        value = getattr(spec, name)
        if value is not None:
            setattr(limits, name, value)
    return pb.InstanceStatus(
        instance=pb.Instance(name=instance.name, limits=limits,
                             labels=dict(instance.spec.labels)),
        spiffe_id=str(instance.spiffe_id), socket=instance.socket,
        host_pid=instance.host_pid, started_at=instance.started_at)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class InstanceService(InstanceServiceBase):
    def __init__(self, instances: Instances, channels: InstanceChannels) -> None:
        self._instances = instances
        self._channels = channels
        instances.on_ended = lambda instance: channels.close(instance.name)

    def spawn(self, request: pb.InstanceServiceSpawnRequest,
              context: grpc.ServicerContext) -> pb.InstanceServiceSpawnResponse:
        with blamed("instance.labels"):
            labels = parse_labels(dict(request.instance.labels))
        spec = InstanceSpec(check_instance_name(request.instance.name),
                            limits_from_instance(request.instance.limits), labels=labels)
        instance = self._instances.spawn(spec)
        try:
            trust = self._instances.trust
            channel = self._channels.open(
                instance.name, instance.socket, trust.ca_certificate_pem,
                trust.client.certificate_pem(), trust.client.private_key_pem())
            self._await_answer(instance, channel, context)
        except BaseException:
            self._channels.close(instance.name)
            self._instances.free(instance.name)
            raise
        self._instances.mark_answering(instance)
        return pb.InstanceServiceSpawnResponse(status=instance_status(instance))

    def _await_answer(self, instance: Instance, channel: grpc.Channel,
                      context: grpc.ServicerContext) -> None:
        discover = channel.unary_unary(
            _DISCOVER, request_serializer=discovery_pb2.DiscoverRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoverResponse.FromString)
        deadline = time.monotonic() + min(READY_TIMEOUT, context.time_remaining() or READY_TIMEOUT)
        # Connect once the socket is there: a refused connection puts the channel in
        # backoff, which would cost more than this poll.
        while (not os.path.exists(instance.socket) and time.monotonic() < deadline
               and instance.process is not None and instance.process.running):
            time.sleep(_SOCKET_POLL)
        last: grpc.RpcError | None = None
        while time.monotonic() < deadline:
            if instance.process is None or not instance.process.running:
                raise FailedPrecondition(
                    f"the daemon of instance {instance.name} exited before it answered: "
                    f"{_tail(instance.log_path)}")
            if not context.is_active():
                raise Unavailable("the caller went away while the instance started")
            try:
                discover(discovery_pb2.DiscoverRequest(), timeout=_ATTEMPT, wait_for_ready=True)
                return
            except grpc.RpcError as error:
                last = error
        detail = last.details() if last is not None else "no attempt"
        raise Unavailable(f"instance {instance.name} did not answer in time: {detail}")

    def free(self, request: pb.InstanceServiceFreeRequest,
             context: grpc.ServicerContext) -> pb.InstanceServiceFreeResponse:
        name = check_instance_name(request.instance_name, "instance_name")
        self._instances.get(name)
        self._channels.close(name)
        self._instances.free(name)
        return pb.InstanceServiceFreeResponse()

    def list(self, request: pb.InstanceServiceListRequest,
             context: grpc.ServicerContext) -> pb.InstanceServiceListResponse:
        return pb.InstanceServiceListResponse(
            instances=[instance_status(i) for i in self._instances.running()])
