"""Spawned instances: Spawn → the instance's Discover answering through the host, cold (the
first Spawn of a new daemon, asked as soon as it answers its first Discover; its template was
forked at its start and may still be importing), warm (the ones after) and in a
burst (several Spawns at once); and the memory of idle instances, with 1, 3 and 8 running.

Memory is PSS (proportional set size, /proc/<pid>/smaps_rollup) summed over every process in
the instance's cgroup — its cell's holder, its auraed, that auraed's spawner — so pages
shared with the template or between instances count once, split among their sharers. The
template's own PSS is reported apart, and amortised (template + instances, per instance). The
peer for time is the same Python daemon started as a host process until its first Discover;
the peer for memory is that process's PSS with its spawner (one full interpreter and a half).

Beside PSS, the memory an instance holds alone (USS: its processes' private pages, what freeing
it gives back) says what one more instance costs whatever the count: PSS with 1 running is
mostly the instance's part of the template's pages, which only two processes besides the
template (the instance's auraed and its spawner) map then.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import aurae_sdk
from auraed.kernel.template import PROCESS_NAME
from bench.cells import pss_bytes
from bench.core import Comparison, Figure, Mode, Result, Series
from tests.support.daemon import running_daemon

GOAL_SECONDS = 0.25
GOAL_MIB = 20.0
# The instance counts idle memory is measured at.
COUNTS = (1, 3, 8)
# Let start-up garbage be collected and the host's channels settle before PSS is read.
IDLE_SECONDS = 2.0


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


def _uss_mib(pids: list[int]) -> float:
    """The private pages (clean and dirty) of `pids`: what they hold that nobody else maps."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                for line in rollup:
                    if line.startswith(("Private_Clean:", "Private_Dirty:")):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total / 1024 / 1024


def _p90(series: Series) -> float:
    return series.spread[1]


def _spawn_ms(client: aurae_sdk.Client, name: str) -> float:
    begin = time.perf_counter()
    client.instances.spawn(instance={"name": name})
    client.instance(name).discovery.discover()
    return (time.perf_counter() - begin) * 1e3


def run(mode: Mode) -> list[Result]:
    counts = mode.pick(full=COUNTS, quick=COUNTS[:2], smoke=COUNTS[:1])
    warm_runs = mode.pick(full=20, quick=6, smoke=1)
    cold_runs = mode.pick(full=10, quick=2, smoke=1)
    burst_size = mode.pick(full=8, quick=4, smoke=2)
    idle_seconds = mode.pick(full=IDLE_SECONDS, quick=IDLE_SECONDS, smoke=0.0)
    warm = Series("Spawn → the instance's Discover through the host (warm)", "ms")
    cold = Series("the first Spawn of a new daemon → its Discover (cold)", "ms")
    burst = Series(f"each of {burst_size} Spawns made at once → its Discover", "ms")
    peer = Series("a new auraed process on the host → its Discover", "ms")
    per_instance: dict[int, float] = {}
    own: dict[int, float] = {}
    # The largest count's processes of one instance, by role: (PSS, USS) in MiB.
    roles: list[tuple[str, float, float]] = []
    template_at: dict[int, float] = {}
    processes = 0
    burst_wall = 0.0
    with running_daemon() as daemon, daemon.client(timeout=120) as client:
        names: list[str] = []
        while len(names) < counts[-1]:
            name = f"b{len(names)}"
            sample = _spawn_ms(client, name)
            (cold if not names else warm).samples.append(sample)
            names.append(name)
            if len(names) in counts:
                time.sleep(idle_seconds)
                per_instance[len(names)] = statistics.median(
                    _pss_mib(_instance_pids(daemon.cgroup_root, n)) for n in names)
                own[len(names)] = statistics.median(
                    _uss_mib(_instance_pids(daemon.cgroup_root, n)) for n in names)
                template_at[len(names)] = _pss_mib(_templates_of(daemon.process.pid))
                first = _instance_pids(daemon.cgroup_root, names[0])
                processes = len(first)
                roles = [(_role(pid, first), _pss_mib([pid]), _uss_mib([pid])) for pid in first]
        # The rest of the warm samples, with the others running: the steady state of a host.
        while len(warm.samples) < warm_runs:
            warm.samples.append(_spawn_ms(client, "w"))
            client.instances.free(instance_name="w")
        for name in names:
            client.instances.free(instance_name=name)

        def spawn_one(index: int) -> None:
            burst.samples.append(_spawn_ms(client, f"burst{index}"))

        threads = [threading.Thread(target=spawn_one, args=(i,)) for i in range(burst_size)]
        begin = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        burst_wall = (time.perf_counter() - begin) * 1e3
        for index in range(burst_size):
            client.instances.free(instance_name=f"burst{index}")

    full = idle_template = 0.0
    for _ in range(cold_runs):
        begin = time.perf_counter()
        with running_daemon() as other, other.client(timeout=120) as other_client:
            other_client.discovery.discover()
            peer.samples.append((time.perf_counter() - begin) * 1e3)
            templates = _templates_of(other.process.pid)
            full = _pss_mib([other.process.pid, *(child for child in _children(
                other.process.pid) if child not in templates)])
            idle_template = _pss_mib(templates)
            cold.samples.append(_spawn_ms(other_client, "c"))
            other_client.instances.free(instance_name="c")

    largest = counts[-1]
    template = template_at[largest]
    amortised = per_instance[largest] + template / largest
    at_counts = ", ".join(f"{n}: {per_instance[n]:.1f}" for n in counts)
    own_at_counts = ", ".join(f"{n}: {own[n]:.1f}" for n in counts)
    by_role = "; ".join(f"{role} {pss:.1f} PSS, {uss:.1f} own" for role, pss, uss in roles)
    return [
        Comparison(
            "instance_spawn_vs_new_daemon", "Instance Spawn → Discover vs a new auraed process",
            warm, peer, goal=f"<= {GOAL_SECONDS * 1000:.0f} ms",
            notes=f"warm p90 {_p90(warm):.0f} ms; cold (first Spawn of a daemon) median "
                  f"{cold.median:.0f} ms, p90 {_p90(cold):.0f} ms "
                  f"(n={len(cold.samples)}); {burst_size} at once: median {burst.median:.0f} "
                  f"ms, p90 {_p90(burst):.0f} ms, all answering after {burst_wall:.0f} ms; each "
                  "instance is a fork of the warm template that joined its cell; the peer also "
                  "starts a full interpreter"),
        Comparison(
            "instance_cold_spawn_vs_new_daemon",
            "First Spawn of a daemon (cold) → Discover vs a new auraed process",
            cold, peer, goal="< 1 (the template pays for itself at the first instance)",
            notes="cold: the template is forked from the daemon at its start, so the first "
                  "Spawn waits for no interpreter; it leans on the daemon having served for the "
                  "moment the template takes to import what the daemon imported"),
        Figure(
            "idle_instance_pss", f"PSS of one idle instance ({largest} running)",
            per_instance[largest], "MiB",
            notes=f"goal <= {GOAL_MIB:.0f} MiB; by instances running: {at_counts} MiB; "
                  f"{processes} processes per instance (cell holder, auraed forked from the "
                  f"template, its spawner forked from that auraed); the template (shared by "
                  f"all): {template:.1f} MiB PSS with {largest} running, "
                  f"{template_at[counts[0]]:.1f} with {counts[0]}; a host auraed with its "
                  f"spawner: {full:.1f} MiB PSS, and its template (forked at its start, "
                  f"before any Spawn) {idle_template:.1f} MiB more"),
        Figure(
            "idle_instance_pss_amortised",
            f"PSS of one idle instance with its share of the template ({largest} running)",
            amortised, "MiB",
            notes=f"(instances + template) / {largest}; with {counts[0]} running: "
                  f"{per_instance[counts[0]] + template_at[counts[0]] / counts[0]:.1f} MiB"),
        Figure(
            "idle_instance_uss",
            f"Memory one idle instance holds alone, USS ({largest} running)",
            own[largest], "MiB",
            notes=f"private pages of its processes, what Free gives back; by instances "
                  f"running: {own_at_counts} MiB; by process ({largest} running): {by_role}"),
    ]


def _role(pid: int, instance: list[int]) -> str:
    """Which of an instance's processes (`instance`) `pid` is: its cell's holder, its auraed (a
    copy of the template, whose child it is) or that auraed's spawner (the copy's child)."""
    if Path(f"/proc/{pid}/comm").read_text().strip() != PROCESS_NAME:
        return "holder"
    with open(f"/proc/{pid}/status") as status:
        parent = next(int(line.split()[1]) for line in status if line.startswith("PPid:"))
    return "spawner" if parent in instance else "auraed"


def _templates_of(pid: int) -> list[int]:
    return [child for child in _children(pid)
            if Path(f"/proc/{child}/comm").read_text().strip() == PROCESS_NAME]


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                           check=False).stdout.split()
    return [int(p) for p in found]


if __name__ == "__main__":
    for result in run(Mode("quick" if "--quick" in sys.argv else "full")):
        print(result.as_dict())
