"""aurae.observe.v0.ObserveService: the daemon's log, workload output, signals."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from aurae_sdk.wire.generated.pb.observe import observe_pb2 as pb
from auraed.errors import FailedPrecondition, InvalidArgument
from auraed.generated.observe import ObserveServiceBase
from auraed.output import Line, LogRing, follow_all
from auraed.runtime.events import Event
from auraed.runtime.workloads import Workloads
from auraed.validation import blaming
from auraed.validation import observe as valid

DAEMON_CHANNEL = "auraed"
DEFAULT_BATCH_EVENTS = 512
MAX_BATCH_EVENTS = 10_000


def _item(channel: str, line: Line) -> pb.LogItem:
    timestamp, text = line
    # LogItem.line is a proto string: it must be valid UTF-8.
    return pb.LogItem(channel=channel, line=text.decode("utf-8", "replace"), timestamp=int(timestamp))


def event_message(event: Event) -> pb.Event:
    message = pb.Event(
        sequence=event.sequence,
        timestamp=event.timestamp,
        kind=pb.EventKind.Value(f"EVENT_KIND_{event.kind.name}"),
        cell_name=event.cell,
        executable_name=event.executable,
        pid=event.pid,
        host_pid=event.host_pid,
        oom_killed=event.oom_killed,
        restart_count=event.restart_count,
        restart_delay_ms=event.restart_delay_ms,
        oom_kills=event.oom_kills,
        cleaned_up=event.cleaned_up,
    )
    if event.exit_code is not None:
        message.exit_code = event.exit_code
    if event.signal is not None:
        message.signal = event.signal
    if event.daemon is not None:
        report = event.daemon
        message.daemon.CopyFrom(pb.DaemonEvent(
            version=report.version,
            previous_stopped_cleanly=report.previous_stopped_cleanly,
            cleaned_cells=report.cleaned_cells,
            cleaned_executables=report.cleaned_executables,
            adopted_cells=report.adopted_cells,
            adopted_executables=report.adopted_executables,
            cleaned_containers=report.cleaned_containers,
        ))
    return message


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
        if all(log.removed for log in logs):
            # Stop forgets an executable's output with it; its record stays only for Wait.
            raise FailedPrecondition(f"executable {executable.name} was stopped: its output was "
                                     "dropped with it")
        # "What the process has written so far": also what is still in its pipes.
        self.workloads.catch_up_output(executable)
        # Read on this thread as the client takes messages, never ahead of it: a client that
        # stalls holds one batch here, and the rest of the output waits in the files.
        # Both channels: what was written before the call replays in the order it was written.
        for index, lines in follow_all(logs, lambda: not context.is_active(),
                                       follow.batch_lines,
                                       replay_in_time_order=len(logs) > 1,
                                       replay_only=follow.replay_only):
            if follow.batched:
                yield pb.GetSubProcessStreamResponse(items=[_item(names[index], line)
                                                            for line in lines])
            else:
                for line in lines:
                    yield pb.GetSubProcessStreamResponse(item=_item(names[index], line))

    def get_posix_signals_stream(
        self, request: pb.GetPosixSignalsStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetPosixSignalsStreamResponse]:
        cell = valid.workload_filter(request.workload)
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

    def get_event_stream(
        self, request: pb.GetEventStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetEventStreamResponse]:
        if request.max_batch_events > MAX_BATCH_EVENTS:
            raise InvalidArgument(f"at most {MAX_BATCH_EVENTS} events per batch",
                                  field="max_batch_events")
        cell = valid.workload_filter(request.workload)
        journal = self.workloads.events
        newest = journal.last_sequence
        if request.after_sequence > newest:
            raise FailedPrecondition(
                f"sequence {request.after_sequence} is past the newest event ({newest}): "
                "this daemon's event journal was reset since; resume from 0",
                field="after_sequence")
        batch = request.max_batch_events or DEFAULT_BATCH_EVENTS
        for lost, events in journal.read(request.after_sequence, lambda: not context.is_active(),
                                         follow=request.follow, batch=batch):
            if cell is not None:
                events = [e for e in events if e.daemon is not None or e.within(cell.path)]
                if not events and not lost:
                    continue
            yield pb.GetEventStreamResponse(events=[event_message(e) for e in events], lost=lost)
