"""Shutdown and restart: SIGTERM leaves nothing behind; a daemon killed with
SIGKILL leaves its workloads to the spawner, and a next daemon that cannot adopt
them (another runtime directory) cleans up. Adoption: tests/trust/test_live_restore.py."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import aurae_sdk
from tests.support.daemon import cgroup_dirs, cgroup_pids, running_daemon
from tests.support.processes import alive


def test_sigterm_stops_everything_and_removes_every_cgroup() -> None:
    with running_daemon(grace_period=1.0) as daemon:
        with daemon.client() as client:
            client.cells.allocate(cell={"name": "web", "cpu": {"weight": 50}})
            client.cells.allocate(cell={"name": "web/api"})
            pids = [
                client.cells.start(cell_name="web", executable={"name": "a", "command": "sleep 300"}).pid,
                client.cells.start(cell_name="web/api",
                                   executable={"name": "b", "command": "trap '' TERM; sleep 300 & wait"}).pid,
                client.cells.start(executable={"name": "c", "command": "sleep 300"}).pid,
            ]
            assert cgroup_dirs(daemon.cgroup_root)
            assert set(pids) <= cgroup_pids(daemon.cgroup_root)
            statuses: list[int] = []
            watch = client.health.watch(service="")

            def follow() -> None:
                try:
                    for response in watch:
                        statuses.append(response.status)
                except aurae_sdk.AuraeError:
                    pass

            watcher = threading.Thread(target=follow)
            watcher.start()
            time.sleep(0.3)
            assert daemon.stop(signal.SIGTERM) == 0
            watcher.join(10)
        # Health went NOT_SERVING before the server went away.
        assert statuses[:1] == [1] and 2 in statuses
        assert not cgroup_dirs(daemon.cgroup_root)
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists(), pid
        assert not os.path.exists(daemon.socket)
        assert "auraed stopped" in daemon.log()


def test_a_killed_daemon_leaves_its_workloads_and_a_daemon_that_cannot_adopt_cleans_up() -> None:
    with running_daemon() as first:
        root = first.cgroup_root
        with first.client() as client:
            client.cells.allocate(cell={"name": "survivor"})
            pid = client.cells.start(cell_name="survivor",
                                     executable={"name": "s", "command": "sleep 300"}).host_pid
        first.stop(signal.SIGKILL)
        # The spawner outlives its daemon and keeps the workload running.
        time.sleep(0.3)
        assert Path(f"/proc/{pid}").exists()
        assert cgroup_dirs(root), "a SIGKILLed daemon cannot remove its cgroups"

        # Another runtime directory: no spawner to adopt, so the cgroup subtree is cleaned,
        # the orphaned spawner (in the host leaf) with it.
        with running_daemon(cgroup_root=root) as second:
            assert not alive(pid), second.log()
            with second.client() as client:
                assert [n.cell.name for n in client.cells.list().cells] == []
                # The same name allocates again: nothing left over is in the way.
                client.cells.allocate(cell={"name": "survivor"})
                client.cells.free(cell_name="survivor")
            log = second.log()
            assert "removing cells left by a previous run" in log
            # The shell and its sleep.
            assert "cells=survivor processes_killed=2" in log, log
