"""Which cells' cgroup directories may have been removed behind the daemon's back, known
without a stat of every directory at every List.

cgroupfs (kernfs) tells an inotify watch on a directory when a directory in it is removed
(IN_DELETE with its name), though it never tells the removed directory's own watch (no
IN_DELETE_SELF, no IN_IGNORED: measured on 6.18, v1 and v2 alike). A cgroup with children cannot
be removed, so a cell's directory cannot go before its process leaf `_procs` does, nor a parent
cell's before its children's: a watch on each cell directory, in each hierarchy, hears of every
removal that touches the cell — its leaf going, or a child cell's directory (whose own watch
heard its leaf go first).

A cell is *unchanged* once it has a watch in every hierarchy and a look at the host found all
of its directories; an event on it (or a full queue, IN_Q_OVERFLOW) makes it changed again, and
the next look reads the host. A cell that cannot be watched (the host's inotify limits reached)
simply stays changed: it is looked at every time, as without this.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Iterable

from inotify_simple import INotify
from inotify_simple import flags as inotify_flags

log = logging.getLogger("auraed.cgroups")

_WATCHED = inotify_flags.DELETE | inotify_flags.ONLYDIR | inotify_flags.DONT_FOLLOW


class RemovalWatch:
    """inotify watches on the cells' directories; see the module docstring."""

    def __init__(self, leaf: str) -> None:
        """leaf: the name of a cell's process leaf (its own removal changes the cell)."""
        self._leaf = leaf
        self._lock = threading.Lock()
        self._inotify: INotify | None = None
        self._refused = False  # inotify itself is unavailable: every cell stays changed
        self._cell_of: dict[int, str] = {}  # watch descriptor -> cell path
        self._watches: dict[str, set[int]] = {}
        self._unchanged: set[str] = set()
        # A new value whenever what a look would find may differ from the last look's.
        self._version = 0

    @property
    def version(self) -> int:
        """Changes with every removal heard, and with every look that left a cell changed
        (a directory missing, or no watch): equal values mean equal looks."""
        with self._lock:
            self._drain()
            return self._version

    def unchanged(self, cell_paths: Iterable[str]) -> set[str]:
        """Those of `cell_paths` known to have all their directories still; the others must
        be looked at (then `looked` says what was found)."""
        with self._lock:
            self._drain()
            return self._unchanged.intersection(cell_paths)

    def watch(self, cell_path: str, directories: list[str]) -> bool:
        """Watch a cell's directories (one per hierarchy), before the host is looked at, so a
        removal after the look is heard. False if any could not be watched."""
        with self._lock:
            inotify = self._open()
            if inotify is None:
                return False
            watched = self._watches.setdefault(cell_path, set())
            whole = True
            for directory in directories:
                try:
                    # The same directory gives the same descriptor again: adding is idempotent.
                    descriptor = inotify.add_watch(directory, _WATCHED)
                except OSError as error:
                    if error.errno == errno.ENOSPC:
                        log.warning("inotify watch limit reached: List looks at this cell's "
                                    "cgroups every time", extra={"cell": cell_path})
                    whole = False
                    continue
                watched.add(descriptor)
                self._cell_of[descriptor] = cell_path
            return whole

    def looked(self, cell_path: str, whole: bool) -> None:
        """A look (after `watch`) found every directory of the cell and `watch` succeeded
        (whole), or not: then the next look must look again."""
        with self._lock:
            if whole and cell_path in self._watches:
                self._unchanged.add(cell_path)
            else:
                self._version += 1

    def forget(self, cell_path: str) -> None:
        """The cell and the cells below it are removed: drop their watches."""
        prefix = cell_path + "/"
        with self._lock:
            for path in [p for p in self._watches if p == cell_path or p.startswith(prefix)]:
                self._unchanged.discard(path)
                for descriptor in self._watches.pop(path):
                    self._cell_of.pop(descriptor, None)
                    if self._inotify is not None:
                        try:
                            self._inotify.rm_watch(descriptor)
                        except OSError:
                            pass  # the kernel let go of it already

    def close(self) -> None:
        with self._lock:
            if self._inotify is not None:
                self._inotify.close()
            self._inotify = None
            self._version += 1
            self._cell_of.clear()
            self._watches.clear()
            self._unchanged.clear()

    def _open(self) -> INotify | None:
        if self._inotify is None and not self._refused:
            try:
                self._inotify = INotify(nonblocking=True)
            except OSError as error:
                self._refused = True
                log.warning("no inotify: List looks at every cell's cgroups every time",
                            extra={"error": str(error)})
        return self._inotify

    def _drain(self) -> None:
        """Apply the events queued since the last look (call under _lock)."""
        if self._inotify is None:
            return
        for event in self._inotify.read(timeout=0):
            self._version += 1
            if event.mask & inotify_flags.Q_OVERFLOW:
                self._unchanged.clear()  # events were lost: look at everything once
                continue
            cell = self._cell_of.get(event.wd)
            if cell is None:
                continue  # a watch forgotten meanwhile
            if event.mask & inotify_flags.IGNORED:  # the kernel dropped it (an unmount, say)
                self._cell_of.pop(event.wd, None)
                self._watches.get(cell, set()).discard(event.wd)
                self._unchanged.discard(cell)
            elif event.mask & inotify_flags.DELETE:
                self._unchanged.discard(cell if event.name == self._leaf
                                        else f"{cell}/{event.name}")
