"""A fleet: one command on 8 nodes against the same command on 1 node, same run, same machine.

The nodes are auraed daemons in network namespaces (veth, TCP), as in tests/fleet. Measured end
to end as an operator runs it (`aurae-py --context ... cells list`, process start to exit: the
cold path every CLI call takes), and in-process with aurae_sdk.Fleet (a burst: 8 nodes at once,
fresh connections each time). Goal for the CLI: 8 nodes cost at most 1.5x one node.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.core import Comparison, Figure, Mode, Result, Series, interleave
from tests.support.daemon import fleet_config, netns_nodes

NODES = 8
SMOKE_NODES = 2  # a fleet still: more than the one node it is compared with


def run(mode: Mode) -> list[Result]:
    import aurae_sdk

    runs = mode.pick(full=20, quick=6, smoke=1)
    count = mode.pick(full=NODES, quick=NODES, smoke=SMOKE_NODES)
    results: list[Result] = []
    with netns_nodes(count) as nodes, tempfile.TemporaryDirectory() as scratch:
        config = fleet_config(Path(scratch) / "config", nodes)
        env = {**os.environ, "AURAE_CONFIG": str(config)}
        env.pop("AURAE_CONTEXT", None)
        all_names = ",".join(node.name for node in nodes)

        def cli(contexts: str) -> float:
            begin = time.perf_counter()
            subprocess.run([sys.executable, "-m", "aurae_cli", "--context", contexts, "cells",
                            "list"], env=env, check=True, stdout=subprocess.DEVNULL)
            return (time.perf_counter() - begin) * 1e3

        first_fleet = cli(all_names)  # cold: the nodes' first call, new connections everywhere
        eight = Series(f"aurae-py --context <{count} nodes> cells list", "ms")
        one = Series("aurae-py --context node1 cells list", "ms")
        interleave(runs, (eight, lambda: cli(all_names)), (one, lambda: cli("node1")),
                   warmup=mode.warmup(1))
        results.append(Comparison(
            "fleet_cli_8_vs_1", f"One CLI command on {count} nodes vs on 1 node (process start "
            "to exit)", eight, one, goal="<= 1.5x",
            notes=f"first {count}-node run (cold): {first_fleet:.0f} ms"))

        fleet8 = aurae_sdk.Fleet(configs=[_config(config, n.name) for n in nodes])
        fleet1 = aurae_sdk.Fleet(configs=[_config(config, "node1")])

        async def list_cells(client: Any) -> Any:
            return await client.cells.list()

        def burst(fleet: Any) -> float:
            begin = time.perf_counter()
            outcome = fleet.run(list_cells)
            assert all(result.ok for result in outcome), outcome
            return (time.perf_counter() - begin) * 1e3

        sdk8 = Series(f"Fleet.run on {count} nodes (new connections)", "ms")
        sdk1 = Series("Fleet.run on 1 node (new connection)", "ms")
        interleave(runs * 2, (sdk8, lambda: burst(fleet8)), (sdk1, lambda: burst(fleet1)),
                   warmup=mode.warmup(3))
        results.append(Comparison(
            "fleet_sdk_8_vs_1", f"aurae_sdk.Fleet: a burst to {count} nodes vs to 1 node", sdk8,
            sdk1,
            notes="each run opens its channels: 8 mTLS handshakes share 2 cores, so this is "
                  "CPU-bound; the CLI figure hides it behind one process start"))
        results.append(Figure("fleet_nodes", "Nodes in the fleet benchmark", count, "nodes",
                              notes="auraed in network namespaces over veth, TCP + mTLS"))
    return results


def _config(path: Path, context: str) -> Any:
    from aurae_sdk.config import load_config

    return load_config(path, context=context)
