"""A fleet: the same work on many nodes at once, one result per node.

    fleet = aurae_sdk.Fleet(["edge-1", "edge-2", "edge-3"])   # contexts of the client config
    for result in fleet.run(lambda client: client.cells.list()):
        print(result.context, "ok" if result.ok else result.error)

Underneath it is asyncio: one AsyncClient per node, at most `concurrency` nodes worked on at a
time, so eight nodes take about as long as the slowest one. A node that fails (down, refusing
us, the work raising) gives a failed result; the others are not held up or cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from aurae_sdk.config import ClientConfig, load_contexts
from aurae_sdk.rpc import DEFAULT_TIMEOUT

if TYPE_CHECKING:
    from aurae_sdk.client import AsyncClient

T = TypeVar("T")
DEFAULT_CONCURRENCY = 16


@dataclass(frozen=True)
class NodeResult(Generic[T]):
    """What the work gave on one node: its value, or the exception it raised."""

    context: str
    target: str
    value: T | None
    error: BaseException | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None


class Fleet:
    """Several nodes, named by the contexts of one client config.

    `contexts` None means every context of the file. `configs` gives ClientConfigs directly
    instead (then `config` and `contexts` are not read).
    """

    def __init__(self, contexts: Sequence[str] | None = None, *, config: str | None = None,
                 configs: Sequence[ClientConfig] | None = None,
                 concurrency: int = DEFAULT_CONCURRENCY, timeout: float = DEFAULT_TIMEOUT) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if configs is None:
            configs = load_contexts(config, None if contexts is None else list(contexts))
        if not configs:
            raise ValueError("a fleet needs at least one node")
        self.configs = list(configs)
        self.concurrency = concurrency
        self.timeout = timeout

    @property
    def contexts(self) -> list[str]:
        return [config.context for config in self.configs]

    def __repr__(self) -> str:
        return f"<aurae_sdk.Fleet {', '.join(self.contexts)}>"

    async def arun(self, work: Callable[[AsyncClient], Awaitable[T]]) -> list[NodeResult[T]]:
        """Await `work(client)` on every node; results in the fleet's order."""
        from aurae_sdk.client import AsyncClient

        gate = asyncio.Semaphore(self.concurrency)

        async def one(config: ClientConfig) -> NodeResult[T]:
            async with gate:
                started = time.monotonic()
                try:
                    async with AsyncClient(config, timeout=self.timeout) as client:
                        value = await work(client)
                except Exception as error:  # noqa: BLE001 - a node's failure is its result
                    return NodeResult(config.context, config.socket, None, error,
                                      time.monotonic() - started)
                return NodeResult(config.context, config.socket, value, None,
                                  time.monotonic() - started)

        return list(await asyncio.gather(*(one(config) for config in self.configs)))

    def run(self, work: Callable[[AsyncClient], Awaitable[T]]) -> list[NodeResult[T]]:
        """`arun` from sync code (not from inside a running event loop)."""
        return asyncio.run(self.arun(work))


__all__ = ["DEFAULT_CONCURRENCY", "Fleet", "NodeResult"]
