"""The CRI's pod sandboxes and containers, kept over the daemon's cells.

A pod sandbox is a cell `p<id>` with the pod's namespaces (pid, ipc, uts and mount unless
kubelet asks for the node's; net unless it asks for host networking) and the pod's limits. A
container is a nested cell `p<id>/c<id>` (its own cgroup and limits, the pod's namespaces)
running one executable, `main`, in the image's root filesystem (auraed.runtime.containers).
The CRI's lifecycle maps so:

  RunPodSandbox    allocate the pod cell, named with the pod's hostname
  CreateContainer  prepare the container's filesystem, allocate its cell   -> CREATED
  StartContainer   start `main` in it, copy its output to the CRI log     -> RUNNING
  (exit)                                                                   -> EXITED
  StopContainer    SIGTERM, SIGKILL after the timeout; kept for status     (idempotent)
  RemoveContainer  free its cell: process, writable layer, records         (idempotent)
  StopPodSandbox   stop every container; the sandbox is NOTREADY           (idempotent)
  RemovePodSandbox remove every container, free the pod cell               (idempotent)

This is the first step of issue 14's pods: the sandbox is a cell of this daemon; once spawned
instances exist, a sandbox becomes an instance and its containers cells inside it.
kubelet's cgroup_parent is recorded but not used: the daemon creates cgroups only in its own
subtree. State lives in memory: like every workload, sandboxes end with the daemon.

Locking: `_lock` guards the two registries and each record's fields, and is never held while
waiting for a process (stop, exec).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import shlex
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from auraed.cri.ids import by_id, labels_match
from auraed.cri.logs import CriLog
from auraed.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from auraed.images import Image, ImageStore
from auraed.kernel.cgroups import CgroupLimits
from auraed.output import OutputLog
from auraed.runtime.containers import Containers, ContainerSpec, Mount
from auraed.runtime.executables import Executable
from auraed.runtime.names import CellName
from auraed.runtime.workloads import CellSpec, Workloads

log = logging.getLogger("auraed.cri")

MAIN = "main"
# Namespace modes, as runtime.v1.NamespaceMode numbers them.
POD, CONTAINER, NODE, TARGET = 0, 1, 2, 3
# ExecSync output beyond this is dropped (CVE-2022-1708).
MAX_EXEC_OUTPUT = 16 * 1024 * 1024
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,62}[A-Za-z0-9])?")
LOG_DRAIN_SECONDS = 5.0


class ExecTimedOut(Exception):
    """ExecSync's command outlived its timeout and was killed."""


@dataclass(frozen=True)
class SandboxConfig:
    name: str
    uid: str
    namespace: str
    attempt: int = 0
    hostname: str = ""
    log_directory: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    network: int = POD
    pid: int = POD
    ipc: int = POD
    cgroup_parent: str = ""
    limits: CgroupLimits = field(default_factory=CgroupLimits)
    runtime_handler: str = ""


@dataclass(frozen=True)
class ContainerConfig:
    name: str
    image: str
    attempt: int = 0
    command: Sequence[str] = ()
    args: Sequence[str] = ()
    working_dir: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: Sequence[Mount] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    log_path: str = ""
    limits: CgroupLimits = field(default_factory=CgroupLimits)
    run_as_user: int | None = None
    run_as_group: int | None = None
    run_as_username: str = ""
    read_only_rootfs: bool = False
    # CONTAINER: a pid namespace of its own; POD (and NODE, which a hostPID pod's
    # containers ask for): the sandbox's.
    pid: int = POD


@dataclass(eq=False)
class Sandbox:
    id: str
    cell: CellName
    config: SandboxConfig
    created_at: int  # ns
    ready: bool = True
    containers: dict[str, CriContainer] = field(default_factory=dict)


@dataclass(eq=False)
class CriContainer:
    id: str
    sandbox_id: str
    cell: CellName
    config: ContainerConfig
    image: Image
    spec: ContainerSpec
    created_at: int  # ns
    log_path: Path | None
    executable: Executable | None = None
    start_error: str = ""
    log: CriLog | None = None

    @property
    def state(self) -> str:
        if self.executable is None:
            return "EXITED" if self.start_error else "CREATED"
        return "RUNNING" if self.executable.running else "EXITED"

    @property
    def started_at(self) -> int:
        return int(self.executable.started_at * 1e9) if self.executable else 0

    @property
    def finished_at(self) -> int:
        if self.executable is None or self.executable.running:
            return 0
        return int(self.executable.exited_at * 1e9)

    @property
    def exit_code(self) -> int:
        if self.start_error:
            return 128
        status = self.executable.exit_status if self.executable else None
        if status is None:
            return 0
        return status.exit_code if status.exit_code is not None else 128 + (status.signal or 0)

    @property
    def reason(self) -> str:
        if self.start_error:
            return "StartError"
        if self.state != "EXITED" or self.executable is None:
            return ""
        if self.executable.oom_killed:
            return "OOMKilled"
        return "Completed" if self.exit_code == 0 else "Error"

    @property
    def message(self) -> str:
        return self.start_error


def _new_id() -> str:
    return secrets.token_hex(32)


class Pods:
    def __init__(self, workloads: Workloads, containers: Containers, store: ImageStore) -> None:
        self.workloads = workloads
        self.containers = containers
        self.store = store
        self._lock = threading.RLock()
        self._sandboxes: dict[str, Sandbox] = {}
        self._by_container: dict[str, CriContainer] = {}
        self._execs = itertools.count(1)

    # ------------------------------------------------------------------ sandboxes

    def run_sandbox(self, config: SandboxConfig) -> Sandbox:
        if not config.name or not config.namespace or not config.uid:
            raise InvalidArgument("a pod sandbox needs metadata name, namespace and uid",
                                  field="config.metadata")
        if config.runtime_handler:
            raise InvalidArgument(f"unknown runtime handler {config.runtime_handler!r}; this "
                                  "runtime has only the default one", field="runtime_handler")
        if TARGET in (config.network, config.pid, config.ipc):
            raise InvalidArgument("namespace mode TARGET is for containers, not sandboxes",
                                  field="config.linux.security_context.namespace_options")
        # A pod that shares the node's ipc but not its processes gets a pid namespace only.
        isolate_process = NODE not in (config.pid, config.ipc)
        isolate_pid = config.pid != NODE and not isolate_process
        if config.log_directory and not os.path.isabs(config.log_directory):
            raise InvalidArgument("log_directory must be an absolute path",
                                  field="config.log_directory")
        if config.hostname and not _HOSTNAME.fullmatch(config.hostname):
            raise InvalidArgument(f"invalid hostname {config.hostname!r}", field="config.hostname")
        with self._lock:
            for sandbox in self._sandboxes.values():
                same = sandbox.config
                if (same.name, same.namespace, same.uid, same.attempt) == (
                        config.name, config.namespace, config.uid, config.attempt):
                    raise AlreadyExists(f"sandbox {config.namespace}/{config.name} attempt "
                                        f"{config.attempt} exists: {sandbox.id}",
                                        field="config.metadata")
            sandbox_id = _new_id()
            cell = CellName(f"p{sandbox_id[:24]}")
        self.workloads.allocate(cell, CellSpec(limits=config.limits,
                                               isolate_process=isolate_process,
                                               isolate_network=config.network != NODE,
                                               isolate_pid=isolate_pid,
                                               hostname=config.hostname or None))
        try:
            if config.log_directory:
                Path(config.log_directory).mkdir(mode=0o755, parents=True, exist_ok=True)
        except BaseException:
            self.workloads.free(cell, grace=0)
            raise
        sandbox = Sandbox(sandbox_id, cell, config, created_at=time.time_ns())
        with self._lock:
            self._sandboxes[sandbox_id] = sandbox
        log.info("pod sandbox running", extra={"sandbox": sandbox_id, "cell": cell.path,
                                               "pod": f"{config.namespace}/{config.name}"})
        return sandbox

    def sandbox(self, sandbox_id: str) -> Sandbox:
        with self._lock:
            found = by_id(self._sandboxes, sandbox_id)
        if found is None:
            raise NotFound(f"no pod sandbox {sandbox_id!r}", field="pod_sandbox_id")
        return found

    def sandboxes(self, *, sandbox_id: str = "", ready: bool | None = None,
                  labels: Mapping[str, str] | None = None) -> list[Sandbox]:
        with self._lock:
            found = list(self._sandboxes.values())
        return sorted((s for s in found
                       if s.id.startswith(sandbox_id)
                       and (ready is None or s.ready == ready)
                       and labels_match(s.config.labels, labels or {})),
                      key=lambda s: s.created_at)

    def stop_sandbox(self, sandbox_id: str) -> None:
        try:
            sandbox = self.sandbox(sandbox_id)
        except NotFound:
            return  # already removed: stop is idempotent
        with self._lock:
            members = list(sandbox.containers.values())
        for container in members:
            self.stop_container(container.id, timeout=0)
        with self._lock:
            sandbox.ready = False
        log.info("pod sandbox stopped", extra={"sandbox": sandbox.id})

    def remove_sandbox(self, sandbox_id: str) -> None:
        try:
            sandbox = self.sandbox(sandbox_id)
        except NotFound:
            return
        self.stop_sandbox(sandbox.id)
        # One free of the pod cell removes the containers' cells with it.
        try:
            self.workloads.free(sandbox.cell, grace=0)
        except NotFound:
            pass  # freed already (a concurrent remove)
        with self._lock:
            members = list(sandbox.containers.values())
            self._sandboxes.pop(sandbox.id, None)
            for container in members:
                self._by_container.pop(container.id, None)
        for container in members:
            container.spec.release()
            if container.log is not None:
                container.log.close()
        log.info("pod sandbox removed", extra={"sandbox": sandbox.id})

    # ------------------------------------------------------------------ containers

    def create_container(self, sandbox_id: str, config: ContainerConfig) -> CriContainer:
        sandbox = self.sandbox(sandbox_id)
        if not config.name:
            raise InvalidArgument("a container needs a metadata name", field="config.metadata")
        with self._lock:
            if not sandbox.ready:
                raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready",
                                         field="pod_sandbox_id")
            for other in sandbox.containers.values():
                if (other.config.name, other.config.attempt) == (config.name, config.attempt):
                    raise AlreadyExists(f"container {config.name} attempt {config.attempt} "
                                        f"exists in the sandbox: {other.id}",
                                        field="config.metadata")
        if config.log_path and (os.path.isabs(config.log_path)
                                or ".." in config.log_path.split("/")):
            raise InvalidArgument("log_path must be relative to the sandbox's log directory",
                                  field="config.log_path")
        if config.run_as_user is not None and config.run_as_username:
            raise InvalidArgument("run_as_user and run_as_username exclude each other",
                                  field="config.linux.security_context")
        if config.run_as_group is not None and config.run_as_user is None \
                and not config.run_as_username:
            raise InvalidArgument("run_as_group needs run_as_user or run_as_username",
                                  field="config.linux.security_context.run_as_group")
        if config.pid == TARGET:
            raise InvalidArgument("pid namespace mode TARGET (sharing another container's) is "
                                  "not supported",
                                  field="config.linux.security_context.namespace_options.pid")
        image = self.store.get(config.image)
        user = config.run_as_username or None
        spec = self.containers.prepare(
            image.id, command=config.command or None, args=config.args or None,
            env=config.env,
            working_dir=config.working_dir or None, user=user, uid=config.run_as_user,
            gid=config.run_as_group, read_only=config.read_only_rootfs, mounts=config.mounts)
        container_id = _new_id()
        cell = CellName(f"{sandbox.cell.path}/c{container_id[:24]}")
        try:
            self.workloads.allocate(cell, CellSpec(limits=config.limits,
                                                   isolate_pid=config.pid == CONTAINER))
        except BaseException:
            spec.release()
            raise
        log_path = None
        if sandbox.config.log_directory and config.log_path:
            log_path = Path(sandbox.config.log_directory) / config.log_path
        container = CriContainer(container_id, sandbox.id, cell, config, image, spec,
                                 created_at=time.time_ns(), log_path=log_path)
        with self._lock:
            sandbox.containers[container_id] = container
            self._by_container[container_id] = container
        log.info("container created", extra={"container": container_id, "cell": cell.path,
                                             "image": image.id})
        return container

    def container(self, container_id: str) -> CriContainer:
        with self._lock:
            found = by_id(self._by_container, container_id)
        if found is None:
            raise NotFound(f"no container {container_id!r}", field="container_id")
        return found

    def list_containers(self, *, container_id: str = "", sandbox_id: str = "",
                        state: str | None = None,
                        labels: Mapping[str, str] | None = None) -> list[CriContainer]:
        with self._lock:
            found = list(self._by_container.values())
        return sorted((c for c in found
                       if c.id.startswith(container_id) and c.sandbox_id.startswith(sandbox_id)
                       and (state is None or c.state == state)
                       and labels_match(c.config.labels, labels or {})),
                      key=lambda c: c.created_at)

    def start_container(self, container_id: str) -> None:
        container = self.container(container_id)
        with self._lock:
            if container.state != "CREATED":
                raise FailedPrecondition(f"container {container.id} is {container.state}, "
                                         "not CREATED", field="container_id")
            # Claimed under the lock, so that two Starts cannot both start it.
            container.start_error = "starting"
        crilog = None
        try:
            if container.log_path is not None:
                crilog = CriLog(container.log_path)
            executable = self.workloads.start_executable(
                container.cell, MAIN, container.spec.command, container=container.spec)
        except Exception as error:
            if crilog is not None:
                crilog.close()
            with self._lock:
                container.start_error = getattr(error, "message", str(error))
            raise
        if crilog is not None:
            crilog.follow(executable.stdout, executable.stderr)
        with self._lock:
            container.executable, container.log, container.start_error = executable, crilog, ""
        log.info("container started", extra={"container": container.id,
                                             "pid": executable.process.host_pid})

    def stop_container(self, container_id: str, timeout: float) -> None:
        try:
            container = self.container(container_id)
        except NotFound:
            return  # removed already: stop is idempotent
        if container.executable is not None:
            try:
                self.workloads.stop_executable(container.cell, MAIN, grace=max(0.0, timeout),
                                               forget=False)
            except NotFound:
                pass
        if container.log is not None:
            container.log.drain(LOG_DRAIN_SECONDS)

    def remove_container(self, container_id: str) -> None:
        try:
            container = self.container(container_id)
        except NotFound:
            return
        try:
            self.workloads.free(container.cell, grace=0)
        except NotFound:
            pass
        container.spec.release()  # done by the free once it ran; not if it never did
        if container.log is not None:
            container.log.close()
        with self._lock:
            self._by_container.pop(container.id, None)
            sandbox = self._sandboxes.get(container.sandbox_id)
            if sandbox is not None:
                sandbox.containers.pop(container.id, None)
        log.info("container removed", extra={"container": container.id})

    def update_resources(self, container_id: str, limits: CgroupLimits) -> None:
        """Write new limits to a container's cell (those set; the rest stay)."""
        from auraed.kernel.cgroups import CgroupError, InvalidLimit, LimitRefused, UnsupportedLimit

        container = self.container(container_id)
        if container.state == "EXITED":
            raise FailedPrecondition(f"container {container.id} has exited",
                                     field="container_id")
        try:
            self.workloads.backend.update(container.cell.path, limits)
        except InvalidLimit as error:
            raise InvalidArgument(str(error), field=f"linux.{error.field}") from None
        except (UnsupportedLimit, LimitRefused) as error:
            raise FailedPrecondition(str(error), field=f"linux.{error.field}") from None
        except CgroupError as error:
            raise NotFound(f"container {container.id}: {error}", field="container_id") from None
        with self._lock:
            merged = {name: value for name, value in vars(limits).items() if value is not None}
            container.config = replace(container.config,
                                       limits=replace(container.config.limits, **merged))

    def reopen_log(self, container_id: str) -> None:
        container = self.container(container_id)
        if container.state != "RUNNING":
            raise FailedPrecondition(f"container {container.id} is not running",
                                     field="container_id")
        if container.log is not None:
            container.log.reopen()

    def exec_sync(self, container_id: str, argv: Sequence[str],
                  timeout: float | None) -> tuple[bytes, bytes, int]:
        """Run argv in the container; its stdout, stderr (each capped) and exit code."""
        container = self.container(container_id)
        if container.state != "RUNNING" or container.executable is None:
            raise FailedPrecondition(f"container {container.id} is not running",
                                     field="container_id")
        spec = container.spec
        process = self.containers.exec_in(container.executable.process.host_pid, argv,
                                          env=spec.env, cwd=spec.cwd, uid=spec.uid, gid=spec.gid)
        name = f"exec-{next(self._execs)}"
        executable = self.workloads.start_executable(container.cell, name, shlex.join(argv),
                                                     container=process)
        try:
            if not executable.wait(timeout):
                raise ExecTimedOut(f"command timed out after {timeout} s")
            output = [_read_all(channel) for channel in (executable.stdout, executable.stderr)]
            status = executable.exit_status
            assert status is not None
            code = status.exit_code if status.exit_code is not None else 128 + (
                status.signal or 0)
        finally:
            self.workloads.stop_executable(container.cell, name, grace=0)
        return output[0], output[1], code

    def usage(self, container: CriContainer) -> tuple[int, int | None, int, int]:
        """CPU µs and memory bytes of the container's cell, and bytes and inodes of its
        writable layer."""
        from auraed.kernel.cgroups import CgroupError

        try:
            used = self.workloads.backend.usage(container.cell.path)
        except CgroupError as error:
            raise NotFound(f"container {container.id} has no cgroup: {error}",
                           field="container_id") from None
        size = inodes = 0
        upper = container.spec.directory / "upper" if container.spec.directory else None
        if upper is not None:
            for directory, subdirectories, files in os.walk(upper):
                inodes += len(files) + len(subdirectories)
                for name in files:
                    try:
                        size += os.lstat(os.path.join(directory, name)).st_size
                    except OSError:
                        pass
        return used.cpu_usec, used.memory_bytes, size, inodes

    def shutdown(self) -> None:
        """Remove every sandbox (the daemon is stopping)."""
        for sandbox in self.sandboxes():
            try:
                self.remove_sandbox(sandbox.id)
            except Exception:
                log.exception("removing a pod sandbox at shutdown failed",
                              extra={"sandbox": sandbox.id})


def _read_all(channel: OutputLog) -> bytes:
    """A finished channel's lines as bytes, up to MAX_EXEC_OUTPUT."""
    deadline = time.monotonic() + LOG_DRAIN_SECONDS
    data = bytearray()
    for _, line in channel.follow(lambda: time.monotonic() > deadline):
        if len(data) < MAX_EXEC_OUTPUT:
            data += line + b"\n"
    return bytes(data[:MAX_EXEC_OUTPUT])
