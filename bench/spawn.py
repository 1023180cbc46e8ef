"""The spawner against a bare fork/exec, and the spawner's output capture against a pipe —
the kernel-facing floor under Start and under log streaming, without gRPC."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time

from auraed.kernel.processes import ExitStatus, SpawnSpec
from auraed.kernel.spawner.client import Spawner
from auraed.output import OutputLog
from bench.core import Comparison, Mode, Result, Series, interleave


class ExitWaiter:
    """on_exit target: when each workload's exit was reported (perf_counter seconds)."""

    def __init__(self) -> None:
        self._exits: dict[int, float] = {}
        self._changed = threading.Condition()

    def record(self, pid: int, start_time: int, status: ExitStatus) -> None:
        with self._changed:
            self._exits[pid] = time.perf_counter()
            self._changed.notify_all()

    def wait_for(self, pid: int) -> float:
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits, timeout=60)
            return self._exits.pop(pid)


def _captured(spawner: Spawner, exits: ExitWaiter, directory: str, command: str,
              lines: int) -> float:
    """Seconds from spawn until a follower has read every line of `command`: the spawner reads
    the pipe and writes the segment files, this process follows its mirror of them, as the
    daemon does."""
    logs = (OutputLog.mirror(directory, "stdout", segment_bytes=8 << 20, max_segments=8),
            OutputLog.mirror(directory, "stderr", segment_bytes=8 << 20, max_segments=8))
    begin = time.perf_counter()
    process = spawner.spawn(SpawnSpec(command=command, uid=0, gid=0, capture=logs))
    received = sum(len(batch) for batch in logs[0].follow_batches(threading.Event()))
    elapsed = time.perf_counter() - begin
    exits.wait_for(process.host_pid)
    for log in logs:
        log.remove()
    if received != lines:
        raise RuntimeError(f"lost lines: read {received} of {lines}")
    return elapsed


def run(mode: Mode) -> list[Result]:
    runs = mode.pick(full=200, quick=30, smoke=1)
    lines = mode.pick(full=200_000, quick=50_000, smoke=2_000)
    output_runs = mode.pick(full=7, quick=3, smoke=1)
    exits = ExitWaiter()
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    spawned = Series("spawner: spawn `true` until its exit is reported", "ms")
    forked = Series("subprocess.run(['true'])", "ms")
    command = f"seq -f 'line %g of a chatty workload, as fast as it can' 1 {lines}"
    size = len(subprocess.run(["sh", "-c", command], capture_output=True, check=True).stdout)
    captured = Series("spawner capture -> segment files -> follower", "MB/s")
    piped = Series("plain pipe into cat", "MB/s")
    try:
        with Spawner(exits.record) as spawner:
            spec = SpawnSpec(command=["true"], uid=0, gid=0, stdout_fd=devnull, stderr_fd=devnull)

            def spawn_once() -> float:
                begin = time.perf_counter()
                process = spawner.spawn(spec)
                return (exits.wait_for(process.host_pid) - begin) * 1e3

            def fork_once() -> float:
                begin = time.perf_counter()
                subprocess.run(["true"], stdout=devnull, stderr=devnull, check=True)
                return (time.perf_counter() - begin) * 1e3

            interleave(runs, (spawned, spawn_once), (forked, fork_once), warmup=mode.warmup(3))

            with tempfile.TemporaryDirectory(prefix="aurae-bench-") as tmp:
                def capture_once() -> float:
                    return size / _captured(spawner, exits, tmp, command, lines) / 1e6

                def pipe_once() -> float:
                    begin = time.perf_counter()
                    subprocess.run(["sh", "-c", f"{command} | cat > /dev/null"], check=True)
                    return size / (time.perf_counter() - begin) / 1e6

                interleave(output_runs, (captured, capture_once), (piped, pipe_once),
                           warmup=mode.warmup(1))
    finally:
        os.close(devnull)
    return [
        Comparison("spawn_vs_fork", "Spawner start+exit of `true` vs subprocess.run", spawned, forked,
                   notes="both vfork+exec with no Python in the child (fork_exec); ours adds the "
                         "spawner round trip and the exit report"),
        Comparison("capture_vs_pipe",
                   f"Output capture throughput ({lines} lines, {size / 1e6:.1f} MB) vs a plain pipe",
                   captured, piped, higher_is_better=True),
    ]
