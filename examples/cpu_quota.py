#!/usr/bin/env aurae-py
"""A cell limited to a fifth of one CPU, running a busy loop.

    aurae-py examples/cpu_quota.py [--keep]

--keep leaves the cell allocated so you can look at its cgroup files.
"""

import sys
import time

from aurae_sdk.script import cells, client

name = "cpu-quota"
client.cells.allocate(cell=cells.Cell(
    name=name,
    cpu=cells.CpuController(weight=50, max=20_000, period=100_000),  # 20 ms every 100 ms
))
started = client.cells.start(cell_name=name, executable=cells.Executable(
    name="spin", command="while :; do :; done", description="burns CPU, within its quota"))
print(f"spinning as pid {started.pid} in cell {name!r}: at most 20% of one CPU")
time.sleep(1)

(node,) = [n for n in client.cells.list().cells if n.cell.name == name]
cpu = node.cell.cpu
print(f"cell {name}: weight={cpu.weight} max={cpu.max}us per {cpu.period}us")
if "--keep" not in sys.argv:
    stopped = client.cells.stop(cell_name=name, executable_name="spin", grace_period_ms=500)
    print(f"stopped spin: signal {stopped.status.signal}")
    client.cells.free(cell_name=name)
