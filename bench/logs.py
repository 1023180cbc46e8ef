"""Log streaming through a real auraed: lines/s and MB/s that reach an SDK
client from a chatty process, one line per message and batched, against the
same process writing into a plain pipe."""

from __future__ import annotations

import subprocess
import time

from bench.core import Comparison, Mode, Result, Series, interleave
from tests.support.daemon import running_daemon


def run(mode: Mode) -> list[Result]:
    lines = mode.pick(full=200_000, quick=50_000, smoke=2_000)
    runs = mode.pick(full=5, quick=3, smoke=1)
    command = f"seq -f 'line %g of a chatty workload, as fast as it can' 1 {lines}"
    size = len(subprocess.run(["sh", "-c", command], capture_output=True, check=True).stdout)
    per_line = Series("through auraed, one line per message", "lines/s")
    batched = Series("through auraed, batched (max_batch_lines=1000)", "lines/s")
    piped = Series("plain pipe into cat", "lines/s")

    with running_daemon() as daemon, daemon.client() as client:
        client.cells.allocate(cell={"name": "chatty"})
        counter = iter(range(10**9))

        def stream_once(batch: int) -> float:
            name = f"c{next(counter)}"
            begin = time.perf_counter()
            started = client.cells.start(cell_name="chatty",
                                         executable={"name": name, "command": command})
            received = 0
            for response in client.observe.get_sub_process_stream(
                    process_id=started.pid, channel_type="LOG_CHANNEL_TYPE_STDOUT",
                    max_batch_lines=batch):
                received += len(response.items) if batch else 1
            elapsed = time.perf_counter() - begin
            client.cells.stop(cell_name="chatty", executable_name=name, grace_period_ms=0)
            if received != lines:
                raise RuntimeError(f"lost lines: {received} of {lines}")
            return lines / elapsed

        def pipe_once() -> float:
            begin = time.perf_counter()
            subprocess.run(["sh", "-c", f"{command} | cat > /dev/null"], check=True)
            return lines / (time.perf_counter() - begin)

        interleave(runs, (per_line, lambda: stream_once(0)), (batched, lambda: stream_once(1000)),
                   (piped, pipe_once), warmup=mode.warmup(1))
        client.cells.free(cell_name="chatty")
    mb = size / lines / 1e6
    return [
        Comparison("logs_per_line_vs_pipe", f"Log lines reaching a client, one per message ({lines} lines)",
                   per_line, piped, higher_is_better=True,
                   notes=f"{per_line.median * mb:.1f} MB/s vs {piped.median * mb:.1f} MB/s"),
        Comparison("logs_batched_vs_pipe", f"Log lines reaching a client, batched ({lines} lines)",
                   batched, piped, higher_is_better=True,
                   notes=f"{batched.median * mb:.1f} MB/s vs {piped.median * mb:.1f} MB/s"),
    ]
