"""Scale: the 1st against the 1000th Allocate+Start, List latency with 1000
cells against an empty List, and the daemon's memory idle and with 1000
cells each running a process.

List is measured from the client, one List of all cells: page_size 0 (as many cells as fit
in 1 MiB), and the run checks that this one page holds every cell (no next_page_token). The
daemon keeps its last page while nothing it shows changes (auraed/services/cells.py), so the
steady figure leans on that; "List after a change" is the same List right after an Update of
one cell, which puts the page together again (from cached serialized cells).
"""

from __future__ import annotations

import statistics
import time

from bench.core import Comparison, Figure, Result, Series, rss_bytes
from tests.support.daemon import running_daemon


def run(quick: bool) -> list[Result]:
    cells = 200 if quick else 1000
    window = 10 if quick else 25
    first = Series(f"Allocate+Start, cells 1-{window}", "ms")
    last = Series(f"Allocate+Start, cells {cells - window + 1}-{cells}", "ms")
    full_list = Series(f"List with {cells} cells (one page of all)", "ms")
    changed_list = Series(f"List with {cells} cells right after an Update of one", "ms")
    empty_list = Series("List with no cells", "ms")
    results: list[Result] = []
    with running_daemon() as daemon, daemon.client(timeout=120) as client:
        for _ in range(20):
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
        for _ in range(10 if quick else 20):
            full_list.samples.append(_timed_ms(client.cells.list))
        for weight in range(10 if quick else 20):
            client.cells.update(cell={"name": "s0", "cpu": {"weight": 101 + weight}})
            changed_list.samples.append(_timed_ms(client.cells.list))
        listed = client.cells.list()
        assert not listed.next_page_token, "one page must hold every cell"
        assert len(listed.cells) == cells and all(n.executables for n in listed.cells)
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
                   last, first, goal="<= 1.2x (no growth with the number of cells)"),
        Comparison("list_full_vs_empty", f"List latency with {cells} cells vs none", full_list, empty_list,
                   goal="<= 5 ms at 1000 cells",
                   notes=f"{full_list.median:.2f} ms median; one page of all cells; leans on the "
                         "kept page (nothing changed between these Lists)"),
        Comparison("list_after_change_vs_empty", f"List latency with {cells} cells right after "
                   "an Update of one vs none", changed_list, empty_list,
                   notes=f"{changed_list.median:.2f} ms median: the page put together again "
                         "from cached serialized cells and statuses"),
        Figure("rss_idle", "Daemon RSS, idle", idle / 2**20, "MiB"),
        Figure("rss_loaded", f"Daemon RSS with {cells} cells, each running a process", loaded / 2**20, "MiB",
               notes=f"{(loaded - idle) / cells / 1024:.1f} KiB per cell with its executable"),
        Figure("rss_after_free", f"Daemon RSS after freeing all {cells} cells", after / 2**20, "MiB"),
        Figure("free_median", f"Free of a cell with a running process (median of {cells})",
               statistics.median(free_costs), "ms"),
    ]
    return results


def _timed_ms(call) -> float:  # type: ignore[no-untyped-def]
    begin = time.perf_counter()
    call()
    return (time.perf_counter() - begin) * 1e3
