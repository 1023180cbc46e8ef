"""aurae.cells.v0.CellService on the runtime's Workloads."""

from __future__ import annotations

import shlex
import time

import grpc

from aurae_sdk.wire.generated.pb.cells import cells_pb2 as pb
from auraed.errors import InvalidArgument, Unimplemented
from auraed.generated.cells import CellServiceBase
from auraed.runtime.containers import Containers, ContainerSpec
from auraed.runtime.deferred import after_answer
from auraed.runtime.executables import Executable
from auraed.runtime.metrics import CellUsage, cell_usage
from auraed.runtime.names import CellName
from auraed.runtime.workloads import CellSpec, Workloads
from auraed.services.cell_pages import ListingCache, WholeListing, list_page
from auraed.validation import blamed, blaming
from auraed.validation import cells as valid

# Wait polls the caller's liveness this often, so an abandoned Wait ends.
_WAIT_SLICE = 0.5


def _hold_until_answered(workloads: Workloads) -> None:
    """Make no spare scope (SpareScopes.hold) until this call's answer is sent (released by
    auraed.runtime.deferred, as the event journal's writer is woken)."""
    after_answer(workloads.spare_scopes.hold())


def cell_message(name: CellName, spec: CellSpec) -> pb.Cell:
    """The cell as it was allocated."""
    cell = pb.Cell(name=name.path, isolate_process=spec.isolate_process,
                   isolate_network=spec.isolate_network, labels=dict(spec.labels))
    valid.set_limits(cell, spec.limits)
    return cell


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
        restart_policy=valid.RESTART_POLICIES[executable.restart.policy.mode],
        cell_oom_kills=executable.cell_oom_kills,
        restart_count=executable.restart.count,
        next_restart_at=0.0 if executable.restart.ended else executable.restart.next_at,
        start_limit_hit=executable.restart.gave_up,
        labels=dict(executable.labels),
    )
    if executable.exit_status is not None:
        if executable.exit_status.exit_code is not None:
            status.exit_code = executable.exit_status.exit_code
        if executable.exit_status.signal is not None:
            status.signal = executable.exit_status.signal
    return status


def status_version(executable: Executable) -> object:
    """Everything executable_status shows that can change after the start: its cached bytes
    in List are current while this stays equal."""
    restart = executable.restart
    return (executable.running, executable.exit_status, executable.exited_at,
            executable.oom_killed, executable.cell_oom_kills, restart.count, restart.ended,
            restart.next_at, restart.gave_up)


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


class CellService(CellServiceBase):
    def __init__(self, workloads: Workloads, containers: Containers | None = None) -> None:
        self.workloads = workloads
        self.containers = containers
        self._listing = ListingCache(cell_message, executable_status, status_version)
        self._whole = WholeListing(self._listing)
        self._last_page: tuple[object, pb.CellServiceListResponse] | None = None

    def allocate(self, request: pb.CellServiceAllocateRequest,
                 context: grpc.ServicerContext) -> pb.CellServiceAllocateResponse:
        allocation = valid.allocation(request)
        with blaming(valid.ALLOCATE_FIELDS):
            self.workloads.allocate(allocation.name, allocation.spec)
        return pb.CellServiceAllocateResponse(
            cell_name=allocation.name.path, cgroup_v2=self.workloads.backend.version == 2
        )

    def update(self, request: pb.CellServiceUpdateRequest,
               context: grpc.ServicerContext) -> pb.CellServiceUpdateResponse:
        change = valid.update(request)
        with blaming(valid.UPDATE_FIELDS):
            spec = self.workloads.update(change.name, change.spec)
        return pb.CellServiceUpdateResponse(cell=cell_message(change.name, spec))

    def free(self, request: pb.CellServiceFreeRequest,
             context: grpc.ServicerContext) -> pb.CellServiceFreeResponse:
        name = valid.cell_to_free(request)
        with blaming(valid.FREE_FIELDS):
            self.workloads.free(name)
        return pb.CellServiceFreeResponse()

    def start(self, request: pb.CellServiceStartRequest,
              context: grpc.ServicerContext) -> pb.CellServiceStartResponse:
        _hold_until_answered(self.workloads)
        start = valid.executable_start(request)
        # validated before a container is prepared
        container = self._container(request, start.uid, start.gid)
        with blaming(valid.START_FIELDS):
            executable = self.workloads.start_executable(
                start.cell,
                start.name,
                container.command if container else start.command,
                description=start.description,
                uid=start.uid,
                gid=start.gid,
                container=container,
                restart=start.restart,
                labels=start.labels,
                checked=True,  # by valid.executable_start
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
        with blaming(valid.CONTAINER_FIELDS):
            return self.containers.prepare(executable.image, args=args, uid=uid, gid=gid,
                                           read_only=executable.read_only_rootfs)

    def stop(self, request: pb.CellServiceStopRequest,
             context: grpc.ServicerContext) -> pb.CellServiceStopResponse:
        stop = valid.executable_stop(request)
        with blaming(valid.STOP_FIELDS):
            executable = self.workloads.stop_executable(
                stop.executable.cell, stop.executable.name, stop.grace)
        return pb.CellServiceStopResponse(status=executable_status(executable))

    def list(self, request: pb.CellServiceListRequest,
             context: grpc.ServicerContext) -> pb.CellServiceListResponse:
        # Paged, so no tree outgrows the message limit (auraed/services/cell_pages.py). The
        # last page given is kept while nothing it shows changes: a List of a thousand cells
        # that changed in no way is then no walk over them.
        key = (self.workloads.version, request.page_size, request.page_token)
        kept = self._last_page
        if kept is not None and kept[0] == key:
            return kept[1]
        # The first page, when it holds every cell, is kept per top-level cell: after a
        # change only what changed is put together again (WholeListing).
        whole = None if request.page_token else self._whole.page(self.workloads,
                                                                  request.page_size)
        if whole is not None:
            page = pb.CellServiceListResponse.FromString(whole)
        else:
            page = list_page(self.workloads.tree(), self.workloads.host_executables(), request,
                             self._listing)
        if (self.workloads.version, request.page_size, request.page_token) == key:
            self._last_page = (key, page)  # nothing changed while it was put together
        return page

    def wait(self, request: pb.CellServiceWaitRequest,
             context: grpc.ServicerContext) -> pb.CellServiceWaitResponse:
        ref = valid.executable_ref(request)
        while context.is_active():
            remaining = context.time_remaining()
            timeout = _WAIT_SLICE if remaining is None else max(0.0, min(_WAIT_SLICE, remaining))
            with blaming(valid.WAIT_FIELDS):
                executable = self.workloads.wait_executable(ref.cell, ref.name, timeout)
            if executable is not None:
                return pb.CellServiceWaitResponse(status=executable_status(executable))
            if remaining is not None and remaining <= _WAIT_SLICE:
                break
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{ref.name} is still running")
        raise AssertionError("unreachable: abort raises")

    def metrics(self, request: pb.CellServiceMetricsRequest,
                context: grpc.ServicerContext) -> pb.CellServiceMetricsResponse:
        cell = None
        if request.cell_name:
            with blamed("cell_name"):
                cell = CellName.parse(request.cell_name)
        if cell is None and request.exclude_children:
            raise InvalidArgument("exclude_children needs a cell name", field="exclude_children")
        read_at = time.time()
        with blaming(valid.FREE_FIELDS):  # the request's cell is its cell_name, as in Free
            usage = cell_usage(self.workloads, cell, recursive=not request.exclude_children)
        return pb.CellServiceMetricsResponse(cells=[metrics_message(u) for u in usage],
                                             timestamp=read_at,
                                             cgroup_v2=self.workloads.backend.version == 2)
