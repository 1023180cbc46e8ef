"""Services a daemon wires after its server began to listen (`auraed --serve-early`).

A VM guest's auraed answers Health and Discovery as soon as its server listens, and wires the
rest (spawner, cgroups, images, instances, VMs, reflection) behind it: under TCG those imports
and starts take seconds, and the host only needs a health answer to return the guest's address.

`PendingServices` is the outermost server interceptor and the registration target of the late
servicers. A call whose method nobody serves yet, while the daemon is still wiring, gets a
placeholder handler that waits (bounded by the call's deadline and `WIRING_WAIT`) until the
services are wired, then runs the method's real handler, found through the rest of the
interceptor chain, so authorization, admission, audit and fault translation see the call once,
with its parsed request, as for any other. The placeholder is raw bytes in both directions
(stream-stream), so one shape carries every kind of method; it deserializes, calls and
serializes with the real handler's own functions. A call still waiting after `WIRING_WAIT`, or
made after the wiring failed, is answered UNAVAILABLE with why (the SDK retries that for
reads). Health reports each service SERVING only once it is wired (auraed.server).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeAlias

import grpc

# How long a call waits for the services being wired before UNAVAILABLE. A guest's wiring takes
# ~4 s on an idle machine and ~15 s on our loaded ones under TCG.
WIRING_WAIT = 60.0

# Generic only in grpcio's stubs: spelled as strings, never evaluated.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Handler | None]"


def _same(data: Any) -> Any:
    return data


class PendingServices(grpc.ServerInterceptor):
    def __init__(self, wait: float = WIRING_WAIT) -> None:
        self._wait = wait
        self._wired = threading.Event()
        self._failure: str | None = None
        self._handlers: list[grpc.GenericRpcHandler] = []
        self._began = time.monotonic()

    # --------------------------------------------- as a grpc.Server to the servicers' register()
    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        # Registered methods must be known before the server starts; these are served through
        # their generic handlers (every generated servicer registers both).
        pass

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """What the server is given at its start: the late services, once they are wired."""
        return _Late(self)

    def wired(self) -> None:
        self._wired.set()

    def failed(self, why: str) -> None:
        self._failure = why
        self._wired.set()

    # ------------------------------------------------------------------ as the interceptor
    def intercept_service(self, continuation: Continuation,
                          details: grpc.HandlerCallDetails) -> Handler | None:
        wired = self._wired.is_set()  # before the look-up: the wiring may end during it
        handler = continuation(details)
        if handler is not None or (wired and self._failure is None):
            return handler
        return grpc.stream_stream_rpc_method_handler(self._placeholder(continuation, details))

    def _placeholder(self, continuation: Continuation, details: grpc.HandlerCallDetails
                     ) -> Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[bytes]]:
        method: str = details.method

        def behavior(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            remaining = context.time_remaining()
            wait = self._wait if remaining is None else min(self._wait, remaining)
            if not self._wired.wait(wait):
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              f"auraed is still wiring its services "
                              f"({time.monotonic() - self._began:.0f} s since it began to "
                              f"listen); only health and discovery answer yet: retry")
            if self._failure is not None:
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              f"auraed could not start its services: {self._failure}")
            handler = continuation(details)
            if handler is None:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {method}")
            yield from _run(handler, requests, context)

        return behavior


class _Late(grpc.GenericRpcHandler):
    def __init__(self, pending: PendingServices) -> None:
        self._pending = pending

    def service(self, details: grpc.HandlerCallDetails) -> Handler | None:
        if not self._pending._wired.is_set():
            return None
        for handler in self._pending._handlers:
            found = handler.service(details)
            if found is not None:
                return found
        return None


def _run(handler: Handler, requests: Iterator[bytes],
         context: grpc.ServicerContext) -> Iterator[bytes]:
    """The real handler, on the placeholder's raw messages."""
    parse = handler.request_deserializer or _same
    dump = handler.response_serializer or _same
    if handler.request_streaming:
        request: Any = (parse(data) for data in requests)
    else:
        data = next(requests, None)
        if data is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
        request = parse(data)
    if handler.unary_unary is not None:
        yield dump(handler.unary_unary(request, context))
    elif handler.unary_stream is not None:
        yield from (dump(response) for response in handler.unary_stream(request, context))
    elif handler.stream_unary is not None:
        yield dump(handler.stream_unary(request, context))
    elif handler.stream_stream is not None:
        yield from (dump(response) for response in handler.stream_stream(request, context))
