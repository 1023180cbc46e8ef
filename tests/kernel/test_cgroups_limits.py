"""CgroupLimits validation and the v2 -> v1 conversions: pure logic, checked against this host's
online CPUs and memory nodes."""

from pathlib import Path

import pytest

from auraed.kernel.cgroups import (
    CgroupLimits,
    InvalidLimit,
    UnsafePath,
    shares_to_weight,
    validate,
    weight_to_shares,
)
from auraed.kernel.cgroups.limits import parse_list


def _one_past(path: str) -> str:
    """The first id above the host's online ones: a CPU or node that does not exist."""
    try:
        online = Path(path).read_text().strip()
    except FileNotFoundError:
        online = "0"
    return str(max(high for _, high in parse_list(online)) + 1)


NO_SUCH_CPU = _one_past("/sys/devices/system/cpu/online")
NO_SUCH_NODE = _one_past("/sys/devices/system/node/online")


def test_every_valid_limit_passes() -> None:
    validate(CgroupLimits())
    validate(
        CgroupLimits(
            cpu_weight=1,
            cpu_max=1_000,
            cpu_period=1_000_000,
            cpuset_cpus="0",
            cpuset_mems="0",
            memory_min=0,
            memory_low=1 << 20,
            memory_high=1 << 30,
            memory_max=2**63 - 1,
            pids_max=0,
        )
    )
    validate(CgroupLimits(cpu_weight=10_000, cpu_period=1_000, pids_max=4_194_304))


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        (CgroupLimits(cpu_weight=0), "cpu.weight"),
        (CgroupLimits(cpu_weight=10_001), "cpu.weight"),
        (CgroupLimits(cpu_weight=-100), "cpu.weight"),
        (CgroupLimits(cpu_weight=True), "cpu.weight"),
        (CgroupLimits(cpu_weight="100"), "cpu.weight"),  # type: ignore[arg-type]
        (CgroupLimits(cpu_max=999), "cpu.max"),
        (CgroupLimits(cpu_max=-1), "cpu.max"),
        (CgroupLimits(cpu_max=2**44), "cpu.max"),
        (CgroupLimits(cpu_max=50_000, cpu_period=999), "cpu.period"),
        (CgroupLimits(cpu_period=1_000_001), "cpu.period"),
        (CgroupLimits(cpuset_cpus=""), "cpuset.cpus"),
        (CgroupLimits(cpuset_cpus="0-"), "cpuset.cpus"),
        (CgroupLimits(cpuset_cpus="a"), "cpuset.cpus"),
        (CgroupLimits(cpuset_cpus="3-1"), "cpuset.cpus"),
        (CgroupLimits(cpuset_cpus="0,,1"), "cpuset.cpus"),
        (CgroupLimits(cpuset_cpus=" 0"), "cpuset.cpus"),
        (CgroupLimits(cpuset_cpus="-1"), "cpuset.cpus"),
        (CgroupLimits(cpuset_cpus="99999999999"), "cpuset.cpus"),
        (CgroupLimits(cpuset_cpus="0-99999999999"), "cpuset.cpus"),
        (CgroupLimits(cpuset_cpus="9" * 5000), "cpuset.cpus"),
        (CgroupLimits(cpuset_cpus=NO_SUCH_CPU), "cpuset.cpus"),
        (CgroupLimits(cpuset_cpus=f"0,{NO_SUCH_CPU}"), "cpuset.cpus"),
        (CgroupLimits(cpuset_mems=NO_SUCH_NODE), "cpuset.mems"),
        (CgroupLimits(cpuset_mems="0-"), "cpuset.mems"),
        (CgroupLimits(memory_min=-1), "memory.min"),
        (CgroupLimits(memory_low=-1), "memory.low"),
        (CgroupLimits(memory_high=-4096), "memory.high"),
        (CgroupLimits(memory_max=-1), "memory.max"),
        (CgroupLimits(memory_max=2**63), "memory.max"),
        (CgroupLimits(pids_max=-1), "pids.max"),
        (CgroupLimits(pids_max=4_194_305), "pids.max"),
    ],
)
def test_invalid_limit_names_its_field(limits: CgroupLimits, field: str) -> None:
    with pytest.raises(InvalidLimit) as caught:
        validate(limits)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"invalid {field}: ")


def test_weight_to_shares_uses_the_kernels_scale() -> None:
    assert weight_to_shares(2) == 20  # round(2 * 1024 / 100) = round(20.48)
    assert weight_to_shares(1) == 10
    assert weight_to_shares(100) == 1024
    assert weight_to_shares(10_000) == 102_400


def test_shares_to_weight_clamps_to_the_v2_range() -> None:
    assert shares_to_weight(2) == 1
    assert shares_to_weight(262_144) == 10_000


def test_every_weight_survives_the_round_trip_through_shares() -> None:
    assert all(shares_to_weight(weight_to_shares(w)) == w for w in range(1, 10_001))


def test_parse_list() -> None:
    assert parse_list("0-2,5,7-7") == [(0, 2), (5, 5), (7, 7)]
    for bad in ("", "0-", "-0", "1-0", "0;1", "0 1"):
        with pytest.raises(ValueError):
            parse_list(bad)


def test_set_fields_uses_v2_names() -> None:
    limits = CgroupLimits(cpu_max=10_000, cpuset_mems="0", memory_max=1, pids_max=3)
    assert limits.set_fields() == ["cpu.max", "cpuset.mems", "memory.max", "pids.max"]


def test_errors_carry_field_and_readable_text() -> None:
    unsafe = UnsafePath("/sys/fs/cgroup/cpu/aurae/a")
    assert unsafe.field is None
    assert unsafe.path == "/sys/fs/cgroup/cpu/aurae/a"
    assert "/sys/fs/cgroup/cpu/aurae/a" in str(unsafe)
