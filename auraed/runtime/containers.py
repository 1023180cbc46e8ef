"""Containers: executables that run an image's root filesystem inside a cell.

`Containers.prepare` turns an image from the store and the caller's overrides into a
`ContainerSpec` — argv, environment, working directory and user from the image config, and the
rootfs the spawned child mounts and pivots into (auraed.kernel.rootfs). Each container gets a
directory of its own under the runtime dir holding overlayfs's upper and work directories and
the mount point; `ContainerSpec.release` removes it and lets go of the image, once the
executable is forgotten (stopped, its name reused, or its cell freed). The overlay mount itself
lives only in the container's own mount namespace, so it goes with the container's last
process and never appears in the host's mount table.

Live restore: a container's processes hold its mount namespace and so its overlay mount while
no daemon runs. The next daemon adopts a running container (`adopt`): it re-learns the mount
from the kernel (the container process's mountinfo must show the overlay on "/" with this
container's upper directory), takes its hold on the image again, and keeps its directory.
`start` then removes every other directory, after waiting for the mounts of what it removes
to go with their processes (which the cleanup of their cells ended).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auraed.errors import FailedPrecondition, InvalidArgument, Subject
from auraed.images import Image, ImageStore
from auraed.kernel.processes import DEFAULT_PATH

DEFAULT_ENV = {"PATH": DEFAULT_PATH}
# How long `start` waits for a leftover container's mounts to go with its killed processes.
MOUNT_GONE_WAIT = 10.0

log = logging.getLogger("auraed.containers")


class NotAdoptable(Exception):
    """A container a previous daemon left that cannot be taken over; the message says why."""


@dataclass(frozen=True)
class Mount:
    """A host path bound into the container."""

    source: str
    destination: str
    read_only: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    """What the spawner needs to run a process in a container's filesystem."""

    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    # The rootfs to make (a new container), or None to join `mount_namespace` (an exec).
    rootfs: dict[str, Any] | None = None
    mount_namespace: str | None = None
    image: Image | None = None
    directory: Path | None = None
    release: Callable[[], None] = field(default=lambda: None, compare=False)

    @property
    def command(self) -> str:
        """The argv as one line, for listings."""
        import shlex

        return shlex.join(self.argv)


class Containers:
    def __init__(self, store: ImageStore, root: Path) -> None:
        self.store = store
        self.root = root

    def start(self, keep: Sequence[Path] = ()) -> list[str]:
        """Clear what a previous run left but the directories of adopted containers (`keep`).
        Returns the directories removed; a mount of one still held by a process after
        MOUNT_GONE_WAIT (one outside the cells the daemon cleaned) is logged."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        kept = {path.name for path in keep}
        stale = sorted(entry.name for entry in os.scandir(self.root) if entry.name not in kept)
        deadline = time.monotonic() + MOUNT_GONE_WAIT
        for name in stale:
            directory = self.root / name
            while (held := mounted_anywhere(directory)) and time.monotonic() < deadline:
                time.sleep(0.05)
            if held:
                log.error("a container's mount is still held after its cell was cleaned",
                          extra={"directory": str(directory), "pids": ",".join(held)})
            shutil.rmtree(directory, ignore_errors=True)
        return stale

    def adopt(self, directory: Path, image_id: str, pid: int | None) -> Callable[[], None]:
        """Take over a container a previous daemon started, in `directory`, of image
        `image_id`, whose process is `pid` (None: it has ended, and its mount with it). The
        release to call once the executable is forgotten; NotAdoptable if it is not ours."""
        if directory.parent != self.root or not directory.is_dir():
            raise NotAdoptable(f"no container directory {directory}")
        if pid is not None and not overlay_root_of(pid, directory):
            raise NotAdoptable(f"process {pid} has no overlay of {directory} as its root")
        image = self.store.find(image_id)
        if image is None:
            raise NotAdoptable(f"its image {image_id} is no longer in the store")
        try:
            self.store.acquire(image)
        except FailedPrecondition as error:
            raise NotAdoptable(str(error)) from None
        except Exception as error:  # noqa: BLE001 - NotFound: removed meanwhile
            raise NotAdoptable(str(error)) from None
        return self._release(directory, image)

    def _release(self, directory: Path, image: Image) -> Callable[[], None]:
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                shutil.rmtree(directory, ignore_errors=True)
                self.store.release(image)

        return release

    def prepare(
        self,
        image_name: str,
        *,
        command: Sequence[str] | None = None,
        args: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        working_dir: str | None = None,
        user: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        read_only: bool = False,
        mounts: Sequence[Mount] = (),
    ) -> ContainerSpec:
        """A new container of `image_name`. command replaces the image's entrypoint (and then
        its cmd too), args its cmd; env adds to the image's; uid/gid win over user, which wins
        over the image's user."""
        image = self.store.get(image_name)
        config = image.config
        if command:
            argv = [*command, *(args or ())]
        else:
            argv = [*config.entrypoint, *(args if args else config.cmd)]
        if not argv:
            raise InvalidArgument(f"image {image_name} has no entrypoint or cmd: give a "
                                  "command", subject=Subject.COMMAND)
        if any("\0" in a for a in argv):
            raise InvalidArgument("arguments must not contain NUL bytes",
                                  subject=Subject.COMMAND)
        environment = dict(DEFAULT_ENV)
        for entry in config.env:
            key, _, value = entry.partition("=")
            environment[key] = value
        environment.update(env or {})
        cwd = working_dir or config.working_dir or "/"
        if not cwd.startswith("/"):
            raise InvalidArgument(f"working directory {cwd!r} is not absolute",
                                  subject=Subject.WORKING_DIR)
        layers = self.store.layer_dirs(image)
        resolved_uid, resolved_gid = resolve_user(user if user is not None else config.user,
                                                  layers)
        for mount in mounts:
            if not os.path.isabs(mount.source) or not os.path.exists(mount.source):
                raise InvalidArgument(f"mount source {mount.source!r} does not exist on the host",
                                      subject=Subject.MOUNT)
        self.store.acquire(image)
        directory = self.root / uuid.uuid4().hex
        try:
            for name in ("upper", "work", "rootfs"):
                (directory / name).mkdir(parents=True)
            # The container's "/" is the upper directory's: open to its users like any root.
            (directory / "upper").chmod(0o755)
        except OSError as error:
            shutil.rmtree(directory, ignore_errors=True)
            self.store.release(image)
            raise FailedPrecondition(f"cannot prepare the container's directories: "
                                     f"{error.strerror}") from None
        release = self._release(directory, image)
        return ContainerSpec(
            argv=tuple(argv), env=environment, cwd=cwd,
            uid=resolved_uid if uid is None else uid,
            gid=resolved_gid if gid is None else gid,
            rootfs={"lower": [str(p) for p in layers], "upper": str(directory / "upper"),
                    "work": str(directory / "work"), "target": str(directory / "rootfs"),
                    "read_only": read_only,
                    "mounts": [{"source": m.source, "destination": m.destination,
                                "read_only": m.read_only} for m in mounts]},
            image=image, directory=directory, release=release,
        )

    def exec_in(self, container_pid: int, argv: Sequence[str], *, env: Mapping[str, str],
                cwd: str, uid: int, gid: int) -> ContainerSpec:
        """A process joining the filesystem of the container whose process is `container_pid`
        (a host pid)."""
        if not argv:
            raise InvalidArgument("a command is required", subject=Subject.COMMAND)
        return ContainerSpec(argv=tuple(argv), env=dict(env), cwd=cwd, uid=uid, gid=gid,
                             mount_namespace=f"/proc/{container_pid}/ns/mnt")


def overlay_root_of(pid: int, directory: Path) -> bool:
    """Whether process `pid`'s root is the overlay mount of the container in `directory`."""
    try:
        mountinfo = Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return False
    for line in mountinfo.splitlines():
        # mountinfo(5): ... mount point (5th) ... " - " fstype source super options
        fields, _, tail = line.partition(" - ")
        parts = fields.split()
        if len(parts) >= 5 and parts[4] == "/" and tail.startswith("overlay "):
            return f"upperdir={directory}/upper," in tail + ","
    return False


def mounted_anywhere(directory: Path) -> list[str]:
    """The pids whose mount table mentions `directory` (a container's upper, work or rootfs)."""
    held = []
    needle = str(directory) + "/"
    for info in glob.glob("/proc/[0-9]*/mountinfo"):
        try:
            with open(info) as file:
                if needle in file.read():
                    held.append(info.split("/")[2])
        except OSError:
            pass  # the process ended meanwhile
    return held


def resolve_user(user: str, layers: Sequence[Path]) -> tuple[int, int]:
    """uid and gid of an image's "user[:group]", names looked up in the image's own
    /etc/passwd and /etc/group (as a container runtime must: the host's mean nothing)."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")
    passwd = _image_file(layers, "etc/passwd")
    uid: int | None = int(name) if name.isdigit() else None
    gid: int | None = None
    for line in passwd.splitlines():
        parts = line.split(":")
        if len(parts) >= 4 and parts[2].isdigit() and parts[3].isdigit() and (
                parts[0] == name or (uid is not None and int(parts[2]) == uid)):
            uid, gid = int(parts[2]), int(parts[3])
            break
    if uid is None:
        raise InvalidArgument(f"user {name!r} is not in the image's /etc/passwd",
                              subject=Subject.USER)
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            for line in _image_file(layers, "etc/group").splitlines():
                parts = line.split(":")
                if len(parts) >= 3 and parts[0] == group and parts[2].isdigit():
                    gid = int(parts[2])
                    break
            else:
                raise InvalidArgument(f"group {group!r} is not in the image's /etc/group",
                                      subject=Subject.GROUP)
    return uid, 0 if gid is None else gid


def _image_file(layers: Sequence[Path], relative: str) -> str:
    """A small file of the image as the stacked layers show it ("" when absent or deleted)."""
    for layer in reversed(layers):
        path = layer / relative
        if os.path.lexists(path):
            if not path.is_file() or path.is_symlink():
                return ""  # a whiteout (a character device) or something we will not follow
            return path.read_text(errors="replace")[:1024 * 1024]
    return ""
