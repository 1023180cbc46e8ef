"""Directory-fd access to a cgroup tree that never follows a symlink below a hierarchy's mount.

Every path below the mount is walked one component at a time with O_NOFOLLOW|O_DIRECTORY and
created or removed relative to its parent's fd, so a symlink or file planted in the tree can
neither redirect a write nor hide a directory from removal.
"""

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from auraed.kernel.cgroups.errors import UnsafePath

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_CREAT lets a plain directory tree stand in for cgroupfs in unit tests. cgroupfs itself never
# creates files (open fails with EACCES), so on a real host a missing interface file still fails.
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
# Errors that mean the cgroup went away under us (ENODEV: its directory was removed while open).
_GONE = (errno.ENOENT, errno.ENODEV)
_READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy: v2 has a single one, v1 one per (co-mounted) controller set.

    `controllers` are those bound to it, as /proc/<pid>/cgroup lists them: empty for v2.
    """

    mount: str
    controllers: frozenset[str]

    def path(self, components: Sequence[str]) -> str:
        return os.path.join(self.mount, *components)


def open_cgroup(hierarchy: Hierarchy, components: Sequence[str]) -> int:
    """An fd (the caller closes it) on the cgroup at `components` below the mount.

    Raises FileNotFoundError if it does not exist and UnsafePath if a component is not a real
    directory. The mount itself may be reached through symlinks (some distributions link
    cpu -> cpu,cpuacct); nothing below it may.
    """
    mount_fd = os.open(hierarchy.mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_below(mount_fd, components, hierarchy.mount)
    finally:
        os.close(mount_fd)


def open_below(dir_fd: int, components: Sequence[str], path: str) -> int:
    """Like open_cgroup, from an open directory (kept open) at `path`: a new fd of its own
    (never a dup, whose directory offset a concurrent scan would share) on the cgroup at
    `components` below it."""
    fd = os.open(".", _DIR_FLAGS, dir_fd=dir_fd)
    try:
        for name in components:
            path = os.path.join(path, name)
            child = open_child(fd, name, path)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_child(dir_fd: int, name: str, path: str) -> int:
    """Open the directory `name` in dir_fd; `path` is its full path, for errors."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(path) from None
        raise


def make_cgroup(parent_fd: int, name: str, path: str) -> bool:
    """mkdir `name` in parent_fd; False if a real directory was already there."""
    try:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
        return True
    except FileExistsError:
        if not stat.S_ISDIR(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
            raise UnsafePath(path) from None
        return False


def remove_cgroup_tree(
    parent_fd: int, name: str, path: str, usual_children: Sequence[str] = ()
) -> None:
    """rmdir the cgroup `name` and every cgroup below it, deepest first.

    cgroupfs removes a cgroup's interface files with it; the caller empties it of processes first.
    `usual_children`: the child cgroups it mostly holds, tried first without listing the
    directory (a cgroup directory lists every interface file too). A cgroup below `name` that
    someone else removes meanwhile is no error (the rest is still removed); FileNotFoundError
    means `name` itself is not there.
    """
    fd = open_child(parent_fd, name, path)
    try:
        if usual_children:
            try:
                for child in usual_children:
                    os.rmdir(child, dir_fd=fd)
                os.rmdir(name, dir_fd=parent_fd)
                return
            except OSError:
                pass  # something else is there, or busy: the listing below finds out which
        for child in subdirs(fd):
            try:
                remove_cgroup_tree(fd, child, os.path.join(path, child))
            except FileNotFoundError:
                continue  # removed meanwhile (a concurrent removal of that subtree)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def subdirs(dir_fd: int) -> list[str]:
    """Names of the child cgroups (real directories, never symlinks) in dir_fd."""
    with os.scandir(dir_fd) as entries:
        return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))


def walk(dir_fd: int, components: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], int]]:
    """Yield (components relative to dir_fd, fd) for dir_fd and every cgroup below it, parents
    first. Each fd is valid only until the generator resumes; cgroups removed meanwhile are skipped.
    """
    yield components, dir_fd
    for name in subdirs(dir_fd):
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in _GONE:
                continue
            raise
        try:
            yield from walk(fd, (*components, name))
        finally:
            os.close(fd)


def has_file(dir_fd: int, filename: str) -> bool:
    try:
        os.stat(filename, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def read_file(dir_fd: int, filename: str) -> str:
    """The whole content of an interface file, without its trailing newline."""
    fd = os.open(filename, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        # Plain reads to end of file: a buffered file object costs four more system calls.
        chunks = []
        while chunk := os.read(fd, _READ_SIZE):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode().rstrip("\n")


def write_file(dir_fd: int, filename: str, value: str) -> None:
    """Write `value` in one write(2): cgroupfs parses each write as a whole."""
    fd = os.open(filename, _WRITE_FLAGS, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read_pids(dir_fd: int) -> set[int]:
    """The processes listed in the cgroup's cgroup.procs (empty if it was removed meanwhile)."""
    try:
        return {int(line) for line in read_file(dir_fd, "cgroup.procs").split()}
    except OSError as e:
        if e.errno in _GONE:
            return set()
        raise


def read_keyed(dir_fd: int, filename: str) -> dict[str, int]:
    """Parse a flat-keyed file ("usage_usec 123" per line: cpu.stat, memory.events, ...)."""
    pairs = (line.split() for line in read_file(dir_fd, filename).splitlines())
    return {key: int(value) for key, value in pairs}


def parse_max(value: str) -> int | None:
    """A limit file's value, "max" meaning unlimited (None)."""
    return None if value == "max" else int(value)
