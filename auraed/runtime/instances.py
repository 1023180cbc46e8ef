"""Spawned instances: nested auraed daemons, each in an isolated cell of ours.

An instance is three things the host owns: a top-level cell `instance-<name>`
(own pid, mount, network, uts and ipc namespaces; the instance's cgroup
limits), the auraed process running in it, and a directory under the host's
runtime dir holding the instance's credentials, its runtime and library
directories, and the Unix socket it listens on. The cell has its own network
namespace, so the host reaches the instance only through that socket, which
is a file on the host's filesystem.

The instance's auraed is not a new interpreter: a warm template process
(auraed.kernel.template), forked from the host daemon at its start (or, in an
instance, started at its first Spawn), has imported the daemon once; each
instance is a fork of it that joined the cell's cgroup and namespaces, sharing
the template's pages until it writes them.

The instance trusts one CA: an ephemeral one the host makes in memory the first
time it spawns. The host mints with it the instance's server identity (a
SPIFFE ID under the host's own, `<host>/instance/<name>`) and its own client
identity for forwarding; the host's server key never enters an instance.

Like Workloads, this module knows nothing of gRPC: the service makes the
channel and waits for the instance's first answer.
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography import x509

from aurae_sdk.wire import dns
from aurae_sdk.wire.pki import CertificateAuthority, Credential, write_credential
from aurae_sdk.wire.spiffe import SpiffeId
from auraed.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from auraed.kernel.cgroups import CgroupLimits
from auraed.kernel.template import Template, TemplateError
from auraed.runtime.names import CellName
from auraed.runtime.standby import Claim, ClaimError, offer_claim
from auraed.runtime.workloads import CellSpec, Workloads

log = logging.getLogger("auraed.instances")

CELL_PREFIX = "instance-"
DAEMON_NAME = "auraed"
# The instance daemon's entry point, which the template's copies run. What the template imports
# beyond it is what the daemon itself imported (Instances.warm), computed, never listed.
TEMPLATE_ENTRY = "auraed.__main__:main"
SOCKET_NAME = "auraed.sock"
# Where a spare's daemon waits for its claim, in the instance's directory.
STANDBY_SOCKET = "standby.sock"
# The top cell pods' cgroup parents go under (auraed.cri.sandboxes): instances below it are
# stale at start like those at the top.
POD_PARENTS = "kubepods"
# The nested daemon roots its cgroup subtree here, inside the instance's cell.
CGROUP_LEAF = "auraed"
# A cell name is a DNS label of at most 63 characters, prefix included.
MAX_NAME = 63 - len(CELL_PREFIX)
# sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107
# Where an ended instance's directories go to be removed in the background, in the instances'
# runtime and library dirs (no instance name starts with a dot). Removing the 25 files of a pod
# took 20-30 ms of each RemovePodSandbox on a loaded machine; a rename is one call, and what a
# crash leaves there goes with the rest at the next start (remove_stale).
TRASH = ".trash"
# How long the nested daemon gets to stop its own workloads on Free, beyond
# its grace period, before it is killed with everything else in the cell.
SHUTDOWN_ALLOWANCE = 10.0


@dataclass(frozen=True)
class InstanceSpec:
    name: str
    limits: CgroupLimits
    # Below these cells of the host instead of at the top (a pod's cgroup parent); the caller
    # has allocated them.
    parent: CellName | None = None
    # The uts namespace's hostname; None: the cell's name.
    hostname: str | None = None
    # Without: the host's pid, ipc, uts and mount namespaces (a pod that shares the node's
    # processes), or the host's network (host networking).
    isolate_process: bool = True
    isolate_network: bool = True
    # More arguments for the instance's daemon (a pod's: its CRI socket).
    daemon_arguments: tuple[str, ...] = ()
    # What the caller recorded with it (Instance.labels), sorted by key.
    labels: tuple[tuple[str, str], ...] = ()
    # A spare: its daemon waits for a claim (claim(); auraed.runtime.standby) before it makes
    # its cgroup subtree and serves.
    standby: bool = False

    @property
    def cell(self) -> CellName:
        leaf = CELL_PREFIX + self.name
        return CellName(f"{self.parent.path}/{leaf}" if self.parent is not None else leaf)


@dataclass(eq=False)
class Instance:
    spec: InstanceSpec
    spiffe_id: SpiffeId
    directory: Path  # credentials, runtime dir and socket
    library: Path
    cell: CellName
    process: InstanceProcess | None = None
    started_at: float = 0.0
    freeing: bool = False
    ended: threading.Event = field(default_factory=threading.Event)
    # Held while a spare is claimed (its cell moves): ending it waits, so that it ends the
    # cell where it is.
    moving: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def socket(self) -> str:
        return str(self.directory / SOCKET_NAME)

    @property
    def host_pid(self) -> int:
        return self.process.host_pid if self.process else 0

    @property
    def log_path(self) -> Path:
        return self.directory / "auraed.log"


class InstanceProcess:
    """The instance's daemon, watched through a pidfd: it is not our child (its parent is the
    cell's init), so a pidfd is how we see it end and signal it without racing pid reuse."""

    def __init__(self, host_pid: int) -> None:
        self.host_pid = host_pid
        self._pidfd = os.pidfd_open(host_pid)
        self.ended = threading.Event()
        threading.Thread(target=self._watch, name=f"instance-pid-{host_pid}",
                         daemon=True).start()

    @property
    def running(self) -> bool:
        return not self.ended.is_set()

    def _watch(self) -> None:
        select.select([self._pidfd], [], [])
        self.ended.set()

    def wait(self, timeout: float | None) -> bool:
        return self.ended.wait(timeout)

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if self.ended.is_set():
                break
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:
                break
            self.ended.wait(wait)

    def close(self) -> None:
        self.ended.wait(10.0)
        try:
            os.close(self._pidfd)
        except OSError:
            pass


@dataclass(frozen=True)
class Trust:
    """What the host needs to talk to its instances: the CA they trust and its own identity
    for that CA."""

    ca_certificate_pem: bytes
    client: Credential


def own_spiffe_id(server_certificate_pem: bytes, fallback: str = "auraed") -> SpiffeId:
    """The daemon's SPIFFE ID: its certificate's URI SAN when it has one (an instance's does),
    else spiffe://<aurae trust domain>/<fallback>."""
    try:
        certificate = x509.load_pem_x509_certificate(server_certificate_pem)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    except (ValueError, x509.ExtensionNotFound):
        uris = []
    for uri in uris:
        try:
            return SpiffeId.parse(uri)
        except ValueError:
            continue
    return SpiffeId.of_workload(fallback)


def check_instance_name(name: str, field_name: str = "instance.name") -> str:
    if not name:
        raise InvalidArgument("an instance name is required", field=field_name)
    if len(name) > MAX_NAME or not dns.is_dns_label(name) or name != name.lower():
        raise InvalidArgument(
            f"invalid instance name {name[:70]!r}: use 1-{MAX_NAME} lowercase letters, digits "
            "and '-', not starting or ending with '-'", field=field_name)
    return name


class Instances:
    def __init__(
        self,
        workloads: Workloads,
        *,
        runtime_dir: Path,
        library_dir: Path,
        cgroup_mount: str,
        spiffe_id: SpiffeId,
        grace_period: float,
        forwarded_calls: int = 256,
        python: str = sys.executable,
        template: Template | None = None,
        preload: tuple[str, ...] = (),
    ) -> None:
        """forwarded_calls: the long-lived calls the host may relay to one instance at once.
        Every relayed call reaches the instance as the host's identity, so the instance
        counts them in an operator reserve that large; the host's own budgets already hold
        each caller to its share. template: the one the daemon forked at its start
        (Template.fork_here), or, without, one started as a new interpreter at the first
        Spawn; Instances closes it. preload: modules the template imports beyond what the
        daemon imported, those the instances' daemons will import (a pod's: the CRI)."""
        self._workloads = workloads
        self._directory = runtime_dir / "instances"
        self._library = library_dir / "instances"
        self._cgroup_mount = cgroup_mount
        self.spiffe_id = spiffe_id
        self._grace = grace_period
        self._forwarded_calls = forwarded_calls
        self._python = python
        self._lock = threading.Lock()
        self._instances: dict[str, Instance] = {}
        self._authority: CertificateAuthority | None = None
        self._trust: Trust | None = None
        self._closing = False
        # Trash directories being emptied (see TRASH), each by one thread: True when more was
        # thrown in since it last looked.
        self._emptying: dict[Path, bool] = {}
        self._emptiers: list[threading.Thread] = []
        self._template = template if template is not None else Template(TEMPLATE_ENTRY, python)
        if preload:
            self._template.preload(list(preload))
        # Called (outside any lock) once an instance is gone, however it went.
        self.on_ended: Callable[[Instance], None] | None = None

    def remove_stale(self) -> None:
        """Remove what instances of a previous run left: their cells (Workloads.start adopts
        cells a previous daemon left running, and an instance is not adopted with its cell:
        the instance daemon's parent, the template, died with that daemon) and our
        directories. Call it after Workloads.start."""
        views = list(self._workloads.tree())
        while views:
            view = views.pop()
            if view.name.leaf.startswith(CELL_PREFIX):
                log.warning("freeing the cell of an instance left by a previous run",
                            extra={"cell": view.name.path})
                self._workloads.free(view.name, grace=0.0)
            elif view.name.labels[0] == POD_PARENTS:
                # Pods' instances sit below their cgroup parents (auraed.cri.sandboxes).
                views.extend(view.children)
        for top in (self._directory, self._library):
            if top.exists():
                log.warning("removing instance directories left by a previous run",
                            extra={"directory": str(top)})
                shutil.rmtree(top, ignore_errors=True)

    def warm(self) -> None:
        """Once the daemon has started: give the template what the daemon imported, and have it
        imported now, in the background, rather than at the first Spawn."""
        self._template.preload(list(sys.modules))
        threading.Thread(target=self._flush_template, name="instance-template",
                         daemon=True).start()

    def _flush_template(self) -> None:
        try:
            self._template.flush()
        except TemplateError as error:
            # The next Spawn starts a new template, and says so if that fails too.
            log.warning("the instance template failed", extra={"error": str(error)})

    def directory_of(self, name: str) -> Path:
        """Where instance `name`'s directory (credentials, sockets, log) is or will be."""
        return self._directory / name

    @property
    def trust(self) -> Trust:
        """Made on first use: a daemon that never spawns pays nothing for it."""
        with self._lock:
            if self._trust is None:
                self._authority = CertificateAuthority.create(
                    common_name=f"instances.{dns.AURAE_DOMAIN}")
                client = self._authority.issue_client(DAEMON_NAME,
                                                      spiffe_ids=[str(self.spiffe_id)])
                self._trust = Trust(self._authority.certificate_pem(), client)
            return self._trust

    # ------------------------------------------------------------------ lifecycle

    def spawn(self, spec: InstanceSpec) -> Instance:
        """Start the instance's daemon; it is not yet known to answer (the caller waits)."""
        check_instance_name(spec.name)
        trust = self.trust
        assert self._authority is not None
        try:
            spiffe_id = self.spiffe_id.child("instance").child(spec.name)
        except ValueError as error:
            raise FailedPrecondition(f"cannot name the instance: {error}") from None
        instance = Instance(spec, spiffe_id, self._directory / spec.name,
                            self._library / spec.name, spec.cell)
        if len(instance.socket.encode()) > MAX_SOCKET_PATH:
            raise FailedPrecondition(
                f"the instance's socket path {instance.socket} is over {MAX_SOCKET_PATH} bytes; "
                "use a shorter name or a daemon runtime dir with a shorter path",
                field="instance.name")
        with self._lock:
            if self._closing:
                raise Unavailable("the daemon is shutting down")
            if spec.name in self._instances:
                raise AlreadyExists(f"instance {spec.name} already exists", field="instance.name")
            self._instances[spec.name] = instance  # reserved while it starts
        try:
            self._prepare_directories(instance, trust)
            self._workloads.allocate(instance.cell, CellSpec(
                spec.limits, isolate_process=spec.isolate_process,
                isolate_network=spec.isolate_network, hostname=spec.hostname))
            try:
                instance.process = self._start_daemon(instance)
            except BaseException:
                self._workloads.free(instance.cell, grace=0)
                raise
        except BaseException:
            self._remove_directories(instance)
            with self._lock:
                self._instances.pop(spec.name, None)
            raise
        threading.Thread(target=self._watch, args=(instance,), name=f"instance-{spec.name}",
                         daemon=True).start()
        log.info("instance spawned", extra={"instance": spec.name, "spiffe_id": str(spiffe_id),
                                            "pid": instance.host_pid})
        return instance

    def mark_answering(self, instance: Instance) -> None:
        instance.started_at = time.time()

    def claim(self, name: str, spec: InstanceSpec, timeout: float = 60.0) -> Instance:
        """Make the spare `name` (spawned with standby) the instance `spec` describes, whose
        name must be the spare's and whose isolation must match: its cell moved to spec's
        place with spec's limits (Workloads.rehome: the limits written, then every process
        moved), its daemon told its cgroup subtree and hostname once the new cell exists and
        that its processes are there once they are. Like spawn(), the instance is not yet
        known to answer. On a failure the spare is left for the caller to free (where its
        cell is: moved or not)."""
        with self._lock:
            instance = self._instances.get(name)
            if self._closing:
                raise Unavailable("the daemon is shutting down")
            if instance is None or instance.process is None or not instance.process.running:
                raise NotFound(f"spare instance {name} does not exist", field="instance_name")
            if instance.freeing or not instance.spec.standby or instance.moving.locked():
                raise FailedPrecondition(f"instance {name} is not a spare",
                                         field="instance_name")
            old = instance.spec
            if (spec.name, spec.isolate_process, spec.isolate_network) != (
                    old.name, old.isolate_process, old.isolate_network):
                raise FailedPrecondition(f"spare {name} has other namespaces than asked for",
                                         field="instance_name")
            instance.moving.acquire()
            process = instance.process
        try:
            spec = replace(spec, standby=False, daemon_arguments=old.daemon_arguments)
            backend = self._workloads.backend
            claim = Claim(f"{backend.root_name}/{spec.cell.path}/{CGROUP_LEAF}", spec.hostname)
            try:
                # The spare is told its place as soon as its new cell exists, and makes its
                # subtree there while its processes move (auraed.runtime.standby).
                with offer_claim(instance.directory / STANDBY_SOCKET, claim, timeout,
                                 alive=lambda: not process.ended.is_set()) as offer:
                    self._workloads.rehome(instance.cell, spec.cell, CellSpec(
                        spec.limits, isolate_process=spec.isolate_process,
                        isolate_network=spec.isolate_network, hostname=spec.hostname),
                        placed=offer.send)
                    instance.spec, instance.cell = spec, spec.cell
            except ClaimError as error:
                raise FailedPrecondition(f"spare instance {name} did not take its claim: "
                                         f"{error}") from None
        finally:
            instance.moving.release()
        log.info("spare instance claimed", extra={"instance": name, "cell": spec.cell.path})
        return instance

    def free(self, name: str, *, kill: bool = False, _shutting_down: bool = False) -> None:
        """Stop the instance's daemon (it stops its own workloads), then remove its cell with
        whatever is left in it, and its directories. kill: end the daemon at once instead,
        for an instance whose workloads need no stopping (a pod's, once its containers were
        stopped): removing the cell kills the rest."""
        with self._lock:
            if self._closing and not _shutting_down:
                raise Unavailable("the daemon is shutting down")
            instance = self._instances.get(name)
            if instance is None:
                raise NotFound(f"instance {name} does not exist", field="instance_name")
            if instance.freeing:
                raise FailedPrecondition(f"instance {name} is already being freed",
                                         field="instance_name")
            instance.freeing = True
        try:
            self._end(instance, kill=kill)
        except BaseException:
            instance.freeing = False
            raise
        log.info("instance freed", extra={"instance": name})

    def get(self, name: str) -> Instance:
        with self._lock:
            instance = self._instances.get(name)
        if instance is None or instance.process is None:
            raise NotFound(f"instance {name} does not exist", field="instance_name")
        return instance

    def running(self) -> list[Instance]:
        with self._lock:
            return sorted((i for i in self._instances.values() if i.process is not None),
                          key=lambda i: i.name)

    def shutdown(self) -> None:
        """End every instance; the daemon calls this before it stops its own workloads."""
        with self._lock:
            self._closing = True
            names = [name for name, i in self._instances.items() if not i.freeing]
        threads = [threading.Thread(target=self._free_quietly, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._template.close()
        self._wait_for_trash()
        shutil.rmtree(self._directory, ignore_errors=True)
        shutil.rmtree(self._library, ignore_errors=True)

    # ------------------------------------------------------------------ internals

    def _free_quietly(self, name: str) -> None:
        try:
            self.free(name, _shutting_down=True)
        except NotFound:
            pass
        except Exception:
            log.exception("freeing instance during shutdown failed", extra={"instance": name})

    def _end(self, instance: Instance, *, kill: bool = False) -> None:
        with instance.moving:
            self._end_where_it_is(instance, kill=kill)

    def _end_where_it_is(self, instance: Instance, *, kill: bool) -> None:
        if instance.process is not None:
            if kill:
                # Not waited for: freeing the cell ends its pid namespace (or kills what is
                # left in its cgroups), and close() below waits for the daemon's end.
                instance.process.kill()
            else:
                instance.process.stop(self._grace + SHUTDOWN_ALLOWANCE)
        try:
            self._workloads.free(instance.cell, grace=0, _shutting_down=self._closing)
        except NotFound:
            pass  # freed through the cell service: nothing of it is left there
        if instance.process is not None:
            instance.process.close()
        self._remove_directories(instance)
        self._forget(instance)

    def _forget(self, instance: Instance) -> None:
        with self._lock:
            if self._instances.get(instance.name) is instance:
                del self._instances[instance.name]
        if not instance.ended.is_set():
            instance.ended.set()
            if self.on_ended is not None:
                self.on_ended(instance)

    def _watch(self, instance: Instance) -> None:
        """An instance whose daemon died on its own (or whose cell someone freed) is cleaned up
        rather than left half there."""
        assert instance.process is not None
        instance.process.wait(None)
        if instance.freeing or instance.ended.is_set():
            return
        with self._lock:
            if instance.freeing or self._closing:
                return
            instance.freeing = True
        log.warning("instance daemon ended on its own; removing the instance",
                    extra={"instance": instance.name})
        try:
            self._end(instance)
        except Exception:
            log.exception("cleaning up an ended instance failed",
                          extra={"instance": instance.name})

    def _prepare_directories(self, instance: Instance, trust: Trust) -> None:
        assert self._authority is not None
        for top in (self._directory, self._library):
            top.mkdir(mode=0o700, parents=True, exist_ok=True)
        if instance.directory.exists() or instance.library.exists():
            # Left by a crash of ours: nothing runs there any more (our cells were cleaned).
            self._remove_directories(instance)
        pki = instance.directory / "pki"
        pki.mkdir(mode=0o700, parents=True)
        (instance.directory / "run").mkdir(mode=0o700)
        instance.library.mkdir(mode=0o700, parents=True)
        (pki / "ca.crt").write_bytes(trust.ca_certificate_pem)
        server = self._authority.issue_child(
            self.spiffe_id.child("instance"), instance.name, dns_names=[dns.SERVER_NAME])
        write_credential(server, pki / "server.crt", pki / "server.key")

    def _remove_directories(self, instance: Instance) -> None:
        for directory in (instance.directory, instance.library):
            trash = directory.parent / TRASH
            trash.mkdir(mode=0o700, exist_ok=True)
            try:
                os.rename(directory, trash / f"{directory.name}.{secrets.token_hex(4)}")
            except FileNotFoundError:
                continue
            except OSError:
                shutil.rmtree(directory, ignore_errors=True)
                continue
            self._empty_trash(trash)

    def _empty_trash(self, trash: Path) -> None:
        """Remove what is in `trash`, in a thread of its own; shutdown waits for it."""
        with self._lock:
            if trash in self._emptying:
                self._emptying[trash] = True  # the running thread looks again
                return
            self._emptying[trash] = False
            thread = threading.Thread(target=self._emptier, args=(trash,),
                                      name="instance-trash", daemon=True)
            self._emptiers.append(thread)
        thread.start()

    def _emptier(self, trash: Path) -> None:
        while True:
            for entry in list(trash.iterdir()) if trash.exists() else []:
                shutil.rmtree(entry, ignore_errors=True)
            with self._lock:
                if not self._emptying[trash]:
                    del self._emptying[trash]
                    self._emptiers.remove(threading.current_thread())
                    return
                self._emptying[trash] = False

    def _wait_for_trash(self) -> None:
        while True:
            with self._lock:
                threads = list(self._emptiers)
            if not threads:
                return
            for thread in threads:
                thread.join()

    def _start_daemon(self, instance: Instance) -> InstanceProcess:
        namespaces = self._workloads.namespaces_of(instance.cell)
        try:
            pid = self._template.fork(
                self._arguments(instance),
                namespaces=namespaces.paths() if namespaces is not None else {},
                cgroup_join=self._workloads.backend.join_files(instance.cell.path),
                log_path=str(instance.log_path))
        except TemplateError as error:
            raise FailedPrecondition(f"could not start the daemon of instance "
                                     f"{instance.name}: {error}") from None
        return InstanceProcess(pid)

    def _arguments(self, instance: Instance) -> list[str]:
        pki = instance.directory / "pki"
        backend = self._workloads.backend
        arguments = [
            "--socket", instance.socket,
            "--ca-crt", str(pki / "ca.crt"),
            "--server-crt", str(pki / "server.crt"),
            "--server-key", str(pki / "server.key"),
            "--runtime-dir", str(instance.directory / "run"),
            "--library-dir", str(instance.library),
            *(("--standby", str(instance.directory / STANDBY_SOCKET)) if instance.spec.standby
              else ("--cgroup-root", f"{backend.root_name}/{instance.cell.path}/{CGROUP_LEAF}")),
            "--cgroup-mount", self._cgroup_mount,
            "--grace-period", str(self._grace),
            "--operator", str(self.spiffe_id),
            "--long-lived-operators", str(self._forwarded_calls),
            *instance.spec.daemon_arguments,
        ]
        if log.isEnabledFor(logging.DEBUG):
            arguments.append("--verbose")
        return arguments


__all__ = ["Instance", "InstanceSpec", "Instances", "Trust", "check_instance_name",
           "own_spiffe_id"]
