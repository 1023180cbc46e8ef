"""cgroup v2 hosts: one unified hierarchy whose files already speak the API's terms."""

import os
import time

from auraed.kernel.cgroups import cgroupfs
from auraed.kernel.cgroups.base import (
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
from auraed.kernel.cgroups.limits import CgroupLimits, controller_of

# The controllers cells use; each must be enabled on every level from the mount root down.
CONTROLLERS = ("cpu", "cpuset", "memory", "pids")


class CgroupV2Backend(CgroupBackend):
    """Cells in the unified hierarchy mounted at `mount_root`.

    Controllers the host does not offer (see `controllers`) are tolerated: the cells still hold
    and kill processes, and a limit that needs a missing controller raises UnsupportedLimit.
    """

    version = 2

    def __init__(self, root_name: str = "aurae", mount_root: str = "/sys/fs/cgroup") -> None:
        self._unified = Hierarchy(os.path.normpath(mount_root), frozenset())
        super().__init__(root_name, [self._unified])
        fd = cgroupfs.open_cgroup(self._unified, ())
        try:
            available = cgroupfs.read_file(fd, "cgroup.controllers").split()
        finally:
            os.close(fd)
        self.controllers = tuple(c for c in CONTROLLERS if c in available)

    def setup(self) -> None:
        self._check_placed()
        # Our root only gets the controllers its parent hands down.
        fd = cgroupfs.open_cgroup(self._unified, ())
        try:
            self._enable_controllers(fd)
        finally:
            os.close(fd)
        super().setup()

    def birth_cgroup(self, cell_path: str | None, scope: str | None = None) -> str | None:
        # Born there, a process never migrates: no wait on the kernel's global threadgroup lock,
        # whose write side (cgroup.procs) costs an RCU grace period after a quiet spell.
        (join_file,) = self.join_files(cell_path, scope)
        return os.path.dirname(join_file)

    def is_populated(self, cell_path: str) -> bool:
        with self._open(self._unified, cell_components(cell_path)) as fd:
            return cgroupfs.read_keyed(fd, "cgroup.events")["populated"] == 1

    def read_limits(self, cell_path: str) -> CgroupLimits:
        with self._open(self._unified, cell_components(cell_path)) as fd:

            def read(filename: str) -> str | None:
                if controller_of(filename) not in self.controllers:
                    return None
                return cgroupfs.read_file(fd, filename)

            cpu_max = read("cpu.max")
            quota, period = cpu_max.split() if cpu_max else (None, None)
            return CgroupLimits(
                cpu_weight=_int(read("cpu.weight")),
                cpu_max=_limit(quota),
                cpu_period=_int(period),
                cpuset_cpus=read("cpuset.cpus") or None,
                cpuset_mems=read("cpuset.mems") or None,
                memory_min=_int(read("memory.min")),
                memory_low=_int(read("memory.low")),
                memory_high=_limit(read("memory.high")),
                memory_max=_limit(read("memory.max")),
                pids_max=_limit(read("pids.max")),
            )

    def usage(self, cell_path: str) -> CgroupUsage:
        with self._open(self._unified, cell_components(cell_path)) as fd:
            # cpu.stat's usage_usec is there even without the cpu controller.
            cpu_usec = cgroupfs.read_keyed(fd, "cpu.stat")["usage_usec"]
            memory = None
            if "memory" in self.controllers:
                memory = int(cgroupfs.read_file(fd, "memory.current"))
            return CgroupUsage(cpu_usec, memory)

    def _oom_kills(self, components: Components) -> int | None:
        if "memory" not in self.controllers:
            return None
        with self._open(self._unified, components) as fd:
            if not cgroupfs.has_file(fd, "memory.events"):
                return None  # memory not handed down this far
            return cgroupfs.read_keyed(fd, "memory.events")["oom_kill"]

    def metrics(self, cell_path: str) -> CgroupMetrics:
        with self._open(self._unified, cell_components(cell_path)) as fd:
            # usage/user/system are in cpu.stat even without the cpu controller; the
            # throttling counters only with it.
            cpu = cgroupfs.read_keyed(fd, "cpu.stat")
            current = peak = limit = oom_kills = pids = None
            if "memory" in self.controllers:
                current = int(cgroupfs.read_file(fd, "memory.current"))
                if cgroupfs.has_file(fd, "memory.peak"):  # Linux 5.19+
                    peak = int(cgroupfs.read_file(fd, "memory.peak"))
                limit = cgroupfs.parse_max(cgroupfs.read_file(fd, "memory.max"))
                oom_kills = cgroupfs.read_keyed(fd, "memory.events")["oom_kill"]
            if "pids" in self.controllers:
                pids = int(cgroupfs.read_file(fd, "pids.current"))
        return CgroupMetrics(
            cpu_usage_usec=cpu["usage_usec"],
            cpu_user_usec=cpu.get("user_usec"),
            cpu_system_usec=cpu.get("system_usec"),
            cpu_periods=cpu.get("nr_periods"),
            cpu_throttled_periods=cpu.get("nr_throttled"),
            cpu_throttled_usec=cpu.get("throttled_usec"),
            memory_current_bytes=current,
            memory_peak_bytes=peak,
            memory_max_bytes=limit,
            pids_current=pids,
            oom_kills=oom_kills,
        )

    def _check_supported(self, limits: CgroupLimits) -> None:
        for field in limits.set_fields():
            controller = controller_of(field)
            if controller not in self.controllers:
                raise UnsupportedLimit(field, f"this host offers no {controller} controller")

    def _limit_files(self, limits: CgroupLimits) -> list[LimitFile]:
        writes = []
        if limits.cpu_max is not None or limits.cpu_period is not None:
            quota = "max" if limits.cpu_max is None else str(limits.cpu_max)
            cpu_max = f"{quota} {limits.effective_cpu_period}"
            writes.append(LimitFile(self._unified, "cpu.max", cpu_max, "cpu.max"))
        # The other limits are files of their own name.
        for field, value in (
            ("cpu.weight", limits.cpu_weight),
            ("cpuset.cpus", limits.cpuset_cpus),
            ("cpuset.mems", limits.cpuset_mems),
            ("memory.min", limits.memory_min),
            ("memory.low", limits.memory_low),
            ("memory.high", limits.memory_high),
            ("memory.max", limits.memory_max),
            ("pids.max", limits.pids_max),
        ):
            if value is not None:
                writes.append(LimitFile(self._unified, field, str(value), field))
        return writes

    def _needs_init(self, hierarchy: Hierarchy, *, holds_processes: bool) -> bool:
        return not holds_processes

    def _init_cgroup(
        self, hierarchy: Hierarchy, fd: int, parent_fd: int, *, holds_processes: bool
    ) -> None:
        # A leaf must not enable controllers: then it could not hold processes.
        if not holds_processes:
            self._enable_controllers(fd)

    def _enable_controllers(self, fd: int) -> None:
        if not self.controllers:
            return
        line = " ".join(f"+{c}" for c in self.controllers)
        try:
            cgroupfs.write_file(fd, "cgroup.subtree_control", line)
        except OSError as e:
            # EBUSY: the cgroup holds processes (e.g. the daemon itself in a container's root).
            raise CgroupError(f"cannot enable {line!r} in cgroup.subtree_control: {e}") from e

    def _kill_at_once(self, components: Components) -> set[int]:
        with self._open(self._unified, components) as fd:
            if not cgroupfs.has_file(fd, "cgroup.kill"):  # before Linux 5.14
                return set()
            pids = self._pids(components)
            # Nothing to kill, no write: a cgroup.kill marks the cgroups it covers, and on some
            # kernels a child later born into a marked cgroup (CLONE_INTO_CGROUP) is killed at
            # birth (see the fork server's _fork_workload).
            if pids:
                cgroupfs.write_file(fd, "cgroup.kill", "1")
            return pids

    def _freeze(self, components: Components, deadline: float) -> None:
        backoff = Backoff()
        with self._open(self._unified, components) as fd:
            cgroupfs.write_file(fd, "cgroup.freeze", "1")
            while cgroupfs.read_keyed(fd, "cgroup.events")["frozen"] != 1:
                if time.monotonic() >= deadline:
                    return
                backoff.sleep()

    def _thaw(self, components: Components) -> None:
        with self._open(self._unified, components) as fd:
            cgroupfs.write_file(fd, "cgroup.freeze", "0")


def _int(value: str | None) -> int | None:
    return None if value is None else int(value)


def _limit(value: str | None) -> int | None:
    return None if value is None else cgroupfs.parse_max(value)
