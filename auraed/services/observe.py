"""aurae.observe.v0.ObserveService: the daemon's log, workload output, signals."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc

from aurae_sdk.wire.generated.pb.observe import observe_pb2 as pb
from auraed.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from auraed.generated.observe import ObserveServiceBase
from auraed.output import Line, LogRing, OutputLog
from auraed.runtime.executables import Executable
from auraed.runtime.names import CellName
from auraed.runtime.workloads import Workloads

DAEMON_CHANNEL = "auraed"
MAX_BATCH_LINES = 10_000
_DONE = object()


def _item(channel: str, line: Line) -> pb.LogItem:
    timestamp, text = line
    # LogItem.line is a proto string: it must be valid UTF-8.
    return pb.LogItem(channel=channel, line=text.decode("utf-8", "replace"), timestamp=int(timestamp))


def _merge(sources: list[tuple[str, OutputLog]], batch: int,
           context: grpc.ServicerContext) -> Iterator[list[pb.LogItem]]:
    """Batches of items from several logs as they arrive, until all have ended.

    Each log is followed on its own thread; the order within one channel is
    kept, and the channels interleave as their lines arrive.
    """
    if len(sources) == 1:
        channel, log = sources[0]
        for lines in log.follow_batches(lambda: not context.is_active(), batch):
            yield [_item(channel, line) for line in lines]
        return

    handoff: queue.Queue[object] = queue.Queue(maxsize=64)
    stop = threading.Event()

    def follow(channel: str, log: OutputLog) -> None:
        try:
            for lines in log.follow_batches(lambda: stop.is_set() or not context.is_active(), batch):
                items = [_item(channel, line) for line in lines]
                while not stop.is_set():
                    try:
                        handoff.put(items, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        finally:
            handoff.put(_DONE)

    threads = [threading.Thread(target=follow, args=source, daemon=True, name="observe-follow")
               for source in sources]
    for thread in threads:
        thread.start()
    try:
        running = len(threads)
        while running:
            got = handoff.get()
            if got is _DONE:
                running -= 1
            else:
                yield got  # type: ignore[misc]
    finally:
        stop.set()
        while any(t.is_alive() for t in threads):
            try:
                handoff.get(timeout=0.1)
            except queue.Empty:
                pass


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
        sources = [(executable.channel_name(c), getattr(executable, c)) for c in channels]
        batched = request.max_batch_lines > 0
        for items in _merge(sources, request.max_batch_lines or 1024, context):
            if batched:
                yield pb.GetSubProcessStreamResponse(items=items)
            else:
                for item in items:
                    yield pb.GetSubProcessStreamResponse(item=item)

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
