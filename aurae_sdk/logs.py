"""Log streams as iterators of lines.

    for item in aurae_sdk.follow(client, started.pid):
        print(item.channel, item.line)

ObserveService can pack many lines into one response (`max_batch_lines`, an
aurae-py addition), which is far cheaper than one response per line for chatty
processes. These helpers ask for batches and hand out one `LogItem` at a time,
so callers get batching's throughput with a plain line iterator. Leaving the
loop early (break, an exception, Ctrl-C) cancels the call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Literal

from aurae_sdk.generated import observe
from aurae_sdk.rpc import AsyncStream, Stream

if TYPE_CHECKING:
    from aurae_sdk.client import AsyncClient, Client

Channel = Literal["both", "stdout", "stderr"]

DEFAULT_BATCH = 256

_CHANNEL_TYPES = {
    # The protos spell "both" as "unspecified".
    "both": observe.LOG_CHANNEL_TYPE_UNSPECIFIED,
    "stdout": observe.LOG_CHANNEL_TYPE_STDOUT,
    "stderr": observe.LOG_CHANNEL_TYPE_STDERR,
}


def follow(
    client: Client,
    process_id: int,
    channel: Channel = "both",
    *,
    batch: int = DEFAULT_BATCH,
    timeout: float | None = None,
) -> Iterator[observe.LogItem]:
    """The output of a process started through CellService, one line at a time.

    Lines written before the call come first, then new ones as they are
    written; the iterator ends once the process has exited and all its output
    is read. `batch` is how many lines the daemon may pack into one response
    (0: one line per response, as public Aurae daemons send).
    """
    request = _sub_process_request(process_id, channel, batch)
    return _flatten(client.observe.get_sub_process_stream(request, timeout=timeout))


def afollow(
    aclient: AsyncClient,
    process_id: int,
    channel: Channel = "both",
    *,
    batch: int = DEFAULT_BATCH,
    timeout: float | None = None,
) -> AsyncIterator[observe.LogItem]:
    """`follow` for the asyncio client: `async for item in afollow(aclient, pid)`."""
    request = _sub_process_request(process_id, channel, batch)
    return _aflatten(aclient.observe.get_sub_process_stream(request, timeout=timeout))


def daemon_log(client: Client, *, timeout: float | None = None) -> Iterator[observe.LogItem]:
    """The daemon's own log lines as they are written, until cancelled."""
    return _flatten(client.observe.get_aurae_daemon_log_stream(timeout=timeout))


def adaemon_log(
    aclient: AsyncClient, *, timeout: float | None = None
) -> AsyncIterator[observe.LogItem]:
    """`daemon_log` for the asyncio client."""
    return _aflatten(aclient.observe.get_aurae_daemon_log_stream(timeout=timeout))


def _sub_process_request(
    process_id: int, channel: str, batch: int
) -> observe.GetSubProcessStreamRequest:
    if channel not in _CHANNEL_TYPES:
        raise ValueError(f"channel must be one of {', '.join(_CHANNEL_TYPES)}, not {channel!r}")
    if batch < 0:
        raise ValueError(f"batch must be 0 or more lines, not {batch}")
    return observe.GetSubProcessStreamRequest(
        process_id=process_id, channel_type=_CHANNEL_TYPES[channel], max_batch_lines=batch
    )


def _items(
    response: observe.GetSubProcessStreamResponse | observe.GetAuraeDaemonLogStreamResponse,
) -> list[observe.LogItem]:
    items = [response.item] if response.HasField("item") else []
    if isinstance(response, observe.GetSubProcessStreamResponse):
        items.extend(response.items)
    return items


def _flatten(
    stream: Stream[observe.GetSubProcessStreamResponse]
    | Stream[observe.GetAuraeDaemonLogStreamResponse],
) -> Iterator[observe.LogItem]:
    try:
        for response in stream:
            yield from _items(response)
    finally:
        stream.cancel()


async def _aflatten(
    stream: AsyncStream[observe.GetSubProcessStreamResponse]
    | AsyncStream[observe.GetAuraeDaemonLogStreamResponse],
) -> AsyncIterator[observe.LogItem]:
    try:
        async for response in stream:
            for item in _items(response):
                yield item
    finally:
        stream.cancel()


__all__ = ["Channel", "adaemon_log", "afollow", "daemon_log", "follow"]
