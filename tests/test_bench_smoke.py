"""The benchmarks still run (smoke mode: every code path once at the smallest sizes, into a
scratch directory). Their figures never decide a test: machines differ and ratios are for the
report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Fourteen benchmarks, each with its own daemons: about 50 s at load 3-4, and more
# than twice that beside other work; the suite's 300 s default is for single tests.
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_benchmark_runs_in_smoke_mode(tmp_path: Path) -> None:
    results, report = tmp_path / "latest.json", tmp_path / "benchmarks.md"
    # All but vms: its guests boot under TCG for minutes on a loaded machine, and
    # tests/vms boots the same guests through the same code.
    from bench.__main__ import BENCHMARKS

    chosen = ",".join(name for name in BENCHMARKS if name != "vms")
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", chosen,
         "--results", str(results), "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=540, check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    document = json.loads(results.read_text())
    assert document["failures"] == {}
    assert document["mode"] == "smoke"
    ran = {entry["benchmark"] for entry in document["results"]}
    assert ran == {"rpc", "start", "spawn", "logs", "streams", "events", "cells", "containers",
                   "instances", "scale", "restore", "cli", "fleet", "codegen"}
    assert "| Benchmark |" in report.read_text() and "(smoke mode)" in report.read_text()
    assert (tmp_path / "benchmarks" / "ratios.png").stat().st_size > 0
