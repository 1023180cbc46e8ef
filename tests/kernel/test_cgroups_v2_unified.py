"""The v2 backend on a real cgroup2 mount: placement, cgroup.kill, freezing and removal.

On hybrid hosts the unified mount binds none of the controllers cells limit, so this shows the
kernel side of everything but limits, and that limits are then refused rather than dropped.
Needs root and a cgroup2 mount at /sys/fs/cgroup/unified (or at /sys/fs/cgroup).
"""

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from auraed.kernel.cgroups import (
    CgroupBusy,
    CgroupLimits,
    CgroupNotFound,
    CgroupV2Backend,
    UnsupportedLimit,
)
from auraed.kernel.cgroups.mountinfo import read_mounts

SpawnInto = Callable[..., subprocess.Popen[bytes]]  # the conftest fixture


def _cgroup2_mount() -> str | None:
    mounts = [m.mount_point for m in read_mounts() if m.fstype == "cgroup2"]
    for candidate in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if candidate in mounts:
            return candidate
    return None


MOUNT = _cgroup2_mount()

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creates cgroups: needs root"),
    pytest.mark.skipif(MOUNT is None, reason="needs a cgroup2 mount"),
]


@pytest.fixture
def backend() -> Iterator[CgroupV2Backend]:
    assert MOUNT is not None
    backend = CgroupV2Backend(f"aurae-test-{secrets.token_hex(4)}", MOUNT)
    backend.setup()
    try:
        yield backend
    finally:
        backend.teardown()
        assert not Path(MOUNT, backend.root_name).exists()


def cgroup_of(pid: int) -> str:
    """The process's cgroup in the unified hierarchy (the "0::" line)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return next(line[3:] for line in lines if line.startswith("0::"))


def test_processes_land_in_the_cell_leaf(backend: CgroupV2Backend, spawn_into: SpawnInto) -> None:
    backend.create("a", CgroupLimits())
    backend.create("a/b", CgroupLimits())
    busy = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exec sleep 100"
    process = spawn_into(backend.join_files("a/b"), "sh", "-c", busy)
    assert cgroup_of(process.pid) == f"/{backend.root_name}/a/b/_procs"
    assert backend.pids("a") == {process.pid}
    assert backend.pids("a", recursive=False) == set()
    assert backend.is_populated("a")
    while Path(f"/proc/{process.pid}/comm").read_text() != "sleep\n":
        pass  # burning CPU
    assert backend.usage("a").cpu_usec > 1_000


def test_cgroup_kill_empties_the_subtree(backend: CgroupV2Backend, spawn_into: SpawnInto) -> None:
    backend.create("a", CgroupLimits())
    backend.create("a/b", CgroupLimits())
    backend.create("other", CgroupLimits())
    victims = [spawn_into(backend.join_files("a")), spawn_into(backend.join_files("a/b"))]
    bystander = spawn_into(backend.join_files("other"))

    backend.kill("a")

    for victim in victims:
        assert victim.wait(timeout=1) == -signal.SIGKILL
    assert not backend.is_populated("a")
    assert bystander.poll() is None


def test_other_signals_go_through_the_freezer(
    backend: CgroupV2Backend, spawn_into: SpawnInto
) -> None:
    backend.create("a", CgroupLimits())
    polite = spawn_into(backend.join_files("a"))
    stubborn = spawn_into(backend.join_files("a"), ignore_sigterm=True)

    with pytest.raises(CgroupBusy) as caught:
        backend.kill("a", signal.SIGTERM, timeout=0.2)

    assert polite.wait(timeout=1) == -signal.SIGTERM
    assert caught.value.pids == {stubborn.pid}
    cell = Path(MOUNT or "", backend.root_name, "a")
    assert (cell / "cgroup.freeze").read_text().strip() == "0"  # thawed again
    backend.remove("a")
    assert stubborn.wait(timeout=1) == -signal.SIGKILL
    assert not cell.exists()


def test_limits_need_their_controller(backend: CgroupV2Backend) -> None:
    if "pids" in backend.controllers:
        pytest.skip("this mount offers the pids controller")
    with pytest.raises(UnsupportedLimit) as caught:
        backend.create("a", CgroupLimits(pids_max=5))
    assert caught.value.field == "pids.max"
    with pytest.raises(CgroupNotFound):
        backend.pids("a")


def test_host_leaf_and_cleanup(backend: CgroupV2Backend, spawn_into: SpawnInto) -> None:
    host_process = spawn_into(backend.join_files(None))
    assert cgroup_of(host_process.pid) == f"/{backend.root_name}/_host/_spawner"
    backend.create("a", CgroupLimits())
    backend.cleanup_stale()
    assert host_process.wait(timeout=1) == -signal.SIGKILL
    assert backend.existing_cells() == []
    assert Path(MOUNT or "", backend.root_name, "_host").is_dir()


def test_metrics_on_a_real_cgroup2_mount(backend: CgroupV2Backend, spawn_into: SpawnInto) -> None:
    backend.create("a", CgroupLimits())
    burner = spawn_into(backend.join_files("a"), "sh", "-c", "while :; do :; done")
    first = backend.metrics("a").cpu_usage_usec
    deadline = time.monotonic() + 60
    while (metrics := backend.metrics("a")).cpu_usage_usec < first + 50_000:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert metrics.cpu_user_usec is not None and metrics.cpu_user_usec > 0
    # Controllers this mount does not bind are not accounted, and say so.
    if "memory" not in backend.controllers:
        assert metrics.memory_current_bytes is None and metrics.oom_kills is None
    if "pids" not in backend.controllers:
        assert metrics.pids_current is None
    burner.kill()
    burner.wait()
