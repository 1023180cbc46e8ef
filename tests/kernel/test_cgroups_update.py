"""CgroupBackend.update on this host's real cgroups: new limits land in the kernel's files, the
others stay, and a missing cell is an error."""

from __future__ import annotations

import glob
import os
import secrets
from collections.abc import Iterator

import pytest

from auraed.kernel.cgroups import CgroupBackend, CgroupLimits, CgroupNotFound, detect_backend

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates cgroups: needs root")


@pytest.fixture
def backend() -> Iterator[CgroupBackend]:
    name = f"aurae-test-{secrets.token_hex(4)}"
    made = detect_backend(root_name=name)
    made.setup()
    try:
        yield made
    finally:
        made.cleanup_stale()
        made.teardown()
        assert glob.glob(f"/sys/fs/cgroup/*/{name}") == glob.glob(f"/sys/fs/cgroup/{name}") == []


def test_update_writes_only_the_limits_given(backend: CgroupBackend) -> None:
    backend.create("box", CgroupLimits(memory_max=64 << 20, cpu_weight=200))
    backend.update("box", CgroupLimits(memory_max=128 << 20))
    limits = backend.read_limits("box")
    assert limits.memory_max == 128 << 20
    assert limits.cpu_weight == 200  # untouched
    backend.update("box", CgroupLimits(cpu_max=50_000, cpu_period=100_000))
    limits = backend.read_limits("box")
    assert (limits.cpu_max, limits.cpu_period, limits.memory_max) == (50_000, 100_000, 128 << 20)
    backend.remove("box")


def test_update_of_a_missing_cell(backend: CgroupBackend) -> None:
    with pytest.raises(CgroupNotFound):
        backend.update("missing", CgroupLimits(memory_max=64 << 20))
