"""The mounts this process sees, from /proc/self/mountinfo: enough to find cgroup hierarchies."""

import re
from dataclasses import dataclass
from pathlib import Path

PROC_MOUNTINFO = Path("/proc/self/mountinfo")

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    super_options: tuple[str, ...]


def read_mounts(mountinfo: Path = PROC_MOUNTINFO) -> list[Mount]:
    """Every mount, in mount order (a later mount on the same point hides an earlier one)."""
    mounts = []
    for line in mountinfo.read_text().splitlines():
        # "36 25 0:32 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu"
        # The optional fields before "-" vary in number.
        before, _, after = line.partition(" - ")
        fstype, _source, super_options = after.split(" ", 2)
        mount_point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), before.split(" ")[4])
        mounts.append(Mount(mount_point, fstype, tuple(super_options.split(","))))
    return mounts
