"""Forwarding: a call addressed to a spawned instance goes to that instance's daemon.

A caller addresses an instance with the request metadata key `aurae-instance`
("build-1", or "build-1/inner" for an instance that build-1 spawned). The
host checks the caller as for any call (the Authorization interceptor runs
first, on the caller's own identity), then relays the request's bytes to the
instance over its Unix socket with the host's identity for it, the rest of
the path in `aurae-instance`, and the caller in `aurae-forwarded-for`. The
answer comes back byte for byte: responses, stream messages, status codes,
messages, details and trailing metadata. The caller's deadline becomes the
relayed call's deadline, and a cancelled call cancels the relayed one.

Nothing here knows any method: the interceptor wraps every unary and
server-streaming handler the same way, and the response serializer lets
already-serialized bytes through.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from auraed.interceptors import Handler, HandlerWrapper, _with, caller_of

log = logging.getLogger("auraed.forwarding")

INSTANCE_KEY = "aurae-instance"
FORWARDED_FOR_KEY = "aurae-forwarded-for"
# Metadata grpc sets on every call by itself: never relayed.
_TRANSPORT_KEYS = frozenset({"user-agent", "grpc-accept-encoding", "grpc-encoding",
                             "grpc-timeout", "content-type", "te", "authority"})
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# A remaining time beyond this (about three years) means the caller set no deadline.
NO_DEADLINE = 1e8


class _Status(grpc.Status):
    """What abort_with_status passes on to the caller: the instance's status as it was."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing_metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


class InstanceChannels:
    """One channel per instance, made at Spawn and closed at Free."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def open(self, name: str, socket: str, ca_pem: bytes, client_pem: bytes,
             client_key_pem: bytes) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=client_key_pem, certificate_chain=client_pem)
        channel = grpc.secure_channel(f"unix:{socket}", credentials, options=[
            # The instance's certificate names the server as every Aurae daemon's does.
            ("grpc.ssl_target_name_override", "server.unsafe.aurae.io"),
            ("grpc.default_authority", "server.unsafe.aurae.io"),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # A new instance binds its socket within a fraction of a second: retry the
            # connection that soon, not after grpc's default first backoff of a second.
            ("grpc.initial_reconnect_backoff_ms", 10),
            ("grpc.min_reconnect_backoff_ms", 10),
            ("grpc.max_reconnect_backoff_ms", 200),
        ])
        with self._lock:
            previous = self._channels.pop(name, None)
            self._channels[name] = channel
        if previous is not None:
            previous.close()
        return channel

    def get(self, name: str) -> grpc.Channel | None:
        with self._lock:
            return self._channels.get(name)

    def close(self, name: str) -> None:
        with self._lock:
            channel = self._channels.pop(name, None)
        if channel is not None:
            channel.close()

    def close_all(self) -> None:
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
        for channel in channels:
            channel.close()


def _address(context: grpc.ServicerContext) -> tuple[str | None, list[tuple[str, str | bytes]]]:
    """The instance path the call names (None: not forwarded) and the metadata to relay."""
    target: str | None = None
    relayed: list[tuple[str, str | bytes]] = []
    forwarded_for: str | None = None
    for key, value in context.invocation_metadata():
        if key == INSTANCE_KEY:
            target = value if isinstance(value, str) else value.decode(errors="replace")
        elif key == FORWARDED_FOR_KEY:
            forwarded_for = str(value)
        elif key.startswith((":", "grpc-")) or key in _TRANSPORT_KEYS:
            continue
        else:
            relayed.append((key, value))
    if target is None:
        return None, relayed
    caller = str(caller_of(context))
    relayed.append((FORWARDED_FOR_KEY, f"{forwarded_for},{caller}" if forwarded_for else caller))
    return target, relayed


class InstanceForwarding(HandlerWrapper):
    """Relays calls that carry `aurae-instance` to that instance; others pass through."""

    def __init__(self, channels: InstanceChannels) -> None:
        super().__init__()
        self._channels = channels

    def wrap_handler(self, method: str, handler: Handler) -> Handler:
        if handler.request_streaming:
            return handler  # reflection only: always the host's own
        serialize = handler.response_serializer
        if serialize is not None:
            handler = _with(handler, response_serializer=_passing_bytes(serialize))
        if handler.unary_unary is not None:
            return _with(handler, unary_unary=self._unary(method, handler.unary_unary))
        if handler.unary_stream is not None:
            return _with(handler, unary_stream=self._stream(method, handler.unary_stream))
        return handler

    def _channel(self, target: str, context: grpc.ServicerContext) -> tuple[grpc.Channel, str | None]:
        name, _, rest = target.partition("/")
        channel = self._channels.get(name)
        if channel is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"instance {name!r} does not exist (metadata {INSTANCE_KEY}: {target})")
        assert channel is not None
        return channel, rest or None

    def _unary(self, method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(request: Any, context: grpc.ServicerContext) -> Any:
            target, metadata = _address(context)
            if target is None or not hasattr(request, "SerializeToString"):
                return inner(request, context)
            channel, rest = self._channel(target, context)
            if rest is not None:
                metadata.append((INSTANCE_KEY, rest))
            call: Any = channel.unary_unary(method, request_serializer=None,
                                            response_deserializer=None)
            future = call.future(request.SerializeToString(), timeout=_remaining(context),
                                 metadata=tuple(metadata))
            context.add_callback(_canceller(future))
            try:
                return future.result()
            except grpc.RpcError as error:
                _relay_status(context, error)
            except grpc.FutureCancelledError:
                context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")

        return forward

    def _stream(self, method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            target, metadata = _address(context)
            if target is None or not hasattr(request, "SerializeToString"):
                yield from inner(request, context)
                return
            channel, rest = self._channel(target, context)
            if rest is not None:
                metadata.append((INSTANCE_KEY, rest))
            call: Any = channel.unary_stream(method, request_serializer=None,
                                             response_deserializer=None)
            responses = call(request.SerializeToString(), timeout=_remaining(context),
                             metadata=tuple(metadata))
            context.add_callback(_canceller(responses))
            try:
                yield from responses
            except grpc.RpcError as error:
                if context.is_active():
                    _relay_status(context, error)

        return forward


def _canceller(call: Any) -> Callable[[], None]:
    def cancel() -> None:
        call.cancel()

    return cancel


def _remaining(context: grpc.ServicerContext) -> float | None:
    """The caller's deadline as a timeout; None when it set none (grpc then reports an
    infinite deadline as a huge number of seconds)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > NO_DEADLINE else remaining


def _passing_bytes(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def serialized(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return serialized


def _relay_status(context: grpc.ServicerContext, error: grpc.RpcError) -> None:
    call: Any = error
    trailing = tuple(call.trailing_metadata() or ())
    context.abort_with_status(_Status(call.code(), call.details() or "", trailing))


__all__ = ["FORWARDED_FOR_KEY", "INSTANCE_KEY", "InstanceChannels", "InstanceForwarding"]
