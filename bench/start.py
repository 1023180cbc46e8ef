"""Start at host level, end to end through a real auraed, against its floor:
a gRPC no-op round trip on the same mTLS channel plus a local fork/exec."""

from __future__ import annotations

import os
import subprocess
import time

from bench.core import Comparison, Mode, Result, Series, interleave
from tests.support.daemon import running_daemon


def run(mode: Mode) -> list[Result]:
    runs = mode.pick(full=300, quick=40, smoke=1)
    start = Series("Start `true` at host level (SDK, mTLS)", "ms")
    floor = Series("Discover round trip + subprocess.run(['true'])", "ms")
    roundtrip = Series("Discover round trip (mTLS, Unix socket)", "ms")
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        with running_daemon() as daemon, daemon.client() as client:
            counter = iter(range(10**9))

            def start_once() -> float:
                name = f"b{next(counter)}"
                begin = time.perf_counter()
                client.cells.start(executable={"name": name, "command": "true"})
                elapsed = time.perf_counter() - begin
                client.cells.stop(executable_name=name, grace_period_ms=0)
                return elapsed * 1e3

            def floor_once() -> float:
                begin = time.perf_counter()
                client.discovery.discover()
                subprocess.run(["true"], stdout=devnull, stderr=devnull, check=True)
                return (time.perf_counter() - begin) * 1e3

            def roundtrip_once() -> float:
                begin = time.perf_counter()
                client.discovery.discover()
                return (time.perf_counter() - begin) * 1e3

            interleave(runs, (start, start_once), (floor, floor_once), (roundtrip, roundtrip_once),
                       warmup=mode.warmup(3))
    finally:
        os.close(devnull)
    return [
        Comparison("start_vs_floor", "Start (host level) vs gRPC round trip + fork/exec", start, floor,
                   goal="as close to 1x as the spawner allows",
                   notes=f"a bare mTLS round trip alone: {roundtrip.median:.2f} ms median"),
    ]
