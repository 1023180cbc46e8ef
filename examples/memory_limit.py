#!/usr/bin/env aurae-py
"""A cell with a 32 MiB memory limit, and a process that wants more.

The kernel's OOM killer ends the process inside the cell; the rest of the
machine never notices. Wait reports how it ended.
"""

from aurae_sdk.script import client

name = "memory-limit"
client.cells.allocate(cell={"name": name, "memory": {"max": 32 * 1024 * 1024}})
try:
    # `exec` makes the hungry process the one Start reports (not its shell).
    client.cells.start(cell_name=name, executable={
        "name": "hog", "command": "exec python3 -c 'hoard = bytearray(256 << 20)'"})
    status = client.cells.wait(cell_name=name, executable_name="hog", timeout=60).status
    if status.oom_killed:
        print(f"hog was killed by the OOM killer (signal {status.signal}) at the cell's 32 MiB limit")
    else:
        print(f"hog ended: exit code {status.exit_code if status.HasField('exit_code') else '-'}, "
              f"signal {status.signal if status.HasField('signal') else '-'}")
finally:
    client.cells.free(cell_name=name)
