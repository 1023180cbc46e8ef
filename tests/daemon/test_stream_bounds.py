"""Every stream is bounded in the daemon's memory: a client that reads one message and stalls
costs the daemon at most 1 MiB, whatever the workload has written; the output waits in the
files, not in queues, and is all there when the client reads on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aurae_sdk
from tests.support.daemon import DaemonProcess

STALLED = 30
LINES = 500_000  # per channel: ~30 MiB of records each, all retained (8 x 8 MiB segments)
MAX_MIB_PER_STREAM = 1.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def settled_rss_mib(pid: int, timeout: float = 60.0) -> float:
    """RSS once it has stopped moving: two readings 2 s apart within 1 MiB."""
    deadline = time.monotonic() + timeout
    previous = rss_mib(pid)
    while time.monotonic() < deadline:
        time.sleep(2.0)
        current = rss_mib(pid)
        if abs(current - previous) < 1.0:
            return current
        previous = current
    return rss_mib(pid)


def logged_bytes(daemon: DaemonProcess) -> int:
    return sum(p.stat().st_size for p in (daemon.runtime_dir / "logs").rglob("*.log"))


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_stalled_readers_cost_the_daemon_at_most_1_mib_each(daemon: DaemonProcess,
                                                            client: aurae_sdk.Client) -> None:
    client.cells.allocate(cell={"name": "flood"})
    streams: list[Iterator[Any]] = []
    try:
        command = (f"seq -f 'out %g of a chatty workload, written before anyone reads' 1 {LINES};"
                   f" seq -f 'err %g of a chatty workload, written before anyone reads' 1 {LINES}"
                   " >&2; exec sleep 600")
        started = client.cells.start(cell_name="flood",
                                     executable={"name": "chatty", "command": command})
        expected = 2 * LINES * 60  # at least this many bytes of records
        wait_for(lambda: logged_bytes(daemon) >= expected, 120, "the workload's output")
        before = settled_rss_mib(daemon.process.pid)
        for index in range(STALLED):
            # Half one line per message (both channels), half the largest batches (stdout).
            stream = iter(client.observe.get_sub_process_stream(
                process_id=started.pid, timeout=600,
                **({} if index % 2 else {"channel_type": "LOG_CHANNEL_TYPE_STDOUT",
                                         "max_batch_lines": 10_000})))
            next(stream)
            streams.append(stream)
        after = settled_rss_mib(daemon.process.pid)
        per_stream = (after - before) / STALLED
        print(f"stalled streams: {before:.1f} -> {after:.1f} MiB, {per_stream:.2f} MiB each")
        assert per_stream <= MAX_MIB_PER_STREAM, (
            f"{STALLED} stalled streams took the daemon from {before:.1f} to {after:.1f} MiB")

        # Nothing was dropped while they stalled: a stdout reader goes on where it stopped.
        batched = streams[0]
        numbers = [int(item.line.split()[1]) for response in (next(batched) for _ in range(20))
                   for item in response.items]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))) and numbers[0] > 1
    finally:
        for stream in streams:
            stream.cancel()  # type: ignore[attr-defined]
        client.cells.stop(cell_name="flood", executable_name="chatty", grace_period_ms=0)
        client.cells.free(cell_name="flood")
