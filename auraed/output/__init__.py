"""Output capture: executables' stdout/stderr to rotated files on disk, and the daemon's own log.

The spawner (auraed.kernel.spawner.server) reads every executable's pipes and writes its
OutputLog segments, so capture goes on while no daemon runs; the daemon follows the files through
mirrors (OutputLog.mirror). LogRing keeps the daemon's own log lines in memory for followers.
"""

from auraed.output.log import (
    MAX_LINE_BYTES,
    Cancelled,
    Line,
    LineAssembler,
    OutputLog,
    follow_all,
    output_pipe,
)
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
    "follow_all",
    "output_pipe",
]
