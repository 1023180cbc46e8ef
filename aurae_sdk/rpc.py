"""The core every generated service client runs on.

Sync and asyncio clients share everything but the waiting: request building,
defaults, the retry decision and error mapping live in plain functions here,
and the two base classes only differ in `time.sleep` versus `asyncio.sleep`
and in how a call is awaited.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from aurae_sdk.errors import AuraeError, Cancelled, from_rpc_error
from aurae_sdk.messages import from_dict

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Metadata = Sequence[tuple[str, str | bytes]]
# Told of every successful unary call: (method path, request, response).
CallObserver = Callable[[str, Message, Message], None]

DEFAULT_TIMEOUT = 30.0
# A timeout of math.inf means no deadline at all (e.g. a Wait that lasts as long as its process).
# Only failures that mean "the request never took effect" are retried, and
# only for methods the protos declare free of side effects.
RETRYABLE_STATUSES = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class MethodSpec(Generic[Req, Resp]):
    """One RPC as the generated clients describe it."""

    path: str
    request_type: type[Req]
    response_type: type[Resp]
    server_streaming: bool
    idempotent: bool

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for idempotent reads."""

    attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def delay(self, method: MethodSpec[Any, Any], error: grpc.RpcError, attempt: int,
              deadline: float) -> float | None:
        """Seconds to wait before retrying after failed `attempt` (1-based), or
        None when the call must fail now."""
        if not method.idempotent or attempt >= self.attempts:
            return None
        if error.code() not in RETRYABLE_STATUSES:
            return None
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        import random  # only a failing call pays for it

        delay = random.uniform(0, ceiling)
        return delay if time.monotonic() + delay < deadline else None


NO_RETRY = RetryPolicy(attempts=1)


def _remaining(deadline: float) -> float | None:
    """The timeout to give grpc for `deadline` (monotonic); None (no deadline) for math.inf."""
    if math.isinf(deadline):
        return None
    return max(0.0, deadline - time.monotonic())


def build_request(method: MethodSpec[Req, Any], request: Any, fields: Mapping[str, Any]) -> Req:
    """The request message from either a message/dict or keyword arguments."""
    given = {name: value for name, value in fields.items() if value is not None}
    if request is not None and given:
        raise TypeError(
            f"{method.name}: pass either a request or keyword arguments, not both "
            f"(got a request and {', '.join(sorted(given))})"
        )
    if request is None:
        return from_dict(method.request_type, given)
    if isinstance(request, method.request_type):
        return request
    if isinstance(request, Mapping):
        return from_dict(method.request_type, request)
    raise TypeError(
        f"{method.name}: expected {method.request_type.__name__} or a dict, "
        f"got {type(request).__name__}"
    )


@dataclass
class Transport:
    """A channel plus the defaults calls made on it use."""

    channel: grpc.Channel | grpc.aio.Channel
    timeout: float = DEFAULT_TIMEOUT
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    closed: bool = False
    # Sent with every call: e.g. the instance the calls are addressed to (Client.instance).
    metadata: tuple[tuple[str, str], ...] = ()
    # What aurae_sdk.allocations uses to record what a script allocates.
    observers: list[CallObserver] = field(default_factory=list)
    _callables: dict[str, Any] = field(default_factory=dict, repr=False)

    def call_metadata(self, metadata: Metadata | None) -> Metadata | None:
        """The call's own metadata plus the transport's."""
        if not self.metadata:
            return metadata
        return (*self.metadata, *(metadata or ()))

    def callable(self, method: MethodSpec[Any, Any]) -> Any:
        """The channel's multicallable for `method`, made once and reused."""
        if self.closed:
            # grpcio 1.85 crashes the process (SIGSEGV) when a registered
            # method is made on a closed channel; say what is wrong instead.
            raise ValueError(f"{method.name}: the client is closed")
        found = self._callables.get(method.path)
        if found is None:
            channel: Any = self.channel  # the stubs lack _registered_method
            factory = channel.unary_stream if method.server_streaming else channel.unary_unary
            found = factory(
                method.path,
                request_serializer=method.request_type.SerializeToString,
                response_deserializer=method.response_type.FromString,
                _registered_method=True,
            )
            self._callables[method.path] = found
        return found


class ServiceClient:
    """Base of the generated sync service clients."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def _unary(self, method: MethodSpec[Any, Resp], request: Any, fields: Mapping[str, Any],
               timeout: float | None, metadata: Metadata | None) -> Resp:
        message = build_request(method, request, fields)
        call = self._transport.callable(method)
        timeout = self._transport.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        attempt = 1
        while True:
            try:
                response: Resp = call(message, timeout=_remaining(deadline),
                                      metadata=self._transport.call_metadata(metadata))
                for observer in self._transport.observers:
                    observer(method.path, message, response)
                return response
            except grpc.RpcError as error:
                delay = self._transport.retry.delay(method, error, attempt, deadline)
                if delay is None:
                    raise from_rpc_error(error, method.path) from None
            time.sleep(delay)
            attempt += 1

    def _stream(self, method: MethodSpec[Any, Resp], request: Any, fields: Mapping[str, Any],
                timeout: float | None, metadata: Metadata | None) -> Stream[Resp]:
        message = build_request(method, request, fields)
        # Streams are subscriptions: they get no deadline unless asked for one.
        call = self._transport.callable(method)(message, timeout=timeout, metadata=self._transport.call_metadata(metadata))
        return Stream(call, method.path)


class AsyncServiceClient:
    """Base of the generated asyncio service clients."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def _unary(self, method: MethodSpec[Any, Resp], request: Any,
                     fields: Mapping[str, Any], timeout: float | None,
                     metadata: Metadata | None) -> Resp:
        message = build_request(method, request, fields)
        call = self._transport.callable(method)
        timeout = self._transport.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        attempt = 1
        while True:
            try:
                response: Resp = await call(message, timeout=_remaining(deadline),
                                            metadata=self._transport.call_metadata(metadata))
                for observer in self._transport.observers:
                    observer(method.path, message, response)
                return response
            except grpc.RpcError as error:
                delay = self._transport.retry.delay(method, error, attempt, deadline)
                if delay is None:
                    raise from_rpc_error(error, method.path) from None
            await asyncio.sleep(delay)
            attempt += 1

    def _stream(self, method: MethodSpec[Any, Resp], request: Any, fields: Mapping[str, Any],
                timeout: float | None, metadata: Metadata | None) -> AsyncStream[Resp]:
        message = build_request(method, request, fields)
        call = self._transport.callable(method)(message, timeout=timeout, metadata=self._transport.call_metadata(metadata))
        return AsyncStream(call, method.path)


class Stream(Generic[Resp]):
    """The responses of a server-streaming call, as an iterator.

    `cancel()` (or leaving a `with` block, or `close()`) ends the call; the
    iteration then stops quietly instead of raising CANCELLED.
    """

    def __init__(self, call: Any, method: str) -> None:
        self._call = call
        self._method = method
        self._cancelled = False

    def __iter__(self) -> Iterator[Resp]:
        return self

    def __next__(self) -> Resp:
        try:
            response: Resp = next(self._call)
            return response
        except grpc.RpcError as error:
            if self._cancelled and error.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise from_rpc_error(error, self._method) from None
        except KeyboardInterrupt:
            # Ctrl-C ends the call, not only the loop that was reading it.
            self.cancel()
            raise

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    close = cancel

    def __enter__(self) -> Stream[Resp]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


class AsyncStream(Generic[Resp]):
    """The responses of a server-streaming call, as an async iterator."""

    def __init__(self, call: Any, method: str) -> None:
        self._call = call
        self._method = method
        self._cancelled = False
        self._responses: AsyncIterator[Resp] | None = None

    def __aiter__(self) -> AsyncIterator[Resp]:
        return self

    async def __anext__(self) -> Resp:
        if self._responses is None:
            self._responses = self._call.__aiter__()
        try:
            return await self._responses.__anext__()
        except grpc.RpcError as error:
            if self._cancelled and error.code() == grpc.StatusCode.CANCELLED:
                raise StopAsyncIteration from None
            raise from_rpc_error(error, self._method) from None
        except asyncio.CancelledError:
            if self._cancelled:
                raise StopAsyncIteration from None
            raise

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    async def close(self) -> None:
        self.cancel()

    async def __aenter__(self) -> AsyncStream[Resp]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()


__all__ = [
    "AsyncServiceClient",
    "AsyncStream",
    "AuraeError",
    "Cancelled",
    "Metadata",
    "MethodSpec",
    "RetryPolicy",
    "ServiceClient",
    "Stream",
    "Transport",
    "build_request",
]
