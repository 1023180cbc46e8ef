"""The v2 backend's files and values, against plain directories that imitate a cgroup2 mount.

The kernel's behaviour (populating new cgroups, enforcing limits) is not imitated: these tests show
which files the backend writes and what it makes of what it reads. test_cgroups_v2_unified.py runs
the same backend on a real cgroup2 mount.
"""

from pathlib import Path

import pytest

from auraed.kernel.cgroups import (
    CgroupExists,
    CgroupLimits,
    CgroupMetrics,
    CgroupNotFound,
    CgroupUsage,
    CgroupV2Backend,
    UnsafePath,
    UnsupportedLimit,
)

ALL_LIMITS = CgroupLimits(
    cpu_weight=250,
    cpu_max=50_000,
    cpu_period=200_000,
    cpuset_cpus="0",
    cpuset_mems="0",
    memory_min=1 << 20,
    memory_low=2 << 20,
    memory_high=3 << 20,
    memory_max=4 << 20,
    pids_max=42,
)


def fake_cgroup2(tmp_path: Path, controllers: str) -> Path:
    mount = tmp_path / "cgroup"
    mount.mkdir()
    (mount / "cgroup.controllers").write_text(controllers + "\n")
    (mount / "cgroup.subtree_control").write_text("\n")
    return mount


@pytest.fixture
def mount(tmp_path: Path) -> Path:
    return fake_cgroup2(tmp_path, "cpuset cpu io memory hugetlb pids rdma misc")


@pytest.fixture
def backend(mount: Path) -> CgroupV2Backend:
    backend = CgroupV2Backend("aurae-test", str(mount))
    backend.setup()
    return backend


def test_setup_enables_controllers_down_to_the_root(mount: Path, backend: CgroupV2Backend) -> None:
    assert backend.controllers == ("cpu", "cpuset", "memory", "pids")
    enabled = "+cpu +cpuset +memory +pids"
    assert (mount / "cgroup.subtree_control").read_text() == enabled
    assert (mount / "aurae-test" / "cgroup.subtree_control").read_text() == enabled
    # Host-level executables live in scopes below _host, which hands them the controllers
    # (memory among them: each scope's own OOM kill counter).
    assert (mount / "aurae-test" / "_host" / "cgroup.subtree_control").read_text() == enabled


def test_setup_is_idempotent(mount: Path, backend: CgroupV2Backend) -> None:
    backend.create("a", CgroupLimits())
    backend.setup()
    assert backend.existing_cells() == ["a"]


def test_limits_land_in_files_of_their_own_name(mount: Path, backend: CgroupV2Backend) -> None:
    backend.create("a", ALL_LIMITS)
    cell = mount / "aurae-test" / "a"
    assert {f.name: f.read_text() for f in cell.iterdir() if f.is_file()} == {
        "cgroup.subtree_control": "+cpu +cpuset +memory +pids",
        "cpu.weight": "250",
        "cpu.max": "50000 200000",
        "cpuset.cpus": "0",
        "cpuset.mems": "0",
        "memory.min": str(1 << 20),
        "memory.low": str(2 << 20),
        "memory.high": str(3 << 20),
        "memory.max": str(4 << 20),
        "pids.max": "42",
    }
    assert (cell / "_procs").is_dir()
    assert not (cell / "_procs" / "cgroup.subtree_control").exists()
    assert backend.read_limits("a") == ALL_LIMITS


@pytest.mark.parametrize(
    ("limits", "cpu_max"),
    [
        (CgroupLimits(cpu_max=30_000), "30000 100000"),
        (CgroupLimits(cpu_period=50_000), "max 50000"),
    ],
)
def test_cpu_max_pairs_quota_and_period(
    mount: Path, backend: CgroupV2Backend, limits: CgroupLimits, cpu_max: str
) -> None:
    backend.create("a", limits)
    assert (mount / "aurae-test" / "a" / "cpu.max").read_text() == cpu_max


def test_read_limits_maps_max_to_none(mount: Path, backend: CgroupV2Backend) -> None:
    backend.create("a", ALL_LIMITS)
    cell = mount / "aurae-test" / "a"
    # What the kernel shows for a cell with no limits of its own.
    for name, value in {
        "cpu.weight": "100\n",
        "cpu.max": "max 100000\n",
        "cpuset.cpus": "\n",
        "cpuset.mems": "\n",
        "memory.min": "0\n",
        "memory.low": "0\n",
        "memory.high": "max\n",
        "memory.max": "max\n",
        "pids.max": "max\n",
    }.items():
        (cell / name).write_text(value)
    assert backend.read_limits("a") == CgroupLimits(
        cpu_weight=100, cpu_period=100_000, memory_min=0, memory_low=0
    )


def test_nested_cells_and_their_files(mount: Path, backend: CgroupV2Backend) -> None:
    backend.create("a", CgroupLimits())
    backend.create("a/b", CgroupLimits(pids_max=5))
    leaf = mount / "aurae-test" / "a" / "b" / "_procs"
    assert leaf.is_dir()
    assert (mount / "aurae-test" / "a" / "b" / "cgroup.subtree_control").read_text() != ""
    assert backend.existing_cells() == ["a", "a/b"]
    assert backend.join_files("a/b") == [str(leaf / "cgroup.procs")]
    assert backend.join_files(None) == [str(mount / "aurae-test" / "_host" / "_spawner" / "cgroup.procs")]


def test_parent_must_exist_and_cell_must_not(backend: CgroupV2Backend) -> None:
    with pytest.raises(CgroupNotFound):
        backend.create("a/b", CgroupLimits())
    backend.create("a", CgroupLimits())
    with pytest.raises(CgroupExists):
        backend.create("a", CgroupLimits())


def test_missing_controllers_refuse_their_limits(tmp_path: Path) -> None:
    mount = fake_cgroup2(tmp_path, "cpu memory io")
    backend = CgroupV2Backend("aurae-test", str(mount))
    backend.setup()
    assert (mount / "cgroup.subtree_control").read_text() == "+cpu +memory"
    with pytest.raises(UnsupportedLimit) as caught:
        backend.create("a", CgroupLimits(cpu_weight=10, pids_max=5))
    assert caught.value.field == "pids.max"
    assert not (mount / "aurae-test" / "a").exists()
    backend.create("a", CgroupLimits(memory_max=4096))
    assert (mount / "aurae-test" / "a" / "memory.max").read_text() == "4096"


def test_planted_symlinks_are_refused(tmp_path: Path, mount: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (mount / "aurae-test").symlink_to(outside)
    with pytest.raises(UnsafePath):
        CgroupV2Backend("aurae-test", str(mount)).setup()

    backend = CgroupV2Backend("aurae-other", str(mount))
    backend.setup()
    (mount / "aurae-other" / "a").symlink_to(outside)
    with pytest.raises(UnsafePath) as caught:
        backend.create("a", ALL_LIMITS)
    assert caught.value.path == str(mount / "aurae-other" / "a")
    with pytest.raises(UnsafePath):
        backend.create("a/b", ALL_LIMITS)
    with pytest.raises(UnsafePath):
        backend.read_limits("a")
    assert list(outside.iterdir()) == []
    assert backend.existing_cells() == []  # a symlink is never taken for a cell


def test_usage_oom_kills_and_populated(mount: Path, backend: CgroupV2Backend) -> None:
    backend.create("a", CgroupLimits())
    cell = mount / "aurae-test" / "a"
    (cell / "cpu.stat").write_text("usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n")
    (cell / "memory.current").write_text("8192\n")
    (cell / "memory.events").write_text("low 0\nhigh 3\nmax 9\noom 2\noom_kill 1\n")
    (cell / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert backend.usage("a") == CgroupUsage(cpu_usec=1234, memory_bytes=8192)
    assert backend.oom_kills("a") == 1
    assert backend.is_populated("a")


def test_metrics_read_the_v2_files(mount: Path, backend: CgroupV2Backend) -> None:
    backend.create("a", CgroupLimits(memory_max=1 << 30))
    cell = mount / "aurae-test" / "a"
    (cell / "cpu.stat").write_text(
        "usage_usec 5000\nuser_usec 4000\nsystem_usec 1000\nnr_periods 50\nnr_throttled 7\n"
        "throttled_usec 900\n")
    (cell / "memory.current").write_text("8192\n")
    (cell / "memory.peak").write_text("16384\n")
    (cell / "memory.max").write_text(f"{1 << 30}\n")
    (cell / "memory.events").write_text("low 0\nhigh 0\nmax 1\noom 1\noom_kill 1\n")
    (cell / "pids.current").write_text("3\n")
    assert backend.metrics("a") == CgroupMetrics(
        cpu_usage_usec=5000, cpu_user_usec=4000, cpu_system_usec=1000, cpu_periods=50,
        cpu_throttled_periods=7, cpu_throttled_usec=900, memory_current_bytes=8192,
        memory_peak_bytes=16384, memory_max_bytes=1 << 30, pids_current=3, oom_kills=1)
    # Before Linux 5.19 there is no memory.peak; without the cpu controller, no throttling.
    (cell / "memory.peak").unlink()
    (cell / "memory.max").write_text("max\n")
    (cell / "cpu.stat").write_text("usage_usec 5000\nuser_usec 4000\nsystem_usec 1000\n")
    metrics = backend.metrics("a")
    assert metrics.memory_peak_bytes is None and metrics.memory_max_bytes is None
    assert metrics.cpu_periods is None and metrics.cpu_throttled_usec is None
