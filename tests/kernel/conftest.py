"""Fixtures shared by the kernel-facing tests."""

import os
import subprocess
from collections.abc import Callable, Iterator

import pytest

# Starts a process that joins the given cgroup.procs files, then execs argv (default: sleep).
SpawnInto = Callable[..., subprocess.Popen[bytes]]

# Join every hierarchy the way the daemon's spawner does: write "0" (= the writer itself) to each
# cgroup.procs, report on stdout, then exec. `trap '' TERM` survives exec: the workload then
# ignores SIGTERM from its first instruction, with no window where it could still die of it.
_JOIN_AND_EXEC = 'for f in $CGROUP_JOIN; do echo 0 > "$f"; done; echo joined; exec "$@"'


@pytest.fixture
def spawn_into() -> Iterator[SpawnInto]:
    """Start processes inside cgroups; whatever is still running at the end is killed and reaped."""
    started: list[subprocess.Popen[bytes]] = []

    def spawn(
        join_files: list[str], *argv: str, ignore_sigterm: bool = False
    ) -> subprocess.Popen[bytes]:
        script = ("trap '' TERM; " if ignore_sigterm else "") + _JOIN_AND_EXEC
        process = subprocess.Popen(
            ["sh", "-ec", script, "sh", *(argv or ("sleep", "100"))],
            env={**os.environ, "CGROUP_JOIN": " ".join(join_files)},
            stdout=subprocess.PIPE,
        )
        started.append(process)
        assert process.stdout is not None
        # Returns once every write succeeded; at EOF if one failed (sh -e exits).
        if process.stdout.readline() != b"joined\n":
            raise AssertionError(f"pid {process.pid} failed to join {join_files}")
        return process

    yield spawn
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout:
            process.stdout.close()
