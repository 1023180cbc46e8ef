"""Host scopes made ahead of the host-level Starts that take them.

Every host-level executable runs in a cgroup of its own (a scope, see auraed.kernel.cgroups).
Making one is a mkdir in each v1 hierarchy, a memory cgroup's above all: 0.4-0.6 ms of a
host-level Start of about 6 ms (measured with timestamps on the test machines, loaded);
renaming a made one in each hierarchy took 0.15-0.2 ms. So a thread keeps a few spares made, and a Start renames one to its scope's name.
The scope is the same as one made for it: empty, nothing ever accounted in it, in the same
place with the same name. Where the kernel cannot rename cgroups (cgroup2) no spare is kept
and every scope is made at its Start, as before.

The thread makes its spares while no Start holds it (hold()): a Start that the mkdirs competed
with for the CPU and the interpreter would only have paid for them in another way. And only
from the first host-level Start on: a daemon that runs none (an instance's, say, whose work
is in cells) keeps no spare, and a daemon's start-up is not slowed by making them.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable

from auraed.kernel.cgroups import CgroupBackend, CgroupError

log = logging.getLogger(__name__)

SPARES = 2


class SpareScopes:
    def __init__(self, backend: CgroupBackend, *, spares: int = SPARES) -> None:
        self._backend = backend
        self._spares = spares
        self._ready: list[str] = []
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._holds = 0
        self._wanted = False  # from the first claim on
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Be ready to keep spares (from the first claim on), after the backend's setup and
        after any spares an earlier daemon left were removed (backend.remove_spare_scopes)."""
        if self._spares <= 0 or not self._backend.renames_scopes or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._keep, name="spare-scopes", daemon=True)
        self._thread.start()

    def claim(self, scope: str) -> bool:
        """Make a spare the scope `scope`; False if none was ready (then make it as usual)."""
        with self._lock:
            self._wanted = True
            if not self._holds:  # else the hold's release wakes the thread; now it would find it held
                self._changed.notify()
            if not self._ready:
                return False
            spare = self._ready.pop()
        try:
            self._backend.claim_spare_scope(spare, scope)
        except (CgroupError, OSError) as error:
            log.warning("could not rename a spare scope; making the scope instead",
                        extra={"scope": scope, "error": str(error)})
            self._remove(spare)
            return False
        return True

    def hold(self) -> Callable[[], None]:
        """Make no spare until the returned release is called (once): while a Start is on
        its way."""
        with self._lock:
            self._holds += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                self._holds -= 1
                if not self._holds:
                    self._changed.notify()

        return release

    def close(self) -> None:
        """Stop making spares and remove those made."""
        with self._lock:
            self._closed = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            left, self._ready = self._ready, []
        for spare in left:
            self._remove(spare)

    def _keep(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (not self._wanted or self._holds
                                            or len(self._ready) >= self._spares):
                    self._changed.wait()
                if self._closed:
                    return
            spare = f"_spare.{next(self._numbers)}"
            try:
                self._backend.create_spare_scope(spare)
            except (CgroupError, OSError) as error:
                # Starts make their scopes themselves, as they would without spares.
                log.warning("could not make a spare scope; making none any more",
                            extra={"error": str(error)})
                return
            with self._lock:
                if not self._closed:
                    self._ready.append(spare)
                    continue
            self._remove(spare)
            return

    def _remove(self, spare: str) -> None:
        try:
            self._backend.remove_spare_scope(spare)
        except (CgroupError, OSError):
            log.exception("could not remove a spare scope", extra={"scope": spare})
