"""Spawned instances: Spawn → the instance's Discover answering through the host, cold
(the first Spawn of a daemon) and warm (the ones after), and the memory of an idle instance.

Memory is PSS (proportional set size, /proc/<pid>/smaps_rollup) summed over every process in
the instance's cgroup — its cell's holder, its auraed, that auraed's spawner — so pages
shared with the host or between instances count once, split among their sharers. The peer
for time is the same Python daemon started as a host process until its first Discover; the
peer for memory is that process's PSS (one full interpreter).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.cells import pss_bytes
from bench.core import Comparison, Figure, Result, Series
from tests.support.daemon import running_daemon

GOAL_SECONDS = 0.25
GOAL_MIB = 20.0


def _instance_pids(cgroup_root: str, name: str) -> list[int]:
    top = Path(f"/sys/fs/cgroup/memory/{cgroup_root}/instance-{name}")
    pids: set[int] = set()
    for procs in top.rglob("cgroup.procs"):
        pids.update(int(p) for p in procs.read_text().split())
    return sorted(pids)


def _pss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += pss_bytes(pid)
        except OSError:
            pass
    return total / 1024 / 1024


def run(quick: bool) -> list[Result]:
    count = 3 if quick else 8
    spawn = Series("Spawn → the instance's Discover through the host (warm)", "ms")
    cold = Series("the first Spawn of a daemon (cold)", "ms")
    peer = Series("a new auraed process on the host → its Discover", "ms")
    results: list[Result] = []
    with running_daemon() as daemon, daemon.client(timeout=120) as client:
        names = [f"b{index}" for index in range(count)]
        for index, name in enumerate(names):
            begin = time.perf_counter()
            client.instances.spawn(instance={"name": name})
            client.instance(name).discovery.discover()
            (cold if index == 0 else spawn).samples.append((time.perf_counter() - begin) * 1e3)
        time.sleep(2.0)  # idle: start-up garbage collected, spare holders settled
        per_instance = [_pss_mib(_instance_pids(daemon.cgroup_root, n)) for n in names]
        processes = len(_instance_pids(daemon.cgroup_root, names[0]))
        template = _pss_mib(_templates_of(daemon.process.pid))
        for name in names:
            client.instances.free(instance_name=name)

        for _ in range(max(2, count // 2)):
            begin = time.perf_counter()
            with running_daemon() as other, other.client(timeout=60) as other_client:
                other_client.discovery.discover()
                peer.samples.append((time.perf_counter() - begin) * 1e3)
                full = _pss_mib([other.process.pid, *_children(other.process.pid)])
    results.append(Comparison(
        "instance_spawn_vs_new_daemon", "Instance Spawn → Discover vs a new auraed process",
        spawn, peer, goal=f"<= {GOAL_SECONDS * 1000:.0f} ms",
        notes=f"cold (first Spawn, which starts the template) {statistics.median(cold.samples):.0f}"
              " ms; each instance is a fork of the warm template that joined its cell; the peer "
              "also makes its PKI and starts a full interpreter"))
    results.append(Figure(
        "idle_instance_pss", f"PSS of one idle instance ({count} running)",
        statistics.median(per_instance), "MiB",
        notes=f"goal <= {GOAL_MIB:.0f} MiB; {processes} processes per instance (cell holder, "
              f"auraed forked from the template, its spawner and the spawner's spare); the "
              f"template itself (shared by all): {template:.1f} MiB PSS; a host auraed with its "
              f"spawner: {full:.1f} MiB PSS"))
    return results


def _templates_of(pid: int) -> list[int]:
    return [child for child in _children(pid)
            if b"auraed.kernel.template" in Path(f"/proc/{child}/cmdline").read_bytes()]


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                           check=False).stdout.split()
    return [int(p) for p in found]


if __name__ == "__main__":
    for result in run("--quick" in sys.argv):
        print(result.as_dict())
