"""Choosing the backend from the mount table."""

import os
from pathlib import Path

import pytest

from auraed.kernel.cgroups import CgroupError, CgroupV1Backend, CgroupV2Backend, detect_backend
from auraed.kernel.cgroups.mountinfo import read_mounts


def write_mountinfo(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_cgroup2_at_the_mount_root_means_v2(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    mountinfo = write_mountinfo(
        tmp_path,
        f"30 23 0:26 / {tmp_path} rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate",
    )
    backend = detect_backend("aurae", str(tmp_path), mountinfo)
    assert isinstance(backend, CgroupV2Backend)
    assert backend.version == 2
    assert backend.controllers == ("cpu", "memory")


def test_tmpfs_at_the_mount_root_means_v1(tmp_path: Path) -> None:
    controllers = ("cpuset", "cpu,cpuacct", "memory", "pids", "freezer")
    mountinfo = write_mountinfo(
        tmp_path,
        f"31 23 0:28 / {tmp_path} rw - tmpfs tmpfs rw,mode=755",
        *(
            f"{40 + i} 31 0:{40 + i} / {tmp_path / c} rw shared:{i} - cgroup cgroup rw,{c}"
            for i, c in enumerate(controllers)
        ),
        f"50 31 0:50 / {tmp_path / 'unified'} rw - cgroup2 cgroup2 rw",
    )
    backend = detect_backend("aurae", str(tmp_path), mountinfo)
    assert isinstance(backend, CgroupV1Backend)
    # cpu and cpuacct share one hierarchy: a process joins it once.
    assert backend.join_files("a") == [
        str(tmp_path / c / "aurae" / "a" / "_procs" / "tasks") for c in controllers
    ]


def test_missing_v1_controller_is_named(tmp_path: Path) -> None:
    mountinfo = write_mountinfo(
        tmp_path,
        f"31 23 0:28 / {tmp_path} rw - tmpfs tmpfs rw",
        f"40 31 0:40 / {tmp_path / 'cpu'} rw - cgroup cgroup rw,cpu",
    )
    with pytest.raises(CgroupError, match="cpuset"):
        detect_backend("aurae", str(tmp_path), mountinfo)


def test_nothing_mounted_is_an_error(tmp_path: Path) -> None:
    mountinfo = write_mountinfo(tmp_path, "22 1 8:1 / / rw - ext4 /dev/sda1 rw")
    with pytest.raises(CgroupError, match="nothing is mounted"):
        detect_backend("aurae", str(tmp_path), mountinfo)


def test_mount_points_are_unescaped(tmp_path: Path) -> None:
    mountinfo = write_mountinfo(tmp_path, r"40 31 0:40 / /mnt/with\040space rw - tmpfs none rw")
    assert read_mounts(mountinfo)[0].mount_point == "/mnt/with space"


@pytest.mark.skipif(not os.path.ismount("/sys/fs/cgroup"), reason="no cgroup mount here")
def test_this_host() -> None:
    fstype = next(m.fstype for m in reversed(read_mounts()) if m.mount_point == "/sys/fs/cgroup")
    expected = CgroupV2Backend if fstype == "cgroup2" else CgroupV1Backend
    assert isinstance(detect_backend(), expected)
