"""Wrongly typed calls; mypy must reject each line marked `# E:`."""

from __future__ import annotations

from aurae_sdk import cells
from aurae_sdk.client import AsyncClient, Client


def wrong(client: Client, aclient: AsyncClient) -> None:
    client.cells.allocate(cell=42)  # E: arg-type
    client.cells.free(cell_name=7)  # E: arg-type
    client.cells.start(cell_nam="x")  # E: call-arg
    client.cells.start(cells.CellServiceFreeRequest())  # E: arg-type
    pid: str = client.cells.start(cell_name="x").pid  # noqa: F841  # E: assignment
    client.cells.list(timeout="soon")  # E: arg-type
    version: str = aclient.discovery.discover().version  # noqa: F841  # E: attr-defined
