"""The v1 backend on this host's real cgroup v1 hierarchies: what lands in the kernel's files, where
processes end up, and that nothing is left behind.

Needs root and a v1 or hybrid host (a tmpfs at /sys/fs/cgroup).
"""

import glob
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from auraed.kernel.cgroups import (
    CgroupBusy,
    CgroupError,
    CgroupExists,
    CgroupLimits,
    CgroupNotFound,
    CgroupV1Backend,
    InvalidLimit,
    LimitRefused,
    UnsafePath,
    UnsupportedLimit,
)
from auraed.kernel.cgroups.mountinfo import read_mounts

MOUNT_ROOT = "/sys/fs/cgroup"
CONTROLLERS = ("cpuset", "cpu", "cpuacct", "memory", "pids", "freezer")
PAGE = os.sysconf("SC_PAGE_SIZE")

SpawnInto = Callable[..., subprocess.Popen[bytes]]  # the conftest fixture


def _v1_host() -> bool:
    return any(m.mount_point == MOUNT_ROOT and m.fstype == "tmpfs" for m in read_mounts())


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creates cgroups: needs root"),
    pytest.mark.skipif(not _v1_host(), reason="needs cgroup v1 hierarchies"),
]


@pytest.fixture(scope="module")
def root_name() -> Iterator[str]:
    """A root of our own for this module; whatever happens, nothing of it may survive."""
    name = f"aurae-test-{secrets.token_hex(4)}"
    yield name
    # The others are test_teardown_removes_everything's and the placement test's.
    for root in (name, f"{name}-teardown", f"{name}-claimed"):
        CgroupV1Backend(root).teardown()
    assert glob.glob(f"{MOUNT_ROOT}/*/{name}*") == []


@pytest.fixture
def backend(root_name: str) -> Iterator[CgroupV1Backend]:
    backend = CgroupV1Backend(root_name)
    backend.setup()
    yield backend
    backend.cleanup_stale()
    assert backend.existing_cells() == []
    backend.close()


def cg(controller: str, *path: str) -> Path:
    return Path(MOUNT_ROOT, controller, *path)


def read(controller: str, *path: str) -> str:
    return cg(controller, *path).read_text().strip()


def proc_cgroups(pid: int) -> dict[str, str]:
    """controller -> cgroup path, from /proc/<pid>/cgroup."""
    placed = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            placed[controller] = path
    return placed


def assert_absent(root: str, cell: str) -> None:
    assert [c for c in CONTROLLERS if cg(c, root, cell).exists()] == []


def test_setup_makes_root_and_host_leaf_everywhere(backend: CgroupV1Backend) -> None:
    root = backend.root_name
    for controller in CONTROLLERS:
        assert cg(controller, root, "_host").is_dir()
    # A new v1 cpuset is empty; setup gave ours the parent's CPUs and nodes.
    assert read("cpuset", root, "cpuset.cpus") == read("cpuset", "cpuset.cpus")
    assert read("cpuset", root, "_host", "cpuset.mems") == read("cpuset", "cpuset.mems")
    # Below the root the kernel copies them at mkdir, and a cell's leaf can take processes.
    assert read("cpuset", root, "cgroup.clone_children") == "1"
    backend.create("fresh", CgroupLimits())
    assert read("cpuset", root, "fresh", "_procs", "cpuset.cpus") == read("cpuset", "cpuset.cpus")
    assert read("cpuset", root, "fresh", "_procs", "cpuset.mems") == read("cpuset", "cpuset.mems")


def test_limits_land_in_the_v1_files(backend: CgroupV1Backend) -> None:
    root = backend.root_name
    backend.create(
        "a",
        CgroupLimits(
            cpu_weight=2,
            cpu_max=50_000,
            cpu_period=200_000,
            cpuset_cpus="0",
            cpuset_mems="0",
            memory_low=32 << 20,
            memory_max=64 << 20,
            pids_max=42,
        ),
    )
    assert read("cpu", root, "a", "cpu.shares") == "20"
    assert read("cpu", root, "a", "cpu.cfs_quota_us") == "50000"
    assert read("cpu", root, "a", "cpu.cfs_period_us") == "200000"
    assert read("cpuset", root, "a", "cpuset.cpus") == "0"
    assert read("cpuset", root, "a", "cpuset.mems") == "0"
    assert read("memory", root, "a", "memory.soft_limit_in_bytes") == str(32 << 20)
    assert read("memory", root, "a", "memory.limit_in_bytes") == str(64 << 20)
    assert read("pids", root, "a", "pids.max") == "42"
    # The process leaf exists everywhere, its cpuset copied from the cell.
    for controller in CONTROLLERS:
        assert cg(controller, root, "a", "_procs").is_dir()
    assert read("cpuset", root, "a", "_procs", "cpuset.cpus") == "0"


def test_default_period_and_unset_limits(backend: CgroupV1Backend) -> None:
    root = backend.root_name
    backend.create("a", CgroupLimits(cpu_max=25_000))
    assert read("cpu", root, "a", "cpu.cfs_period_us") == "100000"
    assert read("cpu", root, "a", "cpu.shares") == "1024"
    assert read("pids", root, "a", "pids.max") == "max"
    assert backend.read_limits("a") == CgroupLimits(
        cpu_weight=100,
        cpu_max=25_000,
        cpu_period=100_000,
        cpuset_cpus=read("cpuset", root, "cpuset.cpus"),
        cpuset_mems=read("cpuset", root, "cpuset.mems"),
    )


def test_read_limits_reports_what_the_kernel_holds(backend: CgroupV1Backend) -> None:
    limits = CgroupLimits(
        cpu_weight=10_000, cpu_max=300_000, memory_max=100_000_000, memory_low=PAGE + 1
    )
    backend.create("a", limits)
    assert read("cpu", backend.root_name, "a", "cpu.shares") == "102400"
    held = backend.read_limits("a")
    assert (held.cpu_weight, held.cpu_max, held.cpu_period) == (10_000, 300_000, 100_000)
    # v1 rounds memory limits down to whole pages.
    assert held.memory_max == 100_000_000 // PAGE * PAGE
    assert held.memory_low == PAGE


def test_nested_cells(backend: CgroupV1Backend) -> None:
    root = backend.root_name
    backend.create("a", CgroupLimits(cpuset_cpus="0", pids_max=100))
    backend.create("a/b", CgroupLimits(pids_max=50))
    backend.create("a/b/c", CgroupLimits(cpu_weight=50))
    for controller in CONTROLLERS:
        assert cg(controller, root, "a", "b", "c", "_procs").is_dir()
    assert read("pids", root, "a", "b", "pids.max") == "50"
    assert read("cpu", root, "a", "b", "c", "cpu.shares") == "512"
    assert read("cpuset", root, "a", "b", "c", "_procs", "cpuset.cpus") == "0"
    assert backend.existing_cells() == ["a", "a/b", "a/b/c"]
    assert backend.join_files("a/b/c") == [
        str(cg(c, root, "a", "b", "c", "_procs", "tasks")) for c in CONTROLLERS
    ]


def test_parent_must_exist(backend: CgroupV1Backend) -> None:
    with pytest.raises(CgroupNotFound):
        backend.create("x/y", CgroupLimits())
    assert_absent(backend.root_name, "x")


def test_existing_cell_is_refused_and_kept(backend: CgroupV1Backend) -> None:
    backend.create("a", CgroupLimits(pids_max=7))
    with pytest.raises(CgroupExists):
        backend.create("a", CgroupLimits(pids_max=8))
    assert read("pids", backend.root_name, "a", "pids.max") == "7"


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        (CgroupLimits(memory_high=1 << 30), "memory.high"),
        (CgroupLimits(memory_min=1 << 20), "memory.min"),
    ],
)
def test_v2_only_limits_are_refused_not_dropped(
    backend: CgroupV1Backend, limits: CgroupLimits, field: str
) -> None:
    with pytest.raises(UnsupportedLimit) as caught:
        backend.create("a", limits)
    assert caught.value.field == field
    assert_absent(backend.root_name, "a")


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        (CgroupLimits(cpu_weight=0), "cpu.weight"),
        (CgroupLimits(cpu_max=999), "cpu.max"),
        (CgroupLimits(cpuset_cpus="0-"), "cpuset.cpus"),
        (CgroupLimits(cpuset_cpus="4096"), "cpuset.cpus"),
        (CgroupLimits(memory_max=-1), "memory.max"),
    ],
)
def test_invalid_limits_touch_nothing(
    backend: CgroupV1Backend, limits: CgroupLimits, field: str
) -> None:
    with pytest.raises(InvalidLimit) as caught:
        backend.create("a", limits)
    assert caught.value.field == field
    assert_absent(backend.root_name, "a")


def test_kernel_refusal_rolls_back_every_hierarchy(backend: CgroupV1Backend) -> None:
    # v1 CFS refuses a child quota larger than its parent's (v2 would just cap it).
    backend.create("a", CgroupLimits(cpu_max=50_000))
    with pytest.raises(LimitRefused) as caught:
        backend.create("a/b", CgroupLimits(cpu_max=100_000))
    assert caught.value.field == "cpu.max"
    assert [c for c in CONTROLLERS if cg(c, backend.root_name, "a", "b").exists()] == []
    assert backend.existing_cells() == ["a"]


@pytest.mark.skipif(os.cpu_count() == 1, reason="needs two CPUs")
def test_cpuset_outside_the_parent_is_refused(backend: CgroupV1Backend) -> None:
    backend.create("a", CgroupLimits(cpuset_cpus="0"))
    with pytest.raises(LimitRefused) as caught:
        backend.create("a/b", CgroupLimits(cpuset_cpus="1"))
    assert caught.value.field == "cpuset.cpus"


def test_processes_join_every_hierarchy(backend: CgroupV1Backend, spawn_into: SpawnInto) -> None:
    backend.create("a", CgroupLimits())
    process = spawn_into(backend.join_files("a"))
    placed = proc_cgroups(process.pid)
    for controller in CONTROLLERS:
        assert placed[controller] == f"/{backend.root_name}/a/_procs"
    assert backend.pids("a") == {process.pid}
    assert backend.is_populated("a")


def test_kill_empties_the_subtree_and_nothing_else(
    backend: CgroupV1Backend, spawn_into: SpawnInto
) -> None:
    backend.create("a", CgroupLimits())
    backend.create("a/b", CgroupLimits())
    backend.create("other", CgroupLimits())
    victims = [
        spawn_into(backend.join_files("a")),
        spawn_into(backend.join_files("a")),
        spawn_into(backend.join_files("a/b")),
    ]
    bystander = spawn_into(backend.join_files("other"))
    assert backend.pids("a", recursive=False) == {victims[0].pid, victims[1].pid}

    backend.kill("a")

    for victim in victims:
        assert victim.wait(timeout=1) == -signal.SIGKILL
        assert not Path(f"/proc/{victim.pid}").exists()  # reaped, not a zombie
    assert not backend.is_populated("a")
    assert backend.pids("a") == set()
    assert bystander.poll() is None
    assert backend.pids("other") == {bystander.pid}


def test_kill_with_an_ignored_signal_times_out(
    backend: CgroupV1Backend, spawn_into: SpawnInto
) -> None:
    backend.create("a", CgroupLimits())
    stubborn = spawn_into(backend.join_files("a"), ignore_sigterm=True)
    with pytest.raises(CgroupBusy) as caught:
        backend.kill("a", signal.SIGTERM, timeout=0.2)
    assert caught.value.pids == {stubborn.pid}
    # Thawed again: SIGKILL still works.
    assert read("freezer", backend.root_name, "a", "freezer.state") == "THAWED"
    backend.kill("a")
    assert stubborn.wait(timeout=1) == -signal.SIGKILL


def test_remove_kills_and_leaves_no_directory(
    backend: CgroupV1Backend, spawn_into: SpawnInto
) -> None:
    backend.create("a", CgroupLimits(pids_max=10))
    backend.create("a/b", CgroupLimits())
    process = spawn_into(backend.join_files("a/b"))
    backend.remove("a")
    assert process.wait(timeout=1) == -signal.SIGKILL
    assert_absent(backend.root_name, "a")
    with pytest.raises(CgroupNotFound):
        backend.remove("a")


def test_usage_and_oom_kills(backend: CgroupV1Backend, spawn_into: SpawnInto) -> None:
    backend.create("a", CgroupLimits(memory_max=32 << 20))
    hog = spawn_into(backend.join_files("a"), sys.executable, "-c", "x = 'x' * (256 << 20)")
    assert hog.wait(timeout=10) == -signal.SIGKILL
    usage = backend.usage("a")
    assert usage.cpu_usec > 1_000
    assert usage.memory_bytes is not None
    assert 0 < usage.memory_bytes <= 32 << 20
    assert backend.oom_kills("a") == 1


def test_host_leaf_and_restart_reconciliation(
    backend: CgroupV1Backend, spawn_into: SpawnInto
) -> None:
    backend.create("a", CgroupLimits())
    backend.create("a/b", CgroupLimits())
    host_process = spawn_into(backend.join_files(None))
    assert proc_cgroups(host_process.pid)["memory"] == f"/{backend.root_name}/_host/_spawner"
    cell_process = spawn_into(backend.join_files("a/b"))

    # A restarted daemon finds the cells, then clears them and the host leaf's processes.
    restarted = CgroupV1Backend(backend.root_name)
    restarted.setup()
    assert restarted.existing_cells() == ["a", "a/b"]
    restarted.cleanup_stale()
    assert restarted.existing_cells() == []
    assert host_process.wait(timeout=1) == cell_process.wait(timeout=1) == -signal.SIGKILL
    for controller in CONTROLLERS:
        assert cg(controller, backend.root_name, "_host").is_dir()


def test_teardown_removes_everything(root_name: str, spawn_into: SpawnInto) -> None:
    backend = CgroupV1Backend(f"{root_name}-teardown")
    backend.setup()
    backend.create("a", CgroupLimits())
    process = spawn_into(backend.join_files("a"))
    backend.teardown()
    assert process.wait(timeout=1) == -signal.SIGKILL
    assert glob.glob(f"{MOUNT_ROOT}/*/{backend.root_name}") == []
    backend.teardown()  # idempotent


def test_a_backend_awaiting_its_placement_touches_no_cgroup_until_relocated(
        root_name: str, spawn_into: SpawnInto) -> None:
    # A spare daemon's backend, built before its claim: its settings name a root (here one
    # that exists, holding a cell) that it must neither read nor change.
    placeholder = CgroupV1Backend(f"{root_name}-teardown")
    placeholder.setup()
    placeholder.create("a", CgroupLimits())
    process = spawn_into(placeholder.join_files("a"))
    spare = CgroupV1Backend(placeholder.root_name)
    spare.await_placement()
    for operation in (spare.setup, spare.cleanup_stale, spare.existing_cells,
                      lambda: spare.create("b", CgroupLimits()), lambda: spare.remove("a")):
        with pytest.raises(CgroupError, match="not known yet"):
            operation()
    assert process.poll() is None
    assert sorted(p.name for p in cg("memory", placeholder.root_name).iterdir()
                  if p.is_dir()) == ["_host", "a"]
    # Its claim names its place: from then on it works there, and only there.
    spare.relocate(f"{root_name}-claimed")
    spare.setup()
    spare.create("b", CgroupLimits())
    assert cg("memory", f"{root_name}-claimed", "b").is_dir()
    assert not cg("memory", placeholder.root_name, "b").exists()
    with pytest.raises(RuntimeError):
        spare.relocate(f"{root_name}-other")  # not once its root is in use
    spare.teardown()
    placeholder.teardown()
    assert glob.glob(f"{MOUNT_ROOT}/*/{root_name}-claimed") == []


def _fake_v1_mounts(tmp_path: Path) -> Path:
    """Plain directories standing in for the v1 mounts (cgroupfs itself refuses symlinks and
    files); returns a mountinfo that lists them."""
    lines = [f"29 20 0:39 / {tmp_path / 'cgroup'} rw - tmpfs tmpfs rw"]
    for i, controller in enumerate(CONTROLLERS):
        (tmp_path / "cgroup" / controller).mkdir(parents=True)
        mount = tmp_path / "cgroup" / controller
        lines.append(f"{30 + i} 29 0:{40 + i} / {mount} rw - cgroup cgroup rw,{controller}")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("\n".join(lines) + "\n")
    return mountinfo


def test_planted_symlink_or_file_is_refused(tmp_path: Path) -> None:
    backend = CgroupV1Backend("aurae", str(tmp_path / "cgroup"), _fake_v1_mounts(tmp_path))
    outside = tmp_path / "outside"
    outside.mkdir()
    cpuset_root = tmp_path / "cgroup" / "cpuset" / "aurae"
    cpuset_root.mkdir()
    (cpuset_root / "a").symlink_to(outside)
    (cpuset_root / "f").write_text("")

    with pytest.raises(UnsafePath) as caught:
        backend.create("a", CgroupLimits(cpuset_cpus="0"))
    assert caught.value.path == str(cpuset_root / "a")
    with pytest.raises(UnsafePath):
        backend.create("a/b", CgroupLimits())
    with pytest.raises(UnsafePath):
        backend.create("f", CgroupLimits())
    with pytest.raises(UnsafePath):
        backend.pids("a")
    assert list(outside.iterdir()) == []


def test_planted_symlink_as_the_root_is_refused(tmp_path: Path) -> None:
    backend = CgroupV1Backend("aurae", str(tmp_path / "cgroup"), _fake_v1_mounts(tmp_path))
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "cgroup" / "cpuset" / "aurae").symlink_to(outside)
    with pytest.raises(UnsafePath):
        backend.setup()
    assert list(outside.iterdir()) == []


def test_a_host_scope_holds_and_reaches_a_whole_process_tree(
    backend: CgroupV1Backend, root_name: str, spawn_into: SpawnInto
) -> None:
    backend.create_scope("web.7")
    scope_dirs = glob.glob(f"{MOUNT_ROOT}/*/{root_name}/_host/web.7")
    assert len(scope_dirs) == len({os.path.realpath(p) for p in scope_dirs}) >= 5
    with pytest.raises(CgroupExists):
        backend.create_scope("web.7")
    with pytest.raises(ValueError):
        backend.create_scope("../web.7")
    # A shell whose child starts a session of its own: out of reach of the shell's group.
    process = spawn_into(backend.join_files(None, "web.7"), "sh", "-c",
                         "setsid sh -c 'echo $$; exec sleep 100' & wait")
    assert process.stdout is not None
    escaped = int(process.stdout.readline())
    assert os.getsid(escaped) != os.getsid(process.pid)
    assert backend.scope_pids("web.7") == {process.pid, escaped}
    backend.signal_scope("web.7", signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while backend.scope_pids("web.7") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.scope_pids("web.7") == set()
    backend.remove_scope("web.7")
    backend.remove_scope("web.7")  # gone already: no error
    assert glob.glob(f"{MOUNT_ROOT}/*/{root_name}/_host/web.7") == []


def test_host_scopes_get_their_cpuset_from_the_kernel_and_the_held_fds_go_with_close(
    root_name: str,
) -> None:
    host_leaf = os.path.realpath(cg("cpuset", root_name, "_host"))

    def fds_on_host_leaf() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd")
                   if os.path.realpath(f"/proc/self/fd/{fd}") == host_leaf)

    # Another backend of this module may hold the same leaf open: counted from here.
    held_before = fds_on_host_leaf()
    backend = CgroupV1Backend(root_name)
    backend.setup()
    try:
        # Made after the root had clone_children, the host leaf has it too: a scope made
        # below it starts with its CPUs and nodes, copied by the kernel.
        assert read("cpuset", root_name, "_host", "cgroup.clone_children") == "1"
        backend.create_scope("copied.1")
        for filename in ("cpuset.cpus", "cpuset.mems"):
            assert read("cpuset", root_name, "_host", "copied.1", filename) == read(
                "cpuset", filename)
        assert backend.join_files(None, "copied.1")[0].endswith("/_host/copied.1/tasks")
        # The host leaf is held open (one fd per hierarchy) until close().
        assert fds_on_host_leaf() == held_before + 1
        backend.remove_scope("copied.1")
        assert glob.glob(f"{MOUNT_ROOT}/*/{root_name}/_host/copied.1") == []
    finally:
        backend.remove_scope("copied.1")  # gone already, unless an assertion failed
        backend.close()
    assert fds_on_host_leaf() == held_before


def test_cleanup_stale_removes_host_scopes(
    backend: CgroupV1Backend, root_name: str, spawn_into: SpawnInto
) -> None:
    backend.create_scope("old.1")
    spawn_into(backend.join_files(None, "old.1"))
    backend.cleanup_stale()
    assert glob.glob(f"{MOUNT_ROOT}/*/{root_name}/_host/old.1") == []
    assert glob.glob(f"{MOUNT_ROOT}/*/{root_name}/_host") != []


def test_metrics_read_every_counter_from_the_v1_files(
    backend: CgroupV1Backend, spawn_into: SpawnInto
) -> None:
    # 10 % of a CPU, and a process that wants all of it: throttled in most periods.
    backend.create("m", CgroupLimits(cpu_max=10_000, cpu_period=100_000, memory_max=256 << 20))
    backend.create("m/inner", CgroupLimits())
    burner = spawn_into(backend.join_files("m/inner"), "sh", "-c", "while :; do :; done")
    spawn_into(backend.join_files("m"))
    deadline = time.monotonic() + 60
    while (metrics := backend.metrics("m")).cpu_throttled_periods in (None, 0) \
            or metrics.cpu_usage_usec < 20_000:
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)
    assert metrics.cpu_periods is not None and metrics.cpu_periods >= metrics.cpu_throttled_periods
    assert metrics.cpu_throttled_usec is not None and metrics.cpu_throttled_usec > 0
    assert metrics.cpu_user_usec is not None and metrics.cpu_system_usec is not None
    # Hierarchical: the child's burner counts in its parent; two processes, one each.
    assert metrics.pids_current == 2
    assert metrics.memory_current_bytes is not None and metrics.memory_current_bytes > 0
    assert metrics.memory_peak_bytes is not None
    assert metrics.memory_peak_bytes >= metrics.memory_current_bytes
    assert metrics.memory_max_bytes == 256 << 20
    assert metrics.oom_kills == 0
    inner = backend.metrics("m/inner")
    assert inner.pids_current == 1 and inner.memory_max_bytes is None
    burner.kill()
    burner.wait()


def test_missing_cells_hears_removals_made_behind_its_back(backend: CgroupV1Backend) -> None:
    # The first look stats and watches; later looks stat only what a removal event named.
    backend.create("watched", CgroupLimits())
    backend.create("watched/inner", CgroupLimits())
    backend.create("bystander", CgroupLimits())
    cells = ["watched", "watched/inner", "bystander"]
    assert backend.missing_cells(cells) == {cell: [] for cell in cells}
    assert backend.missing_cells(cells) == {cell: [] for cell in cells}
    leaf = cg("memory", backend.root_name, "watched", "inner", "_procs")
    leaf.rmdir()
    gone = backend.missing_cells(cells)
    assert gone == {"watched": [], "watched/inner": [str(leaf)], "bystander": []}
    leaf.parent.rmdir()  # the whole cell, in this hierarchy
    assert backend.missing_cells(cells)["watched/inner"] == [str(leaf.parent)]
    # Put back (as a restart of the same name would): whole again, and watched again.
    leaf.mkdir(parents=True)
    assert backend.missing_cells(cells)["watched/inner"] == []
    pids = cg("pids", backend.root_name, "bystander", "_procs")
    pids.rmdir()
    assert backend.missing_cells(cells) == {"watched": [], "watched/inner": [],
                                            "bystander": [str(pids)]}
    backend.remove("watched")
    backend.remove("bystander")


def test_a_spare_scope_becomes_a_host_scope_by_renaming_and_keeps_its_cpuset(
    backend: CgroupV1Backend, root_name: str, spawn_into: SpawnInto
) -> None:
    assert backend.renames_scopes
    backend.create_spare_scope("_spare.1")
    backend.create_spare_scope("_spare.2")
    with pytest.raises(ValueError):
        backend.create_spare_scope("web.1")  # a scope's name, not a spare's
    backend.create_scope("taken.1")
    try:
        backend.claim_spare_scope("_spare.1", "renamed.1")
        for controller in CONTROLLERS:
            assert not cg(controller, root_name, "_host", "_spare.1").exists()
            assert cg(controller, root_name, "_host", "renamed.1").is_dir()
        for filename in ("cpuset.cpus", "cpuset.mems"):
            assert read("cpuset", root_name, "_host", "renamed.1", filename) == read(
                "cpuset", filename)
        # A process joins it and is reached through it like any scope's.
        process = spawn_into(backend.join_files(None, "renamed.1"))
        assert backend.scope_pids("renamed.1") == {process.pid}
        assert proc_cgroups(process.pid)["memory"] == f"/{root_name}/_host/renamed.1"
        backend.signal_scope("renamed.1", signal.SIGKILL)
        process.wait(timeout=30)
        # A name that is taken is refused, and the spare is left as it was.
        with pytest.raises(FileExistsError):
            backend.claim_spare_scope("_spare.2", "taken.1")
        for controller in CONTROLLERS:
            assert cg(controller, root_name, "_host", "_spare.2").is_dir()
        # A daemon's start removes the spares an earlier one left; scopes stay.
        backend.remove_spare_scopes()
        assert glob.glob(f"{MOUNT_ROOT}/*/{root_name}/_host/_spare.*") == []
        assert glob.glob(f"{MOUNT_ROOT}/*/{root_name}/_host/taken.1") != []
    finally:
        for scope in ("renamed.1", "taken.1"):
            backend.remove_scope(scope)
        for spare in ("_spare.1", "_spare.2"):
            backend.remove_spare_scope(spare)
    assert glob.glob(f"{MOUNT_ROOT}/*/{root_name}/_host/*.[0-9]") == []
