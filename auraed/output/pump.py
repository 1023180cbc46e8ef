"""One thread that moves the output of every executable from its pipes into its OutputLogs.

Reading promptly matters more than anything here: a workload whose pipe is full blocks in write.
So the pump only reads, cuts lines and appends to files; readers are served from the files.
"""

import logging
import os
import selectors
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from auraed.output.log import LineAssembler, OutputLog, output_pipe

__all__ = ["LineAssembler", "OutputPump", "output_pipe"]

_log = logging.getLogger(__name__)

_READ_BYTES = 64 * 1024


@dataclass
class _Stream:
    log: OutputLog
    lines: LineAssembler = field(default_factory=LineAssembler)
    # After a write error (a full disk) the stream is still drained, so the workload never
    # blocks, but its output is dropped.
    failed: bool = False

    def store(self, lines: list[bytes]) -> None:
        if self.failed or not lines:
            return
        try:
            self.log.append(lines, time.time())
        except OSError:
            _log.exception("%s in %s is dropped from now on", self.log.channel, self.log.directory)
            self.failed = True


class OutputPump:
    """Reads every watched pipe on one thread and appends its lines to its OutputLog.

    watch() and close() may be called from any thread. At end of file the pump closes the read
    end and finishes the log. close() drains what is already in the pipes and finishes every log.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._incoming: list[tuple[int, _Stream]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="output-pump", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def watch(self, read_fd: int, log: OutputLog) -> None:
        """Pump read_fd into log until end of file. The pump owns read_fd from now on."""
        os.set_blocking(read_fd, False)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the output pump is closed")
            # Registered by the pump thread itself: selectors are not thread-safe.
            self._incoming.append((read_fd, _Stream(log)))
            # Under the lock: the pump thread sees "stopping" only then, so it cannot have
            # closed the wake pipe yet.
            self._wake()

    def close(self) -> None:
        with self._lock:
            already_stopping, self._stopping = self._stopping, True
            if not already_stopping:
                self._wake()
        self._thread.join()

    def __enter__(self) -> Self:
        """Starts the pump."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already awake with bytes to spare

    def _run(self) -> None:
        try:
            while True:
                for key, _ in self._selector.select():
                    if key.fd == self._wake_r:
                        if self._take_incoming():
                            return
                    else:
                        self._pump(key.fd, key.data)
        finally:
            self._shut_down()

    def _take_incoming(self) -> bool:
        """Register new pipes; True when the pump should stop."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            incoming, self._incoming = self._incoming, []
            stopping = self._stopping
        for fd, stream in incoming:
            self._selector.register(fd, selectors.EVENT_READ, stream)
        return stopping

    def _pump(self, fd: int, stream: _Stream) -> None:
        try:
            chunk = os.read(fd, _READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            stream.store(stream.lines.feed(chunk))
        else:
            self._end(fd, stream)

    def _end(self, fd: int, stream: _Stream) -> None:
        self._selector.unregister(fd)
        os.close(fd)
        stream.store(stream.lines.flush())
        stream.log.finish()

    def _shut_down(self) -> None:
        for key in list(self._selector.get_map().values()):
            if key.fd == self._wake_r:
                continue
            stream: _Stream = key.data
            try:
                while chunk := os.read(key.fd, _READ_BYTES):
                    stream.store(stream.lines.feed(chunk))
            except OSError:
                pass  # nothing more without waiting (BlockingIOError), or a broken pipe
            self._end(key.fd, stream)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
