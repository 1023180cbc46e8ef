"""Resource limits of a cell in cgroup v2 terms, their validation, and the v1 conversions."""

import re
from dataclasses import dataclass, fields
from pathlib import Path

from auraed.kernel.cgroups.errors import InvalidLimit

DEFAULT_CPU_PERIOD_US = 100_000
MIN_CPU_WEIGHT, MAX_CPU_WEIGHT = 1, 10_000
MIN_CPU_PERIOD_US, MAX_CPU_PERIOD_US = 1_000, 1_000_000
# The kernel's own bounds: quota >= 1 ms, and at most MAX_BW (2^44 - 1) µs.
MIN_CPU_QUOTA_US, MAX_CPU_QUOTA_US = 1_000, 2**44 - 1
MAX_MEMORY_BYTES = 2**63 - 1
MAX_PIDS = 4_194_304  # PID_MAX_LIMIT on 64-bit kernels
MIN_CPU_SHARES, MAX_CPU_SHARES = 2, 262_144

ONLINE_CPUS = Path("/sys/devices/system/cpu/online")
ONLINE_NODES = Path("/sys/devices/system/node/online")

_CPU_LIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


@dataclass(frozen=True)
class CgroupLimits:
    """What a cell may use, in cgroup v2 terms. None means "not set": the kernel's default
    (unlimited) applies."""

    cpu_weight: int | None = None  # share of CPU under contention, 1..10000 (default 100)
    cpu_max: int | None = None  # CPU time per period, µs; None: unlimited
    cpu_period: int | None = None  # the period cpu_max counts in, µs (default 100000)
    cpuset_cpus: str | None = None  # CPUs allowed, kernel list syntax: "0-1,3"
    cpuset_mems: str | None = None  # memory nodes allowed, same syntax
    memory_min: int | None = None  # memory.* in bytes
    memory_low: int | None = None
    memory_high: int | None = None
    memory_max: int | None = None
    pids_max: int | None = None  # processes and threads

    def set_fields(self) -> list[str]:
        """The v2 names ("cpu.weight", ...) of the limits that are set."""
        return [field_name(f.name) for f in fields(self) if getattr(self, f.name) is not None]

    @property
    def effective_cpu_period(self) -> int:
        return DEFAULT_CPU_PERIOD_US if self.cpu_period is None else self.cpu_period


def field_name(attribute: str) -> str:
    """The API's v2 name of a CgroupLimits attribute: cpuset_cpus -> "cpuset.cpus"."""
    return attribute.replace("_", ".", 1)


def controller_of(field: str) -> str:
    """The controller that enforces a v2 limit: "memory.max" -> "memory"."""
    return field.partition(".")[0]


def validate(limits: CgroupLimits) -> None:
    """Raise InvalidLimit for the first limit out of range, malformed or naming absent CPUs/nodes."""
    _check_int("cpu.weight", limits.cpu_weight, MIN_CPU_WEIGHT, MAX_CPU_WEIGHT)
    _check_int("cpu.max", limits.cpu_max, MIN_CPU_QUOTA_US, MAX_CPU_QUOTA_US)
    _check_int("cpu.period", limits.cpu_period, MIN_CPU_PERIOD_US, MAX_CPU_PERIOD_US)
    if limits.cpuset_cpus is not None:
        _check_list("cpuset.cpus", limits.cpuset_cpus, _read_online(ONLINE_CPUS))
    if limits.cpuset_mems is not None:
        _check_list("cpuset.mems", limits.cpuset_mems, _read_online(ONLINE_NODES))
    for field, value in (
        ("memory.min", limits.memory_min),
        ("memory.low", limits.memory_low),
        ("memory.high", limits.memory_high),
        ("memory.max", limits.memory_max),
    ):
        _check_int(field, value, 0, MAX_MEMORY_BYTES)
    _check_int("pids.max", limits.pids_max, 0, MAX_PIDS)


def parse_list(text: str) -> list[tuple[int, int]]:
    """Parse kernel list syntax ("0-2,5") into inclusive ranges; ValueError if malformed."""
    if not _CPU_LIST.fullmatch(text):
        raise ValueError(f"{text!r} is not a list like 0-2,5")
    ranges = []
    for item in text.split(","):
        first, _, last = item.partition("-")
        low, high = int(first), int(last or first)
        if low > high:
            raise ValueError(f"range {item!r} runs backwards")
        ranges.append((low, high))
    return ranges


def weight_to_shares(weight: int) -> int:
    """v2 cpu.weight -> v1 cpu.shares, on the kernel's scale (weight 100 = 1024 shares)."""
    return min(max(round(weight * 1024 / 100), MIN_CPU_SHARES), MAX_CPU_SHARES)


def shares_to_weight(shares: int) -> int:
    """v1 cpu.shares -> v2 cpu.weight; the inverse of weight_to_shares for every valid weight."""
    return min(max(round(shares * 100 / 1024), MIN_CPU_WEIGHT), MAX_CPU_WEIGHT)


def _check_int(field: str, value: int | None, low: int, high: int) -> None:
    if value is None:
        return
    # bool is an int subclass; True as a limit is a caller's bug, not "1".
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidLimit(field, f"must be an integer, not {value!r}")
    if not low <= value <= high:
        raise InvalidLimit(field, f"{value} is outside {low}..{high}")


def _check_list(field: str, text: str, online: str) -> None:
    if not isinstance(text, str):
        raise InvalidLimit(field, f"must be a list like 0-2,5, not {text!r}")
    try:
        ranges = parse_list(text)
    except ValueError as e:  # also int() refusing a number of thousands of digits
        raise InvalidLimit(field, str(e)) from None
    available = {i for low, high in parse_list(online) for i in range(low, high + 1)}
    for low, high in ranges:
        # Bound by the host before expanding, so "0-99999999999" costs nothing.
        if high > max(available) or not set(range(low, high + 1)) <= available:
            raise InvalidLimit(field, f"{text!r} names ids this host lacks (online: {online})")


def _read_online(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:  # no NUMA support: a single memory node 0
        return "0"
