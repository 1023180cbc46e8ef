"""Connections to an Aurae daemon: `Client` (sync) and `AsyncClient` (asyncio).

Both have the same shape — one attribute per service (`client.cells`,
`client.discovery`, ...), a default timeout and retry policy for every call,
and context-manager support — and differ only in whether calls are awaited.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self

from aurae_sdk.config import (
    ClientConfig,
    channel_credentials,
    channel_options,
    load_config,
    parse_target,
)
from aurae_sdk.generated.services import SERVICES_HELP, AsyncServices, SyncServices
from aurae_sdk.rpc import DEFAULT_TIMEOUT, RetryPolicy, Transport

# The request metadata key that addresses a call to a spawned instance (see docs/instances.md).
INSTANCE_KEY = "aurae-instance"


def instance_path(metadata: tuple[tuple[str, str], ...], name: str) -> tuple[tuple[str, str], ...]:
    """`metadata` addressed one instance deeper: "a" then "b" gives "a/b"."""
    parts = name.split("/")
    if not name or not all(parts):
        raise ValueError(f"invalid instance name {name!r}: names joined by '/', none empty")
    current = dict(metadata).get(INSTANCE_KEY)
    path = f"{current}/{name}" if current else name
    return (*((k, v) for k, v in metadata if k != INSTANCE_KEY), (INSTANCE_KEY, path))


def _with_services(doc: str | None, services: str) -> str:
    """A class docstring followed by the services and their methods, for help()."""
    import textwrap

    first, _, rest = (doc or "").partition("\n")
    return f"{first}\n{textwrap.dedent(rest).rstrip()}\n\n{services}"


class _Connection:
    """What Client and AsyncClient share: settings, the channel, the transport.

    The two differ only in the channel factory (grpc.secure_channel or
    grpc.aio.secure_channel) and in whether calls are awaited.
    """

    def __init__(
        self,
        secure_channel: Callable[..., Any],
        config: ClientConfig | str | None,
        settings: dict[str, str | None],
        timeout: float,
        retry: RetryPolicy | None,
        channel: Any,
    ) -> None:
        self.config: ClientConfig | None = None
        if channel is None:
            if isinstance(config, ClientConfig):
                self.config = config
            else:
                given = {k: v for k, v in settings.items() if v is not None}
                self.config = load_config(config, **given)
            target = parse_target(self.config.socket)
            channel = secure_channel(
                target.grpc_target, channel_credentials(self.config), channel_options(target)
            )
        self.channel = channel
        self._owns_channel = True
        self._transport = Transport(channel, timeout, retry or RetryPolicy())

    @property
    def instance_name(self) -> str | None:
        """The spawned instance this client's calls go to ("a/b" when nested), or None."""
        return dict(self._transport.metadata).get(INSTANCE_KEY)

    def _addressed(self, view: _Connection, name: str) -> None:
        view.config = self.config
        view._owns_channel = False
        view._transport.metadata = instance_path(self._transport.metadata, name)

    def __repr__(self) -> str:
        where = self.config.socket if self.config else "custom channel"
        if self.instance_name:
            where += f" instance {self.instance_name}"
        return f"<aurae_sdk.{type(self).__name__} {where}>"

    def _guest_config(self, vm_id: str, machines: Any) -> ClientConfig:
        """This client's config aimed at the guest auraed of the running VM `vm_id`."""
        from dataclasses import replace

        from aurae_sdk.errors import FailedPrecondition, NotFound

        if self.config is None:
            raise ValueError("a client made from a custom channel has no config to reuse")
        for machine in machines:
            if machine.id == vm_id:
                if not machine.auraed_address:
                    raise FailedPrecondition(f"virtual machine {vm_id} is {machine.status}, "
                                             "not running: no guest to connect to")
                return replace(self.config, socket=machine.auraed_address,
                               source=f"{self.config.source}, vm {vm_id}")
        raise NotFound(f"no virtual machine {vm_id}")


class Client(_Connection, SyncServices):
    """A sync connection to auraed over mTLS.

    `config` is a ClientConfig, a path to an Aurae TOML config, or None to look
    in $AURAE_CONFIG, ~/.aurae/config, /etc/aurae/config, /var/lib/aurae/config.
    Keyword arguments override single settings of the file. `channel` gives an
    already open grpc.Channel instead (tests, benchmarks, custom transports).
    """

    def __init__(
        self,
        config: ClientConfig | str | None = None,
        *,
        socket: str | None = None,
        ca_crt: str | None = None,
        client_crt: str | None = None,
        client_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        channel: Any = None,
    ) -> None:
        import grpc

        settings = {"socket": socket, "ca_crt": ca_crt, "client_crt": client_crt,
                    "client_key": client_key}
        super().__init__(grpc.secure_channel, config, settings, timeout, retry, channel)

    def instance(self, name: str) -> Client:
        """A client whose calls go to the spawned instance `name` through this daemon, with
        the same credentials; `client.instance("a").instance("b")` reaches b inside a. It shares
        this client's channel: close this one, not it."""
        view = Client(channel=self.channel, timeout=self._transport.timeout,
                      retry=self._transport.retry)
        self._addressed(view, name)
        return view

    __doc__ = _with_services(__doc__, SERVICES_HELP)

    def close(self) -> None:
        self._transport.closed = True
        if self._owns_channel:
            self.channel.close()

    def vm(self, vm_id: str, *, timeout: float = DEFAULT_TIMEOUT) -> Client:
        """A client of the guest auraed of virtual machine `vm_id`, at the address Start
        returned, with this client's certificate: the same API, inside the guest."""
        config = self._guest_config(vm_id, self.vms.list().machines)
        return Client(config, timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient(_Connection, AsyncServices):
    """An asyncio connection to auraed over mTLS; same arguments as Client.

    Create it inside the event loop that will use it.
    """

    def __init__(
        self,
        config: ClientConfig | str | None = None,
        *,
        socket: str | None = None,
        ca_crt: str | None = None,
        client_crt: str | None = None,
        client_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        channel: Any = None,
    ) -> None:
        import grpc.aio

        settings = {"socket": socket, "ca_crt": ca_crt, "client_crt": client_crt,
                    "client_key": client_key}
        super().__init__(grpc.aio.secure_channel, config, settings, timeout, retry, channel)

    def instance(self, name: str) -> AsyncClient:
        """As Client.instance: an AsyncClient whose calls go to the spawned instance `name`."""
        view = AsyncClient(channel=self.channel, timeout=self._transport.timeout,
                           retry=self._transport.retry)
        self._addressed(view, name)
        return view

    __doc__ = _with_services(__doc__, SERVICES_HELP.replace("client.", "aclient.") +
                             "\n(await each call)\n")

    async def close(self) -> None:
        self._transport.closed = True
        if self._owns_channel:
            await self.channel.close()

    async def vm(self, vm_id: str, *, timeout: float = DEFAULT_TIMEOUT) -> AsyncClient:
        """`Client.vm` for the asyncio client."""
        config = self._guest_config(vm_id, (await self.vms.list()).machines)
        return AsyncClient(config, timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def connect(config: ClientConfig | str | None = None, **settings: Any) -> Client:
    """Open a sync client; see `Client` for the arguments."""
    return Client(config, **settings)


def connect_async(config: ClientConfig | str | None = None, **settings: Any) -> AsyncClient:
    """Open an asyncio client (call inside a running loop); see `Client`."""
    return AsyncClient(config, **settings)
