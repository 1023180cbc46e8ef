#!/usr/bin/env aurae-py
"""Cells inside cells: limits nest the way cgroups do, and freeing the
outer cell stops and frees everything inside it."""

from collections.abc import Iterable

from aurae_sdk.script import cells, client

client.cells.allocate(cell={"name": "team", "cpu": {"max": 100_000}})
client.cells.allocate(cell={"name": "team/web", "cpu": {"max": 60_000}})
client.cells.allocate(cell={"name": "team/batch", "cpu": {"max": 30_000}})
client.cells.start(cell_name="team/web", executable={"name": "server", "command": "sleep 600"})


def show(nodes: Iterable[cells.CellGraphNode], depth: int = 0) -> None:
    for node in nodes:
        running = ", ".join(e.name for e in node.executables)
        print(f"{'  ' * depth}{node.cell.name}  cpu.max={node.cell.cpu.max}"
              + (f"  [{running}]" if running else ""))
        show(node.children, depth + 1)


show([n for n in client.cells.list().cells if n.cell.name == "team"])
client.cells.free(cell_name="team")
print("freed team and everything in it:", not any(n.cell.name == "team" for n in client.cells.list().cells))
