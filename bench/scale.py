"""Scale: the 1st against the 1000th Allocate+Start, List latency with 1000
cells against an empty List, and the daemon's memory idle and with 1000
cells each running a process.

The floor of Allocate+Start is what the kernel is asked for per cell, done by this script in
the same run: a cgroup in every hierarchy the daemon uses (a weight written, cpuset copied), in
a parent of as many children, and `sleep` posix_spawned from inside it. Its own last/first
ratio is the part of the growth that is the kernel's.

List is measured from the client, one List of all cells: page_size 0 (as many cells as fit
in 1 MiB), and the run checks that this one page holds every cell (no next_page_token). The
daemon keeps its last page while nothing it shows changes (auraed/services/cells.py), so the
idle figure leans on that; "List after a change" is the same List right after one change (an
Update, an Allocate or a Free of one cell, one executable exiting), which puts together again
only the top-level cell it touched and joins the others' kept bytes (WholeListing in
auraed/services/cell_pages.py).
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from pathlib import Path

from bench.core import Comparison, Figure, Mode, Result, Series, rss_bytes
from tests.support.daemon import cgroup_dirs, running_daemon


def run(mode: Mode) -> list[Result]:
    cells = mode.pick(full=1000, quick=200, smoke=6)
    window = mode.pick(full=25, quick=10, smoke=2)
    lists = mode.pick(full=20, quick=10, smoke=1)  # samples of each List
    first = Series(f"Allocate+Start, cells 1-{window}", "ms")
    last = Series(f"Allocate+Start, cells {cells - window + 1}-{cells}", "ms")
    full_list = Series(f"List with {cells} cells (one page of all)", "ms")
    changed = {change: Series(f"List with {cells} cells right after {what}", "ms")
               for change, what in (("update", "an Update of one"),
                                    ("allocate", "an Allocate of one more"),
                                    ("free", "a Free of one"),
                                    ("exit", "one executable exited"))}
    empty_list = Series("List with no cells", "ms")
    floor_first = Series(f"floor: cgroups+spawn, cells 1-{window}", "ms")
    floor_last = Series(f"floor: cgroups+spawn, cells {cells - window + 1}-{cells}", "ms")
    results: list[Result] = []
    with running_daemon() as daemon, daemon.client(timeout=120) as client:
        for _ in range(mode.pick(full=20, quick=20, smoke=1)):
            empty_list.samples.append(_timed_ms(client.cells.list))
        time.sleep(0.5)
        idle = rss_bytes(daemon.process.pid)
        costs = []
        for index in range(cells):
            name = f"s{index}"
            begin = time.perf_counter()
            client.cells.allocate(cell={"name": name, "cpu": {"weight": 100}})
            client.cells.start(cell_name=name, executable={"name": "idle", "command": "sleep 3600"})
            costs.append((time.perf_counter() - begin) * 1e3)
        first.samples = costs[:window]
        last.samples = costs[-window:]
        client.cells.list()  # the first look at the host: every cgroup stat'ed and watched
        for _ in range(lists):
            full_list.samples.append(_timed_ms(client.cells.list))
        for weight in range(lists):
            client.cells.update(cell={"name": "s0", "cpu": {"weight": 101 + weight}})
            changed["update"].samples.append(_timed_ms(client.cells.list))
        for index in range(lists):
            client.cells.allocate(cell={"name": f"t{index}", "cpu": {"weight": 100}})
            changed["allocate"].samples.append(_timed_ms(client.cells.list))
        for index in range(lists):
            client.cells.free(cell_name=f"t{index}")
            changed["free"].samples.append(_timed_ms(client.cells.list))
        for index in range(lists):
            started = client.cells.start(cell_name="s1", executable={
                "name": f"ends{index}", "command": "sleep 3600"})
            client.cells.list()
            os.killpg(started.host_pid, signal.SIGKILL)
            client.cells.wait(cell_name="s1", executable_name=f"ends{index}", timeout=30)
            changed["exit"].samples.append(_timed_ms(client.cells.list))
        listed = client.cells.list()
        assert not listed.next_page_token, "one page must hold every cell"
        assert len(listed.cells) == cells and all(n.executables for n in listed.cells)
        floor = _kernel_floor(cgroup_dirs(daemon.cgroup_root), cells)
        floor_first.samples, floor_last.samples = floor[:window], floor[-window:]
        time.sleep(0.5)
        loaded = rss_bytes(daemon.process.pid)
        free_costs = []
        for index in range(cells):
            begin = time.perf_counter()
            client.cells.free(cell_name=f"s{index}")
            free_costs.append((time.perf_counter() - begin) * 1e3)
        time.sleep(0.5)
        after = rss_bytes(daemon.process.pid)
    results += [
        Comparison("allocate_start_first_vs_last", f"Allocate+Start: the last {window} of {cells} vs the first {window}",
                   last, first, goal="<= 1.2x (no growth with the number of cells)",
                   notes=f"the kernel's own growth, same run: {floor_last.median / floor_first.median:.2f}x "
                         "(allocate_start_floor_first_vs_last)"),
        Comparison("allocate_start_floor_first_vs_last", f"Floor (kernel): cgroups+spawn, the last "
                   f"{window} of {cells} vs the first {window}", floor_last, floor_first,
                   notes="mkdir in every hierarchy, a weight and cpuset written, sleep posix_spawned "
                         "from inside the cgroup, by this script: what of the growth is the kernel's"),
        Comparison("list_full_vs_empty", f"List latency with {cells} cells vs none", full_list, empty_list,
                   goal="<= 5 ms at 1000 cells",
                   notes=f"{full_list.median:.2f} ms median; one page of all cells; leans on the "
                         "kept page (nothing changed between these Lists)"),
        *(Comparison(f"list_after_{change}_vs_idle", f"List with {cells} cells right after "
                     f"{series.label.rpartition(' after ')[2]} vs the unchanged List", series,
                     full_list, goal="<= 5 ms at 1000 cells",
                     notes=f"{series.median:.2f} ms median vs {full_list.median:.2f} ms: only the "
                           "top-level cell the change touched is put together again")
          for change, series in changed.items()),
        Figure("rss_idle", "Daemon RSS, idle", idle / 2**20, "MiB"),
        Figure("rss_loaded", f"Daemon RSS with {cells} cells, each running a process", loaded / 2**20, "MiB",
               notes=f"{(loaded - idle) / cells / 1024:.1f} KiB per cell with its executable"),
        Figure("rss_after_free", f"Daemon RSS after freeing all {cells} cells", after / 2**20, "MiB"),
        Figure("free_median", f"Free of a cell with a running process (median of {cells})",
               statistics.median(free_costs), "ms"),
    ]
    return results


def _kernel_floor(daemon_tops: list[Path], cells: int) -> list[float]:
    """Per cell, in ms: what the daemon asks of the kernel for an Allocate+Start, by a plain
    script, in a subtree of its own beside the daemon's (see the module docstring)."""
    tops = [top.parent / f"{top.name}-floor" for top in daemon_tops]
    home = [top / "home" for top in tops]
    costs: list[float] = []
    pids: list[int] = []
    for directory in (*tops, *home):
        directory.mkdir()
        _copy_cpuset(directory)

    def join(directories: list[Path]) -> None:
        for directory in directories:
            procs = directory / "cgroup.procs"
            procs.write_text("0")

    started_in = [_own_cgroup(top.parent) for top in tops]
    try:
        join(home)
        for index in range(cells):
            begin = time.perf_counter()
            made = [top / f"c{index}" for top in tops]
            for directory in made:
                directory.mkdir()
                _copy_cpuset(directory)
                for weight, value in (("cpu.shares", "1024"), ("cpu.weight", "100")):
                    if (directory / weight).exists():
                        (directory / weight).write_text(value)
            join(made)
            pids.append(os.posix_spawn("/bin/sleep", ["sleep", "3600"], dict(os.environ),
                                       setsid=True))
            join(home)
            costs.append((time.perf_counter() - begin) * 1e3)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        join(started_in)
        for top in tops:
            for directory in sorted(top.iterdir(), reverse=True):
                if directory.is_dir():
                    directory.rmdir()
            top.rmdir()
    return costs


def _own_cgroup(hierarchy: Path) -> Path:
    """Where this process is in the hierarchy mounted at `hierarchy` (/proc/self/cgroup)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        v2 = not controllers and (hierarchy.name == "unified" or hierarchy == Path("/sys/fs/cgroup"))
        if v2 or hierarchy.name in controllers.split(","):
            return hierarchy / path.lstrip("/")
    raise LookupError(f"not in {hierarchy}")


def _copy_cpuset(directory: Path) -> None:
    """A new v1 cpuset cgroup is empty: no task can join it until it has its parent's."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        if (directory / name).exists() and not (directory / name).read_text().strip():
            (directory / name).write_text((directory.parent / name).read_text())


def _timed_ms(call) -> float:  # type: ignore[no-untyped-def]
    begin = time.perf_counter()
    call()
    return (time.perf_counter() - begin) * 1e3
