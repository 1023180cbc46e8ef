"""Choose the cgroup backend for this host from what is mounted at the cgroup mount root."""

import os
from pathlib import Path

from auraed.kernel.cgroups.base import CgroupBackend
from auraed.kernel.cgroups.errors import CgroupError
from auraed.kernel.cgroups.mountinfo import PROC_MOUNTINFO, read_mounts
from auraed.kernel.cgroups.v1 import CgroupV1Backend
from auraed.kernel.cgroups.v2 import CgroupV2Backend


def detect_backend(
    root_name: str = "aurae",
    mount_root: str = "/sys/fs/cgroup",
    mountinfo: Path = PROC_MOUNTINFO,
) -> CgroupBackend:
    """cgroup2 at mount_root means a v2 host; a tmpfs there holds v1 hierarchies (and on hybrid
    hosts a v2 one with no controllers we use, which the v1 backend ignores)."""
    mount_root = os.path.normpath(mount_root)
    # The last mount on a point is the one visible there.
    fstypes = [m.fstype for m in read_mounts(mountinfo) if m.mount_point == mount_root]
    if not fstypes:
        raise CgroupError(f"nothing is mounted at {mount_root}")
    if fstypes[-1] == "cgroup2":
        return CgroupV2Backend(root_name, mount_root)
    if fstypes[-1] == "tmpfs":
        return CgroupV1Backend(root_name, mount_root, mountinfo)
    raise CgroupError(f"{mount_root} is a {fstypes[-1]} mount, not cgroup2 or a tmpfs of v1 mounts")
