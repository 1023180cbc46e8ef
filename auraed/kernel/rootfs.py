"""A container's root filesystem, set up by the container's own process before it execs.

The forked child (see auraed.kernel.spawner) calls `enter_rootfs` once it has joined its cell's
namespaces. It then:

  1. unshares a mount namespace of its own and makes every mount in it private, so nothing it
     mounts reaches the cell or the host, and everything it mounts goes with its last process;
  2. mounts overlayfs at `target`: the image's unpacked layers as lowers (topmost first), the
     container's `upper` and `work` directories (under the daemon's runtime dir) above, with
     `volatile` (see VOLATILE);
  3. mounts /proc (of the pid namespace it was born in), a minimal /dev (a tmpfs with null,
     zero, full, random, urandom and tty bound from the host, a private devpts, /dev/shm),
     /sys read-only, then the requested bind mounts;
  4. pivot_roots into `target` and detaches the old root; with `read_only` remounts / read-only.

The spec is plain JSON (it travels in the spawn request):
  {"lower": [dir, ...] (lowest first), "upper", "work", "target", "read_only": bool,
   "mounts": [{"source", "destination", "read_only": bool}, ...]}
Standard library only: the spawner imports it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

from auraed.kernel.libc import (
    CLONE_NEWNS,
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    mount,
    mount_with_data,
    pivot_root,
    umount2,
    unshare,
)

# The device nodes every container gets, bound from the host's (a bind works where mknod in a
# container's /dev would need the device cgroup's consent).
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
              "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}

Step = Callable[[str, str], None]

# overlayfs's "volatile" (Linux 5.10+): no sync of the upper filesystem. Without it, the
# unmount at the container's end (its last process's exit, which tears down its mount
# namespace) runs syncfs on the whole filesystem holding the upper directory, the host's: the
# exit waited for every dirty page of the machine to be written and the disk flushed (5-120
# ms of each container's end under load, measured with sched_switch stacks: ovl_sync_fs →
# sync_filesystem → ext4_sync_fs). A container's writable layer is used by one mount only
# (every container gets a new directory, removed with it; a container does not restart) and
# is worthless after a crash of the machine, so the sync bought nothing. A kernel that does
# not know the option (EINVAL) gets the mount without it.
VOLATILE = "volatile"


def overlay_options(lower: list[str], upper: str, work: str, *, volatile: bool = True) -> str:
    """overlayfs mount data; the topmost lower comes first."""
    options = f"lowerdir={':'.join(reversed(lower))},upperdir={upper},workdir={work}"
    return f"{options},{VOLATILE}" if volatile else options


def enter_rootfs(spec: dict[str, Any], at: Step) -> None:
    """In the container's process: make and enter its root filesystem (see the module doc).
    `at(stage, detail)` names the step, so that a failure is reported as it."""
    target = spec["target"]
    # What we create in the container (/mnt for a mount point, /dev's nodes) must be usable by
    # its users: not the daemon's private umask.
    os.umask(0o022)
    at("unshare", "mnt")
    unshare(CLONE_NEWNS)
    at("mount", "/ private")
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    at("mount", "overlay")
    # Relative lower paths keep the options under the kernel's one-page limit with many layers.
    lower = spec["lower"]
    layers_dir = os.path.dirname(lower[0]) if lower else "/"
    if all(os.path.dirname(path) == layers_dir for path in lower):
        os.chdir(layers_dir)
        lower = [os.path.basename(path) for path in lower]
    try:
        mount_with_data("overlay", target, "overlay", MS_NOSUID,
                        overlay_options(lower, spec["upper"], spec["work"]))
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        mount_with_data("overlay", target, "overlay", MS_NOSUID,
                        overlay_options(lower, spec["upper"], spec["work"], volatile=False))
    os.chdir("/")
    _mount_kernel_filesystems(target, at)
    for extra in spec.get("mounts", ()):
        _bind(target, extra, at)
    at("pivot_root", target)
    os.chdir(target)
    pivot_root(".", ".")
    # The old root is now stacked under the new one at "/": detach it.
    umount2(".", MNT_DETACH)
    os.chdir("/")
    if spec.get("read_only"):
        at("mount", "/ read-only")
        mount("none", "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY)


def _directory(path: str, mode: int = 0o755) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path) or os.path.islink(path):
            raise NotADirectoryError(20, "not a directory", path) from None


def _within(target: str, path: str) -> str:
    """`path` of the container, below `target`, refusing to climb out or follow links out."""
    normalized = os.path.normpath("/" + path).lstrip("/")
    here = target
    for part in normalized.split("/") if normalized else ():
        here = os.path.join(here, part)
        if os.path.islink(here):
            raise OSError(40, "a mount destination goes through a symlink", path)
    return here


def _mount_kernel_filesystems(target: str, at: Step) -> None:
    common = MS_NOSUID | MS_NODEV | MS_NOEXEC
    at("mount", "/proc")
    _directory(os.path.join(target, "proc"))
    mount("proc", os.path.join(target, "proc"), "proc", common)
    at("mount", "/dev")
    dev = os.path.join(target, "dev")
    _directory(dev)
    mount_with_data("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=65536k")
    for name in DEVICES:
        node = os.path.join(dev, name)
        os.close(os.open(node, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
        mount(f"/dev/{name}", node, None, MS_BIND)
    for name, link in _DEV_LINKS.items():
        os.symlink(link, os.path.join(dev, name))
    at("mount", "/dev/pts")
    _directory(os.path.join(dev, "pts"))
    mount_with_data("devpts", os.path.join(dev, "pts"), "devpts", MS_NOSUID | MS_NOEXEC,
                    "newinstance,ptmxmode=0666,mode=0620")
    at("mount", "/dev/shm")
    _directory(os.path.join(dev, "shm"), 0o1777)
    mount_with_data("shm", os.path.join(dev, "shm"), "tmpfs", common, "mode=1777,size=65536k")
    at("mount", "/sys")
    _directory(os.path.join(target, "sys"))
    mount("sysfs", os.path.join(target, "sys"), "sysfs", common | MS_RDONLY)


def _bind(target: str, extra: dict[str, Any], at: Step) -> None:
    source, destination = extra["source"], extra["destination"]
    at("mount", destination)
    path = _within(target, destination)
    if not os.path.lexists(path):
        if stat.S_ISDIR(os.stat(source).st_mode):
            os.makedirs(path, 0o755)
        else:
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    mount(source, path, None, MS_BIND | MS_REC)
    if extra.get("read_only"):
        mount("none", path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)
