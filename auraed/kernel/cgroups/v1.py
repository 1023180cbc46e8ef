"""cgroup v1 (and hybrid) hosts: one hierarchy per controller, v2 limits translated to v1 files."""

import os
import time
from pathlib import Path

from auraed.kernel.cgroups import cgroupfs
from auraed.kernel.cgroups.base import (
    HOST_LEAF,
    Backoff,
    CgroupBackend,
    CgroupMetrics,
    CgroupUsage,
    Components,
    LimitFile,
    cell_components,
)
from auraed.kernel.cgroups.cgroupfs import Hierarchy
from auraed.kernel.cgroups.errors import CgroupError, UnsupportedLimit
from auraed.kernel.cgroups.limits import CgroupLimits, shares_to_weight, weight_to_shares
from auraed.kernel.cgroups.mountinfo import PROC_MOUNTINFO, Mount, read_mounts

# The controllers we place processes in, in joining order: cpuset first (see join_files()).
CONTROLLERS = ("cpuset", "cpu", "cpuacct", "memory", "pids", "freezer")
# Every v1 controller name that can appear among a cgroup mount's options.
_KNOWN_CONTROLLERS = frozenset(
    CONTROLLERS
    + ("blkio", "devices", "hugetlb", "misc", "net_cls", "net_prio", "perf_event", "rdma")
)
# What v1 memory files read when unlimited: the largest page-aligned signed 64-bit value.
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
UNLIMITED_BYTES = (2**63 - 1) // _PAGE_SIZE * _PAGE_SIZE
# cpuacct.stat counts in USER_HZ ticks.
_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


class CgroupV1Backend(CgroupBackend):
    """Cells on a v1 or hybrid host, each controller a separate hierarchy below `mount_root`."""

    version = 1
    renames_scopes = True
    # Joining through `tasks` moves only the writing thread, and a thread that moves itself
    # skips the kernel's global threadgroup lock (Linux 5.14+), whose write side waits for an
    # RCU grace period: measured here, 0.1 ms instead of 6-10 ms for the first join after a
    # quiet spell. The processes that join (the spawner's forked children, before exec) are
    # single-threaded, so the thread is the whole process. v2 refuses the same trick across
    # domain cgroups (cgroup.threads), so it keeps cgroup.procs.
    JOIN_FILE = "tasks"

    def __init__(
        self,
        root_name: str = "aurae",
        mount_root: str = "/sys/fs/cgroup",
        mountinfo: Path = PROC_MOUNTINFO,
    ) -> None:
        self._by_controller = _find_hierarchies(
            os.path.normpath(mount_root), read_mounts(mountinfo)
        )
        # Co-mounted controllers (cpu,cpuacct) share a hierarchy: join it once.
        hierarchies = dict.fromkeys(self._by_controller[c] for c in CONTROLLERS)
        super().__init__(root_name, list(hierarchies))

    def setup(self) -> None:
        super().setup()
        # New cpusets below our root start with their parent's CPUs and memory nodes instead of
        # none: the kernel copies them at mkdir, saving a copy per cgroup (see _init_cgroup).
        # A cgroup takes the flag from its parent when it is made, so the host leaf, made
        # above before the root had it, is given it too: host scopes are made below it.
        for components in ((), (HOST_LEAF,)):
            with self._open(self._by_controller["cpuset"], components) as fd:
                cgroupfs.write_file(fd, "cgroup.clone_children", "1")

    def is_populated(self, cell_path: str) -> bool:
        return bool(self._pids(cell_components(cell_path)))

    def read_limits(self, cell_path: str) -> CgroupLimits:
        cell = cell_components(cell_path)
        quota = int(self._read_v1("cpu", cell, "cpu.cfs_quota_us"))
        return CgroupLimits(
            cpu_weight=shares_to_weight(int(self._read_v1("cpu", cell, "cpu.shares"))),
            cpu_max=None if quota < 0 else quota,
            cpu_period=int(self._read_v1("cpu", cell, "cpu.cfs_period_us")),
            cpuset_cpus=self._read_v1("cpuset", cell, "cpuset.cpus") or None,
            cpuset_mems=self._read_v1("cpuset", cell, "cpuset.mems") or None,
            memory_low=_bytes(self._read_v1("memory", cell, "memory.soft_limit_in_bytes")),
            memory_max=_bytes(self._read_v1("memory", cell, "memory.limit_in_bytes")),
            pids_max=cgroupfs.parse_max(self._read_v1("pids", cell, "pids.max")),
        )

    def usage(self, cell_path: str) -> CgroupUsage:
        cell = cell_components(cell_path)
        return CgroupUsage(
            cpu_usec=int(self._read_v1("cpuacct", cell, "cpuacct.usage")) // 1000,
            memory_bytes=int(self._read_v1("memory", cell, "memory.usage_in_bytes")),
        )

    def _oom_kills(self, components: Components) -> int:
        # v1 counts a kill only in the victim's own cgroup (v2 counts it in every ancestor too).
        with self._open(self._by_controller["memory"], components) as fd:
            return sum(
                cgroupfs.read_keyed(cgroup_fd, "memory.oom_control")["oom_kill"]
                for _, cgroup_fd in cgroupfs.walk(fd)
            )

    def metrics(self, cell_path: str) -> CgroupMetrics:
        cell = cell_components(cell_path)
        with self._open(self._by_controller["cpuacct"], cell) as fd:
            usage_ns = int(cgroupfs.read_file(fd, "cpuacct.usage"))
            ticks = cgroupfs.read_keyed(fd, "cpuacct.stat")
        with self._open(self._by_controller["cpu"], cell) as fd:
            # Throttling is counted where the quota is: the cell's own cgroup.
            cpu = cgroupfs.read_keyed(fd, "cpu.stat")
        with self._open(self._by_controller["memory"], cell) as fd:
            current = int(cgroupfs.read_file(fd, "memory.usage_in_bytes"))
            peak = int(cgroupfs.read_file(fd, "memory.max_usage_in_bytes"))
            limit = _bytes(cgroupfs.read_file(fd, "memory.limit_in_bytes"))
        with self._open(self._by_controller["pids"], cell) as fd:
            pids = int(cgroupfs.read_file(fd, "pids.current"))
        return CgroupMetrics(
            cpu_usage_usec=usage_ns // 1000,
            cpu_user_usec=ticks["user"] * 1_000_000 // _TICKS_PER_SECOND,
            cpu_system_usec=ticks["system"] * 1_000_000 // _TICKS_PER_SECOND,
            cpu_periods=cpu["nr_periods"],
            cpu_throttled_periods=cpu["nr_throttled"],
            cpu_throttled_usec=cpu["throttled_time"] // 1000,
            memory_current_bytes=current,
            memory_peak_bytes=peak,
            memory_max_bytes=limit,
            pids_current=pids,
            oom_kills=self.oom_kills(cell_path),
        )

    def _check_supported(self, limits: CgroupLimits) -> None:
        if limits.memory_min is not None:
            raise UnsupportedLimit(
                "memory.min", "cgroup v1 has no memory protection (memory.low is a soft limit)"
            )
        if limits.memory_high is not None:
            raise UnsupportedLimit(
                "memory.high", "cgroup v1 has no throttling threshold; use memory.max"
            )

    def _limit_files(self, limits: CgroupLimits) -> list[LimitFile]:
        cpu, cpuset = self._by_controller["cpu"], self._by_controller["cpuset"]
        memory, pids = self._by_controller["memory"], self._by_controller["pids"]
        writes = []
        if limits.cpuset_cpus is not None:
            writes.append(LimitFile(cpuset, "cpuset.cpus", limits.cpuset_cpus, "cpuset.cpus"))
        if limits.cpuset_mems is not None:
            writes.append(LimitFile(cpuset, "cpuset.mems", limits.cpuset_mems, "cpuset.mems"))
        if limits.cpu_weight is not None:
            shares = str(weight_to_shares(limits.cpu_weight))
            writes.append(LimitFile(cpu, "cpu.shares", shares, "cpu.weight"))
        if limits.cpu_max is not None or limits.cpu_period is not None:
            # Period before quota: the kernel checks the quota against the period it has.
            period = str(limits.effective_cpu_period)
            writes.append(LimitFile(cpu, "cpu.cfs_period_us", period, "cpu.period"))
        if limits.cpu_max is not None:
            writes.append(LimitFile(cpu, "cpu.cfs_quota_us", str(limits.cpu_max), "cpu.max"))
        if limits.memory_low is not None:
            # Only approximately memory.low: under pressure, reclaim pushes the cell towards it.
            low = str(limits.memory_low)
            writes.append(LimitFile(memory, "memory.soft_limit_in_bytes", low, "memory.low"))
        if limits.memory_max is not None:
            high = str(limits.memory_max)
            writes.append(LimitFile(memory, "memory.limit_in_bytes", high, "memory.max"))
        if limits.pids_max is not None:
            writes.append(LimitFile(pids, "pids.max", str(limits.pids_max), "pids.max"))
        return writes

    def _needs_init(self, hierarchy: Hierarchy, *, holds_processes: bool) -> bool:
        return "cpuset" in hierarchy.controllers

    def _init_cgroup(
        self, hierarchy: Hierarchy, fd: int, parent_fd: int, *, holds_processes: bool
    ) -> None:
        # A new v1 cpuset cgroup has no CPUs and no memory nodes: joining it fails with ENOSPC.
        if "cpuset" not in hierarchy.controllers:
            return
        # With clone_children (set on our root, inherited below it) both are already there.
        if cgroupfs.read_file(fd, "cpuset.cpus"):
            return
        for filename in ("cpuset.cpus", "cpuset.mems"):
            if not cgroupfs.read_file(fd, filename):
                cgroupfs.write_file(fd, filename, cgroupfs.read_file(parent_fd, filename))

    def _freeze(self, components: Components, deadline: float) -> None:
        backoff = Backoff()
        with self._open(self._by_controller["freezer"], components) as fd:
            cgroupfs.write_file(fd, "freezer.state", "FROZEN")
            while cgroupfs.read_file(fd, "freezer.state") != "FROZEN":
                if time.monotonic() >= deadline:
                    return
                backoff.sleep()

    def _thaw(self, components: Components) -> None:
        with self._open(self._by_controller["freezer"], components) as fd:
            cgroupfs.write_file(fd, "freezer.state", "THAWED")

    def _read_v1(self, controller: str, components: Components, filename: str) -> str:
        return self._read(self._by_controller[controller], components, filename)


def _find_hierarchies(mount_root: str, mounts: list[Mount]) -> dict[str, Hierarchy]:
    """The hierarchy of each controller we use, from the v1 mounts below mount_root."""
    by_controller: dict[str, Hierarchy] = {}
    for mount in mounts:
        if mount.fstype != "cgroup" or os.path.dirname(mount.mount_point) != mount_root:
            continue
        controllers = _KNOWN_CONTROLLERS.intersection(mount.super_options)
        for controller in controllers:
            # The same hierarchy may be mounted twice; the first mount serves.
            by_controller.setdefault(controller, Hierarchy(mount.mount_point, controllers))
    missing = [c for c in CONTROLLERS if c not in by_controller]
    if missing:
        raise CgroupError(f"cgroup v1 controllers not mounted under {mount_root}: {missing}")
    return by_controller


def _bytes(value: str) -> int | None:
    return None if int(value) >= UNLIMITED_BYTES else int(value)
