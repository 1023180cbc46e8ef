"""The CRI's pod sandboxes as spawned instances (issue 14: "a pod is a spawned instance whose
cells run containers").

RunPodSandbox spawns an instance `pod-<12 hex>` (auraed.runtime.instances): a cell of this
daemon with the pod's own pid, ipc, uts, mount and network namespaces (the node's where kubelet
asks for them), the pod's resources as its limits, named with the pod's hostname, placed at
kubelet's cgroup_parent mapped into this daemon's subtree (`/kubepods/burstable/pod<uid>` →
cells `kubepods/burstable/pod<uid>`, and the instance's cell below; nothing is made outside
the subtree). The instance's daemon serves the CRI itself, with pods as its own cells
(`--cri-pods cells`, auraed.cri.pods), on a socket in the instance's directory, and reads this
daemon's image store (`--image-store`). The host then asks it, over that socket, for one
sandbox sharing the instance's namespaces (with a pid namespace of its own, so the pod's
processes never see the instance's daemon) and relays every container call to it: the
containers are cells of the instance, `<root>/…/instance-pod-<hex>/auraed/p<id>/c<id>`. The
sandbox's id is the one the instance gave, so ids need no translation.

StopPodSandbox stops the containers, keeps their last status, and frees the instance: nothing
of the pod runs after it. RemovePodSandbox forgets the records and frees the cgroup parents no
other pod uses.

Each pod's record (its config, its containers' configs and last statuses) is kept on disk
(auraed.cri.records) at every change. A daemon that starts again (after a --live-restore
restart or a crash) lists the pods it finds there: not ready, their containers exited
(exit code 255, reason "Unknown" for those that were still running) — the instances did not
survive the daemon, and kubelet stops, removes and recreates such pods.

This module is a CRI client of the instances; the service (auraed.cri.relay) only translates.
Locking: `_lock` guards the registries and the records' fields and is never held across a call
to an instance; `_parents` serializes the allocation and freeing of cgroup-parent cells.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from auraed.cri.generated import api_pb2 as cri
from auraed.cri.generated import api_pb2_grpc as cri_grpc
from auraed.cri.ids import by_id, labels_match
from auraed.cri.records import PodRecords
from auraed.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RuntimeFault,
    Unavailable,
    Unimplemented,
)
from auraed.images import Image, ImageStore
from auraed.kernel.cgroups import CgroupError, CgroupLimits
from auraed.runtime.instances import (
    CGROUP_LEAF,
    POD_PARENTS,
    STANDBY_SOCKET,
    Instance,
    Instances,
    InstanceSpec,
)
from auraed.runtime.names import CellName
from auraed.runtime.workloads import CellSpec, Workloads

log = logging.getLogger("auraed.cri")

INSTANCE_PREFIX = "pod-"
CRI_SOCKET = "cri.sock"
# How long a new pod instance gets to answer on its CRI socket. Generous: the machine may be
# loaded; the caller's deadline is the real bound.
READY_TIMEOUT = 60.0
_SOCKET_POLL = 0.003
_ATTEMPT = 0.5
# A spare's cell until it is claimed (the pod's limits replace them): its start runs in the
# background, so it yields the CPU to the pods that run (kubelet starts a node's pods in a
# burst, and a spare refilled meanwhile took the two cores from them).
SPARE_LIMITS = CgroupLimits(cpu_weight=1)
# A refill waits until no pod call came for REFILL_QUIET seconds (at most REFILL_HOLD): spawning
# a spare is this daemon's own work too (its cell, the fork from the template), and started at
# the claim it took the CPU from the claimed pod's start and its container calls (a warm pod's
# start to exit: 4.0-5.4x runc, 2.6x with the wait; bench/containers.py at load 5-10). Held
# longer, the pods right after find their spare still starting (docs/cri.md).
# How long a cgroup-parent cell no pod uses is kept for the next pod (_release_parent).
PARENT_LINGER = 2.0
REFILL_QUIET = 0.1
REFILL_HOLD = 0.2
# Calls to an instance that wait for nothing but the instance itself.
CALL_TIMEOUT = 60.0
# containerd's answer for a container whose process it lost track of.
UNKNOWN_EXIT_CODE = 255
_FAULTS: dict[grpc.StatusCode, type[RuntimeFault]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
}
Reply = TypeVar("Reply", bound=Message)


@dataclass(eq=False)
class PodContainer:
    id: str
    sandbox_id: str
    config: cri.ContainerConfig
    created_at: int  # ns
    image: Image | None  # held in this daemon's store while the container exists
    # The last status the instance gave; what ContainerStatus answers once it is gone.
    status: cri.ContainerStatus | None = None


@dataclass(eq=False)
class Pod:
    id: str
    instance_name: str
    parent: CellName
    config: cri.PodSandboxConfig
    created_at: int  # ns
    runtime_handler: str = ""
    ready: bool = True
    instance: Instance | None = None
    channel: grpc.Channel | None = None
    stub: cri_grpc.RuntimeServiceStub | None = None
    containers: dict[str, PodContainer] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.stub is not None

    @property
    def labels(self) -> Mapping[str, str]:
        return self.config.labels


@dataclass(eq=False)
class Spare:
    """A pod instance started ahead, and the channel to its CRI socket, connected while the
    spare waits (its daemon listens there before its claim): a claim then needs no channel of
    its own nor a call to learn that the daemon answers (calls wait until it has wired its
    services, auraed.pending)."""

    instance: Instance
    channel: grpc.Channel
    connected: grpc.Future[None]
    started: float = field(default_factory=time.monotonic)


class ChannelCloser:
    """Closes channels to pod instances in threads of their own, so that no CRI call waits for
    a close. A channel whose readiness was watched (a spare's, grpc.channel_ready_future) has
    a polling thread in a connectivity watch with a 0.2 s deadline that the close cannot
    cancel; the close waits for it, up to 0.2 s after the channel became ready. A pod removed
    that soon after its spare connected (pods a few hundred ms apart, or kubelet's Stop then
    Remove) waited 40-200 ms for that in its RemovePodSandbox (docs/cri.md)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def close(self, channel: grpc.Channel, connected: grpc.Future[None] | None = None) -> None:
        if connected is not None:
            connected.cancel()
        thread = threading.Thread(target=channel.close, name="pod-channel-close", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def drain(self) -> None:
        """Until every close begun so far has ended (the daemon stops: no channel outlives
        it half closed)."""
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join()

    def pending(self) -> int:
        with self._lock:
            return sum(t.is_alive() for t in self._threads)


def _channel(socket: Path) -> grpc.Channel:
    return grpc.insecure_channel(f"unix:{socket}", options=[
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ("grpc.initial_reconnect_backoff_ms", 10),
        ("grpc.min_reconnect_backoff_ms", 10),
        ("grpc.max_reconnect_backoff_ms", 200)])


def _encode(message: Message) -> str:
    return base64.b64encode(message.SerializeToString()).decode()


def _decode(kind: type[Reply], text: str) -> Reply:
    message = kind()
    message.ParseFromString(base64.b64decode(text))
    return message


def parent_cell(cgroup_parent: str) -> CellName:
    """kubelet's cgroup parent as a cell path under POD_PARENTS."""
    labels = [part for part in cgroup_parent.split("/") if part]
    if not labels or labels[0] != POD_PARENTS:
        labels.insert(0, POD_PARENTS)
    try:
        return CellName.parse("/".join(labels))
    except InvalidArgument as error:
        raise InvalidArgument(f"cgroup_parent {cgroup_parent!r} cannot be a cgroup under this "
                              f"daemon's subtree (use the cgroupfs driver): {error.message}",
                              field="config.linux.cgroup_parent") from None


def _call(method: Callable[..., Reply], request: Message, timeout: float | None = None) -> Reply:
    """One call to an instance's CRI; its failure as the fault the instance meant."""
    try:
        return method(request, timeout=timeout or CALL_TIMEOUT)
    except grpc.RpcError as error:
        code = error.code()
        details = error.details() or ""
        fault = _FAULTS.get(code, Unavailable)
        raise fault(details if fault is not Unavailable
                    else f"the pod's instance did not answer: {details}") from None


def limits_of(resources: cri.LinuxContainerResources) -> CgroupLimits:
    from auraed.cri.service import limits_of as container_limits

    return container_limits(resources)


class PodInstances:
    def __init__(self, instances: Instances, workloads: Workloads, store: ImageStore,
                 records: PodRecords, *, spares: int = 1) -> None:
        """spares: how many pod instances to keep started ahead (see _take_spare); 0: none."""
        self.instances = instances
        self.workloads = workloads
        self.store = store
        self.records = records
        self._lock = threading.RLock()
        self._parents = threading.Lock()
        # Pods by the cgroup parent they hold (_hold_parent), starting ones included.
        self._held: Counter[CellName] = Counter()
        # Parents no pod uses, by when they are freed if still unused (_release_parent).
        self._lingering: dict[CellName, float] = {}
        self._linger_thread: threading.Thread | None = None
        self._pods: dict[str, Pod] = {}
        self._by_container: dict[str, PodContainer] = {}
        self._spare_count = spares
        self._spares: list[Spare] = []
        self._refiller: threading.Thread | None = None
        self._closing = False
        self._closed = threading.Event()  # set with _closing: a waiting refill ends
        # Set (and notified) when a pod took a spare: the refill thread makes another.
        self._refill_wanted = False
        self._refill_asked = threading.Condition(self._lock)
        # When a pod call last began or ended (time.monotonic), and how many run (_busy).
        self._last_call = 0.0
        self._calls = 0
        self.closer = ChannelCloser()

    # ------------------------------------------------------------------ start and stop

    def open(self) -> None:
        """Load the pods a previous daemon left: none of their instances survived it."""
        self.records.open()
        now = time.time_ns()
        for record in self.records.load():
            try:
                pod = self._restored(record, now)
            except (KeyError, TypeError, ValueError) as error:
                log.error("removing a pod record that does not parse",
                          extra={"sandbox": record.get("id"), "error": repr(error)})
                self.records.delete(str(record.get("id")))
                continue
            self._pods[pod.id] = pod
            self._held[pod.parent] += 1  # released by its RemovePodSandbox, as any pod's
            for container in pod.containers.values():
                self._by_container[container.id] = container
            self._save(pod)
            log.info("pod sandbox restored (not ready: its instance ended with the daemon)",
                     extra={"sandbox": pod.id})
        # The cgroup parents of pods whose instances are gone hold nothing now.
        try:
            self.workloads.free(CellName(POD_PARENTS), grace=0)
        except NotFound:
            pass

    def _restored(self, record: dict[str, Any], now: int) -> Pod:
        pod = Pod(id=str(record["id"]), instance_name=str(record["instance"]),
                  parent=CellName.parse(str(record["parent"])),
                  config=_decode(cri.PodSandboxConfig, record["config"]),
                  created_at=int(record["created_at"]),
                  runtime_handler=str(record.get("runtime_handler", "")), ready=False)
        for container_id, entry in record["containers"].items():
            config = _decode(cri.ContainerConfig, entry["config"])
            status = (_decode(cri.ContainerStatus, entry["status"]) if entry.get("status")
                      else None)
            image = self.store.find(str(entry.get("image", "")))
            if image is not None:
                self.store.acquire(image)
            container = PodContainer(str(container_id), pod.id, config,
                                     int(entry["created_at"]), image, status)
            container.status = _lost(container, now)
            pod.containers[container.id] = container
        return pod

    def detach(self) -> None:
        """The daemon stops but keeps the CRI's state (--live-restore): the containers' last
        statuses are recorded before the instances end with the daemon."""
        self._discard_spares()
        for pod in self.sandboxes():
            if pod.live:
                self._snapshot(pod)
            self._save(pod)
        self._flush_parents()
        self.closer.drain()

    def shutdown(self) -> None:
        """Remove every pod (the daemon is stopping for good)."""
        self._discard_spares()
        for pod in self.sandboxes():
            try:
                self.remove(pod.id)
            except Exception:
                log.exception("removing a pod sandbox at shutdown failed",
                              extra={"sandbox": pod.id})
        self._flush_parents()
        self.closer.drain()

    # ------------------------------------------------------------------ sandboxes

    def run(self, config: cri.PodSandboxConfig, runtime_handler: str) -> Pod:
        metadata = config.metadata
        if not metadata.name or not metadata.namespace or not metadata.uid:
            raise InvalidArgument("a pod sandbox needs metadata name, namespace and uid",
                                  field="config.metadata")
        if runtime_handler:
            raise InvalidArgument(f"unknown runtime handler {runtime_handler!r}; this "
                                  "runtime has only the default one", field="runtime_handler")
        options = config.linux.security_context.namespace_options
        if cri.TARGET in (options.network, options.pid, options.ipc):
            raise InvalidArgument("namespace mode TARGET is for containers, not sandboxes",
                                  field="config.linux.security_context.namespace_options")
        parent = parent_cell(config.linux.cgroup_parent)
        with self._lock:
            for pod in self._pods.values():
                if pod.config.metadata == metadata:
                    raise AlreadyExists(f"sandbox {metadata.namespace}/{metadata.name} attempt "
                                        f"{metadata.attempt} exists: {pod.id}",
                                        field="config.metadata")
        self._hold_parent(parent)
        try:
            instance, spare = self._start_instance(config, parent)
        except BaseException:
            self._release_parent(parent)
            raise
        name = instance.name
        socket = self.instances.directory_of(name) / CRI_SOCKET
        # A claimed spare's channel is connected already: the call waits there until the
        # daemon has wired its services. One not connected yet may be in its reconnect backoff
        # (the spare was claimed while it started): a new channel connects at once.
        connected = spare is not None and spare.connected.done() and \
            not spare.connected.cancelled()
        if spare is not None and not connected:
            self.closer.close(spare.channel, spare.connected)
        channel = spare.channel if spare is not None and connected else _channel(socket)
        stub = cri_grpc.RuntimeServiceStub(channel)
        try:
            if not connected:
                self._await_answer(instance, socket, stub)
            try:
                inner = _call(stub.RunPodSandbox, cri.RunPodSandboxRequest(
                    config=_inner_sandbox_config(config)))
            except Unavailable:
                if not _running(instance) or instance.process is None or \
                        instance.process.wait(0.1):
                    raise FailedPrecondition(f"the daemon of pod instance {name} exited before "
                                             f"it answered: {_tail(instance.log_path)}") from None
                raise
        except BaseException:
            self.closer.close(channel)
            self._free_instance(name)
            self._release_parent(parent)
            raise
        self.instances.mark_answering(instance)
        pod = Pod(inner.pod_sandbox_id, name, parent, config, time.time_ns(),
                  runtime_handler=runtime_handler, instance=instance, channel=channel, stub=stub)
        with self._lock:
            self._pods[pod.id] = pod
        self._save(pod)
        log.info("pod sandbox running", extra={"sandbox": pod.id, "instance": name,
                                               "cell": instance.cell.path,
                                               "pod": f"{metadata.namespace}/{metadata.name}"})
        return pod

    # ------------------------------------------------------------------ spares

    def _start_instance(self, config: cri.PodSandboxConfig,
                        parent: CellName) -> tuple[Instance, Spare | None]:
        """The pod's instance, not yet answering: a spare claimed if one matches (returned
        too, with its channel), else one spawned; either way the spares are refilled in the
        background."""
        options = config.linux.security_context.namespace_options
        isolate_process = cri.NODE not in (options.pid, options.ipc)
        isolate_network = options.network != cri.NODE

        def spec(name: str) -> InstanceSpec:
            return replace(self._spec(name, isolate_process, isolate_network),
                           limits=limits_of(config.linux.resources), parent=parent,
                           hostname=config.hostname or None)

        try:
            spare = self._take_spare(isolate_process, isolate_network)
            if spare is not None:
                claimed = self._claim(spare, spec(spare.instance.name))
                if claimed is not None:
                    return claimed, spare
            return self.instances.spawn(spec(INSTANCE_PREFIX + secrets.token_hex(6))), None
        finally:
            self._refill()

    def _spec(self, name: str, isolate_process: bool, isolate_network: bool,
              standby: bool = False) -> InstanceSpec:
        """A pod instance's spec before the pod's own values: its name, isolation, daemon."""
        socket = self.instances.directory_of(name) / CRI_SOCKET
        return InstanceSpec(name, CgroupLimits(), isolate_process=isolate_process,
                            isolate_network=isolate_network, standby=standby,
                            daemon_arguments=("--cri-socket", str(socket), "--cri-pods", "cells",
                                              "--image-store", str(self.store.root)))

    def _take_spare(self, isolate_process: bool, isolate_network: bool) -> Spare | None:
        """A spare started ahead, if one matches and waits for its claim: spares have the
        pod's own namespaces, so a pod that shares the node's pid, ipc or network takes none.
        A spare still starting is left for the next pod: this one starts its own, which took
        60-70 ms to the container's exit, against 110-120 ms waiting out the spare's start
        (bench/containers.py, the interleaved pods; a spare's cell has SPARE_LIMITS until it
        is claimed, and its start is the same work as a pod's own). One that has not come to
        wait within READY_TIMEOUT is freed, and the refill starts another."""
        if not (isolate_process and isolate_network):
            return None
        ended: list[Spare] = []
        stuck: list[Spare] = []
        try:
            with self._lock:
                while self._spares:
                    spare = self._spares.pop(0)
                    if not _running(spare.instance) or spare.instance.ended.is_set():
                        ended.append(spare)
                    elif self._on_standby(spare):
                        return spare
                    elif time.monotonic() - spare.started < READY_TIMEOUT:
                        # Still starting: claimed now, the pod would wait out the rest of its
                        # start; it is left for the next pod.
                        self._spares.insert(0, spare)
                        return None
                    else:
                        stuck.append(spare)  # never came to wait: replaced, not kept forever
        finally:
            for gone in ended + stuck:
                self.closer.close(gone.channel, gone.connected)
            for gone in stuck:
                log.warning("a spare pod instance did not come to wait for its claim; freed",
                            extra={"instance": gone.instance.name})
                self._free_instance(gone.instance.name, kill=True)
        return None

    def _on_standby(self, spare: Spare) -> bool:
        """Whether the spare's daemon waits for its claim: its standby socket appears only
        once it listens (auraed.runtime.standby)."""
        return (self.instances.directory_of(spare.instance.name) / STANDBY_SOCKET).exists()

    def _claim(self, spare: Spare, spec: InstanceSpec) -> Instance | None:
        """The spare made the pod's instance; None (the spare freed) if it could not be."""
        try:
            return self.instances.claim(spare.instance.name, spec)
        except RuntimeFault as fault:
            log.warning("a spare pod instance could not be claimed; spawning one",
                        extra={"instance": spare.instance.name, "error": fault.message})
            self.closer.close(spare.channel, spare.connected)
            self._free_instance(spare.instance.name, kill=True)
            return None

    def _refill(self) -> None:
        """Start spares in the background until there are as many as asked for: the first
        RunPodSandbox of the daemon starts the thread that does (a daemon that runs no pod
        pays nothing); later ones wake it, which costs a pod's start no thread's start."""
        with self._lock:
            if self._closing or len(self._spares) >= self._spare_count:
                return
            self._refill_wanted = True
            if self._refiller is None:
                self._refiller = threading.Thread(target=self._refill_loop, name="pod-spares",
                                                  daemon=True)
                self._refiller.start()
            else:
                self._refill_asked.notify()

    def _refill_loop(self) -> None:
        while True:
            with self._lock:
                self._refill_asked.wait_for(lambda: self._refill_wanted or self._closing)
                if self._closing:
                    return
                self._refill_wanted = False
            self._fill()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Around a CRI call about a pod: the refill waits until they stop (REFILL_QUIET)."""
        with self._lock:
            self._calls += 1
            self._last_call = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._calls -= 1
                self._last_call = time.monotonic()

    def _await_quiet(self) -> None:
        """Until no pod call ran for REFILL_QUIET seconds, at most REFILL_HOLD, or closing."""
        hold = time.monotonic() + REFILL_HOLD
        while True:
            with self._lock:
                now = time.monotonic()
                quiet_for = 0.0 if self._calls else now - self._last_call
            if quiet_for >= REFILL_QUIET or now >= hold:
                return
            if self._closed.wait(min(REFILL_QUIET - quiet_for, hold - now)):
                return

    def _fill(self) -> None:
        while True:
            self._await_quiet()
            with self._lock:
                if self._closing or len(self._spares) >= self._spare_count:
                    return
            name = INSTANCE_PREFIX + secrets.token_hex(6)
            kept, appended = None, False
            try:
                spare = self.instances.spawn(replace(
                    self._spec(name, True, True, standby=True), limits=SPARE_LIMITS))
                channel = _channel(self.instances.directory_of(name) / CRI_SOCKET)
                kept = Spare(spare, channel, grpc.channel_ready_future(channel))
            except RuntimeFault as fault:
                log.warning("could not start a spare pod instance",
                            extra={"instance": name, "error": fault.message})
                return
            finally:
                with self._lock:
                    if kept is not None and not self._closing:
                        self._spares.append(kept)
                        appended = True
            if appended:
                continue
            self.closer.close(kept.channel, kept.connected)
            self._free_instance(name, kill=True)
            return

    def _discard_spares(self) -> None:
        """No more spares: the refill stopped, every spare freed."""
        with self._lock:
            self._closing = True
            self._closed.set()
            self._refill_asked.notify_all()
            refiller = self._refiller
        if refiller is not None:
            refiller.join()
        with self._lock:
            spares, self._spares = self._spares, []
        for spare in spares:
            self.closer.close(spare.channel, spare.connected)
            self._free_instance(spare.instance.name, kill=True)

    def _await_answer(self, instance: Instance, socket: Path,
                      stub: cri_grpc.RuntimeServiceStub) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not socket.exists() and time.monotonic() < deadline and _running(instance):
            time.sleep(_SOCKET_POLL)
        last = ""
        while time.monotonic() < deadline:
            if not _running(instance):
                raise FailedPrecondition(f"the daemon of pod instance {instance.name} exited "
                                         f"before it answered: {_tail(instance.log_path)}")
            try:
                stub.Version(cri.VersionRequest(), timeout=_ATTEMPT, wait_for_ready=True)
                return
            except grpc.RpcError as error:
                last = error.details() or ""
        raise Unavailable(f"pod instance {instance.name} did not answer in time: {last}")

    def sandbox(self, sandbox_id: str) -> Pod:
        with self._lock:
            found = by_id(self._pods, sandbox_id)
        if found is None:
            raise NotFound(f"no pod sandbox {sandbox_id!r}", field="pod_sandbox_id")
        return found

    def sandboxes(self, *, sandbox_id: str = "", ready: bool | None = None,
                  labels: Mapping[str, str] | None = None) -> list[Pod]:
        with self._lock:
            found = list(self._pods.values())
        return sorted((p for p in found if p.id.startswith(sandbox_id)
                       and (ready is None or p.ready == ready)
                       and labels_match(p.labels, labels or {})), key=lambda p: p.created_at)

    def stop(self, sandbox_id: str) -> None:
        """Stop the pod's containers, keep their statuses, free its instance (idempotent)."""
        try:
            pod = self.sandbox(sandbox_id)
        except NotFound:
            return
        self._stop(pod, keep=True)

    def _stop(self, pod: Pod, *, keep: bool) -> None:
        """keep: have the instance stop the containers (their logs drained into kubelet's
        files) and record their last statuses (StopPodSandbox). A RemovePodSandbox forgets
        them right after: the end of the instance kills them as its StopPodSandbox would (with
        no grace: a sandbox's stop gives none), so it neither asks the instance to stop them
        (5 ms of each pod's removal, measured) nor rewrites the record it removes."""
        if pod.live:
            assert pod.stub is not None
            if keep:
                try:
                    _call(pod.stub.StopPodSandbox,
                          cri.StopPodSandboxRequest(pod_sandbox_id=pod.id))
                except RuntimeFault as fault:
                    log.warning("the pod's instance did not stop its containers; freeing it",
                                extra={"sandbox": pod.id, "error": fault.message})
                self._snapshot(pod)
            self._end_instance(pod)
        with self._lock:
            pod.ready = False
            for container in pod.containers.values():
                container.status = _lost(container, time.time_ns())
        if keep:
            self._save(pod)
        log.info("pod sandbox stopped", extra={"sandbox": pod.id})

    def remove(self, sandbox_id: str) -> None:
        try:
            pod = self.sandbox(sandbox_id)
        except NotFound:
            return
        self._stop(pod, keep=False)
        with self._lock:
            if self._pods.pop(pod.id, None) is None:
                return  # a concurrent remove did it
            members = list(pod.containers.values())
            for container in members:
                self._by_container.pop(container.id, None)
        for container in members:
            if container.image is not None:
                self.store.release(container.image)
        self.records.delete(pod.id)
        self._release_parent(pod.parent)
        log.info("pod sandbox removed", extra={"sandbox": pod.id})

    def statuses(self, pod: Pod) -> list[cri.ContainerStatus]:
        """Every container's status: from the instance, or as last recorded."""
        if pod.live:
            assert pod.stub is not None
            try:
                return list(_call(pod.stub.PodSandboxStatus, cri.PodSandboxStatusRequest(
                    pod_sandbox_id=pod.id)).containers_statuses)
            except (NotFound, Unavailable):
                pass  # the instance ended meanwhile
        with self._lock:
            return [c.status for c in pod.containers.values() if c.status is not None]

    # ------------------------------------------------------------------ containers

    def create_container(self, request: cri.CreateContainerRequest) -> PodContainer:
        pod = self.sandbox(request.pod_sandbox_id)
        if not pod.ready or pod.stub is None:
            raise FailedPrecondition(f"pod sandbox {pod.id} is not ready",
                                     field="pod_sandbox_id")
        image = self.store.find(request.config.image.image)
        if image is None:
            raise NotFound(f"no image {request.config.image.image!r} in the store",
                           field="config.image.image")
        self.store.acquire(image)
        try:
            relayed = cri.CreateContainerRequest()
            relayed.CopyFrom(request)
            relayed.pod_sandbox_id = pod.id
            relayed.sandbox_config.CopyFrom(_inner_sandbox_config(pod.config))
            options = relayed.config.linux.security_context.namespace_options
            pod_pid = pod.config.linux.security_context.namespace_options.pid
            if options.pid == cri.POD and pod_pid == cri.CONTAINER:
                # The pod has no shared pid namespace: the one the container would join is the
                # instance's, where the pod's daemon runs. It gets one of its own instead.
                options.pid = cri.CONTAINER
            elif options.pid != cri.TARGET and pod_pid == cri.NODE:
                options.pid = cri.NODE
            created = _call(pod.stub.CreateContainer, relayed)
        except BaseException:
            self.store.release(image)
            raise
        container = PodContainer(created.container_id, pod.id, request.config, time.time_ns(),
                                 image)
        with self._lock:
            pod.containers[container.id] = container
            self._by_container[container.id] = container
        self._save(pod)
        return container

    def container(self, container_id: str) -> tuple[Pod, PodContainer]:
        with self._lock:
            found = by_id(self._by_container, container_id)
            pod = self._pods.get(found.sandbox_id) if found is not None else None
        if found is None or pod is None:
            raise NotFound(f"no container {container_id!r}", field="container_id")
        return pod, found

    def live_container(self, container_id: str) -> tuple[cri_grpc.RuntimeServiceStub, str]:
        """The stub of the instance running the container, and its full id."""
        pod, container = self.container(container_id)
        stub = pod.stub
        if stub is None:
            raise FailedPrecondition(f"container {container.id} is not running: its pod "
                                     "sandbox is stopped", field="container_id")
        return stub, container.id

    def container_status(self, container_id: str,
                         verbose: bool = False) -> cri.ContainerStatusResponse:
        pod, container = self.container(container_id)
        instance, stub = pod.instance, pod.stub
        if stub is not None and instance is not None:
            answer = _call(stub.ContainerStatus, cri.ContainerStatusRequest(
                container_id=container.id, verbose=verbose))
            if verbose:
                answer.info["info"] = json.dumps(self._verbose_info(
                    instance, container, answer.info.get("info", "")))
            return answer
        assert container.status is not None
        return cri.ContainerStatusResponse(status=container.status)

    def remove_container(self, container_id: str) -> None:
        try:
            pod, container = self.container(container_id)
        except NotFound:
            return
        if pod.stub is not None:
            _call(pod.stub.RemoveContainer, cri.RemoveContainerRequest(
                container_id=container.id))
        with self._lock:
            if pod.containers.pop(container.id, None) is None:
                return
            self._by_container.pop(container.id, None)
        if container.image is not None:
            self.store.release(container.image)
        self._save(pod)

    def containers(self, pod: Pod) -> list[cri.Container]:
        """The pod's containers as ListContainers shows them."""
        if pod.stub is not None:
            try:
                return list(_call(pod.stub.ListContainers, cri.ListContainersRequest(
                    filter=cri.ContainerFilter(pod_sandbox_id=pod.id))).containers)
            except (NotFound, Unavailable):
                pass
        with self._lock:
            statuses = [c.status for c in pod.containers.values() if c.status is not None]
        return [cri.Container(id=s.id, pod_sandbox_id=pod.id, metadata=s.metadata,
                              image=s.image, image_ref=s.image_ref, image_id=s.image_id,
                              state=s.state, created_at=s.created_at, labels=s.labels,
                              annotations=s.annotations) for s in statuses]

    # ------------------------------------------------------------------ internals

    def container_cell(self, instance: Instance, container: PodContainer) -> str:
        """The container's cell as a path below this daemon's cgroup root."""
        return (f"{instance.cell.path}/{CGROUP_LEAF}/p{container.sandbox_id[:24]}"
                f"/c{container.id[:24]}")

    def _verbose_info(self, instance: Instance, container: PodContainer,
                      inner: str) -> dict[str, Any]:
        """The instance's verbose info with the container's pid as the host sees it (the
        instance's daemon knows only its own pid namespace's) and its cgroup."""
        try:
            info: dict[str, Any] = json.loads(inner) if inner else {}
        except ValueError:
            info = {}
        cell = self.container_cell(instance, container)
        info["cgroup"] = f"{self.workloads.backend.root_name}/{cell}"
        info["instance"] = instance.name
        inner_pid = info.pop("pid", None)
        info["pid"] = 0
        try:
            pids = self.workloads.backend.pids(cell)
        except CgroupError:
            pids = set()
        for pid in sorted(pids):
            # NSpid: the pid in each namespace from the host's down; the instance's is second
            # (the first for a pod in the node's pid namespace).
            chain = _ns_pids(pid)
            if chain and inner_pid == chain[min(1, len(chain) - 1)]:
                info["pid"] = pid
        return info

    def _snapshot(self, pod: Pod) -> None:
        statuses = {s.id: s for s in self.statuses(pod)}
        with self._lock:
            for container in pod.containers.values():
                if container.id in statuses:
                    container.status = statuses[container.id]

    def _end_instance(self, pod: Pod) -> None:
        with self._lock:
            channel, pod.channel, pod.stub, pod.instance = pod.channel, None, None, None
        if channel is not None:
            self.closer.close(channel)
        self._free_instance(pod.instance_name, kill=True)

    def _free_instance(self, name: str, *, kill: bool = False) -> None:
        try:
            self.instances.free(name, kill=kill)
        except NotFound:
            pass  # ended on its own (or freed through the instance service)
        except FailedPrecondition:
            pass  # being freed by the daemon's shutdown

    def _hold_parent(self, parent: CellName) -> None:
        """Allocate the parent cells a pod goes below, and count the pod as their user from
        now until _release_parent: from the start of its RunPodSandbox, not from its end."""
        with self._parents:
            self._held[parent] += 1
            for name in (*parent.ancestors(), parent):
                try:
                    self.workloads.allocate(name, CellSpec(CgroupLimits()))
                except AlreadyExists:
                    pass

    def _release_parent(self, parent: CellName) -> None:
        """Count the pod out of its parent cells; those no pod uses are freed PARENT_LINGER
        seconds later if still unused (a stopping daemon frees them at once). A pod still
        starting counts as a user: freeing a shared parent under it (the last running pod of
        `kubepods` removed while another started) killed its instance as it began to serve.
        The linger is for pods that follow one another: freeing `kubepods` and making it again
        was 12 rmdirs and 12 mkdirs per pod (6 v1 hierarchies, the cell and its leaf), each
        under the kernel's global cgroup_mutex, 10-35 ms of the pod's start and end."""
        with self._parents:
            if self._held[parent] > 0:
                self._held[parent] -= 1
                if not self._held[parent]:
                    del self._held[parent]
            if self._closing or PARENT_LINGER <= 0:
                self._free_unused(parent)
                return
            self._lingering[parent] = time.monotonic() + PARENT_LINGER
            if self._linger_thread is None or not self._linger_thread.is_alive():
                self._linger_thread = threading.Thread(target=self._linger_loop,
                                                       name="cri-parent-linger", daemon=True)
                self._linger_thread.start()

    def _linger_loop(self) -> None:
        """Free the lingering parents whose time is up; ends when none is left."""
        while True:
            with self._parents:
                now = time.monotonic()
                for parent, deadline in list(self._lingering.items()):
                    if deadline <= now:
                        del self._lingering[parent]
                        self._free_unused(parent)
                if not self._lingering:
                    self._linger_thread = None
                    return
                wait = min(self._lingering.values()) - now
            if self._closed.wait(max(wait, 0.01)):
                return  # the stopping daemon frees them (_flush_parents)

    def _flush_parents(self) -> None:
        """Free every lingering parent now (the daemon stops)."""
        with self._parents:
            lingering, self._lingering = list(self._lingering), {}
            for parent in lingering:
                self._free_unused(parent)

    def _free_unused(self, parent: CellName) -> None:
        """Free the parent cells no pod uses, deepest first (with _parents held)."""
        used = list(self._held)
        for name in reversed((*parent.ancestors(), parent)):
            if any(other.is_within(name) for other in used):
                return
            try:
                self.workloads.free(name, grace=0)
            except NotFound:
                pass
            except FailedPrecondition:
                return  # being freed already, or something else lives there

    def _save(self, pod: Pod) -> None:
        with self._lock:
            record = {
                "id": pod.id, "instance": pod.instance_name, "parent": pod.parent.path,
                "config": _encode(pod.config), "created_at": pod.created_at,
                "runtime_handler": pod.runtime_handler, "ready": pod.ready,
                "containers": {c.id: {"config": _encode(c.config), "created_at": c.created_at,
                                      "image": c.image.id if c.image else "",
                                      "status": _encode(c.status) if c.status else None}
                               for c in pod.containers.values()},
            }
        self.records.save(pod.id, record)


def _inner_sandbox_config(config: cri.PodSandboxConfig) -> cri.PodSandboxConfig:
    """What the pod's instance is asked for: one sandbox in the instance's own network and
    ipc namespaces (the pod's); the limits and cgroup parent are the instance's already."""
    inner = cri.PodSandboxConfig()
    inner.CopyFrom(config)
    inner.linux.ClearField("resources")
    inner.linux.ClearField("cgroup_parent")
    options = inner.linux.security_context.namespace_options
    # A pod sharing its processes (POD) gets a pid namespace inside the instance's; otherwise
    # its containers make theirs from the instance's, side by side as kubelet expects.
    pid = cri.POD if options.pid == cri.POD else cri.NODE
    options.CopyFrom(cri.NamespaceOption(network=cri.NODE, ipc=cri.NODE, pid=pid))
    return inner


def _lost(container: PodContainer, now: int) -> cri.ContainerStatus:
    """The container's status once its instance is gone: as last seen if it had exited,
    else exited with an unknown code."""
    status = cri.ContainerStatus()
    if container.status is not None:
        status.CopyFrom(container.status)
        if status.state == cri.CONTAINER_EXITED:
            return status
    else:
        config = container.config
        status.CopyFrom(cri.ContainerStatus(
            id=container.id, metadata=config.metadata, image=config.image,
            image_ref=container.image.id if container.image else "",
            image_id=container.image.id if container.image else "",
            created_at=container.created_at, labels=config.labels,
            annotations=config.annotations))
    status.state = cri.CONTAINER_EXITED
    status.exit_code = UNKNOWN_EXIT_CODE
    status.reason = "Unknown"
    status.message = "the pod's instance ended before the container exited"
    if not status.finished_at:
        status.finished_at = now
    return status


def _ns_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("NSpid:"):
                    return [int(part) for part in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def _running(instance: Instance) -> bool:
    return instance.process is not None and instance.process.running


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


__all__ = ["Pod", "PodContainer", "PodInstances", "parent_cell"]

