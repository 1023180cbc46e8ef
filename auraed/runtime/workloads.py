"""Workloads: every cell and executable the daemon owns, and their lifecycle.

This is the daemon's domain layer. It turns requests (already validated names,
limits in cgroup terms) into kernel actions through `CgroupBackend` and the
`Spawner`, and keeps the registry that List, Stop, Wait and Observe read.
It knows nothing of gRPC or protobuf; it raises `auraed.errors` faults about
a subject (a cell, an executable, a limit), never naming a request field: the
service edge (auraed/validation) does that.

Locking: `_lock` guards the cell tree and the executable registry and is held
while a structural change (allocate, start, free's bookkeeping) talks to the
kernel, so changes happen one at a time and in order. Waiting — grace
periods, exits — happens outside it. Exit reports arrive on the spawner's
reader thread, which must never wait for `_lock` (it would stall the spawn
reply a lock holder waits for), so they go through the small `_pids_lock`.
Frees of overlapping cells do not run side by side: a Free marks its whole
subtree `freeing` under `_lock`, and one that finds a descendant already being
freed waits (outside the lock) for that Free to finish before it marks its own.

Live restore: the spawner outlives the daemon (it holds every process, pipe and exit status,
and writes captured output itself). It keeps a record of each cell and a label on each process
(auraed.runtime.restore), so start() adopts whatever a previous daemon left running, and
detach() leaves everything running for the next one.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import shutil
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from auraed.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Subject,
    Unavailable,
)
from auraed.kernel.cgroups import (
    CgroupBackend,
    CgroupError,
    CgroupExists,
    CgroupLimits,
    CgroupNotFound,
    InvalidLimit,
    LimitRefused,
    UnsafePath,
    UnsupportedLimit,
)
from auraed.kernel.processes import (
    ExitStatus,
    HolderSpec,
    NamespaceSet,
    SpawnedProcess,
    SpawnSpec,
    default_env,
    exec_refusal,
    signal_group,
)
from auraed.kernel.spawner.client import (
    AdoptedProcess,
    Adoption,
    Spawner,
    SpawnerClosed,
    SpawnError,
    SpawnerSeed,
)
from auraed.output import OutputLog
from auraed.output.log import continuation
from auraed.runtime import restore
from auraed.runtime.containers import Containers, ContainerSpec, NotAdoptable
from auraed.runtime.deferred import log_after_answer
from auraed.runtime.events import EventJournal
from auraed.runtime.executables import Executable, ExecutableKey, check_command, check_identity
from auraed.runtime.names import CellName
from auraed.runtime.restarts import (
    NO_RESTART,
    RestartMode,
    RestartPolicy,
    RestartState,
    RestartTimer,
)
from auraed.runtime.signals import SignalEvent, SignalFeed
from auraed.runtime.spare_scopes import SpareScopes

log = logging.getLogger("auraed.workloads")

DEFAULT_GRACE_PERIOD = 10.0
# After SIGKILL a process dies as soon as the kernel schedules it; this only
# bounds the wait for the spawner's exit report.
KILL_WAIT = 5.0
HOST_LOG_DIR = "_host"
# Exits of pids nobody recorded (a spawn whose caller timed out) are kept this
# long at most, so the table cannot grow without bound.
MAX_EARLY_EXITS = 1024
# Executables Stop ended are remembered (their last status, for a Wait that
# comes after the Stop) until their name starts again, their cell is freed, or
# this many newer ones push them out.
MAX_STOPPED_RECORDS = 1024
# Changes remembered by what they touched (Workloads.changed_since); a List that comes after
# more of them than this puts its whole page together again.
MAX_CHANGE_MARKS = 4096

PROCESS_NAMESPACES = frozenset({"pid", "mnt", "ipc", "uts"})
NETWORK_NAMESPACES = frozenset({"net"})


@dataclass(frozen=True)
class CellSpec:
    """What a cell was allocated with, in the runtime's terms."""

    limits: CgroupLimits
    isolate_process: bool = False
    isolate_network: bool = False
    # A pid namespace of its own only (the rest shared with the parent): what a CRI container
    # whose pod does not share its processes gets.
    isolate_pid: bool = False
    # The hostname in the cell's own uts namespace; None names it after the cell.
    hostname: str | None = None
    # Who owns the cell and why, as (key, value) pairs sorted by key.
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def unshared(self) -> frozenset[str]:
        """Namespace kinds this cell gets of its own."""
        kinds: frozenset[str] = frozenset()
        if self.isolate_process:
            kinds |= PROCESS_NAMESPACES
        if self.isolate_network:
            kinds |= NETWORK_NAMESPACES
        if self.isolate_pid:
            kinds |= {"pid"}
        return kinds


@dataclass(eq=False)
class Cell:
    name: CellName
    spec: CellSpec
    children: dict[str, Cell] = field(default_factory=dict)
    executables: dict[str, Executable] = field(default_factory=dict)
    freeing: bool = False
    # Set when the Free in progress (if any) has finished, whichever way: a
    # Free of an ancestor waits for it (see free()).
    freed: threading.Event = field(default_factory=threading.Event)
    # The pid 1 (or pause process) holding the namespaces this cell made, and
    # the namespaces its processes join: its own, else its nearest ancestor's.
    holder: SpawnedProcess | None = None
    namespaces: NamespaceSet | None = None
    holder_ended: threading.Event = field(default_factory=threading.Event)
    # OOM kills already attributed to an executable (the kernel's counter).
    oom_kills_seen: int = 0
    # From its Allocate until the first Start in it or the first child cell below it: the
    # kernel's OOM kill counter of its cgroups is 0 (they were made empty, and only its
    # holder has run in them since; a holder the OOM killer took leaves a cell that refuses
    # every Start), so the first Start need not read it in every hierarchy.
    oom_counter_unread: bool = False
    # Set for a cell the daemon made for one of its own workloads ("vm <id>"): only that owner
    # may free it or start in it; clients see it in List.
    owner: str | None = None

    @property
    def holder_gone(self) -> bool:
        """Whether the cell made namespaces whose holder has ended: reported by
        the spawner, or already dead (a zombie, or gone) before the report came."""
        if self.holder is None:
            return False
        return self.holder_ended.is_set() or not _holds_namespaces(self.holder, self.spec.unshared)


@dataclass(frozen=True)
class CellView:
    """A read-only snapshot of one cell and its subtree, for List.

    Drift — the host no longer matching the daemon's state — is shown, not
    hidden: `missing_cgroups` are the cell's cgroup directories that are gone
    from the host, `namespaces_lost` says the holder of its namespaces ended.
    """

    name: CellName
    spec: CellSpec
    children: tuple[CellView, ...]
    executables: tuple[Executable, ...]
    missing_cgroups: tuple[str, ...] = ()
    namespaces_lost: bool = False


class Workloads:
    def __init__(
        self,
        backend: CgroupBackend,
        log_root: Path,
        *,
        default_grace: float = DEFAULT_GRACE_PERIOD,
        log_segment_bytes: int = 8 * 1024 * 1024,
        log_segments: int = 8,
        events: EventJournal | None = None,
        spawner_socket: Path | None = None,
        containers: Containers | None = None,
        spawner_seed: SpawnerSeed | None = None,
    ) -> None:
        """spawner_socket: where the spawner listens for the next daemon (in the runtime
        directory); with it the workloads outlive this daemon and the next one adopts them.
        containers: where containers' filesystems are (start() adopts or clears them).
        spawner_seed: what becomes the spawner if none is adopted (see SpawnerSeed)."""
        self._containers = containers
        self.backend = backend
        self.signals = SignalFeed()
        self.events = events if events is not None else EventJournal.in_memory()
        self._log_root = log_root
        self._default_grace = default_grace
        self._log_segment_bytes = log_segment_bytes
        self._log_segments = log_segments
        self._spawner_socket = spawner_socket
        self._spawner = Spawner(self._on_exit, on_lost=self._on_spawner_lost,
                                listen=str(spawner_socket) if spawner_socket else None,
                                cgroup_join=backend.join_files(None), seed=spawner_seed)
        # Set by the daemon: what to do when workloads can no longer be
        # supervised (the spawner died).
        self.on_spawner_lost: Callable[[], None] | None = None
        self._spawner_lost = False
        # Started by start_spawner_ahead(), before start().
        self._spawner_ahead = False
        self._lock = threading.RLock()
        self._cells: dict[CellName, Cell] = {}
        self._host_executables: dict[str, Executable] = {}
        self._stopped: OrderedDict[ExecutableKey, Executable] = OrderedDict()
        self._scope_numbers = itertools.count(1)
        # Host scopes made ahead of the Starts that take them.
        self.spare_scopes = SpareScopes(backend)
        self._closing = False
        self._pids_lock = threading.Lock()
        self._by_host_pid: dict[int, Executable] = {}
        self._holders: dict[int, Cell] = {}
        # Exits reported before the starting thread recorded the pid.
        self._early_exits: dict[tuple[int, int], tuple[ExitStatus, float]] = {}
        self._restarts = RestartTimer(self._restart, self.events.start_limit_hit,
                                      self._keep_restart)
        # A new value at every change that List shows (cells, their specs, executables and
        # their statuses, holders ending): the service keeps a page until it changes.
        self._changes = itertools.count(1)
        self._version = 0
        # What each recent change touched (see changed_since): (version, top-level cell path,
        # "" for host level, or None for anything), so that List puts together again only
        # the top-level cells that changed.
        self._marks: deque[tuple[int, str | None]] = deque(maxlen=MAX_CHANGE_MARKS)
        self._marks_lock = threading.Lock()

    @property
    def version(self) -> tuple[int, int]:
        """Changes whenever anything tree() shows may have changed: the daemon's own state, or
        (CgroupBackend.removals_version) the cells' cgroups on the host. Read it before
        tree(); equal values before and after mean that tree was current all along.

        A holder's end counts once the spawner reports it (its exit comes within
        milliseconds); tree() also looks at /proc, for a holder dying right then."""
        return self._version, self.backend.removals_version

    def changed_since(self, version: int) -> tuple[int, set[str] | None]:
        """The daemon's own version now (version[0]) and the top-level cells ("" for host
        level) whose subtree changed after `version`, or None when that is not known (a change
        of anything, or one too long ago): then any may have."""
        with self._marks_lock:
            now = self._version
            if now == version:
                return now, set()
            if not self._marks or self._marks[0][0] > version + 1:
                return now, None
            touched: set[str] = set()
            for at, top in reversed(self._marks):
                if at <= version:
                    break
                if top is None:
                    return now, None
                touched.add(top)
            return now, touched

    def _changed(self, *where: CellName | None) -> None:
        """A change List shows, in the cells `where` (None: host level; none given: anything,
        which is always correct: give a cell only where the change is in it alone)."""
        # Under the small lock: exit reports come on the spawner's reader thread.
        with self._marks_lock:
            self._version = next(self._changes)
            if not where:
                self._marks.append((self._version, None))
            for name in where:
                self._marks.append((self._version, "" if name is None else name.labels[0]))

    # ------------------------------------------------------------------ lifecycle

    def relocate(self, root_name: str) -> None:
        """Take the cgroup subtree at `root_name`, before start(): a spare daemon's workloads
        are made before its claim says where they live (CgroupBackend.await_placement)."""
        self.backend.relocate(root_name)
        if not self._spawner_ahead:
            self._spawner.join_at(self.backend.join_files(None))

    def start_spawner_ahead(self) -> None:
        """Start the spawner before start(), in the cgroups this process is in: a spare
        daemon's, before its claim (its start was 5-7 ms of each pod's after the claim). It
        joins the subtree's only in start(), once settled: joining before the host moved the
        spare's processes, it would be moved back with them into the cell's leaf."""
        self._spawner.join_at(())  # none yet: the files named so far are a placeholder's
        self._spawner.start()
        self._spawner_ahead = True

    def abandon(self) -> None:
        """Before start() (a spare let go of before its claim settled): stop the spawner
        started ahead, if any."""
        if self._spawner_ahead:
            self._spawner.close()

    def start(self, *, settled: Callable[[], None] | None = None, fresh: bool = False) -> None:
        """Prepare the cgroup subtree and the spawner: adopt the workloads of a spawner that
        outlived the previous daemon, or, with none, clear what a previous run left and start
        one. SpawnerRefused: a spawner runs that cannot be adopted (nothing was touched).

        settled: called before the first process starts (a claimed spare's daemon waits there
        until its host has moved its processes into its new cell, auraed.runtime.standby;
        until then it only makes and clears its subtree).

        fresh: the subtree and the runtime directory were made new for this daemon (a claimed
        spare's: its host made the cell, and refuses one that exists): no earlier run left
        anything in them, so nothing is looked for (5-6 ms of a pod's start, measured)."""
        self.backend.setup()
        self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self._restarts.start()
        began = time.monotonic()
        adoption = (self._spawner.attach() if self._spawner_socket is not None and not fresh
                    and not self._spawner_ahead else None)
        if adoption is not None:
            if settled is not None:
                settled()
            self._adopt(adoption, began)
            self.backend.remove_spare_scopes()  # an earlier daemon's, had it no time to
            self.spare_scopes.start()
            return
        stale = [] if fresh else self.backend.existing_cells()
        if stale:
            # Without a spawner to adopt from, their supervisor, pipes and exit statuses are
            # gone (both were killed): clean up; see docs/daemon.md.
            log.warning("removing cells left by a previous run", extra={
                "cells": ",".join(stale), "processes_killed": self._count_processes(stale)})
        if not fresh:
            self.backend.cleanup_stale()
        # After the cells: their processes held the containers' mounts.
        containers = self._containers.start() if self._containers is not None else []
        if containers:
            log.warning("removed containers left by a previous run: their mounts went with "
                        "their processes", extra={"containers": ",".join(containers)})
        self.events.daemon_started(cleaned_cells=stale, cleaned_containers=containers)
        if self._log_root.exists():
            shutil.rmtree(self._log_root)
        self._log_root.mkdir(parents=True)
        if settled is not None:
            settled()
        if self._spawner_ahead:
            self._spawner.join_at(self.backend.join_files(None))
        else:
            self._spawner.start()
        self.spare_scopes.start()  # cleanup_stale removed any an earlier daemon left

    def _count_processes(self, cells: list[str]) -> int:
        count = 0
        for cell in cells:
            if "/" not in cell:
                try:
                    count += len(self.backend.pids(cell))
                except CgroupError:
                    pass
        return count

    def _adopt(self, adoption: Adoption, began: float) -> None:
        """Take over what the spawner kept of the previous daemon's cells and processes. What
        cannot be matched up (a cgroup with no record, a process whose cell is gone, a record
        that does not parse) is cleaned up and logged."""
        cleaned: list[str] = []
        exited_while_away: list[tuple[Executable, ExitStatus, float]] = []
        on_disk = set(self.backend.existing_cells())
        records: list[restore.CellRecord] = []
        adopted_containers: list[Path] = []
        policies = self._adopted_policies(adoption.records)
        for key, value in adoption.records.items():
            if not key.startswith(restore.CELL_RECORD_PREFIX):
                continue
            try:
                record = restore.read_cell_record(value)
            except restore.BadRecord as error:
                log.error("dropping a record the spawner kept", extra={"error": str(error)})
                self._spawner.forget(key)
                continue
            if record.name.path not in on_disk:
                cleaned.append(f"record of cell {record.name} (its cgroup is gone)")
                self._spawner.forget(key)
                continue
            records.append(record)
        # Parents before children: a child's namespaces start from its parent's.
        records.sort(key=lambda r: len(r.name.labels))
        with self._lock:
            for record in records:
                parent = self._cells.get(record.name.parent) if record.name.parent else None
                if record.name.parent is not None and parent is None:
                    cleaned.append(f"record of cell {record.name} (its parent has none)")
                    self._spawner.forget(restore.cell_key(record.name))
                    continue
                spec = CellSpec(record.limits, record.isolate_process, record.isolate_network,
                                isolate_pid=record.isolate_pid, hostname=record.hostname,
                                labels=record.labels)
                cell = Cell(record.name, spec, namespaces=parent.namespaces if parent else None,
                            owner=record.owner)
                try:
                    cell.oom_kills_seen = self.backend.oom_kills(record.name.path) or 0
                except CgroupError:
                    pass
                self._cells[record.name] = cell
                if parent is not None:
                    parent.children[record.name.leaf] = cell
            holders = [p for p in adoption.processes if p.kind == "holder"]
            spawned = self._latest_runs([p for p in adoption.processes if p.kind != "holder"])
            for adopted in holders:
                try:
                    owner = self._cells.get(restore.read_holder_label(adopted.label))
                except restore.BadRecord:
                    owner = None
                if owner is None or owner.holder is not None:
                    cleaned.append(f"namespace holder pid {adopted.process.host_pid}")
                    self._end_unclaimed(adopted.process, adopted.status is None)
                    continue
                owner.holder = adopted.process
                if adopted.status is not None:
                    owner.holder_ended.set()
                else:
                    with self._pids_lock:
                        self._holders[adopted.process.host_pid] = owner
            for cell in sorted(self._cells.values(), key=lambda c: len(c.name.labels)):
                paths = cell.namespaces.paths() if cell.namespaces else {}
                if cell.holder is not None:
                    for kind in cell.spec.unshared:
                        paths[kind] = f"/proc/{cell.holder.host_pid}/ns/{kind}"
                    cell.namespaces = NamespaceSet(**paths)
                for child in cell.children.values():
                    child.namespaces = cell.namespaces
            for adopted, label in spawned:
                registry = (None if label is None else self._host_executables
                            if label.cell is None else getattr(self._cells.get(label.cell),
                                                               "executables", None))
                if label is None or registry is None or label.name in registry:
                    cleaned.append(f"process {adopted.process.host_pid}")
                    self._end_unclaimed(adopted.process, adopted.status is None)
                    continue
                release = self._adopt_container(label, adopted)
                if release is None:
                    cleaned.append(f"container process {adopted.process.host_pid} "
                                   f"({label.cell}/{label.name})")
                    self._end_unclaimed(adopted.process, adopted.status is None)
                    continue
                outputs = [adopted.outputs.get(channel) or OutputLog.mirror(
                    label.log_dir, channel, segment_bytes=self._log_segment_bytes,
                    max_segments=self._log_segments, position=(1, 1, 0, True))
                    for channel in ("stdout", "stderr")]
                executable = Executable(
                    key=ExecutableKey(label.cell, label.name), command=label.command,
                    description=label.description, uid=label.uid, gid=label.gid,
                    process=adopted.process, stdout=outputs[0], stderr=outputs[1],
                    log_dir=label.log_dir, started_at=label.started_at, scope=label.scope,
                    labels=label.labels)
                executable.release = release
                if label.container is not None:
                    adopted_containers.append(label.container[0])
                policy = policies.pop(executable.key, None)
                if policy is not None:
                    executable.restart = policy
                if label.scope is not None:
                    # New scopes are numbered past the adopted ones: names never collide.
                    number = int(label.scope.rsplit(".", 1)[1])
                    self._scope_numbers = itertools.count(max(number + 1,
                                                              next(self._scope_numbers)))
                registry[label.name] = executable
                if adopted.status is not None:
                    exited_while_away.append((executable, adopted.status, adopted.exited_at))
                    continue
                with self._pids_lock:
                    self._by_host_pid[adopted.process.host_pid] = executable
                    early = self._claim_early_exit(adopted.process)
                if early is not None:
                    self._record_exit(executable, *early)
            # Exits of adopted holders reported before they were registered.
            with self._pids_lock:
                early_holders = [(pid, cell) for pid, cell in self._holders.items()
                                 if cell.holder is not None
                                 and self._claim_early_exit(cell.holder) is not None]
                for pid, _ in early_holders:
                    del self._holders[pid]
            for _, cell in early_holders:
                cell.holder_ended.set()
            adopted_cells = set(self._cells)
            executables = len(self._host_executables) + sum(
                len(cell.executables) for cell in self._cells.values())
            exited = sum(1 for e in [*self._host_executables.values(),
                                     *(x for c in self._cells.values()
                                       for x in c.executables.values())] if not e.running)
        for path in sorted(on_disk, key=lambda p: p.count("/")):
            name = CellName(path)
            if name not in adopted_cells and (name.parent is None or name.parent in adopted_cells):
                cleaned.append(f"cgroup of cell {path} (no record)")
                try:
                    self.backend.remove(path)
                except CgroupError as error:
                    log.error("could not remove a cgroup nobody owns",
                              extra={"cell": path, "error": str(error)})
        self._log_root.mkdir(parents=True, exist_ok=True)
        # After the unclaimed processes were ended: they held the mounts of what goes.
        stale_containers = (self._containers.start(keep=adopted_containers)
                            if self._containers is not None else [])
        cleaned += [f"container {name}" for name in stale_containers]
        with self._lock:
            keys = [str(e.key) for e in self._host_executables.values()] + [
                str(e.key) for c in self._cells.values() for e in c.executables.values()]
        # An exit the previous daemon recorded before it went (the spawner keeps an ended
        # process until its executable is forgotten) is in the journal already: once only.
        previous = self.events.previous
        published = [(str(executable.key), executable.process.host_pid)
                     for executable, _, _ in exited_while_away
                     if previous is not None and previous.exit_published(
                         str(executable.key), executable.process.host_pid)]
        self.events.daemon_started(adopted_cells=[name.path for name in adopted_cells],
                                   adopted_executables=keys,
                                   cleaned_containers=stale_containers,
                                   adopted_exits=published)
        self._changed()
        for gone in policies:  # of executables that are gone
            self._spawner.forget(restore.restart_key(gone))
        for executable, status, when in exited_while_away:
            # Its exit event, after the restart's; then its restart policy goes on.
            self._record_exit(executable, status, when, resumed=True,
                              published=(str(executable.key),
                                         executable.process.host_pid) in published)
        log.info("adopted the workloads of the previous daemon", extra={
            "spawner_pid": adoption.spawner_pid, "cells": len(adopted_cells),
            "executables": executables, "exited_while_away": exited,
            "milliseconds": round((time.monotonic() - began) * 1000, 1)})
        if cleaned:
            log.warning("cleaned up what could not be adopted", extra={"cleaned": "; ".join(cleaned)})

    def _adopt_container(self, label: restore.ExecutableLabel, adopted: AdoptedProcess
                         ) -> Callable[[], None] | None:
        """What releases an adopted executable's filesystem: nothing for a plain one; for a
        container, its directory and image hold, once its mount is re-learnt from the kernel.
        None: a container that cannot be adopted (it is then ended and cleaned up)."""
        if label.container is None:
            return lambda: None
        if self._containers is None:
            return None
        directory, image = label.container
        try:
            return self._containers.adopt(
                directory, image, None if adopted.status is not None else adopted.process.host_pid)
        except NotAdoptable as error:
            log.error("cannot adopt a container", extra={
                "executable": f"{label.cell or ''}/{label.name}", "error": str(error)})
            return None

    def _adopted_policies(self, records: dict[str, dict[str, object]]
                          ) -> dict[ExecutableKey, RestartState]:
        """The restart policies a previous daemon kept, by executable."""
        policies: dict[ExecutableKey, RestartState] = {}
        for key, value in records.items():
            if not key.startswith(restore.RESTART_RECORD_PREFIX):
                continue
            try:
                executable, state = restore.read_restart_record(value)
            except restore.BadRecord as error:
                # Its executable is adopted without a policy: it is not restarted again.
                log.error("dropping a restart policy the spawner kept", extra={"error": str(error)})
                self._spawner.forget(key)
                continue
            policies[executable] = state
        return policies

    def _latest_runs(self, spawned: list[AdoptedProcess]
                     ) -> list[tuple[AdoptedProcess, restore.ExecutableLabel | None]]:
        """Each adopted process with its label (None: it has none we can read). Of several runs
        of one executable (the previous daemon died in the middle of a restart, before it let
        go of the earlier run) the latest is kept; the earlier, ended, are let go of."""
        labelled: list[tuple[AdoptedProcess, restore.ExecutableLabel | None]] = []
        for adopted in spawned:
            try:
                labelled.append((adopted, restore.read_executable_label(adopted.label,
                                                                        adopted.argv)))
            except restore.BadRecord:
                labelled.append((adopted, None))
        latest: dict[tuple[CellName | None, str], float] = {}
        for _, label in labelled:
            if label is not None:
                run = (label.cell, label.name)
                latest[run] = max(latest.get(run, label.started_at), label.started_at)
        kept = []
        for adopted, label in labelled:
            if (label is not None and adopted.status is not None
                    and label.started_at < latest[label.cell, label.name]):
                self._spawner.release(adopted.process)
                continue
            kept.append((adopted, label))
        return kept

    def _end_unclaimed(self, process: SpawnedProcess, running: bool) -> None:
        """A process the spawner kept that no cell or executable claims: it goes."""
        if running:
            for kill in (os.killpg, os.kill):
                try:
                    kill(process.host_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._spawner.release(process)

    def detach(self) -> None:
        """Leave every workload running, supervised by the spawner, for the next daemon to
        adopt (a planned restart with --live-restore): nothing is stopped or removed."""
        with self._lock:
            self._closing = True
            cells = len(self._cells)
            executables = len(self._host_executables) + sum(
                len(cell.executables) for cell in self._cells.values())
        self._restarts.close()
        self.spare_scopes.close()
        self._spawner.detach()
        os.close(self._devnull)
        self.backend.close()
        log.info("detached from the spawner; workloads keep running",
                 extra={"cells": cells, "executables": executables,
                        "spawner_pid": self._spawner.pid})

    def shutdown(self, grace: float | None = None) -> None:
        """Stop every executable, free every cell, remove our cgroups."""
        with self._lock:
            self._closing = True
            top = [cell.name for cell in self._cells.values() if cell.name.parent is None]
            host = list(self._host_executables.values())
        self._restarts.close()
        self.spare_scopes.close()
        self._stop_all(host, self._grace(grace))
        for name in top:
            try:
                self.free(name, grace=grace, _shutting_down=True)
            except Exception:
                log.exception("freeing cell during shutdown failed", extra={"cell": str(name)})
        with self._lock:
            self._host_executables.clear()
            self._changed()
        self._spawner.close()
        os.close(self._devnull)
        self.backend.teardown()
        shutil.rmtree(self._log_root, ignore_errors=True)

    # ------------------------------------------------------------------ cells

    def allocate(self, name: CellName, spec: CellSpec, *, owner: str | None = None) -> Cell:
        """Create a cell with limits already validated (see auraed.kernel.cgroups.validate).
        `owner`: set for a cell the daemon makes for a workload of its own (a VM)."""
        with self._lock:
            self._check_open()
            parent = self._cell_for_change(name.parent) if name.parent else None
            if name in self._cells:
                raise AlreadyExists(f"cell {name} already exists", subject=Subject.CELL)
            if parent is not None and parent.owner != owner:
                raise FailedPrecondition(f"cell {parent.name} belongs to {parent.owner}",
                                         subject=Subject.CELL)
            # A child would join its ancestors' namespaces: refused now if they are
            # gone, not later at its first Start.
            self._check_namespaces_alive(name.ancestors())
            try:
                self.backend.create(name.path, spec.limits)
            except InvalidLimit as error:
                raise InvalidArgument(str(error), subject=error.field) from None
            except (UnsupportedLimit, LimitRefused) as error:
                raise FailedPrecondition(str(error), subject=error.field) from None
            except UnsafePath as error:
                raise FailedPrecondition(
                    f"refusing to create cell {name}: {error}", subject=Subject.CELL
                ) from None
            except CgroupExists:
                # Not ours (we know no such cell): made by someone else; never adopt or remove it.
                raise FailedPrecondition(
                    f"a cgroup for cell {name} exists that this daemon did not create; "
                    "remove it or choose another name", subject=Subject.CELL
                ) from None
            cell = Cell(name, spec, namespaces=parent.namespaces if parent else None, owner=owner,
                        oom_counter_unread=True)
            self._oom_counter_read(name.ancestors())  # a child's OOM kills count in theirs
            if spec.unshared:
                try:
                    self._hold_namespaces(cell, parent)
                except BaseException:
                    self.backend.remove(name.path)
                    raise
            self._cells[name] = cell
            if parent is not None:
                parent.children[name.leaf] = cell
            self._changed(name)
            self.events.cell_allocated(name)
            self._keep_record(cell)
        log_after_answer(log, "cell allocated", cell=name.path,
                         namespaces=",".join(sorted(spec.unshared)))
        return cell

    def update(self, name: CellName, spec: CellSpec) -> CellSpec:
        """Change a cell in place to `spec` (limits already validated): new limit values, labels.

        Isolation cannot change (the namespaces exist), nor can a limit go back to "not set"
        (the kernel's default differs per version and controller): both are FailedPrecondition,
        and nothing changes. Returns the spec the cell now has.
        """
        with self._lock:
            self._check_open()
            cell = self._cell_for_change(name)
            current = cell.spec
            for kind in ("isolate_process", "isolate_network", "isolate_pid"):
                if getattr(spec, kind) != getattr(current, kind):
                    raise FailedPrecondition(
                        f"cell {name}: {kind} cannot change in place; free the cell and "
                        "allocate it again", subject=kind)
            dropped = [f.name for f in fields(CgroupLimits)
                       if getattr(current.limits, f.name) is not None
                       and getattr(spec.limits, f.name) is None]
            if dropped:
                limit = dropped[0].replace("_", ".", 1)
                raise FailedPrecondition(
                    f"cell {name}: {limit} cannot be unset in place; give its value, or free "
                    "the cell and allocate it again", subject=limit)
            changed = CgroupLimits(**{
                f.name: getattr(spec.limits, f.name) for f in fields(CgroupLimits)
                if getattr(spec.limits, f.name) != getattr(current.limits, f.name)
            })
            if changed.cpu_max is not None or changed.cpu_period is not None:
                # cpu.max and its period are written together.
                changed = replace(changed, cpu_max=spec.limits.cpu_max,
                                  cpu_period=spec.limits.cpu_period)
            try:
                self.backend.update(name.path, changed)
            except (UnsupportedLimit, LimitRefused) as error:
                raise FailedPrecondition(str(error), subject=error.field) from None
            cell.spec = spec
            self._keep_record(cell)
            self._changed(name)
        log.info("cell updated", extra={"cell": name.path,
                                        "limits": ",".join(changed.set_fields())})
        return spec

    def rehome(self, name: CellName, new_name: CellName, spec: CellSpec, *,
               placed: Callable[[], None] | None = None) -> Cell:
        """Move a childless cell to `new_name` (whose parent exists) with the limits and labels
        of `spec`: the new cgroups are made with the limits first, then every process of the
        cell moves into them (in each hierarchy), then the old cgroups go. The namespaces come
        along (their holder is one of the processes), so isolation cannot change; the hostname
        in `spec` is recorded, and setting it in the uts namespace is the caller's (the cell's
        own processes may: the holder does not). A spare instance becomes a pod so.

        placed: called once the new cgroups exist with their limits, before any process
        moves (a spare is told its place then, and makes its own subtree there while its
        processes move: the move's first write waits for an RCU grace period of the kernel's).
        If it raises, the new cgroups go and the cell stays.

        On a failure the cell stays where it was, with its processes."""
        with self._lock:
            self._check_open()
            cell = self._cell_for_change(name)
            parent = self._cell_for_change(new_name.parent) if new_name.parent else None
            if new_name in self._cells:
                raise AlreadyExists(f"cell {new_name} already exists", subject=Subject.CELL)
            if cell.children or cell.executables or cell.owner is not None:
                raise FailedPrecondition(f"cell {name} has child cells, executables or an "
                                         "owner: it cannot move", subject=Subject.CELL)
            if spec.unshared != cell.spec.unshared:
                raise FailedPrecondition(f"cell {name}: isolation cannot change in a move",
                                         subject=Subject.CELL)
            if parent is not None and (parent.namespaces is not None or parent.owner):
                # Its holder would stay outside the new parent's namespaces.
                raise FailedPrecondition(f"cell {new_name.parent} has namespaces or an owner: "
                                         "a cell cannot move below it", subject=Subject.CELL)
            try:
                self.backend.create(new_name.path, spec.limits)
            except InvalidLimit as error:
                raise InvalidArgument(str(error), subject=error.field) from None
            except (UnsupportedLimit, LimitRefused) as error:
                raise FailedPrecondition(str(error), subject=error.field) from None
            except (UnsafePath, CgroupExists) as error:
                raise FailedPrecondition(f"cannot move cell {name} to {new_name}: {error}",
                                         subject=Subject.CELL) from None
            if placed is not None:
                try:
                    placed()
                except BaseException:
                    try:
                        self.backend.remove(new_name.path)
                    except CgroupError:
                        log.exception("could not remove the cgroups of an abandoned cell move",
                                      extra={"cell": name.path, "to": new_name.path})
                    raise
            try:
                self.backend.move_processes(name.path, new_name.path)
            except CgroupError as error:
                try:
                    self.backend.move_processes(new_name.path, name.path)
                    self.backend.remove(new_name.path)
                except CgroupError:
                    log.exception("could not undo a failed cell move",
                                  extra={"cell": name.path, "to": new_name.path})
                raise FailedPrecondition(f"cannot move cell {name} to {new_name}: {error}",
                                         subject=Subject.CELL) from None
            try:
                self.backend.remove(name.path)
            except CgroupError:
                log.warning("the moved cell's old cgroups could not be removed",
                            extra={"cell": name.path}, exc_info=True)
            del self._cells[name]
            if name.parent is not None and name.parent in self._cells:
                self._cells[name.parent].children.pop(name.leaf, None)
            self._spawner.forget(restore.cell_key(name))
            _remove_directory(self._log_root / name.path, only_if_empty=True)
            cell.name, cell.spec = new_name, spec
            cell.oom_counter_unread = False
            self._oom_counter_read(new_name.ancestors())
            self._cells[new_name] = cell
            if parent is not None:
                parent.children[new_name.leaf] = cell
            self._keep_record(cell)
            self._changed()
            self.events.cell_freed(name)
            self.events.cell_allocated(new_name)
        log.info("cell moved", extra={"cell": name.path, "to": new_name.path,
                                      "limits": ",".join(spec.limits.set_fields())})
        return cell

    def _oom_counter_read(self, names: Iterable[CellName]) -> None:
        """The OOM kill counters of these cells may no longer be 0 (call under _lock)."""
        for name in names:
            if (cell := self._cells.get(name)) is not None:
                cell.oom_counter_unread = False

    def _keep_record(self, cell: Cell) -> None:
        """What the next daemon adopts the cell with: kept by the spawner, which outlives us."""
        spec = cell.spec
        self._spawner.keep(restore.cell_key(cell.name), restore.cell_record(restore.CellRecord(
            cell.name, spec.limits, spec.isolate_process, spec.isolate_network,
            isolate_pid=spec.isolate_pid, owner=cell.owner, labels=spec.labels,
            hostname=spec.hostname)))

    def _hold_namespaces(self, cell: Cell, parent: Cell | None) -> None:
        """Start the process owning the cell's new namespaces (inside its
        parent's, so a nested cell isolates further from there)."""
        try:
            holder = self._spawner.spawn_holder(HolderSpec(
                unshare=cell.spec.unshared,
                hostname=cell.spec.hostname or cell.name.leaf,
                stdout_fd=self._devnull,
                stderr_fd=self._devnull,
                cgroup_join=self.backend.join_files(cell.name.path),
                cgroup_birth=self.backend.birth_cgroup(cell.name.path),
                memory_limited=self._memory_limited(cell.name, cell.spec),
                namespaces=parent.namespaces if parent else None,
                label=restore.holder_label(cell.name),
            ))
        except SpawnError as error:
            raise FailedPrecondition(
                f"could not create the namespaces of cell {cell.name}: {error.message} "
                f"(at {error.stage})", subject=Subject.CELL) from None
        except (SpawnerClosed, TimeoutError) as error:
            raise _spawner_unavailable(error) from None
        paths = cell.namespaces.paths() if cell.namespaces else {}
        for kind in cell.spec.unshared:
            paths[kind] = f"/proc/{holder.host_pid}/ns/{kind}"
        cell.holder = holder
        cell.namespaces = NamespaceSet(**paths)
        with self._pids_lock:
            # It may have ended already (its exit came before this): then it is not recorded,
            # or the record would outlive it and take a later process's exit for its own.
            ended = self._claim_early_exit(holder) is not None
            if not ended:
                self._holders[holder.host_pid] = cell
        if ended:
            cell.holder_ended.set()

    def free(self, name: CellName, *, grace: float | None = None, owner: str | None = None,
             _shutting_down: bool = False) -> None:
        """Stop everything in the cell and its descendants, then remove them.

        Frees of overlapping cells run one after the other: a Free of a cell
        whose descendant is being freed waits for that Free to finish, and a
        Free of a cell being freed (itself or by an ancestor's Free) is
        refused. Cgroups removed behind the daemon's back (drift) are no
        obstacle: the cell's state is cleaned all the same.
        """
        while True:
            with self._lock:
                if not _shutting_down:
                    self._check_open()
                cell = self._cells.get(name)
                if cell is None:
                    raise NotFound(f"cell {name} does not exist", subject=Subject.CELL)
                if cell.owner != owner and not _shutting_down:
                    raise FailedPrecondition(
                        f"cell {name} belongs to {cell.owner}; it goes with it",
                        subject=Subject.CELL)
                if cell.freeing:
                    raise FailedPrecondition(f"cell {name} is already being freed",
                                             subject=Subject.CELL)
                subtree = [c for c in self._cells.values() if c.name.is_within(name)]
                in_progress = [c.freed for c in subtree if c.freeing]
                if not in_progress:
                    for member in subtree:
                        member.freeing = True
                        member.freed = threading.Event()
                    executables = [e for c in subtree for e in c.executables.values()]
                    break
            for done in in_progress:
                done.wait()
        try:
            self._stop_all(executables, self._grace(grace))
            self._end_holders([member for member in subtree if member.holder is not None])
            try:
                self.backend.remove(name.path)
            except CgroupNotFound:
                log.warning("the cell's cgroups were already gone from the host; forgetting it",
                            extra={"cell": name.path})
            except CgroupError as error:
                with self._lock:
                    for member in subtree:
                        member.freeing = False
                raise FailedPrecondition(f"could not remove cell {name}: {error}",
                                         subject=Subject.CELL) from None
            with self._lock:
                for member in sorted(subtree, key=lambda c: len(c.name.labels), reverse=True):
                    if member.holder is not None:
                        if self._spawner_lost:
                            with self._pids_lock:
                                self._holders.pop(member.holder.host_pid, None)
                        # Else its exit report takes it out of _holders: it is dead, and the
                        # spawner reports it (a nested cell's too, which the init of its
                        # parent's pid namespace reaps: the spawner watches its pidfd),
                        # naming its start time, so a later process given its pid is never
                        # taken for it (see _on_exit).
                        self._spawner.release(member.holder)
                    self._cells.pop(member.name, None)
                    self._spawner.forget(restore.cell_key(member.name))
                    for executable in member.executables.values():
                        self._forget(executable)
                    self._drop_records(member.name)
                    # Emptied by _forget unless output is still being written (see there).
                    _remove_directory(self._log_root / member.name.path, only_if_empty=True)
                if name.parent is not None and name.parent in self._cells:
                    self._cells[name.parent].children.pop(name.leaf, None)
                self._changed(name)
                self.events.cell_freed(name)
        finally:
            for member in subtree:
                member.freed.set()
        log_after_answer(log, "cell freed", cell=name.path)

    def _end_holders(self, cells: list[Cell]) -> None:
        """Kill the pid 1 (or pause process) of each cell; the kernel then ends
        everything left in its pid namespace, so removing the cgroups finds
        them empty instead of freezing and signalling one process at a time.

        Each is held by a pidfd, so that a pid reused meanwhile is never signalled, and
        waited for on it: a pid 1 has exited once everything else in its pid namespace has,
        and then its cgroups can go. Its reap and the spawner's report come after that,
        without Free waiting for them; cgroup removal copes with whatever is left."""
        watched: list[int] = []
        try:
            for cell in cells:
                assert cell.holder is not None
                if cell.holder_ended.is_set():
                    continue
                pidfd = _pidfd_of(cell.holder)
                if pidfd is None:
                    continue  # reaped already: its report is on the way
                watched.append(pidfd)
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + KILL_WAIT
            for pidfd in watched:
                exited = select.poll()
                exited.register(pidfd, select.POLLIN)
                exited.poll(max(0.0, deadline - time.monotonic()) * 1000)
        finally:
            for pidfd in watched:
                os.close(pidfd)

    def tree(self, tops: Iterable[str] | None = None) -> list[CellView]:
        """The top-level cells and their subtrees, by name; `tops`: only those of these
        top-level cell paths that exist (List puts together again only what changed)."""
        with self._lock:
            if tops is None:
                chosen: Iterable[Cell] = self._cells.values()
            else:
                chosen = []
                stack = [cell for top in tops if (cell := self._cells.get(CellName(top)))]
                while stack:
                    cell = stack.pop()
                    chosen.append(cell)
                    stack.extend(cell.children.values())
            cells = {c.name: (c, sorted(c.children.values(), key=lambda child: child.name),
                              tuple(c.executables.values()))
                     for c in chosen}
        # Outside the lock: a look at the host (cgroupfs, /proc) for the cells that may have
        # changed there (auraed.kernel.cgroups.removals).
        gone = self.backend.missing_cells(name.path for name in cells)
        missing = {name: tuple(gone[name.path]) for name in cells}

        def view(name: CellName) -> CellView:
            cell, children, executables = cells[name]
            return CellView(name, cell.spec, tuple(view(child.name) for child in children
                                                   if child.name in cells),
                            executables, missing[name], cell.holder_gone)

        return [view(name) for name in sorted(cells) if name.parent is None]

    def drifted_tops(self) -> set[str]:
        """The top-level cells with a cell whose cgroups the host may have changed since the
        last look (CgroupBackend.changed_cells): their views must be looked at again."""
        with self._lock:
            paths = [name.path for name in self._cells]
        return {path.partition("/")[0] for path in self.backend.changed_cells(paths)}

    def owned_cells(self) -> dict[CellName, str]:
        """The cells the daemon made for workloads of its own (adopted ones too), by owner."""
        with self._lock:
            return {cell.name: cell.owner for cell in self._cells.values()
                    if cell.owner is not None}

    def namespaces_of(self, name: CellName) -> NamespaceSet | None:
        """The namespaces a process started in the cell joins (None: the host's)."""
        with self._lock:
            cell = self._cells.get(name)
            if cell is None:
                raise NotFound(f"cell {name} does not exist", subject=Subject.CELL)
            return cell.namespaces

    def host_executables(self) -> list[Executable]:
        with self._lock:
            return list(self._host_executables.values())

    # ------------------------------------------------------------------ executables

    def start_executable(
        self,
        cell_name: CellName | None,
        name: str,
        command: str,
        *,
        description: str = "",
        uid: int | None = None,
        gid: int | None = None,
        container: ContainerSpec | None = None,
        restart: RestartPolicy = NO_RESTART,
        owner: str | None = None,
        labels: tuple[tuple[str, str], ...] = (),
        checked: bool = False,
    ) -> Executable:
        """With `container`, run its argv in its filesystem as its user; the caller's
        `command` is then only what listings show. The container is released if this fails.

        checked: the caller has run check_command and check_identity on `command`, `uid` and
        `gid` itself (a service's edge does, to name the field): they are not run again."""
        try:
            if container is not None and restart.mode is not RestartMode.NO:
                raise InvalidArgument("a restart policy cannot be combined with an image yet",
                                      subject=Subject.RESTART_POLICY)
            return self._start_executable(cell_name, name, command, description=description,
                                          uid=uid, gid=gid, container=container, restart=restart,
                                          owner=owner, labels=labels, checked=checked)
        except BaseException:
            if container is not None:
                container.release()
            raise

    def _start_executable(self, cell_name: CellName | None, name: str, command: str, *,
                          description: str, uid: int | None, gid: int | None,
                          container: ContainerSpec | None,
                          restart: RestartPolicy, owner: str | None,
                          labels: tuple[tuple[str, str], ...] = (),
                          checked: bool = False) -> Executable:
        if container is None:
            # At a service's edge when `checked` (it names the field); here for any other caller.
            if not checked:
                check_command(command)
            if not checked and (uid is not None or gid is not None):
                # Only ids the caller gave: the daemon runs as its own, whatever the user
                # database says of them. A container's users are the image's, not the host's.
                check_identity(os.getuid() if uid is None else uid,
                               os.getgid() if gid is None else gid)
            uid = os.getuid() if uid is None else uid
            gid = os.getgid() if gid is None else gid
        else:
            uid, gid = container.uid, container.gid
            refusal = exec_refusal(container.argv, container.env)
            if refusal is not None:
                raise InvalidArgument(f"the command is too long for exec: {refusal}",
                                      subject=Subject.COMMAND)
        key = ExecutableKey(cell_name, name)
        with self._lock:
            self._check_open()
            registry = self._registry(cell_name, for_change=True)
            if cell_name is not None and self._cells[cell_name].owner != owner:
                raise FailedPrecondition(
                    f"cell {cell_name} belongs to {self._cells[cell_name].owner}",
                    subject=Subject.CELL)
            namespaces = self._namespaces_for_start(cell_name)
            if container is not None and container.mount_namespace is not None:
                namespaces = replace(namespaces or NamespaceSet(), mnt=container.mount_namespace)
            previous = registry.get(name)
            # A name is free again once its process group is gone, not just its leader.
            if previous is not None and not self._ended(previous):
                raise AlreadyExists(
                    f"executable {name} is already running in {_where(cell_name)}",
                    subject=Subject.EXECUTABLE,
                )
            if previous is not None:
                self._forget(previous)
                del registry[name]
            executable = self._spawn(key, command, description, uid, gid, namespaces,
                                     RestartState(restart), container, labels=labels)
            registry[name] = executable
            self._stopped.pop(key, None)
            self._changed(cell_name)
        log_after_answer(log, "executable started", cell=str(cell_name or ""), executable=name,
                         pid=executable.process.host_pid)
        return executable

    def stop_executable(self, cell_name: CellName | None, name: str, grace: float | None = None,
                        *, forget: bool = True, owner: str | None = None) -> Executable:
        """End an executable (SIGTERM to its group, SIGKILL after the grace
        period) and forget it (unless `forget` is False: the CRI keeps stopped
        containers until they are removed). Returns it with its exit status."""
        with self._lock:
            registry = self._registry(cell_name, for_change=False)
            if cell_name is not None and self._cells[cell_name].owner != owner:
                raise FailedPrecondition(
                    f"cell {cell_name} belongs to {self._cells[cell_name].owner}",
                    subject=Subject.CELL)
            executable = registry.get(name)
            if executable is None:
                raise NotFound(
                    f"no executable {name} in {_where(cell_name)}", subject=Subject.EXECUTABLE
                )
            executable.restart.ended = True  # under _lock: no restart can slip in after this
            self._keep_restart(executable)  # nor in the next daemon's, should this one die
            self._changed(cell_name)
        self._stop_all([executable], self._grace(grace))
        if not forget:
            return executable
        with self._lock:
            if registry.get(name) is executable:
                del registry[name]
                self._forget(executable)
                self._stopped[executable.key] = executable
                self._stopped.move_to_end(executable.key)
                while len(self._stopped) > MAX_STOPPED_RECORDS:
                    self._stopped.popitem(last=False)
                self.events.executable_stopped(executable)
                self._changed(cell_name)
        log_after_answer(log, "executable stopped", cell=str(cell_name or ""), executable=name)
        return executable

    def catch_up_output(self, executable: Executable) -> None:
        """Bring an executable's logs up to what it has written so far: the spawner reads its
        pipes a moment after the write and reports later still, so a replay taken just after
        the write would miss it without this. A spawner that cannot flush (older than this
        daemon) leaves the logs as they are: a replay then holds what was reported."""
        if executable.stdout.complete and executable.stderr.complete:
            return  # the pipes are closed and read to their end
        if not self._spawner.flush_output([executable.process]) and self._spawner.flushes_output:
            log.warning("the spawner did not flush output in time; replaying what it reported",
                        extra={"executable": str(executable.key)})

    def wait_executable(self, cell_name: CellName | None, name: str, timeout: float | None) -> Executable | None:
        """The executable once it has exited, or None if `timeout` passed first.
        One that Stop ended is answered with the status recorded then."""
        with self._lock:
            registry = self._registry(cell_name, for_change=False)
            executable = registry.get(name) or self._stopped.get(ExecutableKey(cell_name, name))
            if executable is None:
                raise NotFound(f"no executable {name} in {_where(cell_name)}",
                               subject=Subject.EXECUTABLE)
        return executable if executable.wait(timeout) else None

    def find_executable(self, *, pid: int | None = None, cell_name: CellName | None = None,
                        name: str | None = None) -> Executable:
        """One known executable: by name (in `cell_name`, None for host level), or by pid.

        A pid is looked up as a host pid first — unique on the host — and only then as a pid
        inside a cell's pid namespace, where several cells may each have it; `cell_name`
        (without a name) narrows a pid lookup to that cell. Running executables are preferred
        to exited ones that still hold a (since reused) pid. A pid that still names several is
        refused: FailedPrecondition.
        """
        with self._lock:
            if name is not None:
                registry = self._registry(cell_name, for_change=False)
                executable = registry.get(name) or self._stopped.get(ExecutableKey(cell_name, name))
                if executable is None:
                    raise NotFound(f"no executable {name} in {_where(cell_name)}",
                                   subject=Subject.EXECUTABLE)
                if pid is not None and pid not in (executable.process.host_pid,
                                                   executable.process.ns_pid):
                    raise NotFound(f"executable {name} in {_where(cell_name)} does not have "
                                   f"process id {pid}", subject=Subject.PROCESS)
                return executable
            if cell_name is not None:
                candidates = list(self._registry(cell_name, for_change=False).values())
            else:
                candidates = [*self._host_executables.values()]
                for cell in self._cells.values():
                    candidates.extend(cell.executables.values())
        assert pid is not None
        for matches in ([e for e in candidates if e.process.host_pid == pid],
                        [e for e in candidates if e.process.ns_pid == pid]):
            running = [e for e in matches if e.running]
            if len(running or matches) == 1:
                return (running or matches)[0]
            if len(matches) > 1:
                names = ", ".join(sorted(str(e.key) for e in matches))
                raise FailedPrecondition(
                    f"process id {pid} names several executables ({names}); use the host pid "
                    "Start reported, or select by cell_name and executable_name",
                    subject=Subject.PROCESS)
        raise NotFound(f"no executable with process id {pid}" +
                       (f" in cell {cell_name}" if cell_name else ""), subject=Subject.PROCESS)

    # ------------------------------------------------------------------ internals

    def _grace(self, grace: float | None) -> float:
        return self._default_grace if grace is None else grace

    def _check_open(self) -> None:
        if self._closing:
            raise Unavailable("the daemon is shutting down")

    def _cell_for_change(self, name: CellName) -> Cell:
        cell = self._cells.get(name)
        if cell is None:
            raise NotFound(f"cell {name} does not exist", subject=Subject.CELL)
        if cell.freeing:
            raise FailedPrecondition(f"cell {name} is being freed", subject=Subject.CELL)
        return cell

    def _registry(self, cell_name: CellName | None, *, for_change: bool) -> dict[str, Executable]:
        if cell_name is None:
            return self._host_executables
        if for_change:
            return self._cell_for_change(cell_name).executables
        cell = self._cells.get(cell_name)
        if cell is None:
            raise NotFound(f"cell {cell_name} does not exist", subject=Subject.CELL)
        return cell.executables

    def _namespaces_for_start(self, cell_name: CellName | None) -> NamespaceSet | None:
        if cell_name is None:
            return None
        # Every holder whose namespaces this cell uses must still be alive:
        # a dead holder's /proc paths could name a recycled pid.
        self._check_namespaces_alive([*cell_name.ancestors(), cell_name])
        return self._cells[cell_name].namespaces

    def _check_namespaces_alive(self, cells: Iterable[CellName]) -> None:
        for name in cells:
            if self._cells[name].holder_gone:
                raise FailedPrecondition(
                    f"the namespaces of cell {name} are gone (its init was killed); "
                    "free the cell and allocate it again", subject=Subject.CELL)

    def _spawn(self, key: ExecutableKey, command: str, description: str, uid: int, gid: int,
               namespaces: NamespaceSet | None, restart: RestartState,
               container: ContainerSpec | None = None, *,
               earlier: Executable | None = None,
               labels: tuple[tuple[str, str], ...] = ()) -> Executable:
        """earlier: the run a restart policy starts this one after; its output is continued.
        labels: what the caller recorded with it (Executable.labels)."""
        # Written by the spawner, which makes the pipes: output is captured while no daemon
        # runs too. These follow it. A restart goes on in the earlier run's log, so Observe
        # replays every run's output, within the same bound as one run's.
        if earlier is not None and self._continues_output(earlier):
            log_dir, fresh = earlier.log_dir, False
            stdout, stderr = (OutputLog.mirror(
                log_dir, log.channel, segment_bytes=self._log_segment_bytes,
                max_segments=self._log_segments,
                position=(*continuation(*log.position()[:2], self._log_segments), 0, False))
                for log in (earlier.stdout, earlier.stderr))
        else:
            log_dir, fresh = self._log_dir(key), True
            stdout = OutputLog.mirror(log_dir, "stdout", segment_bytes=self._log_segment_bytes,
                                      max_segments=self._log_segments)
            stderr = OutputLog.mirror(log_dir, "stderr", segment_bytes=self._log_segment_bytes,
                                      max_segments=self._log_segments)
        # Before the fork: a process that ends at once must not seem to have
        # exited before it started.
        started_at = time.time()
        cell_path = key.cell.path if key.cell else None
        # Host level: a cgroup of its own, so that Stop reaches whatever it starts, even in
        # sessions of their own (setsid) that its process group does not hold.
        scope = None if key.cell else f"{key.name}.{next(self._scope_numbers)}"
        restart.record_start()  # an attempt counts towards the start limit
        if restart.policy.mode is not RestartMode.NO:
            # Kept before the spawn: a daemon that dies during it leaves the attempt counted.
            self._spawner.keep(restore.restart_key(key), restore.restart_record(key, restart))
        label = restore.executable_label(restore.ExecutableLabel(
            key.cell, key.name, command, description, uid, gid, log_dir, started_at, scope,
            container=None if container is None or container.directory is None
            or container.image is None else (container.directory, container.image.id),
            labels=labels))
        try:
            if scope is not None and not self.spare_scopes.claim(scope):
                self._create_scope(key, scope)
            spec = SpawnSpec(
                command=container.argv if container else command,
                env=container.env if container else default_env(),
                cwd=container.cwd if container else "/",
                rootfs=container.rootfs if container else None,
                uid=uid,
                gid=gid,
                capture=(stdout, stderr),
                label=label,
                cgroup_join=self.backend.join_files(cell_path, scope),
                cgroup_birth=self.backend.birth_cgroup(cell_path, scope),
                memory_limited=key.cell is not None and self._memory_limited(key.cell),
                namespaces=namespaces,
            )
            # A scope made just now has had no OOM kill, nor a cell before its first Start
            # (Cell.oom_counter_unread): the counter is not read (a read per hierarchy file
            # costs about a tenth of the Start).
            cell = self._cells.get(key.cell) if key.cell is not None else None
            if scope is not None or (cell is not None and cell.oom_counter_unread):
                oom_kills_at_start = 0
            else:
                oom_kills_at_start = self._oom_count(key.cell, None) or 0
            if cell is not None:
                cell.oom_counter_unread = False
            process = self._spawner.spawn(spec)
        except (SpawnError, SpawnerClosed, TimeoutError, FailedPrecondition) as error:
            if fresh:  # else the earlier run's output, still to be replayed
                shutil.rmtree(log_dir, ignore_errors=True)
            if scope is not None:
                self._remove_scope(scope)
            if isinstance(error, FailedPrecondition):
                raise
            if not isinstance(error, SpawnError):
                raise _spawner_unavailable(error) from None
            if key.cell is not None and error.stage in ("namespace", "setns"):
                # The holder may have died after the check in start_executable:
                # say so rather than pass on a raw /proc path error.
                self._check_namespaces_alive([*key.cell.ancestors(), key.cell])
            raise FailedPrecondition(
                f"could not start {key}: {error.message} (at {error.stage})",
                subject=Subject.COMMAND,
            ) from None
        except BaseException:
            if scope is not None:
                self._remove_scope(scope)
            raise
        executable = Executable(
            key=key, command=command, description=description, uid=uid, gid=gid,
            process=process, stdout=stdout, stderr=stderr, log_dir=log_dir, started_at=started_at,
            scope=scope, oom_kills_at_start=oom_kills_at_start,
            restart=restart, labels=labels,
        )
        if container is not None:
            executable.release = container.release
        self.events.executable_started(executable)  # before an exit can be recorded
        with self._pids_lock:
            self._by_host_pid[process.host_pid] = executable
            early = self._claim_early_exit(process)
        if early is not None:
            self._record_exit(executable, *early)
        return executable

    def _memory_limited(self, name: CellName, spec: CellSpec | None = None) -> bool:
        """Whether the cell's cgroups, or an ancestor cell's, limit memory (call under _lock;
        `spec`: the cell's, for one not registered yet)."""
        if (spec or self._cells[name].spec).limits.memory_max is not None:
            return True
        return any(self._cells[ancestor].spec.limits.memory_max is not None
                   for ancestor in name.ancestors())

    def _create_scope(self, key: ExecutableKey, scope: str) -> None:
        try:
            self.backend.create_scope(scope)
        except (CgroupError, OSError) as error:
            raise FailedPrecondition(f"could not make a cgroup for {key}: {error}",
                                     subject=Subject.EXECUTABLE) from None

    def _remove_scope(self, scope: str) -> None:
        try:
            self.backend.remove_scope(scope)
        except (CgroupError, OSError):
            log.exception("could not remove a host executable's cgroup", extra={"scope": scope})

    def _drop_records(self, cell_name: CellName) -> None:
        """Forget the stopped executables of a cell that is freed (call under _lock)."""
        for key in [key for key in self._stopped if key.cell == cell_name]:
            del self._stopped[key]

    def _log_dir(self, key: ExecutableKey) -> Path:
        base = self._log_root / (key.cell.path if key.cell else HOST_LOG_DIR)
        # Unique per start: a name reused after an exit gets a fresh directory.
        return base / f"{key.name}.{time.monotonic_ns()}"

    def _forget(self, executable: Executable, *, successor: Executable | None = None) -> None:
        """Drop an executable's records and its captured output (call under _lock).

        Output still being written — a descendant that left the process group
        keeps the pipe open — stays on disk until shutdown clears the log root.
        successor: the run its restart policy started after it, which keeps the policy and,
        when it continues the log, the output.
        """
        with self._pids_lock:
            if self._by_host_pid.get(executable.process.host_pid) is executable:
                del self._by_host_pid[executable.process.host_pid]
        if executable.scope is not None:
            self._remove_scope(executable.scope)
        executable.release()  # a container's writable layer and its hold on the image
        self._spawner.release(executable.process)
        if successor is None and executable.restart.policy.mode is not RestartMode.NO:
            self._spawner.forget(restore.restart_key(executable.key))
        if successor is not None and successor.log_dir == executable.log_dir:
            return
        if executable.stdout.complete and executable.stderr.complete:
            executable.stdout.remove()
            executable.stderr.remove()
            _remove_directory(executable.log_dir)

    def _on_exit(self, host_pid: int, start_time: int, status: ExitStatus) -> None:
        """Called on the spawner's reader thread; must not take _lock. Records are matched by
        pid and start time: a pid freed by a reap can be a new process's before an exit of the
        old one reaches us, and that must not end the new one's record."""
        when = time.time()
        with self._pids_lock:
            holder_of = self._holders.get(host_pid)
            if holder_of is not None and _same_process(holder_of.holder, start_time):
                del self._holders[host_pid]
            else:
                holder_of = None
            executable = self._by_host_pid.get(host_pid)
            if executable is not None and not _same_process(executable.process, start_time):
                executable = None
            if executable is None and holder_of is None:
                if len(self._early_exits) >= MAX_EARLY_EXITS:
                    self._early_exits.pop(next(iter(self._early_exits)))
                self._early_exits[host_pid, start_time] = (status, when)
                return
        if holder_of is not None:
            holder_of.holder_ended.set()
            self._changed(holder_of.name)
            if not holder_of.freeing:
                log.warning("a cell's namespace holder ended", extra={"cell": holder_of.name.path})
            return
        assert executable is not None
        self._record_exit(executable, status, when)

    def _claim_early_exit(self, process: SpawnedProcess) -> tuple[ExitStatus, float] | None:
        """The exit reported for this process before it was recorded, if any (under
        _pids_lock); an older spawner's reports carry no start time (0)."""
        return (self._early_exits.pop((process.host_pid, process.start_time), None)
                or self._early_exits.pop((process.host_pid, 0), None))

    def _restart(self, previous: Executable) -> None:
        """Start an executable again for its restart policy (on the RestartTimer's thread),
        unless Stop, Free or shutdown ended the policy, or the name was reused, meanwhile."""
        state = previous.restart
        cell = previous.cell
        with self._lock:
            state.next_at = state.due = 0.0
            self._changed(cell)
            if state.ended or self._closing:
                return
            if cell is not None and (cell not in self._cells or self._cells[cell].freeing):
                return
            registry = self._host_executables if cell is None else self._cells[cell].executables
            if registry.get(previous.name) is not previous:
                return
            try:
                namespaces = self._namespaces_for_start(cell)
                state.count += 1
                executable = self._spawn(previous.key, previous.command, previous.description,
                                         previous.uid, previous.gid, namespaces, state,
                                         earlier=previous, labels=previous.labels)
            except Unavailable:
                self._changed(cell)  # its restart count
                return  # no spawner: nothing starts any more
            except FailedPrecondition as error:
                failed: FailedPrecondition | None = error
            else:
                failed = None
                self._forget(previous, successor=executable)
                registry[previous.name] = executable
            self._changed(cell)
        if failed is not None:
            # A failed start: the policy tries again later, within its start limit.
            log.warning("restart failed", extra={"executable": str(previous.key),
                                                 "error": failed.message})
            self._restarts.exited(previous)
            self._changed(cell)
            return
        log.info("executable restarted", extra={
            "cell": str(cell or ""), "executable": previous.name,
            "pid": executable.process.host_pid, "restarts": state.count})

    def _keep_restart(self, executable: Executable) -> None:
        """Keep the state of an executable's restart policy for a later daemon (any thread)."""
        if executable.restart.policy.mode is not RestartMode.NO:
            self._spawner.keep(restore.restart_key(executable.key),
                               restore.restart_record(executable.key, executable.restart))

    def _continues_output(self, earlier: Executable) -> bool:
        # Only a finished log is continued: a descendant of the earlier run may still write
        # to its own (then the new run starts a log of its own, and the earlier one's output
        # is not replayed with it).
        return (self._spawner.continues_output and earlier.stdout.complete
                and earlier.stderr.complete)

    def _on_spawner_lost(self) -> None:
        """The spawner is gone: no exit will be reported from now on, so stop
        waiting for reports and let the daemon decide what to do."""
        self._spawner_lost = True
        if self.on_spawner_lost is not None:
            self.on_spawner_lost()

    def _record_exit(self, executable: Executable, status: ExitStatus, when: float, *,
                     resumed: bool = False, published: bool = False) -> None:
        """resumed: an exit of an adopted executable, while no daemon ran (or before this one
        adopted it). published: its exit event is in the journal already (an earlier daemon
        recorded the exit)."""
        self._attribute_oom_kills(executable, status)
        if not published:
            self.events.executable_exited(executable, status)  # before Stop or Free see the end
        executable.mark_exited(status, when)
        self._restarts.exited(executable, resumed=resumed)
        self._changed(executable.cell)  # its status and restart plan, now complete
        if status.signal is not None:
            self._publish_signal(executable, status.signal, delivered_by_daemon=False)
        log.info(
            "executable exited",
            extra={
                "cell": str(executable.cell or ""),
                "executable": executable.name,
                "pid": executable.process.host_pid,
                "exit_code": "" if status.exit_code is None else status.exit_code,
                "signal": "" if status.signal is None else signal.Signals(status.signal).name,
                "oom_killed": executable.oom_killed,
                "cell_oom_kills": executable.cell_oom_kills,
            },
        )

    def _oom_count(self, cell_name: CellName | None, scope: str | None) -> int | None:
        """The OOM kill counter of a cell's cgroups, or of a host scope; None if unknown."""
        try:
            if cell_name is not None:
                return self.backend.oom_kills(cell_name.path)
            if scope is not None:
                return self.backend.scope_oom_kills(scope)
        except (CgroupError, OSError, KeyError):
            pass
        return None

    def _attribute_oom_kills(self, executable: Executable, status: ExitStatus) -> None:
        """Read the kernel's OOM kill counter of the executable's cgroup after its exit and
        compare it with the counter at its start.

        `cell_oom_kills` is what the counter gained while it ran. `oom_killed` — its own death
        was the OOM killer's — needs a SIGKILL the daemon did not send and a kill no other exit
        has accounted for: every exit in a cell takes the kills seen since the last one, except
        those left for another of the cell's executables already dying of SIGKILL, so a later
        `kill -9` from outside is not mistaken for an OOM kill that ended a child long ago.
        """
        now = self._oom_count(executable.cell, executable.scope)
        if now is None:
            return
        executable.cell_oom_kills = max(0, now - executable.oom_kills_at_start)
        killed = status.signal == signal.SIGKILL and not executable.killed_by_daemon
        if executable.scope is not None:  # its own cgroup: every kill there was of its processes
            executable.oom_killed = killed and executable.cell_oom_kills > 0
            return
        assert executable.cell is not None
        cell = self._cells.get(executable.cell)
        if cell is None:
            return
        if now > cell.oom_kills_seen:
            self.events.cell_oom_kill(executable.cell, now)
        unaccounted = now - max(cell.oom_kills_seen, executable.oom_kills_at_start)
        if killed and unaccounted > 0:
            executable.oom_killed = True
            cell.oom_kills_seen = max(cell.oom_kills_seen, executable.oom_kills_at_start) + 1
            return
        # Not its own: left for peers dying of SIGKILL right now (their reports are on the
        # way), the rest counted as kills of descendants.
        dying = sum(1 for peer in list(cell.executables.values())
                    if peer is not executable and peer.running and _dying_of_sigkill(peer.process))
        cell.oom_kills_seen = max(cell.oom_kills_seen, now - min(dying, max(0, unaccounted)))

    def _publish_signal(self, executable: Executable, signum: int, *, delivered_by_daemon: bool) -> None:
        self.signals.publish(
            SignalEvent(
                signal=signum,
                pid=executable.process.ns_pid,
                host_pid=executable.process.host_pid,
                cell=executable.cell,
                executable=executable.name,
                timestamp=time.time(),
                delivered_by_daemon=delivered_by_daemon,
            )
        )

    def _signal(self, executables: Iterable[Executable], signum: int) -> None:
        for executable in executables:
            if signum == signal.SIGKILL:
                executable.killed_by_daemon = True
            delivered = False
            if _group_alive(executable.process.pgid):
                signal_group(executable.process.pgid, signum)
                delivered = True
            if executable.scope is not None and self._scope_populated(executable):
                # Its other sessions (setsid) too: everything in its cgroup.
                try:
                    self.backend.signal_scope(executable.scope, signum)
                    delivered = True
                except (CgroupError, OSError):
                    log.exception("signalling a host executable's cgroup failed",
                                  extra={"executable": str(executable.key)})
            if delivered:
                self._publish_signal(executable, signum, delivered_by_daemon=True)

    def _scope_populated(self, executable: Executable) -> bool:
        if executable.scope is None:
            return False
        try:
            return bool(self.backend.scope_pids(executable.scope))
        except CgroupNotFound:
            return False

    def _stop_all(self, executables: list[Executable], grace: float) -> None:
        """SIGTERM every process group (and host scope), wait up to `grace` for
        the leaders to exit and the groups to empty, SIGKILL what is left, wait
        for the exits."""
        live = [e for e in executables if not self._ended(e)]
        if not live:
            return
        self._signal(live, signal.SIGTERM)
        _wait_until(lambda: all(self._ended(e) for e in live), grace)
        remaining = [e for e in live if not self._ended(e)]
        if remaining:
            self._signal(remaining, signal.SIGKILL)
            _wait_until(lambda: all(self._ended(e) for e in remaining), KILL_WAIT)
        for executable in live:
            if not self._ended(executable):
                log.error("executable did not end after SIGKILL",
                          extra={"executable": str(executable.key), "pid": executable.process.host_pid})

    def _ended(self, executable: Executable) -> bool:
        # Without a spawner no exit is reported: the group's absence has to do.
        reported = not executable.running or self._spawner_lost
        return (reported and not _group_alive(executable.process.pgid)
                and not self._scope_populated(executable))


def _remove_directory(path: Path, *, only_if_empty: bool = False) -> None:
    """rmdir, the common case; the whole tree only if something was left in it."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        if not only_if_empty:
            shutil.rmtree(path, ignore_errors=True)


def _same_process(process: SpawnedProcess | None, start_time: int) -> bool:
    """Whether an exit reported with this start time is this process's (0: an older spawner
    said none, and the pid is all there is)."""
    return process is not None and (start_time == 0 or process.start_time == start_time)


def _holds_namespaces(holder: SpawnedProcess, kinds: Iterable[str]) -> bool:
    """Whether a namespace holder still runs and holds its namespaces.

    Dying is enough to be gone: a SIGKILL pending, or (pid 1 of a namespace
    waits for the rest of it to end before it turns zombie) namespaces already
    released, or a zombie, or its pid reused.
    """
    pid = holder.host_pid
    fields = _stat_fields(pid)
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
        for kind in kinds:
            os.readlink(f"/proc/{pid}/ns/{kind}")
    except (FileNotFoundError, ProcessLookupError):
        return False
    if fields is None or fields[0] in (b"Z", b"X") or int(fields[19]) != holder.start_time:
        return False
    kill = 1 << (signal.SIGKILL - 1)
    for line in status.splitlines():
        if line.startswith((b"SigPnd:", b"ShdPnd:")) and int(line.split()[1], 16) & kill:
            return False
    return True


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces and
    parentheses): state first, starttime (field 22 of proc(5)) at index 19. None: no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(b")") + 2:].split()


def _pidfd_of(process: SpawnedProcess) -> int | None:
    """A pidfd on the process if its pid still names it (it is not reaped), else None."""
    try:
        pidfd = os.pidfd_open(process.host_pid)
    except ProcessLookupError:
        return None
    fields = _stat_fields(process.host_pid)
    if fields is None or int(fields[19]) != process.start_time:
        os.close(pidfd)
        return None
    return pidfd


def _dying_of_sigkill(process: SpawnedProcess) -> bool:
    """Whether the process has a SIGKILL pending or is a zombie a SIGKILL ended."""
    fields = _stat_fields(process.host_pid)
    try:
        with open(f"/proc/{process.host_pid}/status", "rb") as f:
            status = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    if fields is None or int(fields[19]) != process.start_time:
        return False
    if fields[0] == b"Z":
        # exit_code (field 52), in waitpid's encoding: the low 7 bits are the signal.
        return len(fields) > 49 and int(fields[49]) & 0x7F == signal.SIGKILL
    kill = 1 << (signal.SIGKILL - 1)
    return any(line.startswith((b"SigPnd:", b"ShdPnd:")) and int(line.split()[1], 16) & kill
               for line in status.splitlines())


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_until(done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not done() and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _spawner_unavailable(error: Exception) -> Unavailable:
    # Every workload starts through the spawner: without it nothing can, until a restart.
    return Unavailable(f"the daemon cannot start processes ({error}); see the daemon log "
                       "and restart auraed")


def _where(cell_name: CellName | None) -> str:
    return f"cell {cell_name}" if cell_name else "the host"
