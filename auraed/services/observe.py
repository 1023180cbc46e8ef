"""aurae.observe.v0.ObserveService: the daemon's log, workload output, signals."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from aurae_sdk.wire.generated.pb.observe import observe_pb2 as pb
from auraed.generated.observe import ObserveServiceBase
from auraed.output import Line, LogRing, follow_all
from auraed.runtime.workloads import Workloads
from auraed.validation import blaming
from auraed.validation import observe as valid

DAEMON_CHANNEL = "auraed"


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
        follow = valid.output_follow(request)
        with blaming(valid.SUB_PROCESS_FIELDS):
            executable = self.workloads.find_executable(
                pid=follow.process_id, cell_name=follow.cell, name=follow.executable)
        names = [executable.channel_name(c) for c in follow.channels]
        logs = [getattr(executable, c) for c in follow.channels]
        # Read on this thread as the client takes messages, never ahead of it: a client that
        # stalls holds one batch here, and the rest of the output waits in the files.
        for index, lines in follow_all(logs, lambda: not context.is_active(),
                                       follow.batch_lines):
            if follow.batched:
                yield pb.GetSubProcessStreamResponse(items=[_item(names[index], line)
                                                            for line in lines])
            else:
                for line in lines:
                    yield pb.GetSubProcessStreamResponse(item=_item(names[index], line))

    def get_posix_signals_stream(
        self, request: pb.GetPosixSignalsStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetPosixSignalsStreamResponse]:
        cell = valid.signals_of(request)
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
