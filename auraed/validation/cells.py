"""aurae.cells.v0.CellService requests as validated domain values, and the fields they blame.

Every check a request can fail without looking at the node's state happens
here (INVALID_ARGUMENT naming the field); what is left for the runtime is
what depends on the state (a cell that does not exist, a name in use), and
the runtime's faults come back through the same field tables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from aurae_sdk.wire.generated.pb.cells import cells_pb2 as pb
from auraed.errors import InvalidArgument, Subject
from auraed.kernel.cgroups import CgroupLimits, InvalidLimit
from auraed.kernel.cgroups import validate as validate_limits
from auraed.runtime.executables import check_command, check_identity
from auraed.runtime.names import CellName, parse_executable_name, parse_labels
from auraed.runtime.restarts import NO_RESTART, RestartMode, RestartPolicy
from auraed.runtime.workloads import CellSpec
from auraed.validation import FieldsBySubject, blamed, blaming

MAX_GRACE_MS = 10 * 60 * 1000
MAX_RESTART_DELAY_MS = 60 * 60 * 1000
MAX_START_LIMIT_INTERVAL_MS = 24 * 60 * 60 * 1000
RESTART_MODES = {
    pb.EXECUTABLE_RESTART_POLICY_NO: RestartMode.NO,
    pb.EXECUTABLE_RESTART_POLICY_ON_FAILURE: RestartMode.ON_FAILURE,
    pb.EXECUTABLE_RESTART_POLICY_ALWAYS: RestartMode.ALWAYS,
}
RESTART_POLICIES = {mode: value for value, mode in RESTART_MODES.items()}

# The nine limits a Cell carries, by their cgroup v2 names. Each is the Cell's
# field <controller>.<name> and the CgroupLimits attribute <controller>_<name>;
# this table is the one mapping between the message and the runtime's limits.
CELL_LIMITS = (
    "cpu.weight", "cpu.max", "cpu.period",
    "cpuset.cpus", "cpuset.mems",
    "memory.min", "memory.low", "memory.high", "memory.max",
)


def limit_field(limit: str) -> str:
    """The request field of a limit: "cpu.weight" -> "cell.cpu.weight"."""
    return f"cell.{limit}"


def _attribute(limit: str) -> str:
    return limit.replace(".", "_")


# Which request field each runtime subject came from, per RPC.
ALLOCATE_FIELDS: FieldsBySubject = {
    Subject.CELL: "cell.name", **{limit: limit_field(limit) for limit in CELL_LIMITS}
}
# Update also refuses a change of isolation, blamed on the isolation's own field.
UPDATE_FIELDS: FieldsBySubject = {
    **ALLOCATE_FIELDS,
    "isolate_process": "cell.isolate_process",
    "isolate_network": "cell.isolate_network",
}
FREE_FIELDS: FieldsBySubject = {Subject.CELL: "cell_name"}
START_FIELDS: FieldsBySubject = {
    Subject.CELL: "cell_name",
    Subject.EXECUTABLE: "executable.name",
    Subject.COMMAND: "executable.command",
    Subject.USER: "uid",
    Subject.GROUP: "gid",
    Subject.RESTART_POLICY: "executable.restart_policy",
}
# A container's problems come from its image (its user, working directory) or the command.
CONTAINER_FIELDS: FieldsBySubject = {
    Subject.IMAGE: "executable.image",
    Subject.COMMAND: "executable.command",
    Subject.USER: "executable.image",
    Subject.GROUP: "executable.image",
    Subject.WORKING_DIR: "executable.image",
}
STOP_FIELDS: FieldsBySubject = {Subject.CELL: "cell_name", Subject.EXECUTABLE: "executable_name"}
WAIT_FIELDS: FieldsBySubject = STOP_FIELDS


@dataclass(frozen=True)
class Allocation:
    name: CellName
    spec: CellSpec


@dataclass(frozen=True)
class ExecutableStart:
    cell: CellName | None
    name: str
    command: str  # with an image: its arguments, or "" for the image's own
    description: str
    uid: int | None  # None: the daemon's, or an image's own user
    gid: int | None
    restart: RestartPolicy
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ExecutableRef:
    """An executable by name, in a cell or (cell None) at host level."""

    cell: CellName | None
    name: str


@dataclass(frozen=True)
class ExecutableStop:
    executable: ExecutableRef
    grace: float | None  # seconds; None: the daemon's default


def _optional(message: Message, name: str) -> Any:
    """A proto3 optional field's value, or None when it is not set."""
    return getattr(message, name) if message.HasField(name) else None


def limits_from_cell(cell: pb.Cell) -> CgroupLimits:
    """The Cell's limits, validated (range, syntax, CPUs and nodes of this host)."""
    limits = CgroupLimits(**{
        _attribute(limit): _optional(getattr(cell, limit.split(".")[0]), limit.split(".")[1])
        for limit in CELL_LIMITS
    })
    try:
        validate_limits(limits)
    except InvalidLimit as error:
        raise InvalidArgument(str(error), subject=error.field,
                              field=limit_field(error.field) if error.field else None) from None
    return limits


def set_limits(cell: pb.Cell, limits: CgroupLimits) -> None:
    """Write the limits that are set into the Cell message."""
    for limit in CELL_LIMITS:
        value = getattr(limits, _attribute(limit))
        if value is not None:
            controller, name = limit.split(".")
            setattr(getattr(cell, controller), name, value)


def allocation(request: pb.CellServiceAllocateRequest) -> Allocation:
    with blamed("cell.name"):
        name = CellName.parse(request.cell.name)
    return Allocation(name, cell_spec(request.cell))


def cell_spec(cell: pb.Cell) -> CellSpec:
    """The Cell's limits, isolation and labels, validated."""
    with blamed("cell.labels"):
        labels = parse_labels(dict(cell.labels))
    return CellSpec(
        limits=limits_from_cell(cell),
        isolate_process=cell.isolate_process,
        isolate_network=cell.isolate_network,
        labels=labels,
    )


def update(request: pb.CellServiceUpdateRequest) -> Allocation:
    """The cell to change in place and what it should become."""
    with blamed("cell.name"):
        name = CellName.parse(request.cell.name)
    return Allocation(name, cell_spec(request.cell))


def cell_to_free(request: pb.CellServiceFreeRequest) -> CellName:
    with blamed("cell_name"):
        return CellName.parse(request.cell_name)


def optional_cell(request: pb.CellServiceStartRequest | pb.CellServiceStopRequest
                  | pb.CellServiceWaitRequest) -> CellName | None:
    # Unset and "" both mean host level: proto3 clients that cannot express
    # presence send "".
    if not request.HasField("cell_name") or not request.cell_name:
        return None
    with blamed("cell_name"):
        return CellName.parse(request.cell_name)


def executable_start(request: pb.CellServiceStartRequest) -> ExecutableStart:
    cell = optional_cell(request)
    with blamed("executable.name"):
        name = parse_executable_name(request.executable.name)
    command = request.executable.command
    uid = request.uid if request.HasField("uid") else None
    gid = request.gid if request.HasField("gid") else None
    if not request.executable.HasField("image"):
        # An image's command and users are checked against the image, when it is prepared.
        # The runtime's own checks, here to blame the field before anything is prepared; the
        # service tells start_executable they were made (ExecutableStart.checked).
        with blaming(START_FIELDS):
            check_command(command)
            if uid is not None or gid is not None:  # else the daemon's own: nothing to look up
                check_identity(os.getuid() if uid is None else uid,
                               os.getgid() if gid is None else gid)
    restart = restart_policy(request.executable)
    with blamed("executable.labels"):
        labels = parse_labels(dict(request.executable.labels))
    return ExecutableStart(cell, name, command, request.executable.description, uid, gid, restart,
                           labels)


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


def executable_ref(request: pb.CellServiceStopRequest | pb.CellServiceWaitRequest) -> ExecutableRef:
    cell = optional_cell(request)
    with blamed("executable_name"):
        return ExecutableRef(cell, parse_executable_name(request.executable_name))


def executable_stop(request: pb.CellServiceStopRequest) -> ExecutableStop:
    executable = executable_ref(request)
    grace = None
    if request.HasField("grace_period_ms"):
        if request.grace_period_ms > MAX_GRACE_MS:
            raise InvalidArgument(f"grace period over {MAX_GRACE_MS} ms", field="grace_period_ms")
        grace = request.grace_period_ms / 1000
    return ExecutableStop(executable, grace)
