"""Concurrent operations on overlapping cells against a real auraed: whatever the interleaving,
the host's cgroupfs and the daemon's List agree after every step, and nothing is left behind.

Two tests: the race the trust run found (Free of a parent and of its child at once left cgroup
directories in about a quarter of rounds, and the name could not be allocated again), and a
hypothesis state machine that runs batches of Allocate/Start/Stop/Free/List on a small pool of
nested names from several threads at once and compares the host with List after each batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import aurae_sdk
from tests.support.daemon import DaemonProcess, cgroup_dirs, running_daemon

from .conftest import needs_root, record_figure

RACE_ROUNDS = 40
# Names that overlap: parents, children, grandchildren, and a sibling tree.
NAMES = ("p", "p/c", "p/c/g", "p/d", "q")
EXECUTABLES = ("e1", "e2")
LEAVES = frozenset({"_procs", "_host"})
# Refusals a racing operation may meet; anything else (INTERNAL, UNKNOWN) is a bug.
EXPECTED = (aurae_sdk.NotFound, aurae_sdk.AlreadyExists, aurae_sdk.FailedPrecondition)
STEPS = {"steps": 0, "operations": 0}


@pytest.fixture
def racing_daemon() -> Iterator[DaemonProcess]:
    needs_root()
    with running_daemon(grace_period=0.5) as started:
        yield started


def host_cells(daemon: DaemonProcess) -> dict[Path, set[str]]:
    """Per hierarchy, the cell paths ("p", "p/c") whose cgroup directories exist."""
    found: dict[Path, set[str]] = {}
    for top in cgroup_dirs(daemon.cgroup_root):
        cells = set()
        for directory in top.rglob("*"):
            if not directory.is_dir():
                continue
            parts = directory.relative_to(top).parts
            if not LEAVES & set(parts):
                cells.add("/".join(parts))
        found[top] = cells
    return found


def listed_cells(client: aurae_sdk.Client) -> set[str]:
    names: set[str] = set()

    def visit(nodes: object) -> None:
        for node in nodes:  # type: ignore[attr-defined]
            names.add(node.cell.name)
            visit(node.children)

    visit(client.cells.list().cells)
    return names


def run_at_once(operations: list[Callable[[], object]]) -> list[BaseException | None]:
    """Run the operations in threads released together; each one's error (or None)."""
    barrier = threading.Barrier(len(operations))
    outcomes: list[BaseException | None] = [None] * len(operations)

    def run(index: int, operation: Callable[[], object]) -> None:
        barrier.wait()
        try:
            operation()
        except BaseException as error:  # noqa: BLE001 - judged by the caller
            outcomes[index] = error

    threads = [threading.Thread(target=run, args=item) for item in enumerate(operations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_parent_and_child_freed_at_once_leave_nothing(racing_daemon: DaemonProcess) -> None:
    leaked = []
    with racing_daemon.client(timeout=60) as client:
        for round_number in range(RACE_ROUNDS):
            # A fresh name each round: a leaked one could not be allocated again.
            parent = f"race{round_number}"
            client.cells.allocate(cell={"name": parent})
            client.cells.allocate(cell={"name": f"{parent}/child"})
            client.cells.start(cell_name=f"{parent}/child",
                               executable={"name": "s", "command": "sleep 60"})
            outcomes = run_at_once([partial(client.cells.free, cell_name=parent),
                                    partial(client.cells.free, cell_name=f"{parent}/child")])
            assert outcomes[0] is None, outcomes[0]  # the parent's Free always succeeds
            # The child's either freed it, or found it gone or going with its parent.
            assert outcomes[1] is None or isinstance(outcomes[1], EXPECTED), outcomes[1]
            if any(parent in cells for cells in host_cells(racing_daemon).values()):
                leaked.append(parent)
            assert parent not in listed_cells(client)
        record_figure("parent+child Free race", f"{RACE_ROUNDS} rounds, {len(leaked)} leaked")
        # Each name is usable again.
        for parent in leaked:
            client.cells.allocate(cell={"name": parent})
            client.cells.free(cell_name=parent)
    assert leaked == []


class OverlappingCells(RuleBasedStateMachine):
    """Each step: a batch of 2-4 operations on overlapping names, run at once from threads."""

    daemon: DaemonProcess
    client: aurae_sdk.Client

    def __init__(self) -> None:
        super().__init__()
        self.client.cells.list()  # the daemon is up

    def operation(self, kind: str, name: str, executable: str) -> Callable[[], object]:
        cells = self.client.cells
        return {
            "allocate": lambda: cells.allocate(cell={"name": name}),
            "free": lambda: cells.free(cell_name=name),
            "start": lambda: cells.start(cell_name=name,
                                         executable={"name": executable, "command": "sleep 30"}),
            "stop": lambda: cells.stop(cell_name=name, executable_name=executable,
                                       grace_period_ms=0),
            "list": lambda: cells.list(),
        }[kind]

    @rule(batch=st.lists(st.tuples(st.sampled_from(("allocate", "free", "start", "stop", "list")),
                                   st.sampled_from(NAMES), st.sampled_from(EXECUTABLES)),
                         min_size=2, max_size=4))
    def concurrently(self, batch: list[tuple[str, str, str]]) -> None:
        outcomes = run_at_once([self.operation(*item) for item in batch])
        for item, outcome in zip(batch, outcomes, strict=True):
            assert outcome is None or isinstance(outcome, EXPECTED), (item, outcome)
        STEPS["steps"] += 1
        STEPS["operations"] += len(batch)

    @invariant()
    def host_matches_list(self) -> None:
        listed = listed_cells(self.client)
        for top, cells in host_cells(self.daemon).items():
            assert cells == listed, f"{top}: host {sorted(cells)} vs List {sorted(listed)}"
        # Every running executable List shows is in its cell's cgroup on the host.
        for node in self.client.cells.list().cells:
            self._check_processes(node)

    def _check_processes(self, node: object) -> None:
        for executable in node.executables:  # type: ignore[attr-defined]
            if executable.state == 1:  # running
                cgroup = Path(f"/proc/{executable.host_pid}/cgroup")
                text = cgroup.read_text() if cgroup.exists() else ""
                assert not text or f"/{self.daemon.cgroup_root}/{executable.cell_name}/" in text
        for child in node.children:  # type: ignore[attr-defined]
            self._check_processes(child)

    def teardown(self) -> None:
        for name in ("p", "q"):
            try:
                self.client.cells.free(cell_name=name)
            except aurae_sdk.NotFound:
                pass
        assert listed_cells(self.client) == set()
        assert all(not cells for cells in host_cells(self.daemon).values())


def test_overlapping_operations_keep_host_and_list_consistent(racing_daemon: DaemonProcess) -> None:
    started = time.monotonic()
    with racing_daemon.client(timeout=60) as client:
        OverlappingCells.daemon = racing_daemon
        OverlappingCells.client = client
        test_case = OverlappingCells.TestCase
        test_case.settings = settings(
            max_examples=30, stateful_step_count=15, deadline=None, derandomize=True,
            database=None, suppress_health_check=list(HealthCheck),
        )
        test_case().runTest()
    record_figure("overlapping-cells state machine",
                  f"{STEPS['steps']} steps, {STEPS['operations']} concurrent operations "
                  f"in {time.monotonic() - started:.0f} s")
