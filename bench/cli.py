"""Start-up: `aurae-py discovery discover` end to end against the floor of
just importing grpc, and the REPL's time to its first prompt."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.core import Comparison, Figure, Mode, Result, Series, interleave
from tests.support.daemon import running_daemon

BIN = Path(sys.executable).parent


def run(mode: Mode) -> list[Result]:
    runs = mode.pick(full=25, quick=8, smoke=1)
    cli = Series("aurae-py discovery discover (process start to exit)", "ms")
    floor = Series('python -c "import grpc"', "ms")
    results: list[Result] = []
    with running_daemon() as daemon:
        env = {**os.environ, "AURAE_CONFIG": daemon.config}

        def cli_once() -> float:
            begin = time.perf_counter()
            subprocess.run([str(BIN / "aurae-py"), "discovery", "discover"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            return (time.perf_counter() - begin) * 1e3

        def floor_once() -> float:
            begin = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import grpc"], check=True)
            return (time.perf_counter() - begin) * 1e3

        interleave(runs, (cli, cli_once), (floor, floor_once), warmup=mode.warmup(2))
        results.append(Comparison("cli_cold_start_vs_import_grpc",
                                  "CLI cold start vs python -c 'import grpc'", cli, floor,
                                  goal="<= 1.5x"))
        repl = _repl_start(env, mode.pick(full=8, quick=3, smoke=1))
        if repl is not None:
            results.append(repl)
    return results


def _repl_start(env: dict[str, str], runs: int) -> Result | None:
    """Seconds from `aurae-py repl` to its first prompt, in a pseudo-terminal."""
    try:
        import pexpect
    except ImportError:
        return None
    samples = []
    for _ in range(runs):
        begin = time.perf_counter()
        child = pexpect.spawn(str(BIN / "aurae-py"), ["repl"], env={**env, "TERM": "xterm-256color"},
                              encoding="utf-8", timeout=30, dimensions=(40, 120))
        try:
            child.expect(">>>")
            samples.append((time.perf_counter() - begin) * 1e3)
        finally:
            child.terminate(force=True)
    samples.sort()
    return Figure("repl_start", "REPL start to first prompt", samples[len(samples) // 2], "ms",
                  notes=f"median of {runs}")
