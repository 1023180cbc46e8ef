#!/usr/bin/env aurae-py
"""Top-level await: start several jobs at once with the asyncio client and
gather their results."""

import asyncio

from aurae_sdk.script import aclient

name = "fanout"
await aclient.cells.allocate(cell={"name": name})
try:
    await asyncio.gather(*(
        aclient.cells.start(cell_name=name, executable={"name": f"job{i}", "command": f"sleep 0.{i}; exit {i}"})
        for i in range(1, 4)
    ))
    results = await asyncio.gather(*(
        aclient.cells.wait(cell_name=name, executable_name=f"job{i}") for i in range(1, 4)
    ))
    for result in results:
        print(f"{result.status.name} exited with {result.status.exit_code}")
finally:
    await aclient.cells.free(cell_name=name)
