"""What every benchmark shares: samples and their statistics, comparisons
against a peer, single figures, and the machine they ran on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Mode:
    """How much a run repeats: in full (the report's figures), quick (fewer repetitions), or
    smoke (every code path once, with the smallest sizes that still reach it: what the test
    suite runs to see the benchmarks work; its figures mean nothing)."""

    name: str = "full"

    @property
    def quick(self) -> bool:
        """Quick or smoke: fewer repetitions than the full run."""
        return self.name != "full"

    @property
    def smoke(self) -> bool:
        return self.name == "smoke"

    def pick(self, full: T, quick: T, smoke: T) -> T:
        return {"full": full, "quick": quick, "smoke": smoke}[self.name]

    def warmup(self, rounds: int) -> int:
        """Warm-up rounds before measuring: none in a smoke run, whose figures are not read."""
        return 0 if self.smoke else rounds


@dataclass
class Series:
    """Repeated measurements of one thing, in `unit`."""

    label: str
    unit: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        """10th and 90th percentile (min and max for few samples)."""
        if len(self.samples) < 10:
            return min(self.samples), max(self.samples)
        deciles = statistics.quantiles(self.samples, n=10)
        return deciles[0], deciles[-1]

    def summary(self) -> dict[str, Any]:
        low, high = self.spread
        return {"label": self.label, "unit": self.unit, "median": self.median,
                "p10": low, "p90": high, "n": len(self.samples)}


@dataclass
class Comparison:
    """A subject measured against a peer or floor in the same run.

    ratio = subject median / peer median; for rates (higher is better) the
    ratio is still subject/peer, so 0.5 means half the peer's rate.
    """

    key: str
    title: str
    subject: Series
    peer: Series
    higher_is_better: bool = False
    goal: str = ""
    notes: str = ""

    @property
    def ratio(self) -> float:
        return self.subject.median / self.peer.median

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "comparison", "key": self.key, "title": self.title,
            "subject": self.subject.summary(), "peer": self.peer.summary(),
            "ratio": self.ratio, "higher_is_better": self.higher_is_better,
            "goal": self.goal, "notes": self.notes,
        }


@dataclass
class Figure:
    """One measured value that has no natural peer (memory, counts)."""

    key: str
    title: str
    value: float
    unit: str
    notes: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "figure", **asdict(self)}


Result = Comparison | Figure


def timed(call: Callable[[], object]) -> float:
    begin = time.perf_counter()
    call()
    return time.perf_counter() - begin


def interleave(runs: int, *subjects: tuple[Series, Callable[[], float]], warmup: int = 3) -> None:
    """Measure several things alternately, so drift in the machine's load
    hits all of them alike. Each callable returns one sample."""
    for _ in range(warmup):
        for _, measure in subjects:
            measure()
    for _ in range(runs):
        for series, measure in subjects:
            series.samples.append(measure())


def machine() -> dict[str, Any]:
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                      if line.startswith("model name")), platform.processor())
    with open("/proc/meminfo") as meminfo:
        memory_kb = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal")))
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for {pid}")
