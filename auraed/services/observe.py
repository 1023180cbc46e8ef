"""aurae.observe.v0.ObserveService: the daemon's log, workload output, signals."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from aurae_sdk.wire.generated.pb.observe import observe_pb2 as pb
from auraed.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from auraed.generated.observe import ObserveServiceBase
from auraed.output import Line, LogRing, follow_all
from auraed.runtime.executables import Executable
from auraed.runtime.names import CellName
from auraed.runtime.workloads import Workloads

DAEMON_CHANNEL = "auraed"
MAX_BATCH_LINES = 10_000
# Lines read from the files per turn when the client takes one line per message.
LINES_PER_READ = 1024


def _item(channel: str, line: Line) -> pb.LogItem:
    timestamp, text = line
    # LogItem.line is a proto string: it must be valid UTF-8.
    return pb.LogItem(channel=channel, line=text.decode("utf-8", "replace"), timestamp=int(timestamp))


class ObserveService(ObserveServiceBase):
    def __init__(self, workloads: Workloads, daemon_log: LogRing) -> None:
        self.workloads = workloads
        self.daemon_log = daemon_log

    def get_aurae_daemon_log_stream(
        self, request: pb.GetAuraeDaemonLogStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetAuraeDaemonLogStreamResponse]:
        for timestamp, line in self.daemon_log.follow(lambda: not context.is_active()):
            yield pb.GetAuraeDaemonLogStreamResponse(
                item=pb.LogItem(channel=DAEMON_CHANNEL, line=line, timestamp=int(timestamp))
            )

    def get_sub_process_stream(
        self, request: pb.GetSubProcessStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetSubProcessStreamResponse]:
        # Validate the whole request before looking anything up.
        if request.process_id <= 0:
            raise InvalidArgument("a process id is required", field="process_id")
        if request.max_batch_lines > MAX_BATCH_LINES:
            raise InvalidArgument(f"at most {MAX_BATCH_LINES} lines per batch",
                                  field="max_batch_lines")
        channels = {
            pb.LOG_CHANNEL_TYPE_STDOUT: ["stdout"],
            pb.LOG_CHANNEL_TYPE_STDERR: ["stderr"],
            pb.LOG_CHANNEL_TYPE_UNSPECIFIED: ["stdout", "stderr"],
        }.get(request.channel_type)
        if channels is None:
            raise InvalidArgument(f"unknown channel type {request.channel_type}",
                                  field="channel_type")
        executable = self._executable(request.process_id)
        names = [executable.channel_name(c) for c in channels]
        logs = [getattr(executable, c) for c in channels]
        batch = request.max_batch_lines
        # Read on this thread as the client takes messages, never ahead of it: a client that
        # stalls holds one batch here, and the rest of the output waits in the files.
        for index, lines in follow_all(logs, lambda: not context.is_active(),
                                       batch or LINES_PER_READ):
            if batch:
                yield pb.GetSubProcessStreamResponse(items=[_item(names[index], line)
                                                            for line in lines])
            else:
                for line in lines:
                    yield pb.GetSubProcessStreamResponse(item=_item(names[index], line))

    def _executable(self, pid: int) -> Executable:
        found = self.workloads.executables_with_pid(pid)
        if not found:
            raise NotFound(f"no executable with process id {pid}", field="process_id")
        if len(found) > 1:
            names = ", ".join(sorted(str(e.key) for e in found))
            raise FailedPrecondition(
                f"process id {pid} names several executables in isolated cells ({names}); "
                "use the host pid Start reported",
                field="process_id",
            )
        return found[0]

    def get_posix_signals_stream(
        self, request: pb.GetPosixSignalsStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetPosixSignalsStreamResponse]:
        workload = request.workload
        cell: CellName | None = None
        if workload.workload_type == pb.WORKLOAD_TYPE_CELL:
            cell = CellName.parse(workload.id, field="workload.id")
        elif workload.workload_type in (pb.WORKLOAD_TYPE_POD_SANDBOX, pb.WORKLOAD_TYPE_VM):
            raise Unimplemented("this daemon runs no pod sandboxes or virtual machines yet",
                                field="workload.workload_type")
        elif workload.workload_type != pb.WORKLOAD_TYPE_UNSPECIFIED:
            raise InvalidArgument(f"unknown workload type {workload.workload_type}",
                                  field="workload.workload_type")
        elif workload.id:
            raise InvalidArgument("an id needs a workload type", field="workload.workload_type")
        for event in self.workloads.signals.follow(lambda: not context.is_active(), cell):
            yield pb.GetPosixSignalsStreamResponse(
                signal=pb.Signal(
                    signal=event.signal,
                    process_id=event.pid,
                    cell_name=event.cell.path if event.cell else "",
                    executable_name=event.executable,
                    timestamp=int(event.timestamp),
                )
            )
