"""Load: 64 clients at once, each with its own connection and its own cells,
running the whole lifecycle (allocate, start, stream output, list, stop,
wait, free) over and over for a bounded time.

By design no client can race another (names are per client), so every error
is unexpected. Every executable started must end with a reported status, and
afterwards the daemon must hold no cell, no cgroup, no process, and about the
memory it held before.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import aurae_sdk
from aurae_sdk import cells
from tests.support.daemon import DaemonProcess, running_daemon

from .conftest import host_state, needs_root, record_figure

pytestmark = pytest.mark.slow

CLIENTS = 64
ROUND = 12.0
SETTLE = 3.0
# Memory may grow by allocator fragmentation and thread stacks, but not with the work done:
# bounded against the start, and a second round of the same work must not grow it much more.
RSS_FACTOR, RSS_SLACK_MIB = 1.5, 30
RSS_REGROWTH_MIB = 12


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} for pid {pid}")


@dataclass
class Outcome:
    requests: int = 0
    started: int = 0
    ended_with_status: int = 0
    errors: list[str] = field(default_factory=list)


def one_client(daemon: DaemonProcess, index: int, stop_at: float, outcome: Outcome) -> None:
    with daemon.client(timeout=60) as client:
        round_ = 0
        while time.monotonic() < stop_at:
            cell = f"load-{index}-{round_}"
            round_ += 1
            try:
                lifecycle(client, cell, outcome)
            except (aurae_sdk.AuraeError, AssertionError) as error:
                outcome.errors.append(f"{cell}: {error!r}")
                try:
                    client.cells.free(cell_name=cell)
                except aurae_sdk.NotFound:
                    pass


def lifecycle(client: aurae_sdk.Client, cell: str, outcome: Outcome) -> None:
    def count(n: int = 1) -> None:
        outcome.requests += n

    client.cells.allocate(cell=cells.Cell(name=cell, cpu=cells.CpuController(weight=50),
                                          memory=cells.MemoryController(max=64 << 20)))
    count()
    echo = client.cells.start(cell_name=cell, executable={"name": "echo",
                                                          "command": "echo hello; echo oops >&2"})
    outcome.started += 1
    count()
    lines = [r.item.line for r in client.observe.get_sub_process_stream(
        process_id=echo.host_pid, timeout=30)]
    count()
    assert sorted(lines) == ["hello", "oops"], lines
    sleeper = client.cells.start(cell_name=cell, executable={"name": "sleeper",
                                                             "command": "sleep 60"})
    outcome.started += 1
    count()
    listed = client.cells.list()
    count()
    assert cell in {node.cell.name for node in listed.cells}
    stopped = client.cells.stop(cell_name=cell, executable_name="sleeper", grace_period_ms=1000)
    count()
    assert stopped.status.signal == 15 and stopped.status.host_pid == sleeper.host_pid
    outcome.ended_with_status += 1
    waited = client.cells.wait(cell_name=cell, executable_name="echo", timeout=30)
    count()
    assert waited.status.exit_code == 0
    outcome.ended_with_status += 1
    client.cells.free(cell_name=cell)
    count()


@pytest.fixture(scope="module")
def loaded_daemon() -> Iterator[DaemonProcess]:
    needs_root()
    with running_daemon(grace_period=1.0) as started:
        yield started


def run_round(daemon: DaemonProcess, duration: float) -> tuple[list[Outcome], float, float]:
    """CLIENTS clients for `duration` seconds; their outcomes, the time taken, the peak RSS."""
    outcomes = [Outcome() for _ in range(CLIENTS)]
    started = time.monotonic()
    threads = [threading.Thread(target=one_client, args=(daemon, i, started + duration,
                                                         outcomes[i]))
               for i in range(CLIENTS)]
    peak = 0.0
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, rss_mib(daemon.process.pid))
        time.sleep(0.2)
    for thread in threads:
        thread.join()
    return outcomes, time.monotonic() - started, peak


def test_64_concurrent_clients(loaded_daemon: DaemonProcess) -> None:
    daemon = loaded_daemon
    baseline = host_state(daemon)
    # Warm up: the first calls load code and make the first pool threads.
    with daemon.client() as client:
        lifecycle(client, "warm-up", Outcome())
    time.sleep(0.5)
    rss_before = rss_mib(daemon.process.pid)

    # Two rounds: the first shows how far memory grows under load, the second that it
    # stops growing (a leak would grow again with the same work).
    outcomes, elapsed, peak = run_round(daemon, ROUND)
    time.sleep(SETTLE)
    rss_first = rss_mib(daemon.process.pid)
    more, elapsed_more, peak_more = run_round(daemon, ROUND)
    outcomes += more
    elapsed += elapsed_more
    peak = max(peak, peak_more)
    time.sleep(SETTLE)
    rss_after = rss_mib(daemon.process.pid)

    requests = sum(o.requests for o in outcomes)
    errors = [error for o in outcomes for error in o.errors]
    record_figure("load", f"{requests} requests from {CLIENTS} concurrent clients in 2 rounds of "
                          f"{ROUND:.0f} s ({requests / elapsed:.0f}/s), {len(errors)} errors")
    record_figure("load daemon RSS", f"before {rss_before:.1f} MiB, peak {peak:.1f} MiB, "
                                     f"after round 1 {rss_first:.1f} MiB, after round 2 "
                                     f"{rss_after:.1f} MiB ({SETTLE:.0f} s settle each)")

    assert not errors, Counter(e.split(": ", 1)[1] for e in errors).most_common(5)
    assert all(o.requests > 0 for o in outcomes), "a client made no progress"
    started_total = sum(o.started for o in outcomes)
    assert started_total == sum(o.ended_with_status for o in outcomes)
    record_figure("load workloads", f"{started_total} started, all ended with a reported status")
    assert rss_after < rss_before * RSS_FACTOR + RSS_SLACK_MIB
    assert rss_after < rss_first + RSS_REGROWTH_MIB
    with daemon.client() as client:
        assert list(client.cells.list().cells) == []
        assert client.health.check(service="").status == 1
    assert host_state(daemon) == baseline
