"""Typed use of the SDK; mypy must accept all of it (see test_typing.py)."""

from __future__ import annotations

import aurae_sdk
from aurae_sdk import cells, observe
from aurae_sdk.client import AsyncClient, Client


def sync_usage(client: Client) -> int:
    allocated: cells.CellServiceAllocateResponse = client.cells.allocate(
        cell=cells.Cell(name="web", cpu=cells.CpuController(weight=200, max=50_000))
    )
    started = client.cells.start(
        cell_name=allocated.cell_name,
        executable={"name": "app", "command": "sleep 1"},
        uid=0,
        timeout=5.0,
        metadata=[("x-trace", "1")],
    )
    pid: int = started.pid
    for response in client.observe.get_sub_process_stream(
        process_id=pid, channel_type=observe.LOG_CHANNEL_TYPE_STDOUT
    ):
        text: str = response.item.line
        print(text)
    with client.observe.get_aurae_daemon_log_stream() as stream:
        for entry in stream:
            print(entry.item.line)
            stream.cancel()
    client.cells.stop(cells.CellServiceStopRequest(cell_name="web", executable_name="app"))
    tree = client.cells.list()
    names = [node.cell.name for node in tree.cells]
    healthy: bool = client.discovery.discover().healthy
    print(names, healthy, aurae_sdk.compact(tree))
    return pid


async def async_usage(client: AsyncClient) -> str:
    response = await client.discovery.discover()
    version: str = response.version
    async for line in client.observe.get_sub_process_stream(process_id=1, channel_type="LOG_CHANNEL_TYPE_STDERR"):
        print(line.item.line)
    await client.cells.free(cell_name="web")
    return version


def errors(client: Client) -> str | None:
    try:
        client.cells.free(cell_name="missing")
    except aurae_sdk.NotFound as error:
        return error.field
    return None
