"""The cgroup interface the daemon programs against, and the logic both cgroup versions share.

Layout below each hierarchy's mount (v2 has one hierarchy, v1 one per controller):

    <root>/                 the daemon's subtree; nothing outside it is ever written
    <root>/_host/<scope>/   one leaf per executable that runs outside any cell (as systemd gives
                            a transient scope), so that everything it starts can be reached
    <root>/_host/_spawner/  the leaf of the daemon's own helper (the spawner) and of any host
                            process started without a scope
    <root>/<cell>/          one cgroup per cell, holding its limits
    <root>/<cell>/_procs/   leaf for the cell's own processes
    <root>/<cell>/<child>/  nested cells, same shape

Processes only ever live in leaves: v2 forbids processes in a cgroup that hands controllers to
its children, and v1 follows the same shape so both share one code path. `_procs` and `_host`
cannot collide with cells, whose names are DNS labels.
"""

import errno
import logging
import os
import re
import signal
import stat
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

from auraed.kernel.cgroups import cgroupfs
from auraed.kernel.cgroups.cgroupfs import Hierarchy
from auraed.kernel.cgroups.errors import (
    CgroupBusy,
    CgroupError,
    CgroupExists,
    CgroupNotFound,
    LimitRefused,
)
from auraed.kernel.cgroups.limits import CgroupLimits, validate
from auraed.kernel.cgroups.removals import RemovalWatch

PROCS_LEAF = "_procs"
HOST_LEAF = "_host"
# Below HOST_LEAF, which on v2 hands controllers to its scopes and so can hold no process.
SPAWNER_LEAF = "_spawner"
DEFAULT_TIMEOUT = 5.0
POLL_INTERVAL = 0.005


class Backoff:
    """Sleeps that start short and grow to POLL_INTERVAL: a SIGKILLed process is
    usually gone within a fraction of a millisecond, a stuck one should not
    make us spin."""

    def __init__(self, first: float = 0.0002, ceiling: float = POLL_INTERVAL) -> None:
        self._delay = first
        self._ceiling = ceiling

    def sleep(self) -> None:
        time.sleep(self._delay)
        self._delay = min(self._delay * 2, self._ceiling)

# How long kill() waits for a freeze to settle before signalling anyway: a task stuck in
# uninterruptible sleep can hold a cgroup in FREEZING indefinitely.
FREEZE_WAIT = 1.0

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# A host-level executable's scope: its name and a number, "web.12" (no interface file is named so).
_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}\.[0-9]{1,20}")
_SPARE = re.compile(r"_spare\.[0-9]{1,20}")
# A name, or a path of names below the mount: a spawned instance's daemon roots its subtree
# inside the cgroup of the host cell that holds it. No component can be "." or "..".
_ROOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*")

log = logging.getLogger(__name__)

# A cgroup's position below the daemon's root, one name per level; () is the root itself.
Components = tuple[str, ...]


@dataclass(frozen=True)
class CgroupUsage:
    """What a cell has consumed: CPU time since creation, and memory now in use."""

    cpu_usec: int
    memory_bytes: int | None  # None when the host's cgroups do not account memory


@dataclass(frozen=True)
class CgroupMetrics:
    """A cell's resource usage as its cgroups count it (the cell and its child cells together).

    Counters (CPU time, periods, OOM kills) only grow; None where the host's cgroups do not
    account that resource (a v2 controller not enabled, a kernel without memory.peak).
    """

    cpu_usage_usec: int
    cpu_user_usec: int | None
    cpu_system_usec: int | None
    # Under a cpu.max quota: enforcement periods, those in which the cell was throttled, and
    # the total time it spent throttled.
    cpu_periods: int | None
    cpu_throttled_periods: int | None
    cpu_throttled_usec: int | None
    memory_current_bytes: int | None
    memory_peak_bytes: int | None  # since the cell was created: v1 max_usage, v2 memory.peak
    memory_max_bytes: int | None  # the limit; None when unlimited or not accounted
    pids_current: int | None
    oom_kills: int | None


@dataclass(frozen=True)
class LimitFile:
    """One interface-file write that sets (part of) a limit."""

    hierarchy: Hierarchy
    filename: str
    value: str
    field: str


def cell_components(cell_path: str) -> Components:
    """Split "a/b/c" into its cell names; ValueError unless every name is a DNS label."""
    parts = tuple(cell_path.split("/"))
    if not all(_DNS_LABEL.fullmatch(part) for part in parts):
        raise ValueError(f"{cell_path!r} is not a cell path of DNS labels joined by '/'")
    return parts


class CgroupBackend(ABC):
    """The daemon's cgroups on one host: its root, a host leaf, and a cgroup per cell."""

    version: ClassVar[int]
    # The interface file a process joins a cgroup through by writing "0" (itself).
    JOIN_FILE: ClassVar[str] = "cgroup.procs"

    def __init__(self, root_name: str, hierarchies: Sequence[Hierarchy]) -> None:
        if not _ROOT_NAME.fullmatch(root_name):
            raise ValueError(f"{root_name!r} cannot name a cgroup directory")
        self.root_name = root_name
        # In the order a new process joins them: see join_files().
        self._hierarchies = tuple(hierarchies)
        # Our root in each hierarchy, held open from setup() to teardown(): every operation
        # walks from there instead of from the mount.
        self._root_fds: dict[Hierarchy, int] = {}
        # The host leaf in each hierarchy, held open alike: a host scope is made in it at
        # every host-level Start, and walking to it from the root each time cost a third of
        # making the scope (measured).
        self._host_fds: dict[Hierarchy, int] = {}
        self._removals = RemovalWatch(PROCS_LEAF)
        self._placed = True

    # --- lifecycle of the daemon's subtree ---

    def await_placement(self) -> None:
        """Refuse every operation until relocate() names the root: a spare daemon is built
        before its claim tells it where its subtree is, and must not touch the one its
        settings name meanwhile."""
        if self._root_fds:
            raise RuntimeError("the backend's root is in use already")
        self._placed = False

    def relocate(self, root_name: str) -> None:
        """Take `root_name` as the root, before setup()."""
        if self._root_fds:
            raise RuntimeError("the backend's root is in use already")
        if not _ROOT_NAME.fullmatch(root_name):
            raise ValueError(f"{root_name!r} cannot name a cgroup directory")
        self.root_name, self._placed = root_name, True

    def _check_placed(self) -> None:
        if not self._placed:
            raise CgroupError("the cgroup root is not known yet (a spare daemon before its "
                              "claim)")

    def setup(self) -> None:
        """Create the daemon's root and host leaf in every hierarchy; keep them if they exist."""
        self._check_placed()
        for hierarchy in self._hierarchies:
            self._ensure(hierarchy, ())
            # Processes live in its scopes, not in it: on v2 it hands controllers down to them.
            self._ensure(hierarchy, (HOST_LEAF,), holds_processes=False)
            self._ensure(hierarchy, (HOST_LEAF, SPAWNER_LEAF), holds_processes=True)
            if hierarchy not in self._root_fds:
                self._root_fds[hierarchy] = cgroupfs.open_cgroup(hierarchy, (self.root_name,))
            if hierarchy not in self._host_fds:
                self._host_fds[hierarchy] = self._open_fd(hierarchy, (self.root_name, HOST_LEAF))

    def teardown(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Kill every process below the root, then remove the root and all below it."""
        deadline = time.monotonic() + timeout
        try:
            self._kill((), signal.SIGKILL, deadline)
        except CgroupNotFound:
            return
        finally:
            self.close()  # the fds held on the root go with it
        self._remove((), deadline)

    def close(self) -> None:
        """Let go of the fds held on our roots (teardown() does this too)."""
        while self._root_fds:
            os.close(self._root_fds.popitem()[1])
        while self._host_fds:
            os.close(self._host_fds.popitem()[1])
        self._removals.close()

    def cleanup_stale(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Kill every process below the root and remove every cell and host scope; for a daemon
        (re)start, after setup() and before any workload runs. The root and host leaf stay."""
        deadline = time.monotonic() + timeout
        self._kill((), signal.SIGKILL, deadline)
        for cell in self._top_level_cells():
            self._remove((cell,), deadline)
        for scope in self._scopes():
            self._remove((HOST_LEAF, scope), deadline)

    def existing_cells(self) -> list[str]:
        """Paths ("a", "a/b") of the cells found below the root, parents before children."""
        cells: set[str] = set()
        for hierarchy in self._hierarchies:
            try:
                with self._open(hierarchy, ()) as root_fd:
                    for components, _ in cgroupfs.walk(root_fd):
                        if _is_cell(components):
                            cells.add("/".join(components))
            except CgroupNotFound:
                continue
        return sorted(cells)

    # --- cells ---

    def create(self, cell_path: str, limits: CgroupLimits) -> None:
        """Create the cell's cgroups with `limits` and its process leaf, in every hierarchy.

        The parent cell must exist. On failure nothing created by this call is left behind.
        The kernel may round what it was given (v1 memory to pages): read_limits() tells.
        """
        cell = cell_components(cell_path)
        validate(limits)
        self._check_supported(limits)
        made: list[Hierarchy] = []
        try:
            for hierarchy in self._hierarchies:
                self._make(hierarchy, cell, holds_processes=False, made=made)
            for write in self._limit_files(limits):
                with self._open(write.hierarchy, cell) as fd:
                    self._write_limit(fd, write)
            for hierarchy in self._hierarchies:
                self._make(hierarchy, (*cell, PROCS_LEAF), holds_processes=True, made=None)
        except OSError as e:
            self._undo(made, cell)
            if e.errno != errno.ENOMEM:
                raise
            # A new cgroup is charged to its parent's memory: a memory.max this small (the
            # cell's or an ancestor's) leaves no room even for the cell's own cgroups.
            raise LimitRefused("memory.max", "too small to create the cell's cgroups "
                                             "(here or in an ancestor cell)") from e
        except BaseException:
            self._undo(made, cell)
            raise

    def update(self, cell_path: str, limits: CgroupLimits) -> None:
        """Write the limits set in `limits` to an existing cell; the others stay as they are.

        All or nothing: the kernel checks each file only as it is written (v1 refuses a
        memory limit below usage, a quota above the parent's), so each file's value is read
        before it is written, and when a later write is refused (LimitRefused) the files
        already written get their values back, last first.
        """
        cell = cell_components(cell_path)
        validate(limits)
        self._check_supported(limits)
        written: list[tuple[LimitFile, str]] = []
        try:
            for write in self._limit_files(limits):
                with self._open(write.hierarchy, cell) as fd:
                    try:
                        before = cgroupfs.read_file(fd, write.filename)
                    except FileNotFoundError:
                        raise CgroupNotFound(self._name(cell)) from None
                    self._write_limit(fd, write)
                written.append((write, before))
        except BaseException:
            self._restore(cell, written)
            raise

    def _restore(self, cell: Components, written: list[tuple[LimitFile, str]]) -> None:
        """Put back the values `update` overwrote, in reverse order of writing."""
        for write, before in reversed(written):
            try:
                with self._open(write.hierarchy, cell) as fd:
                    cgroupfs.write_file(fd, write.filename, before)
            except (OSError, CgroupNotFound):
                log.exception("could not restore a limit after a refused update",
                              extra={"cell": self._name(cell), "file": write.filename})

    def remove(self, cell_path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Kill the cell's processes, then remove its cgroups and its child cells'."""
        cell = cell_components(cell_path)
        self._removals.forget(cell_path)
        # Usually the cell is empty by now (its executables were stopped, or the end of its pid
        # namespace took them all), so try removing first: a busy cgroup gets its processes
        # killed then, without a search of every hierarchy for pids in the common case.
        if not self._remove(cell, time.monotonic() + timeout):
            raise CgroupNotFound(self._name(cell))

    def missing(self, cell_path: str) -> list[str]:
        """The cell's cgroup directories (the cell's or its process leaf's) that are gone from the
        host, one per hierarchy where it is: drift, when the daemon still knows the cell."""
        cell = cell_components(cell_path)
        gone = []
        for hierarchy in self._hierarchies:
            if self._exists(hierarchy, (*cell, PROCS_LEAF)):
                continue  # the common case: one stat
            where = (*cell, PROCS_LEAF) if self._exists(hierarchy, cell) else cell
            gone.append(hierarchy.path((self.root_name, *where)))
        return gone

    def missing_cells(self, cell_paths: Iterable[str]) -> dict[str, list[str]]:
        """missing() of each cell, looking at the host only for the cells whose directories
        may have gone since the last look (see auraed.kernel.cgroups.removals): a List of a
        thousand cells then costs no thousands of stats."""
        paths = list(cell_paths)
        unchanged = self._removals.unchanged(paths)
        gone: dict[str, list[str]] = {}
        for path in paths:
            if path in unchanged:
                gone[path] = []
                continue
            cell = cell_components(path)
            watched = self._removals.watch(path, [
                hierarchy.path((self.root_name, *cell)) for hierarchy in self._hierarchies])
            gone[path] = self.missing(path)
            self._removals.looked(path, watched and not gone[path])
        return gone

    def changed_cells(self, cell_paths: Iterable[str]) -> set[str]:
        """Those of `cell_paths` that missing_cells() would look at the host for."""
        paths = list(cell_paths)
        return set(paths) - self._removals.unchanged(paths)

    @property
    def removals_version(self) -> int:
        """Equal values: missing_cells() of the same cells finds what it found last time."""
        return self._removals.version

    def _exists(self, hierarchy: Hierarchy, components: Components) -> bool:
        self._check_placed()
        root_fd = self._root_fds.get(hierarchy)
        try:
            if root_fd is None:
                return os.path.isdir(hierarchy.path((self.root_name, *components)))
            return stat.S_ISDIR(os.stat("/".join(components), dir_fd=root_fd,
                                        follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    # --- host scopes: one cgroup per host-level executable ---

    def create_scope(self, scope: str) -> None:
        """Create the host scope `scope` ("<name>.<n>") in every hierarchy; on failure nothing of
        it is left. CgroupExists if it is there already."""
        self._create_host_cgroup(_scope_components(scope))

    # Spare scopes ("_spare.<n>", which no scope name can be): made ahead of the Starts
    # that take them, so that a Start renames a cgroup in each hierarchy instead of making
    # one (a mkdir, a memory cgroup's above all, costs the kernel several times a rename).
    # cgroup v1 renames a cgroup within its parent; cgroup2 refuses to.
    renames_scopes = False

    def create_spare_scope(self, spare: str) -> None:
        """Like create_scope, for the spare `spare`."""
        self._create_host_cgroup(_spare_components(spare))

    def claim_spare_scope(self, spare: str, scope: str) -> None:
        """Rename the spare `spare` to the host scope `scope` in every hierarchy. On failure
        (OSError, CgroupError) the spare is left as it was, as far as the kernel lets it be."""
        old, new = _spare_components(spare)[-1], _scope_components(scope)[-1]
        renamed = 0
        try:
            for hierarchy in self._hierarchies:
                self._rename_host_cgroup(hierarchy, old, new)
                renamed += 1
        except BaseException:
            for hierarchy in self._hierarchies[:renamed]:
                try:
                    self._rename_host_cgroup(hierarchy, new, old)
                except (OSError, CgroupError) as error:
                    log.warning("could not rename a scope back to its spare",
                                extra={"scope": scope, "error": str(error)})
            raise

    def _rename_host_cgroup(self, hierarchy: Hierarchy, old: str, new: str) -> None:
        host_fd = self._host_fds.get(hierarchy)
        if host_fd is not None:
            # Within one directory the kernel refuses a name that is taken (EEXIST).
            os.rename(old, new, src_dir_fd=host_fd, dst_dir_fd=host_fd)
            return
        with self._open(hierarchy, (HOST_LEAF,)) as fd:
            os.rename(old, new, src_dir_fd=fd, dst_dir_fd=fd)

    def remove_spare_scope(self, spare: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Remove the spare `spare` (no error if it is gone already)."""
        self._remove(_spare_components(spare), time.monotonic() + timeout)

    def remove_spare_scopes(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Remove every spare scope, as a daemon that ended without removing its own left them."""
        deadline = time.monotonic() + timeout
        for name in self._scopes():
            if _SPARE.fullmatch(name):
                self._remove((HOST_LEAF, name), deadline)

    def _create_host_cgroup(self, components: Components) -> None:
        made: list[Hierarchy] = []
        try:
            for hierarchy in self._hierarchies:
                host_fd = self._host_fds.get(hierarchy)
                if host_fd is None:
                    self._make(hierarchy, components, holds_processes=True, made=made)
                else:
                    self._make_in(hierarchy, host_fd, components, holds_processes=True,
                                  made=made)
        except BaseException:
            self._undo(made, components)
            raise

    def signal_scope(self, scope: str, sig: int) -> None:
        """Send `sig` once to every process in the scope (frozen meanwhile, so none escapes by
        forking), wherever in its process tree or session it is."""
        components = _scope_components(scope)
        if not self._pids(components):
            return
        self._freeze(components, time.monotonic() + FREEZE_WAIT)
        try:
            for pid in self._pids(components):
                self._signal(pid, components, sig)
        finally:
            self._thaw(components)

    def scope_pids(self, scope: str) -> set[int]:
        """The processes in the scope; CgroupNotFound if it is gone."""
        return self._pids(_scope_components(scope))

    def remove_scope(self, scope: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Kill what is left in the scope and remove it (no error if it is gone already)."""
        self._remove(_scope_components(scope), time.monotonic() + timeout)

    def _scopes(self) -> set[str]:
        scopes: set[str] = set()
        for hierarchy in self._hierarchies:
            try:
                with self._open(hierarchy, (HOST_LEAF,)) as fd:
                    scopes.update(name for name in cgroupfs.subdirs(fd) if name != SPAWNER_LEAF)
            except CgroupNotFound:
                continue
        return scopes

    # --- where a new process goes ---

    def join_files(self, cell_path: str | None, scope: str | None = None) -> list[str]:
        """The files a new process writes "0" to, in this order, to join the cell's leaf (None:
        the host leaf, or the host scope `scope`) in every hierarchy, before it execs.

        cpuset comes first: it is the one a join can fail on (ENOSPC on an empty v1 cpuset),
        before anything moved. Which file is the backend's choice (see JOIN_FILE).
        """
        leaf = self._leaf(cell_path, scope)
        return [h.path((self.root_name, *leaf, self.JOIN_FILE)) for h in self._hierarchies]

    def birth_cgroup(self, cell_path: str | None, scope: str | None = None) -> str | None:
        """The cgroup2 directory of the cell's leaf (None: the host leaf or scope) that a new
        process can be born in (clone3 with CLONE_INTO_CGROUP) instead of joining through
        join_files(); None where the host has no such hierarchy for us (v1)."""
        return None

    def _leaf(self, cell_path: str | None, scope: str | None) -> Components:
        if cell_path is not None:
            return (*cell_components(cell_path), PROCS_LEAF)
        return _scope_components(scope) if scope is not None else (HOST_LEAF, SPAWNER_LEAF)

    def move_processes(self, from_cell: str, to_cell: str,
                       timeout: float = DEFAULT_TIMEOUT) -> None:
        """Move every process of `from_cell`'s own leaf into `to_cell`'s, in every hierarchy
        (each v1 hierarchy holds its own membership; v2 has one), until none is left there.
        Child cells are not moved: their cgroups stay where they are.

        A process ending meanwhile is no error; CgroupBusy if processes keep appearing
        (forking faster than they are moved) past `timeout` seconds.
        """
        source = (*cell_components(from_cell), PROCS_LEAF)
        target = (*cell_components(to_cell), PROCS_LEAF)
        deadline = time.monotonic() + timeout
        # cpuset first, as for a join (see join_files): the move a full cpuset refuses comes
        # before any other.
        for hierarchy in self._hierarchies:
            with self._open(hierarchy, source) as from_fd, \
                    self._open(hierarchy, target) as to_fd:
                while pids := cgroupfs.read_pids(from_fd):
                    if time.monotonic() > deadline:
                        raise CgroupBusy(self._name(source), pids)
                    for pid in sorted(pids):
                        try:
                            # cgroup.procs: the whole thread group at once.
                            cgroupfs.write_file(to_fd, "cgroup.procs", str(pid))
                        except ProcessLookupError:
                            pass  # ended meanwhile

    def pids(self, cell_path: str, recursive: bool = True) -> set[int]:
        """Processes in the cell; with recursive=False, those of its child cells are left out."""
        return self._pids(cell_components(cell_path), recursive)

    def kill(
        self, cell_path: str, sig: int = signal.SIGKILL, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        """Signal every process in the cell and its child cells, and wait until none is left.

        Raises CgroupBusy if processes remain after `timeout` seconds (e.g. they ignore `sig`).
        """
        self._kill(cell_components(cell_path), sig, time.monotonic() + timeout)

    @abstractmethod
    def is_populated(self, cell_path: str) -> bool:
        """Whether any process is in the cell or its child cells."""

    @abstractmethod
    def read_limits(self, cell_path: str) -> CgroupLimits:
        """The cell's limits as the kernel holds them, in v2 terms; None where unlimited."""

    @abstractmethod
    def usage(self, cell_path: str) -> CgroupUsage:
        """CPU time and memory the cell (with its child cells) uses."""

    def oom_kills(self, cell_path: str) -> int | None:
        """How many of the cell's processes the OOM killer killed; None if not accounted."""
        return self._oom_kills(cell_components(cell_path))

    def scope_oom_kills(self, scope: str) -> int | None:
        """How many processes of the host scope the OOM killer killed; None if not accounted."""
        return self._oom_kills(_scope_components(scope))

    @abstractmethod
    def _oom_kills(self, components: Components) -> int | None:
        """The OOM kill counter of the cgroup at `components` (with all below it)."""

    @abstractmethod
    def metrics(self, cell_path: str) -> CgroupMetrics:
        """What the cell (with its child cells) has used and uses now, from its cgroup files."""

    # --- what each cgroup version does its own way ---

    @abstractmethod
    def _check_supported(self, limits: CgroupLimits) -> None:
        """Raise UnsupportedLimit for a limit this host cannot enforce."""

    @abstractmethod
    def _limit_files(self, limits: CgroupLimits) -> list[LimitFile]:
        """The writes that apply `limits` to a new cell, in order."""

    @abstractmethod
    def _init_cgroup(
        self, hierarchy: Hierarchy, fd: int, parent_fd: int, *, holds_processes: bool
    ) -> None:
        """Make a new (or found) cgroup usable before limits or processes go in."""

    @abstractmethod
    def _freeze(self, components: Components, deadline: float) -> None:
        """Freeze every process below `components`, waiting (briefly) until they are."""

    @abstractmethod
    def _thaw(self, components: Components) -> None: ...

    # --- shared machinery ---

    def _kill(self, components: Components, sig: int, deadline: float) -> None:
        """Freeze, signal whoever is inside, thaw; repeat until empty or past the deadline.

        Frozen processes can neither fork nor exit, so the list read while frozen is complete
        and its pids cannot be reused before the signal lands.
        """
        signalled = self._kill_at_once(components) if sig == signal.SIGKILL else set()
        backoff = Backoff()
        while pids := self._pids(components):
            if pids - signalled:
                self._freeze(components, min(deadline, time.monotonic() + FREEZE_WAIT))
                try:
                    for pid in self._pids(components) - signalled:
                        self._signal(pid, components, sig)
                        signalled.add(pid)
                finally:
                    self._thaw(components)
            if time.monotonic() >= deadline:
                raise CgroupBusy(self._name(components), pids)
            backoff.sleep()

    def _kill_at_once(self, components: Components) -> set[int]:
        """SIGKILL everything below `components` in one kernel operation, if the host has one;
        returns the pids it reached (none without one)."""
        return set()

    def _signal(self, pid: int, components: Components, sig: int) -> None:
        """Signal `pid` only if, held by a pidfd, it is still inside `components`."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            if self._holds(pid, components):
                signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)

    def _holds(self, pid: int, components: Components) -> bool:
        """Whether /proc/<pid>/cgroup places pid below `components` in one of our hierarchies."""
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return False
        ours = {h.controllers for h in self._hierarchies}
        wanted = "/" + "/".join((self.root_name, *components))
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if frozenset(filter(None, controllers.split(","))) in ours and (
                path == wanted or path.startswith(wanted + "/")
            ):
                return True
        return False

    def _pids(self, components: Components, recursive: bool = True) -> set[int]:
        """Union over all hierarchies: a process that died while joining may be in only some."""
        target = components if recursive else (*components, PROCS_LEAF)
        pids: set[int] = set()
        found = False
        for hierarchy in self._hierarchies:
            try:
                with self._open(hierarchy, target) as fd:
                    found = True
                    for _, cgroup_fd in cgroupfs.walk(fd):
                        pids |= cgroupfs.read_pids(cgroup_fd)
            except CgroupNotFound:
                continue
        if not found:
            raise CgroupNotFound(self._name(components))
        return pids

    def _ensure(
        self, hierarchy: Hierarchy, components: Components, *, holds_processes: bool = False
    ) -> None:
        """Create the cgroup if missing; (re)initialise it either way."""
        full = (self.root_name, *components)
        with self._open_parent(hierarchy, full) as parent_fd:
            cgroupfs.make_cgroup(parent_fd, full[-1], hierarchy.path(full))
            self._init_child(hierarchy, parent_fd, full, holds_processes)

    def _make(
        self,
        hierarchy: Hierarchy,
        components: Components,
        *,
        holds_processes: bool,
        made: list[Hierarchy] | None,
    ) -> None:
        """Create a new cgroup below an existing parent; record it in `made` for rollback
        (None when removing its parent rolls it back too).

        CgroupNotFound if the parent is missing, CgroupExists if the cgroup is there already.
        """
        with self._open(hierarchy, components[:-1]) as parent_fd:
            self._make_in(hierarchy, parent_fd, components, holds_processes=holds_processes,
                          made=made)

    def _make_in(self, hierarchy: Hierarchy, parent_fd: int, components: Components, *,
                 holds_processes: bool, made: list[Hierarchy] | None) -> None:
        """_make, with the parent open at `parent_fd`."""
        full = (self.root_name, *components)
        if not cgroupfs.make_cgroup(parent_fd, full[-1], hierarchy.path(full)):
            raise CgroupExists(self._name(components))
        if made is not None:
            made.append(hierarchy)
        if self._needs_init(hierarchy, holds_processes=holds_processes):
            self._init_child(hierarchy, parent_fd, full, holds_processes)

    def _needs_init(self, hierarchy: Hierarchy, *, holds_processes: bool) -> bool:
        """Whether a new cgroup there may need _init_cgroup; False spares opening it."""
        return True

    def _init_child(
        self, hierarchy: Hierarchy, parent_fd: int, full: Components, holds_processes: bool
    ) -> None:
        fd = cgroupfs.open_child(parent_fd, full[-1], hierarchy.path(full))
        try:
            self._init_cgroup(hierarchy, fd, parent_fd, holds_processes=holds_processes)
        finally:
            os.close(fd)

    def _undo(self, made: list[Hierarchy], cell: Components) -> None:
        """Best-effort removal of the cell's cgroups created by a failed create()."""
        full = (self.root_name, *cell)
        for hierarchy in reversed(made):
            try:
                with self._open_parent(hierarchy, full) as parent_fd:
                    cgroupfs.remove_cgroup_tree(parent_fd, full[-1], hierarchy.path(full))
            except (OSError, CgroupError) as e:
                log.warning("could not roll back %s: %s", hierarchy.path(full), e)

    def _remove(self, components: Components, deadline: float) -> bool:
        """rmdir the cgroup and all below it in every hierarchy where it exists; False if it
        existed in none."""
        full = (self.root_name, *components)
        found = False
        for hierarchy in self._hierarchies:
            backoff = Backoff()
            while True:
                try:
                    with self._open_parent(hierarchy, full) as parent_fd:
                        cgroupfs.remove_cgroup_tree(
                            parent_fd, full[-1], hierarchy.path(full),
                            usual_children=(PROCS_LEAF,) if _is_cell(components) else (),
                        )
                    found = True
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    if time.monotonic() >= deadline:
                        raise CgroupBusy(self._name(components), self._pids(components)) from e
                    # Processes are left (or joined since: a racing spawn), or the kernel lags a
                    # moment behind the last exit.
                    self._kill(components, signal.SIGKILL, deadline)
                    backoff.sleep()
        return found

    def _top_level_cells(self) -> set[str]:
        cells: set[str] = set()
        for hierarchy in self._hierarchies:
            with self._open(hierarchy, ()) as root_fd:
                cells.update(name for name in cgroupfs.subdirs(root_fd) if name != HOST_LEAF)
        return cells

    def _write_limit(self, fd: int, write: LimitFile) -> None:
        try:
            cgroupfs.write_file(fd, write.filename, write.value)
        except OSError as e:
            # e.g. v1: EINVAL for a quota above the parent's, EBUSY for memory.max below usage.
            reason = f"{write.filename} = {write.value!r}: {e.strerror}"
            raise LimitRefused(write.field, reason) from e

    def _open_fd(self, hierarchy: Hierarchy, full: Components) -> int:
        """An fd on the cgroup at `full` (root name included); may raise FileNotFoundError."""
        self._check_placed()
        root_fd = self._root_fds.get(hierarchy)
        if root_fd is None or not full:
            return cgroupfs.open_cgroup(hierarchy, full)
        return cgroupfs.open_below(root_fd, full[1:], hierarchy.path(full[:1]))

    @contextmanager
    def _open(self, hierarchy: Hierarchy, components: Components) -> Iterator[int]:
        """An fd on one of our cgroups; CgroupNotFound if it does not exist."""
        try:
            fd = self._open_fd(hierarchy, (self.root_name, *components))
        except FileNotFoundError:
            raise CgroupNotFound(self._name(components)) from None
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def _open_parent(self, hierarchy: Hierarchy, full: Components) -> Iterator[int]:
        """An fd on the parent of the cgroup at `full` (root name included); may raise
        FileNotFoundError."""
        fd = self._open_fd(hierarchy, full[:-1])
        try:
            yield fd
        finally:
            os.close(fd)

    def _read(self, hierarchy: Hierarchy, components: Components, filename: str) -> str:
        with self._open(hierarchy, components) as fd:
            return cgroupfs.read_file(fd, filename)

    def _name(self, components: Components) -> str:
        return "/".join(components) if components else f"(the root {self.root_name!r})"


def _spare_components(spare: str) -> Components:
    if not _SPARE.fullmatch(spare):
        raise ValueError(f"{spare!r} is not a spare scope name like _spare.3")
    return (HOST_LEAF, spare)


def _scope_components(scope: str) -> Components:
    if not _SCOPE.fullmatch(scope):
        raise ValueError(f"{scope!r} is not a host scope name like web.12")
    return (HOST_LEAF, scope)


def _is_cell(components: Components) -> bool:
    """Whether a cgroup below the root is a cell (not the root, a leaf, or inside a leaf)."""
    return bool(components) and components[0] != HOST_LEAF and PROCS_LEAF not in components
