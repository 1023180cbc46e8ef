"""aurae.cells.v0.CellService on the runtime's Workloads."""

from __future__ import annotations

import grpc

from aurae_sdk.wire.generated.pb.cells import cells_pb2 as pb
from auraed.generated.cells import CellServiceBase
from auraed.runtime.executables import Executable
from auraed.runtime.names import CellName
from auraed.runtime.workloads import CellSpec, Workloads
from auraed.services.cell_pages import list_page
from auraed.validation import blaming
from auraed.validation import cells as valid

# Wait polls the caller's liveness this often, so an abandoned Wait ends.
_WAIT_SLICE = 0.5


def cell_message(name: CellName, spec: CellSpec) -> pb.Cell:
    """The cell as it was allocated."""
    cell = pb.Cell(name=name.path, isolate_process=spec.isolate_process,
                   isolate_network=spec.isolate_network)
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
        cell_oom_kills=executable.cell_oom_kills,
    )
    if executable.exit_status is not None:
        if executable.exit_status.exit_code is not None:
            status.exit_code = executable.exit_status.exit_code
        if executable.exit_status.signal is not None:
            status.signal = executable.exit_status.signal
    return status




class CellService(CellServiceBase):
    def __init__(self, workloads: Workloads) -> None:
        self.workloads = workloads

    def allocate(self, request: pb.CellServiceAllocateRequest,
                 context: grpc.ServicerContext) -> pb.CellServiceAllocateResponse:
        allocation = valid.allocation(request)
        with blaming(valid.ALLOCATE_FIELDS):
            self.workloads.allocate(allocation.name, allocation.spec)
        return pb.CellServiceAllocateResponse(
            cell_name=allocation.name.path, cgroup_v2=self.workloads.backend.version == 2
        )

    def free(self, request: pb.CellServiceFreeRequest,
             context: grpc.ServicerContext) -> pb.CellServiceFreeResponse:
        name = valid.cell_to_free(request)
        with blaming(valid.FREE_FIELDS):
            self.workloads.free(name)
        return pb.CellServiceFreeResponse()

    def start(self, request: pb.CellServiceStartRequest,
              context: grpc.ServicerContext) -> pb.CellServiceStartResponse:
        start = valid.executable_start(request)
        with blaming(valid.START_FIELDS):
            executable = self.workloads.start_executable(
                start.cell, start.name, start.command,
                description=start.description, uid=start.uid, gid=start.gid,
            )
        return pb.CellServiceStartResponse(
            pid=executable.process.ns_pid,
            uid=executable.uid,
            gid=executable.gid,
            host_pid=executable.process.host_pid,
        )

    def stop(self, request: pb.CellServiceStopRequest,
             context: grpc.ServicerContext) -> pb.CellServiceStopResponse:
        stop = valid.executable_stop(request)
        with blaming(valid.STOP_FIELDS):
            executable = self.workloads.stop_executable(
                stop.executable.cell, stop.executable.name, stop.grace)
        return pb.CellServiceStopResponse(status=executable_status(executable))

    def list(self, request: pb.CellServiceListRequest,
             context: grpc.ServicerContext) -> pb.CellServiceListResponse:
        # Paged, so no tree outgrows the message limit (auraed/services/cell_pages.py).
        return list_page(self.workloads.tree(), request, cell_message, executable_status)

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
