"""aurae.cells.v0.CellService on the runtime's Workloads."""

from __future__ import annotations

import shlex
import time
from typing import Any

import grpc
from google.protobuf.message import Message

from aurae_sdk.wire.generated.pb.cells import cells_pb2 as pb
from auraed.errors import InvalidArgument, Unimplemented
from auraed.generated.cells import CellServiceBase
from auraed.kernel.cgroups import CgroupLimits
from auraed.runtime.containers import Containers, ContainerSpec
from auraed.runtime.executables import Executable
from auraed.runtime.metrics import CellUsage, cell_usage
from auraed.runtime.names import CellName, parse_executable_name, parse_labels
from auraed.runtime.restarts import NO_RESTART, RestartMode, RestartPolicy
from auraed.runtime.workloads import CellSpec, Workloads
from auraed.services.cell_pages import list_page

# Wait polls the caller's liveness this often, so an abandoned Wait ends.
_WAIT_SLICE = 0.5
MAX_GRACE_MS = 10 * 60 * 1000
MAX_RESTART_DELAY_MS = 60 * 60 * 1000
MAX_START_LIMIT_INTERVAL_MS = 24 * 60 * 60 * 1000
RESTART_MODES = {
    pb.EXECUTABLE_RESTART_POLICY_NO: RestartMode.NO,
    pb.EXECUTABLE_RESTART_POLICY_ON_FAILURE: RestartMode.ON_FAILURE,
    pb.EXECUTABLE_RESTART_POLICY_ALWAYS: RestartMode.ALWAYS,
}
RESTART_POLICIES = {mode: value for value, mode in RESTART_MODES.items()}


def _optional(message: Message, name: str) -> Any:
    """A proto3 optional field's value, or None when it is not set."""
    return getattr(message, name) if message.HasField(name) else None


def limits_from_cell(cell: pb.Cell) -> CgroupLimits:
    return CgroupLimits(
        cpu_weight=_optional(cell.cpu, "weight"),
        cpu_max=_optional(cell.cpu, "max"),
        cpu_period=_optional(cell.cpu, "period"),
        cpuset_cpus=_optional(cell.cpuset, "cpus"),
        cpuset_mems=_optional(cell.cpuset, "mems"),
        memory_min=_optional(cell.memory, "min"),
        memory_low=_optional(cell.memory, "low"),
        memory_high=_optional(cell.memory, "high"),
        memory_max=_optional(cell.memory, "max"),
    )


def spec_from_cell(cell: pb.Cell) -> CellSpec:
    return CellSpec(
        limits=limits_from_cell(cell),
        isolate_process=cell.isolate_process,
        isolate_network=cell.isolate_network,
        labels=parse_labels(dict(cell.labels), field="cell.labels"),
    )


def cell_message(name: CellName, spec: CellSpec) -> pb.Cell:
    """The cell as it was allocated."""
    limits = spec.limits
    cell = pb.Cell(name=name.path, isolate_process=spec.isolate_process,
                   isolate_network=spec.isolate_network, labels=dict(spec.labels))
    for target, field, value in (
        (cell.cpu, "weight", limits.cpu_weight),
        (cell.cpu, "max", limits.cpu_max),
        (cell.cpu, "period", limits.cpu_period),
        (cell.cpuset, "cpus", limits.cpuset_cpus),
        (cell.cpuset, "mems", limits.cpuset_mems),
        (cell.memory, "min", limits.memory_min),
        (cell.memory, "low", limits.memory_low),
        (cell.memory, "high", limits.memory_high),
        (cell.memory, "max", limits.memory_max),
    ):
        if value is not None:
            setattr(target, field, value)
    return cell


def restart_policy(executable: pb.Executable) -> RestartPolicy:
    """The restart policy a Start request asks for, checked field by field."""
    mode = RESTART_MODES.get(executable.restart_policy)
    if mode is None:
        raise InvalidArgument(f"unknown restart policy {executable.restart_policy}",
                              field="executable.restart_policy")
    tuning = [name for name in ("restart_delay_ms", "restart_max_delay_ms", "start_limit")
              if executable.HasField(name)]
    if mode is RestartMode.NO:
        if tuning:
            raise InvalidArgument(f"{tuning[0]} needs a restart policy (on-failure or always)",
                                  field=f"executable.{tuning[0]}")
        return NO_RESTART
    first = NO_RESTART.first_delay
    ceiling = NO_RESTART.max_delay
    if executable.HasField("restart_delay_ms"):
        if not 1 <= executable.restart_delay_ms <= MAX_RESTART_DELAY_MS:
            raise InvalidArgument(f"the restart delay must be 1 to {MAX_RESTART_DELAY_MS} ms",
                                  field="executable.restart_delay_ms")
        first = executable.restart_delay_ms / 1000
        ceiling = max(ceiling, first)
    if executable.HasField("restart_max_delay_ms"):
        if not first * 1000 <= executable.restart_max_delay_ms <= MAX_RESTART_DELAY_MS:
            raise InvalidArgument(
                f"the longest restart delay must be at least the first "
                f"({round(first * 1000)} ms) and at most {MAX_RESTART_DELAY_MS} ms",
                field="executable.restart_max_delay_ms")
        ceiling = executable.restart_max_delay_ms / 1000
    burst, interval = NO_RESTART.burst, NO_RESTART.interval
    if executable.HasField("start_limit"):
        limit = executable.start_limit
        if limit.interval_ms > MAX_START_LIMIT_INTERVAL_MS:
            raise InvalidArgument(f"the start-limit interval is at most "
                                  f"{MAX_START_LIMIT_INTERVAL_MS} ms",
                                  field="executable.start_limit.interval_ms")
        if limit.burst > 10_000:
            raise InvalidArgument("the start-limit burst is at most 10000",
                                  field="executable.start_limit.burst")
        burst = limit.burst
        interval = limit.interval_ms / 1000 if limit.interval_ms else interval
    return RestartPolicy(mode, first_delay=first, max_delay=ceiling, burst=burst,
                         interval=interval)


def executable_status(executable: Executable) -> pb.ExecutableStatus:
    status = pb.ExecutableStatus(
        name=executable.name,
        cell_name=executable.cell.path if executable.cell else "",
        pid=executable.process.ns_pid,
        host_pid=executable.process.host_pid,
        command=executable.command,
        state=pb.EXECUTABLE_STATE_RUNNING if executable.running else pb.EXECUTABLE_STATE_EXITED,
        started_at=executable.started_at,
        exited_at=executable.exited_at,
        oom_killed=executable.oom_killed,
        restart_policy=RESTART_POLICIES[executable.restart.policy.mode],
        restart_count=executable.restart.count,
        next_restart_at=0.0 if executable.restart.ended else executable.restart.next_at,
        start_limit_hit=executable.restart.gave_up,
    )
    if executable.exit_status is not None:
        if executable.exit_status.exit_code is not None:
            status.exit_code = executable.exit_status.exit_code
        if executable.exit_status.signal is not None:
            status.signal = executable.exit_status.signal
    return status


def metrics_message(usage: CellUsage) -> pb.CellMetrics:
    metrics = usage.metrics
    message = pb.CellMetrics(cell_name=usage.name.path, cpu_usage_usec=metrics.cpu_usage_usec,
                             executables_running=usage.executables_running)
    for field in ("cpu_user_usec", "cpu_system_usec", "cpu_periods", "cpu_throttled_periods",
                  "cpu_throttled_usec", "memory_current_bytes", "memory_peak_bytes",
                  "memory_max_bytes", "pids_current", "oom_kills"):
        value = getattr(metrics, field)
        if value is not None:
            setattr(message, field, value)
    return message


def _optional_cell(request: pb.CellServiceStartRequest | pb.CellServiceStopRequest
                   | pb.CellServiceWaitRequest) -> CellName | None:
    # Unset and "" both mean host level: proto3 clients that cannot express
    # presence send "".
    if not request.HasField("cell_name") or not request.cell_name:
        return None
    return CellName.parse(request.cell_name, field="cell_name")


class CellService(CellServiceBase):
    def __init__(self, workloads: Workloads, containers: Containers | None = None) -> None:
        self.workloads = workloads
        self.containers = containers

    def allocate(self, request: pb.CellServiceAllocateRequest,
                 context: grpc.ServicerContext) -> pb.CellServiceAllocateResponse:
        name = CellName.parse(request.cell.name, field="cell.name")
        self.workloads.allocate(name, spec_from_cell(request.cell))
        return pb.CellServiceAllocateResponse(
            cell_name=name.path, cgroup_v2=self.workloads.backend.version == 2
        )

    def update(self, request: pb.CellServiceUpdateRequest,
               context: grpc.ServicerContext) -> pb.CellServiceUpdateResponse:
        name = CellName.parse(request.cell.name, field="cell.name")
        spec = self.workloads.update(name, spec_from_cell(request.cell))
        return pb.CellServiceUpdateResponse(cell=cell_message(name, spec))

    def free(self, request: pb.CellServiceFreeRequest,
             context: grpc.ServicerContext) -> pb.CellServiceFreeResponse:
        self.workloads.free(CellName.parse(request.cell_name, field="cell_name"))
        return pb.CellServiceFreeResponse()

    def start(self, request: pb.CellServiceStartRequest,
              context: grpc.ServicerContext) -> pb.CellServiceStartResponse:
        cell = _optional_cell(request)
        name = parse_executable_name(request.executable.name, field="executable.name")
        uid = request.uid if request.HasField("uid") else None
        gid = request.gid if request.HasField("gid") else None
        restart = restart_policy(request.executable)  # validated before a container is prepared
        container = self._container(request, uid, gid)
        executable = self.workloads.start_executable(
            cell,
            name,
            container.command if container else request.executable.command,
            description=request.executable.description,
            uid=uid,
            gid=gid,
            container=container,
            restart=restart,
        )
        return pb.CellServiceStartResponse(
            pid=executable.process.ns_pid,
            uid=executable.uid,
            gid=executable.gid,
            host_pid=executable.process.host_pid,
        )

    def _container(self, request: pb.CellServiceStartRequest, uid: int | None,
                   gid: int | None) -> ContainerSpec | None:
        """The container to run, when the executable names an image."""
        executable = request.executable
        if not executable.HasField("image"):
            if executable.read_only_rootfs:
                raise InvalidArgument("read_only_rootfs needs an image",
                                      field="executable.read_only_rootfs")
            return None
        if self.containers is None:
            raise Unimplemented("this daemon runs no containers")
        try:
            args = shlex.split(executable.command) if executable.command.strip() else None
        except ValueError as error:
            raise InvalidArgument(f"command: {error}", field="executable.command") from None
        return self.containers.prepare(executable.image, args=args, uid=uid, gid=gid,
                                       read_only=executable.read_only_rootfs)

    def stop(self, request: pb.CellServiceStopRequest,
             context: grpc.ServicerContext) -> pb.CellServiceStopResponse:
        cell = _optional_cell(request)
        name = parse_executable_name(request.executable_name, field="executable_name")
        grace = None
        if request.HasField("grace_period_ms"):
            if request.grace_period_ms > MAX_GRACE_MS:
                raise InvalidArgument(
                    f"grace period over {MAX_GRACE_MS} ms", field="grace_period_ms"
                )
            grace = request.grace_period_ms / 1000
        executable = self.workloads.stop_executable(cell, name, grace)
        return pb.CellServiceStopResponse(status=executable_status(executable))

    def list(self, request: pb.CellServiceListRequest,
             context: grpc.ServicerContext) -> pb.CellServiceListResponse:
        # Paged, so no tree outgrows the message limit (auraed/services/cell_pages.py).
        return list_page(self.workloads.tree(), request, cell_message, executable_status)

    def wait(self, request: pb.CellServiceWaitRequest,
             context: grpc.ServicerContext) -> pb.CellServiceWaitResponse:
        cell = _optional_cell(request)
        name = parse_executable_name(request.executable_name, field="executable_name")
        while context.is_active():
            remaining = context.time_remaining()
            timeout = _WAIT_SLICE if remaining is None else max(0.0, min(_WAIT_SLICE, remaining))
            executable = self.workloads.wait_executable(cell, name, timeout)
            if executable is not None:
                return pb.CellServiceWaitResponse(status=executable_status(executable))
            if remaining is not None and remaining <= _WAIT_SLICE:
                break
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{name} is still running")
        raise AssertionError("unreachable: abort raises")

    def metrics(self, request: pb.CellServiceMetricsRequest,
                context: grpc.ServicerContext) -> pb.CellServiceMetricsResponse:
        cell = CellName.parse(request.cell_name, field="cell_name") if request.cell_name else None
        if cell is None and request.exclude_children:
            raise InvalidArgument("exclude_children needs a cell name", field="exclude_children")
        read_at = time.time()
        usage = cell_usage(self.workloads, cell, recursive=not request.exclude_children)
        return pb.CellServiceMetricsResponse(cells=[metrics_message(u) for u in usage],
                                             timestamp=read_at,
                                             cgroup_v2=self.workloads.backend.version == 2)
