"""Long-lived calls against the daemon's responsiveness and memory.

1. An operator's List while one client identity opens 1,000 idle Health/Watch streams (its
   budget admits 16, the rest get RESOURCE_EXHAUSTED; 40 in a smoke run), against the same List on the idle daemon
   in the same run: during the burst of attempts, and with the admitted streams held.
2. Daemon RSS per stalled GetSubProcessStream reader (reads one message of a 60 MB backlog, then
   stops reading), against the RSS per idle stream (a quiet workload) in the same run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aurae_sdk.config import channel_options, parse_target
from aurae_sdk.wire.pki import CertificateAuthority
from bench.core import Comparison, Figure, Mode, Result, Series, rss_bytes
from tests.support.daemon import DaemonProcess, running_daemon

STREAMS = 1000
STALLED = 30
BACKLOG_LINES = 500_000  # per channel, ~30 MB each
# A smoke run: still past the identity's budget of 16 and more than one stalled reader, with a
# backlog bigger than one message.
SMOKE_STREAMS, SMOKE_STALLED, SMOKE_BACKLOG_LINES = 40, 2, 5_000
MIB = 1024 * 1024


def _channel(daemon: DaemonProcess, name: str) -> grpc.Channel:
    """A channel presenting a certificate for spiffe://unsafe.aurae.io/bench/<name>."""
    ca = CertificateAuthority.load(daemon.pki.directory)
    credential = ca.issue_client(name, spiffe_ids=[f"spiffe://unsafe.aurae.io/bench/{name}"])
    target = parse_target(daemon.socket)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=daemon.pki.ca_crt.read_bytes(),
        private_key=credential.private_key_pem(), certificate_chain=credential.certificate_pem())
    return grpc.secure_channel(target.grpc_target, credentials, channel_options(target))


def _list_ms(client: Any, calls: int) -> float:
    begin = time.perf_counter()
    for _ in range(calls):
        client.cells.list()
    return (time.perf_counter() - begin) / calls * 1000


def _sample(series: Series, client: Any, samples: int, calls: int) -> None:
    for _ in range(samples):
        series.samples.append(_list_ms(client, calls))


def _responsiveness(mode: Mode) -> list[Result]:
    samples, calls = mode.pick(full=(30, 20), quick=(10, 10), smoke=(1, 1))
    attempts = mode.pick(full=STREAMS, quick=STREAMS, smoke=SMOKE_STREAMS)
    idle = Series("operator List, idle daemon", "ms")
    burst = Series(f"operator List while {attempts} Watch streams are attempted", "ms")
    held = Series(f"operator List with one identity's {attempts} streams opened or refused", "ms")
    outcomes: dict[str, int] = {}
    with running_daemon() as daemon, daemon.client(timeout=30) as admin:
        admin.cells.allocate(cell={"name": "listed"})
        _list_ms(admin, 100)  # warm up
        _sample(idle, admin, samples, calls)
        channel = _channel(daemon, "flood")
        health = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        streams: list[Any] = []

        def attempt() -> None:
            opened = [health.Watch(health_pb2.HealthCheckRequest(), timeout=600)
                      for _ in range(attempts)]
            for stream in opened:
                try:
                    next(stream)
                    outcome = "OK"
                    streams.append(stream)
                except grpc.RpcError as error:
                    outcome = error.code().name
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

        flood = threading.Thread(target=attempt)
        began = time.perf_counter()
        flood.start()
        while flood.is_alive():
            burst.samples.append(_list_ms(admin, 1))
        flood_seconds = time.perf_counter() - began
        _sample(held, admin, samples, calls)
        for stream in streams:
            stream.cancel()
        channel.close()
        time.sleep(1.0)  # the daemon notices the cancellations within its poll interval
        _sample(idle, admin, samples, calls)
        admin.cells.free(cell_name="listed")
    counts = ", ".join(f"{code} {n}" for code, n in sorted(outcomes.items()))
    return [
        Comparison("admin_list_under_idle_streams",
                   f"Operator List with {attempts} idle streams from one identity",
                   held, idle, goal="≤ 2×",
                   notes=f"streams: {counts} (budget 16 per identity)"),
        Comparison("admin_list_during_stream_flood",
                   f"Operator List while {attempts} streams are attempted (burst)",
                   burst, idle,
                   notes=f"{len(burst.samples)} Lists during the {flood_seconds:.1f} s the "
                         "attempts took"),
        Figure("streams_held_of_1000", f"Streams held of {attempts} attempted by one identity",
               outcomes.get("OK", 0), "streams", notes=counts),
    ]


def _settled_rss(pid: int, interval: float, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    previous = rss_bytes(pid)
    while time.monotonic() < deadline:
        time.sleep(interval)
        current = rss_bytes(pid)
        if abs(current - previous) < MIB // 2:
            return current
        previous = current
    return rss_bytes(pid)


def _growth_per_stream(daemon: DaemonProcess, open_one: Callable[[], Any],
                       held: list[Any], count: int, interval: float) -> float:
    """RSS added per stream by `count` more; they stay open (added to held), so memory freed
    by earlier streams cannot be reused and hide the cost."""
    before = _settled_rss(daemon.process.pid, interval)
    held.extend(open_one() for _ in range(count))
    after = _settled_rss(daemon.process.pid, interval)
    return (after - before) / count / MIB


def _logged_bytes(daemon: DaemonProcess) -> int:
    return sum(p.stat().st_size for p in Path(daemon.runtime_dir, "logs").rglob("*.log"))


def _stream_memory(mode: Mode) -> list[Result]:
    rounds = mode.pick(full=3, quick=1, smoke=1)
    count = mode.pick(full=STALLED, quick=STALLED, smoke=SMOKE_STALLED)
    backlog = mode.pick(full=BACKLOG_LINES, quick=BACKLOG_LINES, smoke=SMOKE_BACKLOG_LINES)
    # How long RSS must hold still to count as settled: not measured in a smoke run.
    interval = mode.pick(full=1.5, quick=1.5, smoke=0.1)
    stalled = Series(f"daemon RSS per stalled reader of a {backlog * 120 // 1_000_000} MB "
                     "backlog", "MiB")
    idle = Series("daemon RSS per idle stream (quiet workload)", "MiB")
    # Every stream stays open to the end: room for them in the operators' reserve.
    with running_daemon("--long-lived-operators", "512") as daemon, \
            daemon.client(timeout=600) as client:
        client.cells.allocate(cell={"name": "backlog"})
        chatty = client.cells.start(cell_name="backlog", executable={"name": "chatty", "command": (
            f"seq -f 'out %g of a chatty workload, written before anyone reads' 1 "
            f"{backlog}; seq -f 'err %g of a chatty workload, written before anyone "
            f"reads' 1 {backlog} >&2; exec sleep 3600")})
        quiet = client.cells.start(cell_name="backlog",
                                   executable={"name": "quiet", "command": "exec sleep 3600"})
        deadline = time.monotonic() + 300
        while _logged_bytes(daemon) < 2 * backlog * 60 and time.monotonic() < deadline:
            time.sleep(0.5)

        def stalled_reader() -> Any:
            stream = iter(client.observe.get_sub_process_stream(process_id=chatty.pid))
            next(stream)
            return stream

        def idle_stream() -> Any:
            return client.observe.get_sub_process_stream(process_id=quiet.pid)

        held: list[Any] = []
        for _ in range(rounds):
            idle.samples.append(_growth_per_stream(daemon, idle_stream, held, count, interval))
            stalled.samples.append(_growth_per_stream(daemon, stalled_reader, held, count,
                                                      interval))
        for stream in held:
            stream.cancel()
        for name in ("chatty", "quiet"):
            client.cells.stop(cell_name="backlog", executable_name=name, grace_period_ms=0)
        client.cells.free(cell_name="backlog")
    return [Comparison("stalled_stream_memory",
                       f"Daemon memory per stalled stream ({count} at once)", stalled, idle,
                       goal="≤ 1 MiB per stalled stream",
                       notes="before the fix: 17.4 MiB per stalled stream "
                             "(tests/daemon/test_stream_bounds.py on b7cc083)")]


def run(mode: Mode) -> list[Result]:
    return [*_responsiveness(mode), *_stream_memory(mode)]
