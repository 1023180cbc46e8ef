"""Output capture: executables' stdout/stderr to rotated files on disk, and the daemon's own log.

OutputPump reads every executable's pipes on one thread into OutputLogs; readers follow the files.
LogRing keeps the daemon's own log lines in memory for followers.
"""

from auraed.output.log import MAX_LINE_BYTES, Cancelled, Line, OutputLog, follow_all
from auraed.output.pump import LineAssembler, OutputPump, output_pipe
from auraed.output.ring import LogEntry, LogRing, LogRingHandler

__all__ = [
    "MAX_LINE_BYTES",
    "Cancelled",
    "Line",
    "LineAssembler",
    "LogEntry",
    "LogRing",
    "LogRingHandler",
    "OutputLog",
    "OutputPump",
    "follow_all",
    "output_pipe",
]
