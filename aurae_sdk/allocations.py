"""What a script allocated on a node, so it can be freed when the script fails.

    with aurae_sdk.cleanup(client):
        client.cells.allocate(cell={"name": "job"})
        client.cells.start(cell_name="job", executable={"name": "run", "command": "make"})
        ...   # an exception or Ctrl-C here frees cell "job" (and stops what ran in it)

`Allocations` watches the successful calls of the clients it is attached to: Allocate and
host-level Start add, Free and Stop remove. Freeing works from the newest allocation back, so
nested cells go before their parents and a cell takes its executables with it. `aurae-py
--cleanup SCRIPT` attaches one to the script's clients; without --cleanup, a failing script
prints what it left on the node instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aurae_sdk.errors import AuraeError, NotFound

if TYPE_CHECKING:
    from aurae_sdk.client import AsyncClient, Client

_CELLS = "/aurae.cells.v0.CellService/"


@dataclass
class Allocations:
    """Cells and host-level executables allocated through the attached clients, oldest first."""

    cells: list[str] = field(default_factory=list)
    # Host-level executables (in a cell, an executable goes with its cell).
    executables: list[str] = field(default_factory=list)

    def attach(self, client: Client | AsyncClient) -> None:
        """Record what calls through `client` allocate and free from now on."""
        client._transport.observers.append(self.observe)

    def detach(self, client: Client | AsyncClient) -> None:
        observers = client._transport.observers
        if self.observe in observers:
            observers.remove(self.observe)

    def observe(self, path: str, request: Any, response: Any) -> None:
        """Called by the transport after each successful unary call."""
        if not path.startswith(_CELLS):
            return
        method = path.removeprefix(_CELLS)
        if method == "Allocate":
            self.cells.append(request.cell.name)
        elif method == "Free":
            freed = request.cell_name
            self.cells = [c for c in self.cells if c != freed and not c.startswith(freed + "/")]
        elif method in ("Start", "Stop") and not request.cell_name:
            name = request.executable.name if method == "Start" else request.executable_name
            if method == "Start":
                self.executables.append(name)
            elif name in self.executables:
                self.executables.remove(name)

    def __bool__(self) -> bool:
        return bool(self.cells or self.executables)

    def describe(self) -> str:
        """What is allocated, as a person reads it: "cells a, a/b; host executables x"."""
        parts = []
        if self.cells:
            parts.append("cells " + ", ".join(self.cells))
        if self.executables:
            parts.append("host executables " + ", ".join(self.executables))
        return "; ".join(parts) or "nothing"

    def free(self, client: Client) -> list[str]:
        """Stop and free everything recorded, newest first; returns the errors (empty if none).

        Something already gone is not an error. The record is emptied either way, so a second
        call does nothing.
        """
        errors: list[str] = []
        # Taken first: the Stop and Free calls below are observed too.
        cells, executables = list(self.cells), list(self.executables)
        self.cells.clear()
        self.executables.clear()
        for name in reversed(executables):
            try:
                client.cells.stop(executable_name=name)
            except NotFound:
                pass
            except AuraeError as error:
                errors.append(f"stop {name}: {error}")
        freed: list[str] = []
        for cell in reversed(cells):
            if any(cell.startswith(parent + "/") for parent in freed):
                continue
            try:
                client.cells.free(cell_name=cell)
            except NotFound:
                pass
            except AuraeError as error:
                errors.append(f"free {cell}: {error}")
            freed.append(cell)
        return errors


@contextmanager
def cleanup(client: Client, *, always: bool = False) -> Iterator[Allocations]:
    """Free what calls through `client` allocate in the block if it raises (Ctrl-C included);
    with `always`, free it when the block ends normally too."""
    allocations = Allocations()
    allocations.attach(client)
    try:
        yield allocations
    except BaseException:
        allocations.detach(client)
        allocations.free(client)
        raise
    allocations.detach(client)
    if always:
        allocations.free(client)


__all__ = ["Allocations", "cleanup"]
