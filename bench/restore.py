"""Live restore: from a SIGKILL of auraed to the next auraed serving, with 100 cells and 100
running executables adopted, against the same restart with nothing to adopt (the floor: a
daemon's own start), measured in the same run; and the lines a writer loses across it."""

from __future__ import annotations

import os
import signal
import time
from contextlib import ExitStack

from bench.core import Comparison, Figure, Mode, Result, Series
from tests.support.daemon import DaemonProcess, running_daemon

# A numbered line every millisecond.
COUNTER = ("exec python3 -u -c 'import itertools, time\n"
           "for i in itertools.count(): print(i); time.sleep(0.001)'")


def _restart(stack: ExitStack, daemon: DaemonProcess) -> tuple[DaemonProcess, float]:
    """SIGKILL `daemon`, start the next on its runtime directory; seconds until it serves."""
    begin = time.perf_counter()
    daemon.stop(signal.SIGKILL)
    following = stack.enter_context(running_daemon(after=daemon))
    return following, time.perf_counter() - begin


def _lost_lines(lines: list[str]) -> int:
    """Numbers missing or seen more than once."""
    seen = [int(line) for line in lines]
    return (max(seen) + 1 - len(set(seen))) + (len(seen) - len(set(seen))) if seen else 1


def run(mode: Mode) -> list[Result]:
    cells = mode.pick(full=100, quick=100, smoke=4)
    restarts = mode.pick(full=8, quick=3, smoke=1)
    counters = mode.pick(full=5, quick=2, smoke=1)
    adopted = Series(f"SIGKILL -> serving, {cells} cells + {cells} executables adopted", "s")
    floor = Series("SIGKILL -> serving, nothing to adopt", "s")
    with ExitStack() as stack:
        loaded = stack.enter_context(running_daemon())
        empty = stack.enter_context(running_daemon())
        with loaded.client(timeout=60) as client:
            for index in range(cells):
                name = f"c{index:03d}"
                client.cells.allocate(cell={"name": name, "cpu": {"weight": 50 + index}})
                command = COUNTER if index < counters else "sleep 3600"
                client.cells.start(cell_name=name, executable={"name": "w", "command": command})
        for _ in range(restarts):
            loaded, seconds = _restart(stack, loaded)
            adopted.samples.append(seconds)
            empty, seconds = _restart(stack, empty)
            floor.samples.append(seconds)
            with loaded.client(timeout=60) as client:
                listed = client.cells.list().cells
                running = sum(1 for node in listed for e in node.executables if e.state == 1)
                if len(listed) != cells or running != cells:
                    raise RuntimeError(f"adopted {len(listed)} cells and {running} running "
                                       f"executables of {cells}")
        lost = 0
        with loaded.client(timeout=60) as client:
            for index in range(counters):
                name = f"c{index:03d}"
                (node,) = [n for n in client.cells.list().cells if n.cell.name == name]
                os.kill(node.executables[0].host_pid, signal.SIGTERM)
                client.cells.wait(cell_name=name, executable_name="w", timeout=30)
                lines = [item.line for response in client.observe.get_sub_process_stream(
                    process_id=node.executables[0].pid, channel_type="LOG_CHANNEL_TYPE_STDOUT",
                    max_batch_lines=1000, timeout=60) for item in response.items]
                lost += _lost_lines(lines)
    return [
        Comparison("restore_sigkill_100", f"Live restore: SIGKILL -> serving, {cells} cells + "
                   f"{cells} executables adopted, vs the same restart with nothing to adopt",
                   adopted, floor, goal="<= 1 s absolute, 0 lines lost",
                   notes=f"{restarts} restarts of each; median {adopted.median:.2f} s; the "
                         "floor is auraed's own start (Python, grpc, mTLS)"),
        Figure("restore_lines_lost", f"Lines lost by {counters} writers (a numbered line every "
               f"ms) across {restarts} SIGKILL restarts", lost, "lines"),
    ]
