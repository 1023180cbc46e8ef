"""aurae.observe.v0.ObserveService requests as validated domain values, and the fields they blame."""

from __future__ import annotations

from dataclasses import dataclass

from aurae_sdk.wire.generated.pb.observe import observe_pb2 as pb
from auraed.errors import InvalidArgument, Subject, Unimplemented
from auraed.runtime.names import CellName, parse_executable_name
from auraed.validation import FieldsBySubject, blamed

MAX_BATCH_LINES = 10_000
# Lines read from the files per turn when the client takes one line per message.
DEFAULT_BATCH_LINES = 1024

SUB_PROCESS_FIELDS: FieldsBySubject = {
    Subject.PROCESS: "process_id",
    Subject.CELL: "executable.cell_name",
    Subject.EXECUTABLE: "executable.executable_name",
}

_CHANNELS = {
    pb.LOG_CHANNEL_TYPE_STDOUT: ("stdout",),
    pb.LOG_CHANNEL_TYPE_STDERR: ("stderr",),
    pb.LOG_CHANNEL_TYPE_UNSPECIFIED: ("stdout", "stderr"),
}


@dataclass(frozen=True)
class OutputFollow:
    """Which executable's output to follow, which streams, and how it is packed."""

    process_id: int | None  # None: by name
    cell: CellName | None  # the executable's cell (None: host level, or any for a pid)
    executable: str | None  # its name, when selected by name
    channels: tuple[str, ...]
    batch_lines: int  # lines per response at most
    batched: bool  # into `items` (aurae-py) rather than one `item` per response (Aurae v0)
    replay_only: bool = False  # end after what was written before the call


def output_follow(request: pb.GetSubProcessStreamRequest) -> OutputFollow:
    # The whole request is validated before anything is looked up.
    selector = request.executable
    executable = None
    if selector.executable_name:
        with blamed(SUB_PROCESS_FIELDS[Subject.EXECUTABLE]):
            executable = parse_executable_name(selector.executable_name)
    if request.process_id < 0 or (request.process_id == 0 and executable is None):
        raise InvalidArgument("a process id (or an executable name) is required",
                              field="process_id")
    cell = None
    if selector.HasField("cell_name") and selector.cell_name:
        with blamed(SUB_PROCESS_FIELDS[Subject.CELL]):
            cell = CellName.parse(selector.cell_name)
    if request.max_batch_lines > MAX_BATCH_LINES:
        raise InvalidArgument(f"at most {MAX_BATCH_LINES} lines per batch",
                              field="max_batch_lines")
    channels = _CHANNELS.get(request.channel_type)
    if channels is None:
        raise InvalidArgument(f"unknown channel type {request.channel_type}",
                              field="channel_type")
    return OutputFollow(request.process_id or None, cell, executable, channels,
                        request.max_batch_lines or DEFAULT_BATCH_LINES,
                        request.max_batch_lines > 0, request.replay_only)


def workload_filter(workload: pb.Workload) -> CellName | None:
    """The cell a signals or events request's workload names; None for no filter."""
    if workload.workload_type == pb.WORKLOAD_TYPE_CELL:
        with blamed("workload.id"):
            return CellName.parse(workload.id)
    if workload.workload_type in (pb.WORKLOAD_TYPE_POD_SANDBOX, pb.WORKLOAD_TYPE_VM):
        raise Unimplemented("this daemon runs no pod sandboxes or virtual machines yet",
                            field="workload.workload_type")
    if workload.workload_type != pb.WORKLOAD_TYPE_UNSPECIFIED:
        raise InvalidArgument(f"unknown workload type {workload.workload_type}",
                              field="workload.workload_type")
    if workload.id:
        raise InvalidArgument("an id needs a workload type", field="workload.workload_type")
    return None
