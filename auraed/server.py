"""The daemon process: settings, mTLS server, service wiring, shutdown.

This module only wires things together; what each service does lives in
auraed/services, and what happens on the kernel in auraed/runtime and
auraed/kernel.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from aurae_sdk.wire import paths
from aurae_sdk.wire.targets import TargetError, parse_target
from auraed import __version__
from auraed.admission import Budget, LongLivedCalls
from auraed.audit import AuditLog
from auraed.authz import Policy, PolicyError, PrincipalPattern, load_policy
from auraed.forwarding import InstanceChannels, InstanceForwarding
from auraed.interceptors import (
    Admission,
    AfterAnswer,
    AuditTrail,
    Authorization,
    FaultTranslation,
)
from auraed.kernel import template
from auraed.logs import configure as configure_logging
from auraed.output import LogRing
from auraed.pending import PendingServices
from auraed.services.discovery import DiscoveryService
from auraed.services.health import HealthService

if TYPE_CHECKING:
    from auraed.cri.pod_instances import PodInstances
    from auraed.cri.pods import Pods
    from auraed.generated.registry import ServiceEntry, Servicer
    from auraed.images import ImageStore
    from auraed.kernel.spawner.client import SpawnerSeed
    from auraed.prometheus import MetricsAddress, MetricsEndpoint
    from auraed.runtime.containers import Containers
    from auraed.runtime.events import EventJournal
    from auraed.runtime.instances import Instances
    from auraed.runtime.vms import VirtualMachines
    from auraed.runtime.workloads import Workloads

# What the server needs to listen and answer Health and Discovery is imported above; the
# daemon's parts (workloads, spawner, cgroups, images, instances, VMs, their servicers and
# reflection: auraed.wired) when they are wired. A VM guest's auraed (--serve-early) answers
# before it imports them: under TCG those imports take seconds (docs/vms.md).
# The metrics endpoint (prometheus_client, http.server) is imported only when asked for: the
# daemon of every VM guest starts without it, and under TCG those imports cost seconds.

log = logging.getLogger("auraed")

# A request larger than this is refused with RESOURCE_EXHAUSTED before any
# service sees it; the largest legitimate request (a 128 KiB command line)
# fits comfortably.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# How long in-flight RPCs get to finish once shutdown starts; streams are
# cancelled after it.
SHUTDOWN_RPC_GRACE = 2.0
# In the library dir: an audit trail must outlive a reboot (the runtime dir is often tmpfs).
AUDIT_LOG = "audit.log"
# In the library dir too: imported images outlive a reboot.
IMAGES_DIR = "images"
# In the runtime dir: each container's writable layer and mount point.
CONTAINERS_DIR = "containers"
# The CRI's pod records (auraed.cri.records), under the library dir.
CRI_PODS_DIR = "cri/pods"
# In the library dir too: clients resume the event stream across daemon restarts.
EVENTS_DIR = "events"
# In the runtime dir: where the spawner, which outlives the daemon, waits for the next one.
SPAWNER_SOCKET = "spawner.sock"
# Exit status after the spawner died under us (EX_SOFTWARE): a service
# manager restarts the daemon, which then cleans up what was left.
SPAWNER_LOST_EXIT = 70
# The cyclic GC's default trigger (every 700 allocations) makes each full
# collection walk every object the daemon holds: with 1000 cells, Allocate
# and List slowed by half. Few of our objects form cycles; collect rarely.
GC_THRESHOLDS = (50_000, 20, 100)
# Threads no long-lived call may take (auraed.admission): List, Check, Allocate... always find
# one. Short calls end in milliseconds, so a few dozen keep up with any number of clients.
SHORT_CALL_WORKERS = 32
# What the daemon of a pod's instance imports to serve the CRI (Daemon._make_cri, pods as
# cells): the instances' template imports it once when pods are instances, where each pod's
# daemon imported it after the fork (40 ms of each pod's start on a loaded machine, and pages
# of its own).
POD_DAEMON_MODULES = ("auraed.cri.pods", "auraed.cri.service", "auraed.cri.server")
# The development PKI's operator (`aurae-py pki init`); production daemons name theirs.
DEFAULT_OPERATORS = ("spiffe://unsafe.aurae.io/admin",)


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class Settings:
    socket: str = paths.DEFAULT_SOCKET
    ca_crt: Path = Path(paths.DEFAULT_CA_CRT)
    server_crt: Path = Path(paths.DEFAULT_SERVER_CRT)
    server_key: Path = Path(paths.DEFAULT_SERVER_KEY)
    runtime_dir: Path = Path(paths.RUNTIME_DIR)
    library_dir: Path = Path(paths.LIBRARY_DIR)
    verbose: bool = False
    log_format: str = "text"
    cgroup_root: str = "aurae"
    cgroup_mount: str = "/sys/fs/cgroup"
    grace_period: float = 10.0
    authz_policy: Path | None = None
    # Long-lived calls (streams, Wait, Stop) at once: see auraed/admission.py.
    budget: Budget = field(default_factory=Budget)
    operators: tuple[str, ...] = DEFAULT_OPERATORS
    cri_socket: Path | None = None
    # "instances": a pod sandbox is a spawned instance; "cells": a cell of this daemon (the
    # daemon inside a pod instance).
    cri_pods: str = "instances"
    # Pod instances started ahead (auraed.cri.pod_instances); 0: none.
    cri_pod_spares: int = 1
    # Another daemon's image store, read-only (a pod instance's daemon reads its host's).
    image_store: Path | None = None
    metrics_address: str | None = None
    metrics_allow_remote: bool = False
    # SIGTERM/SIGINT leave the workloads running for the next daemon to adopt.
    live_restore: bool = False
    # Virtual machines (docs/vms.md): the CA key mints guest identities; without it no VM starts.
    ca_key: Path | None = None
    vm_image_dir: Path = Path("/var/lib/aurae/vm-images")
    vm_accelerator: str = "auto"
    vm_boot_timeout: float = 120.0
    vm_grace_period: float = 30.0
    vm_health_timeout: float = 30.0
    # Answer Health and Discovery as soon as the server listens; wire the rest behind it (a VM
    # guest's auraed: auraed/pending.py).
    serve_early: bool = False
    # A spare (a pod instance started ahead): everything that does not depend on where the
    # daemon will be is done, then it waits on this Unix socket for its claim (auraed.claim).
    standby: Path | None = None


def _read_pki(settings: Settings) -> tuple[bytes, bytes, bytes]:
    contents = []
    for flag, path in (
        ("--ca-crt", settings.ca_crt),
        ("--server-crt", settings.server_crt),
        ("--server-key", settings.server_key),
    ):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StartupError(
                f"{flag} {path}: no such file. Create a development PKI with "
                f"`aurae-py pki init DIR` and pass its files, or install yours at {path}."
            ) from None
        except OSError as error:
            raise StartupError(f"{flag} {path}: cannot read it: {error.strerror}") from None
        if b"-----BEGIN" not in data:
            raise StartupError(f"{flag} {path}: not a PEM file")
        contents.append(data)
    return contents[0], contents[1], contents[2]


def _private_directory(flag: str, path: Path) -> None:
    """Make `path` a directory only root can enter: created 0700, or an existing one of ours
    tightened to 0700 (its sockets, logs and audit trail are nobody else's business). A symlink,
    a non-directory, or a directory someone else owns is refused: it could be swapped under us."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise StartupError(f"{flag} {path}: not a directory (a symlink or file is in its place)")
    if info.st_uid != os.geteuid():
        raise StartupError(f"{flag} {path}: owned by uid {info.st_uid}, not by the daemon's "
                           f"uid {os.geteuid()}; remove it or choose another directory")
    if stat.S_IMODE(info.st_mode) & 0o077:
        log.warning("tightening an existing directory to mode 0700",
                    extra={"path": str(path), "mode": oct(stat.S_IMODE(info.st_mode))})
        os.chmod(path, 0o700, follow_symlinks=False)


def _prepare_unix_socket(path: str) -> None:
    """Refuse to start beside a live daemon; remove a stale socket file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"--socket {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left by a daemon that died
        return
    finally:
        probe.close()
    raise StartupError(f"--socket {path}: another daemon is listening there")


def assemble_servicers(
    given: Iterable[Servicer], table: Iterable[ServiceEntry] | None = None
) -> list[Servicer]:
    """One servicer per service of the generated table, in its order.

    A service's servicer is the one given for it; else the subclass of its
    generated base that its module (auraed/services/<package>.py) defines,
    made with no arguments; else the base itself, which answers UNIMPLEMENTED.
    """
    from auraed.wired import SERVICES

    entries = list(SERVICES if table is None else table)
    by_name = {servicer.SERVICE: servicer for servicer in given}
    unknown = sorted(set(by_name) - {entry.name for entry in entries})
    if unknown:
        raise StartupError(f"servicers for services not in the schema: {', '.join(unknown)}")
    return [by_name.get(entry.name) or _default_servicer(entry) for entry in entries]


def _default_servicer(entry: ServiceEntry) -> Servicer:
    import inspect
    from importlib import import_module

    try:
        module = import_module(entry.module)
    except ModuleNotFoundError as error:
        if error.name != entry.module:
            raise
        return entry.base()
    found = [
        value for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, entry.base)
        and value is not entry.base and value.__module__ == module.__name__
    ]
    if not found:
        return entry.base()
    if len(found) > 1:
        names = ", ".join(sorted(cls.__name__ for cls in found))
        raise StartupError(f"{entry.module} defines several servicers of {entry.name}: {names}")
    (servicer_class,) = found
    try:
        inspect.signature(servicer_class).bind()
    except TypeError:
        raise StartupError(
            f"{entry.module}.{servicer_class.__name__} takes constructor arguments: "
            "hand it to the server in auraed.server.Daemon._servicers"
        ) from None
    servicer: Servicer = servicer_class()
    return servicer


def _api_methods() -> frozenset[str]:
    """Every "/package.Service/Method" of the services the daemon serves."""
    from auraed.wired import SERVICE_NAMES, descriptor_pool, reflection

    services = [*SERVICE_NAMES, reflection.SERVICE_NAME]
    pool = descriptor_pool.Default()
    return frozenset(f"/{service}/{method.name}" for service in services
                     for method in pool.FindServiceByName(service).methods)


def _operators(principals: tuple[str, ...]) -> tuple[PrincipalPattern, ...]:
    patterns = []
    for principal in principals:
        try:
            patterns.append(PrincipalPattern.parse(principal))
        except ValueError as error:
            raise StartupError(f"--operator {error}") from None
    return tuple(patterns)


def _load_policy(path: Path | None) -> Policy | None:
    if path is None:
        log.warning("no authorization policy (--authz-policy): every client certificate the CA "
                    "signed may call every method")
        return None
    try:
        policy = load_policy(path, _api_methods())
    except PolicyError as error:
        raise StartupError(f"--authz-policy {error}") from None
    log.info("authorization policy loaded", extra={"policy": str(path),
                                                    "deny_rules": len(policy.deny),
                                                    "allow_rules": len(policy.allow)})
    return policy


class Daemon:
    def __init__(self, settings: Settings, spawner_seed: SpawnerSeed | None = None) -> None:
        """spawner_seed: forked already (by the entry point of a template's copy)."""
        self.settings = settings
        self.daemon_log = LogRing()
        self._stop = threading.Event()
        self._shutting_down = False
        self._server: grpc.Server | None = None
        self._workloads: Workloads | None = None
        self._instances: Instances | None = None
        self._channels = InstanceChannels()
        self._vms: VirtualMachines | None = None
        self._health: HealthService | None = None
        self._unix_socket: str | None = None
        self._audit: AuditLog | None = None
        self._events: EventJournal | None = None
        self._metrics: MetricsEndpoint | None = None
        self._exit_status = 0
        self._images: ImageStore | None = None
        self._containers: Containers | None = None
        self._cri_server: grpc.Server | None = None
        self._cri_pending: PendingServices | None = None
        self._pods: Pods | PodInstances | None = None
        self._detach = False
        self._spawner_seed = spawner_seed
        self._template: template.Template | None = None
        self._pending: PendingServices | None = None
        self._discovery: DiscoveryService | None = None
        self._certificate: bytes | None = None
        self._metrics_address: MetricsAddress | None = None

    def request_stop(self, signum: int | None = None) -> None:
        # With --live-restore SIGTERM (a service manager's restart) leaves the workloads
        # running for the next daemon; SIGINT (^C, or an operator's "stop everything") never.
        self._detach = signum == signal.SIGTERM and self.settings.live_restore
        self._stop.set()

    def _spawner_lost(self) -> None:
        # Every workload lost its supervisor: exits go unreported and nothing
        # new can start. Stop serving rather than answer SERVING with half a
        # daemon; shutdown still kills what runs, through the cgroups.
        log.critical("the spawner died; shutting down so the daemon can be restarted clean")
        self._exit_status = SPAWNER_LOST_EXIT
        if self._health is not None:
            self._health.shutting_down()
        self.request_stop()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        settings = self.settings
        if template.is_copy():
            if self._spawner_seed is None:
                # Forked now, before any thread starts: an instance's spawner then shares the
                # template's pages instead of holding a new interpreter. (A host daemon's
                # spawner outlives it under live restore, and would keep its whole image.)
                from auraed.kernel.spawner.client import SpawnerSeed

                self._spawner_seed = SpawnerSeed.fork()
        elif not settings.serve_early:
            # The instance template, forked now too (single-threaded, before any key is read):
            # the first Spawn does not wait for an interpreter to import the daemon (0.6 s),
            # and the template's pages are this daemon's, shared. An instance starts its own
            # nested template only if it spawns: most never do. Not in a VM guest
            # (--serve-early): its one vCPU is the boot's, and a guest seldom spawns.
            from auraed.runtime.instances import TEMPLATE_ENTRY

            try:
                self._template = template.Template.fork_here(TEMPLATE_ENTRY)
            except (OSError, template.TemplateError) as error:
                log.warning("the instance template could not be forked; the first Spawn "
                            "starts one", extra={"error": str(error)})
        # Everything the daemon creates — runtime dir, socket, logs — is private
        # from the moment it exists.
        os.umask(0o077)
        configure_logging(verbose=settings.verbose, log_format=settings.log_format,
                          ring=self.daemon_log)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.request_stop(signum))
        try:
            self._start()
        except StartupError as error:
            log.error(str(error))
            if self._pending is not None:
                # Already serving: calls held back get UNAVAILABLE, then the server ends.
                self._pending.failed(str(error))
                if self._health is not None:
                    self._health.shutting_down()
                if self._server is not None:
                    self._server.stop(SHUTDOWN_RPC_GRACE).wait()
            if self._cri_pending is not None:
                self._cri_pending.failed(str(error))
            self._close_cri_socket()
            self._cleanup()
            return 2
        log.info("auraed serving", extra={"socket": settings.socket, "version": __version__,
                                          "cgroups": f"v{self._workloads.backend.version}"
                                          if self._workloads else ""})
        while not self._stop.wait(1.0):
            pass
        self.shutdown()
        return self._exit_status

    def _start(self) -> None:
        """Listen, then wire the daemon's parts; with --serve-early the server starts between
        the two (Health and Discovery answer, other calls wait: auraed/pending.py)."""
        server = self._listen()
        early = self._serves_early  # a spare's settings lose --standby at its claim
        if early:
            server.start()
            assert self._health is not None
            self._health.serving([HealthService.SERVICE, DiscoveryService.SERVICE])
            log.info("auraed answering health and discovery; wiring the other services",
                     extra={"socket": self.settings.socket})
        self._wire(server)
        if not early:
            server.start()
        # Everything made during start-up lives as long as the daemon: keep
        # it out of every collection.
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        if self._pending is not None:
            self._pending.wired()
        assert self._health is not None
        self._health.serving()
        if self._template is not None:
            assert self._instances is not None
            self._instances.warm()

    @property
    def _serves_early(self) -> bool:
        """A VM guest's daemon (--serve-early) answers as soon as it listens; a spare's
        (--standby) listens before its claim (its server started then was part of a pod's
        start): both wire their services behind it (auraed/pending.py)."""
        return self.settings.serve_early or self.settings.standby is not None

    @property
    def _pods_are_instances(self) -> bool:
        return self.settings.cri_socket is not None and self.settings.cri_pods == "instances"

    def _await_claim(self, path: Path) -> tuple[Settings, Callable[[], None]]:
        """A spare's wait for its claim: the settings it then starts with, and what waits until
        its host has moved its processes into its new cell (before it starts any process)."""
        from auraed.runtime.standby import ClaimError, await_claim

        try:
            claim = await_claim(path, stopping=self._stop)
        except ClaimError as error:
            raise StartupError(f"--standby {path}: {error}") from None
        log.info("claimed", extra={"cgroup_root": claim.cgroup_root,
                                   "hostname": claim.hostname or ""})

        def settled() -> None:
            try:
                claim.settled()
            except ClaimError as error:
                raise StartupError(f"--standby {path}: {error}") from None

        return replace(self.settings, cgroup_root=claim.cgroup_root, standby=None), settled

    def _listen(self) -> grpc.Server:
        """The server, bound, with Health and Discovery registered (not started)."""
        settings = self.settings
        ca, certificate, key = _read_pki(settings)
        self._certificate = certificate
        policy = _load_policy(settings.authz_policy)
        operators = _operators(settings.operators)
        if settings.metrics_address is not None:
            from auraed.prometheus import MetricsAddressError, parse_metrics_address

            try:
                self._metrics_address = parse_metrics_address(
                    settings.metrics_address, allow_remote=settings.metrics_allow_remote)
            except MetricsAddressError as error:
                raise StartupError(f"--metrics-address {error}") from None
        try:
            target = parse_target(settings.socket)
        except TargetError as error:
            raise StartupError(f"--socket {settings.socket}: {error}") from None
        _private_directory("--runtime-dir", settings.runtime_dir)
        _private_directory("--library-dir", settings.library_dir)
        self._audit = AuditLog(settings.library_dir / AUDIT_LOG)
        try:
            self._audit.start()
        except OSError as error:
            raise StartupError(f"audit log {self._audit.path}: {error.strerror}") from None
        if target.kind == "unix":
            _prepare_unix_socket(target.display)
            Path(target.display).parent.mkdir(mode=0o700, parents=True, exist_ok=True)

        budget = settings.budget
        # Outermost first: who may call, whether a long-lived call fits its budget, what it
        # leaves until its answer is out, then the audit of what they did, then statuses.
        interceptors: list[grpc.ServerInterceptor] = [
            Authorization(policy, self._audit),
            Admission(LongLivedCalls(budget), operators, self._audit),
            AfterAnswer(),
            AuditTrail(self._audit),
            # After the checks, so a forwarded call is authorized and audited on the host.
            InstanceForwarding(self._channels),
            FaultTranslation(),
        ]
        if self._serves_early:
            # Before every other interceptor: a call it holds back meets them once it runs.
            self._pending = PendingServices()
            interceptors.insert(0, self._pending)
        server = grpc.server(
            # Long-lived calls can hold at most budget.total + budget.operators threads.
            futures.ThreadPoolExecutor(
                max_workers=budget.total + budget.operators + SHORT_CALL_WORKERS,
                thread_name_prefix="rpc"),
            interceptors=interceptors,
            handlers=[self._pending.generic_handler()] if self._pending is not None else None,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        # "" (the daemon as a whole) and every service but these two are NOT_SERVING until
        # they are wired.
        self._health = HealthService()
        self._health.register(server)
        self._discovery = DiscoveryService(healthy=lambda: not self._shutting_down)
        self._discovery.register(server)
        credentials = grpc.ssl_server_credentials(
            [(key, certificate)], root_certificates=ca, require_client_auth=True
        )
        address = target.grpc_target if target.kind == "unix" else target.display
        # The socket file is born 0600: bind(2) applies the umask, and grpc
        # binds inside add_secure_port. Only this thread creates files now.
        previous = os.umask(0o177)
        try:
            server.add_secure_port(address, credentials)
        except RuntimeError as error:
            raise StartupError(f"--socket {settings.socket}: cannot listen: {error}") from None
        finally:
            os.umask(previous)
        if target.kind == "unix":
            self._unix_socket = target.display
        self._server = server
        return server

    def _wire(self, server: grpc.Server) -> None:
        """The daemon's parts and their services, registered on `server` (or, when it already
        serves, on what holds its calls back until they are wired)."""
        from auraed import wired

        settings = self.settings
        self._events = wired.EventJournal(settings.library_dir / EVENTS_DIR)
        try:
            self._events.open()
        except OSError as error:
            raise StartupError(f"event journal {self._events.directory}: {error}") from None
        # Before the workloads: they adopt containers (or clear what is left of them).
        self._open_images()
        # Before the claim: the CRI's server depends on nothing the claim says.
        self._listen_cri()
        try:
            backend = wired.detect_backend(root_name=settings.cgroup_root,
                                           mount_root=settings.cgroup_mount)
        except wired.CgroupError as error:
            raise StartupError(f"cgroups: {error}") from None
        self._workloads = wired.Workloads(backend, settings.runtime_dir / "logs",
                                          default_grace=settings.grace_period,
                                          events=self._events,
                                          spawner_socket=settings.runtime_dir / SPAWNER_SOCKET,
                                          containers=self._containers,
                                          spawner_seed=self._spawner_seed)
        self._workloads.on_spawner_lost = self._spawner_lost
        settled = None
        if settings.standby is not None:
            # A spare makes its parts and registers its services before its claim: what comes
            # after the claim is a pod's start, and none of this depends on the one thing the
            # claim says, where its cgroup subtree is. Nothing may touch cgroups until then.
            backend.await_placement()
            self._make_parts(server)
            self._workloads.start_spawner_ahead()
            self._spawner_seed = None  # the spawner's now
            try:
                settings, settled = self._await_claim(settings.standby)
            except StartupError:
                self._workloads.abandon()
                self._workloads = self._instances = None  # _cleanup: the template
                raise
            self.settings = settings
            self._workloads.relocate(settings.cgroup_root)
        try:
            self._workloads.start(settled=settled, fresh=settled is not None)
        except wired.SpawnerRefused as refused:
            self._workloads = None
            raise StartupError(f"{refused}. The workloads it holds were left alone.") from None
        except StartupError:
            # A spare let go before its processes moved: its spawner, started ahead, stops;
            # the host removes the cell with the subtree made in it.
            self._workloads.abandon()
            self._workloads = self._instances = None
            raise
        # What the start reported (cleaned up, adopted) is readable once we serve.
        self._events.flush()
        if self._metrics_address is not None:
            self._start_metrics(self._metrics_address)
        if settled is None:
            self._make_parts(server)
        self._start_parts()

    def _make_parts(self, server: grpc.Server) -> None:
        """The parts built on the workloads, and every service registered (on `server`, or on
        what holds calls back until the daemon is wired): nothing here starts or touches the
        kernel; _start_parts does, once the workloads have started."""
        from auraed import wired

        settings = self.settings
        assert self._workloads is not None and self._certificate is not None
        self._instances = wired.Instances(
            self._workloads, runtime_dir=settings.runtime_dir, library_dir=settings.library_dir,
            cgroup_mount=settings.cgroup_mount,
            spiffe_id=wired.own_spiffe_id(self._certificate),
            grace_period=settings.grace_period,
            forwarded_calls=settings.budget.total + settings.budget.operators,
            template=self._template,
            preload=POD_DAEMON_MODULES if self._pods_are_instances else ())
        self._make_vms(self._workloads)
        self._make_cri()
        early = {HealthService.SERVICE, DiscoveryService.SERVICE}
        services = assemble_servicers(self._servicers(self._workloads))
        target = self._pending if self._pending is not None else server
        for service in services:
            if service.SERVICE not in early:
                service.register(target)  # type: ignore[arg-type]
        wired.reflection.enable_server_reflection(  # type: ignore[no-untyped-call]
            [*(s.SERVICE for s in services), wired.reflection.SERVICE_NAME], target
        )

    def _start_parts(self) -> None:
        """What the parts take back or clean from a previous run, after Workloads.start (which
        adopted or cleaned the cells); then the CRI's calls, held back until now, run."""
        assert self._instances is not None and self._vms is not None
        self._instances.remove_stale()
        self._vms.start()
        self._serve_cri()

    def _servicers(self, workloads: Workloads) -> list[Servicer]:
        """The servicers that need the daemon's parts: one line each, and the only place a
        service is named by hand. Every other service gets its default (assemble_servicers);
        Health and Discovery are registered by _listen."""
        from auraed import wired

        assert self._instances is not None and self._health is not None
        assert self._discovery is not None
        return [
            wired.CellService(workloads, self._containers),
            wired.ObserveService(workloads, self.daemon_log),
            wired.InstanceService(self._instances, self._channels),
            self._health,
            self._discovery,
            *self._image_servicers(),
            *self._vm_servicers(),
        ]

    # ------------------------------------------------------------ virtual machines (issue 13)
    def _make_vms(self, workloads: Workloads) -> None:
        settings = self.settings
        from auraed.wired import VirtualMachines, VmSettings

        self._vms = VirtualMachines(workloads, VmSettings(
            runtime_dir=settings.runtime_dir, image_cache=settings.vm_image_dir,
            ca_crt=settings.ca_crt, ca_key=settings.ca_key, server_crt=settings.server_crt,
            accelerator=settings.vm_accelerator, boot_timeout=settings.vm_boot_timeout,
            grace_period=settings.vm_grace_period, authz_policy=settings.authz_policy,
            health_timeout=settings.vm_health_timeout,
            tap_registry=settings.library_dir / "vm-taps"))

    def _vm_servicers(self) -> list[Servicer]:
        assert self._vms is not None
        from auraed.wired import VmService

        return [VmService(self._vms)]

    # ------------------------------------------------------------ images (issue 14)
    def _open_images(self) -> None:
        """The image store under the library dir, and the containers that run its images."""
        from auraed.wired import Containers, ImageStore

        borrowed = self.settings.image_store
        store = (ImageStore(borrowed, borrowed=True) if borrowed is not None
                 else ImageStore(self.settings.library_dir / IMAGES_DIR))
        try:
            store.open()
        except OSError as error:
            raise StartupError(f"image store {store.root}: {error.strerror}") from None
        self._images = store
        # Cleared, or adopted from, by Workloads.start.
        self._containers = Containers(store, self.settings.runtime_dir / CONTAINERS_DIR)

    def _image_servicers(self) -> list[Servicer]:
        assert self._images is not None
        from auraed.wired import ImageService

        return [ImageService(self._images)]

    def _listen_cri(self) -> None:
        """kubelet's runtime.v1 socket, when --cri-socket is given, listening before its
        services are wired (_serve_cri): calls wait for them."""
        if self.settings.cri_socket is None:
            return
        from auraed.cri.server import CriSocketError, listen_cri

        try:
            self._cri_server, self._cri_pending = listen_cri(self.settings.cri_socket)
        except CriSocketError as error:
            raise StartupError(str(error)) from None

    def _make_cri(self) -> None:
        """kubelet's runtime.v1 services on --cri-socket, when given, registered behind its
        server (calls wait until _serve_cri): pods as spawned instances
        (auraed.cri.pod_instances), or, in a pod instance's daemon, as its cells
        (auraed.cri.pods)."""
        if self._cri_pending is None:
            return
        from auraed.cri.server import register_cri
        from auraed.cri.service import CriImageService

        assert self._workloads is not None and self._containers is not None
        assert self._images is not None and self._instances is not None
        ready = lambda: not self._shutting_down
        runtime: object
        if self.settings.cri_pods == "cells":
            from auraed.cri.pods import Pods
            from auraed.cri.service import CriRuntimeService

            self._pods = Pods(self._workloads, self._containers, self._images)
            runtime = CriRuntimeService(self._pods, ready=ready)
        else:
            from auraed.cri.pod_instances import PodInstances
            from auraed.cri.records import PodRecords
            from auraed.cri.relay import CriPodInstanceService

            self._pods = PodInstances(self._instances, self._workloads, self._images,
                                      PodRecords(self.settings.library_dir / CRI_PODS_DIR),
                                      spares=self.settings.cri_pod_spares)
            runtime = CriPodInstanceService(self._pods, ready=ready)
        register_cri(self._cri_pending, runtime, CriImageService(self._images))

    def _serve_cri(self) -> None:
        """The CRI's calls run from now on (a host's pods restored from their records first)."""
        if self._cri_pending is None:
            return
        if self._pods_are_instances:
            from auraed.cri.pod_instances import PodInstances

            assert isinstance(self._pods, PodInstances)
            try:
                self._pods.open()
            except OSError as error:
                raise StartupError(f"CRI pod records: {error}") from None
        self._cri_pending.wired()
        log.info("CRI serving", extra={"cri_socket": str(self.settings.cri_socket),
                                       "pods": self.settings.cri_pods})

    def _close_cri_socket(self) -> None:
        if self._cri_server is not None:
            self._cri_server.stop(SHUTDOWN_RPC_GRACE).wait()
            self._cri_server = None
            assert self.settings.cri_socket is not None
            self.settings.cri_socket.unlink(missing_ok=True)

    def _stop_cri(self) -> None:
        self._close_cri_socket()
        if self._pods is not None:
            # --live-restore keeps the CRI's records for the next daemon.
            from auraed.cri.pod_instances import PodInstances

            if self._detach and isinstance(self._pods, PodInstances):
                self._pods.detach()
            else:
                self._pods.shutdown()

    def _start_metrics(self, address: MetricsAddress) -> None:
        from auraed.prometheus import MetricsEndpoint

        assert self._workloads is not None
        if address.kind == "unix":
            _prepare_unix_socket(address.path)
        # Born 0600, like the API socket (bind applies the umask).
        previous = os.umask(0o177)
        try:
            self._metrics = MetricsEndpoint(address, self._workloads)
        except OSError as error:
            raise StartupError(f"--metrics-address {address}: cannot listen: "
                               f"{error.strerror}") from None
        finally:
            os.umask(previous)
        self._metrics.start()

    def shutdown(self) -> None:
        """Health NOT_SERVING, stop taking RPCs, power the VMs off, stop every workload, remove
        our cgroups."""
        if self._shutting_down:
            return
        self._shutting_down = True
        log.info("shutting down")
        if self._health is not None:
            self._health.shutting_down()
        if self._server is not None:
            self._server.stop(SHUTDOWN_RPC_GRACE).wait()
        self._stop_cri()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        # Guests first, each powered off with its grace: their QEMU runs in a cell that
        # stopping the workloads would otherwise simply kill.
        if self._vms is not None:
            if self._detach:
                self._vms.detach()
            else:
                self._vms.shutdown()
        self.daemon_log.close()
        if self._instances is not None:
            self._instances.shutdown()
        self._channels.close_all()
        if self._workloads is not None:
            if self._detach:
                self._workloads.detach()
            else:
                self._workloads.shutdown()
                if self._containers is not None:
                    shutil.rmtree(self._containers.root, ignore_errors=True)
        if self._events is not None:
            self._events.daemon_stopped()
        self._cleanup()
        log.info("auraed stopped")

    def _cleanup(self) -> None:
        if self._workloads is None and self._spawner_seed is not None:
            self._spawner_seed.discard()  # unused: start-up failed before the workloads
        if self._instances is None and self._template is not None:
            self._template.close()  # start-up failed before Instances took it
        if self._metrics is not None:
            self._metrics.close()
        if self._events is not None:
            self._events.close()
        if self._audit is not None:
            self._audit.close()
        if self._unix_socket is not None:
            try:
                os.unlink(self._unix_socket)
            except FileNotFoundError:
                pass
