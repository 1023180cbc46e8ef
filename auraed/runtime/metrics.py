"""Per-cell resource usage: the runtime's cells joined with what their cgroups count.

Read on demand (Metrics, `aurae-py cells top`, a Prometheus scrape): nothing is sampled in the
background, so an idle daemon pays nothing for metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

from auraed.errors import NotFound, Subject
from auraed.kernel.cgroups import CgroupError, CgroupMetrics
from auraed.runtime.names import CellName
from auraed.runtime.workloads import CellView, Workloads


@dataclass(frozen=True)
class CellUsage:
    name: CellName
    metrics: CgroupMetrics
    executables_running: int


def cell_usage(workloads: Workloads, cell: CellName | None = None, *,
               recursive: bool = True) -> list[CellUsage]:
    """Usage of `cell` (with recursive, of the cells nested in it too), or of every cell,
    parents before children. A cell freed while being read is left out."""
    views: list[CellView] = []

    def add(view: CellView, deep: bool) -> None:
        views.append(view)
        if deep:
            for child in view.children:
                add(child, deep)

    tree = workloads.tree()
    if cell is None:
        for view in tree:
            add(view, True)
    else:
        found = _find(tree, cell)
        if found is None:
            raise NotFound(f"cell {cell} does not exist", subject=Subject.CELL)
        add(found, recursive)
    usage = []
    for view in views:
        try:
            metrics = workloads.backend.metrics(view.name.path)
        except (CgroupError, FileNotFoundError):
            continue  # freed meanwhile
        running = sum(1 for e in view.executables if e.running)
        usage.append(CellUsage(view.name, metrics, running))
    return usage


def _find(views: list[CellView] | tuple[CellView, ...], name: CellName) -> CellView | None:
    for view in views:
        if view.name == name:
            return view
        if name.is_within(view.name):
            return _find(view.children, name)
    return None
