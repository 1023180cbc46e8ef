"""The names an `aurae-py` script starts with, as a typed, importable module.

`aurae-py` puts `client`, `aclient` and the service modules into every
script. Importing them instead,

    from aurae_sdk.script import client, cells

changes nothing under `aurae-py` (it binds this module to the script's own
clients), lets type checkers and editors see them, and lets the script run
under plain `python` too: the clients then open from the usual client config
on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from aurae_sdk.generated import exports
from aurae_sdk.generated.exports import *  # the service modules, generated

if TYPE_CHECKING:
    from aurae_sdk.client import AsyncClient, Client
    from aurae_sdk.config import ClientConfig

    client: Client
    aclient: AsyncClient

C = TypeVar("C")


class LazyClient(Generic[C]):
    """Stands in for a client and opens it when an attribute is first used.

    A script that never calls the daemon must run without a config, and an
    AsyncClient must be created inside the event loop that will use it; both
    follow from opening on first use rather than at start.
    """

    def __init__(self, open_client: Callable[[], C], kind: str) -> None:
        self._open_client = open_client
        self._kind = kind
        self.opened: C | None = None

    def resolve(self) -> C:
        """The client, opened now if it was not yet."""
        if self.opened is None:
            self.opened = self._open_client()
        return self.opened

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the proxy itself lacks; dunders are left alone
        # so that copy, pickle and introspection do not open a connection.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __dir__(self) -> list[str]:
        return dir(self.resolve())

    def __repr__(self) -> str:
        if self.opened is None:
            return f"<{self._kind}, opened on first use>"
        return repr(self.opened)


class ScriptClients:
    """The `client` and `aclient` of one script or REPL session."""

    def __init__(self, config: str | None = None, socket: str | None = None, *,
                 context: str | None = None, timeout: float | None = None) -> None:
        self._config_path = config
        self._socket = socket
        self._context = context
        self._timeout = timeout
        self._config: ClientConfig | None = None
        # Everything the script allocates through either client, so a failure can free it.
        from aurae_sdk.allocations import Allocations

        self.allocations = Allocations()
        self.client: LazyClient[Client] = LazyClient(self._open, "aurae_sdk.Client")
        self.aclient: LazyClient[AsyncClient] = LazyClient(
            self._open_async, "aurae_sdk.AsyncClient"
        )

    def config(self) -> ClientConfig:
        """The client config, read once; raises ConfigError."""
        if self._config is None:
            from aurae_sdk.config import load_config

            self._config = load_config(self._config_path, context=self._context,
                                       socket=self._socket)
        return self._config

    def _open(self) -> Client:
        from aurae_sdk.client import Client

        opened = Client(self.config(), **self._settings())
        self.allocations.attach(opened)
        return opened

    def _open_async(self) -> AsyncClient:
        import asyncio

        from aurae_sdk.client import AsyncClient

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # grpc.aio binds a channel to the loop it is made in; made outside
            # one, it would fail later and far from here.
            raise RuntimeError(
                "aclient is the asyncio client: use it inside a coroutine (top-level await "
                "in a script, or asyncio.run(main())), or use the sync `client`"
            ) from None
        opened = AsyncClient(self.config(), **self._settings())
        self.allocations.attach(opened)
        return opened

    def _settings(self) -> dict[str, Any]:
        return {} if self._timeout is None else {"timeout": self._timeout}

    def free_allocations(self) -> list[str]:
        """Free what the script allocated (through the sync client, whatever loop is gone);
        returns the errors."""
        if not self.allocations:
            return []
        client = self.client.resolve()
        return self.allocations.free(client)

    def close(self) -> None:
        if self.client.opened is not None:
            self.client.opened.close()

    async def aclose(self) -> None:
        if self.aclient.opened is not None:
            await self.aclient.opened.close()


_default: ScriptClients | None = None


def bind(clients: ScriptClients) -> None:
    """Make `client` and `aclient` here the given ones (what aurae-py does)."""
    globals().update(client=clients.client, aclient=clients.aclient)


def __getattr__(name: str) -> Any:
    # Reached only while nothing is bound: plain `python script.py`.
    global _default
    if name in ("client", "aclient"):
        if _default is None:
            _default = ScriptClients()
        bind(_default)
        return globals()[name]
    raise AttributeError(f"module 'aurae_sdk.script' has no attribute {name!r}")


__all__ = [
    "LazyClient",
    "ScriptClients",
    "aclient",
    "bind",
    "client",
]
__all__ += exports.__all__
