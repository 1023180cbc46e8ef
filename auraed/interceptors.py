"""Server interceptors: what every RPC passes through, outermost first.

`Authorization` names the caller by the SPIFFE ID in its client certificate
and asks the policy whether it may call the method; a caller without a usable
identity gets UNAUTHENTICATED, a refused one PERMISSION_DENIED, and both
refusals go to the audit log. Without a policy it refuses only certificates
whose URI SAN is misleading (auraed.identity).

`Admission` admits each long-lived call (a stream, or a unary call that waits
on a workload) against its caller's budget and the daemon's (auraed.admission);
beyond them the call gets RESOURCE_EXHAUSTED, and the refusal is audited.

`AfterAnswer` runs what a unary call's handler left for after its answer
(auraed.runtime.deferred: waking the audit log's writer, and for the calls
that answer at once, `PROMPT_UNARY`, the event journal's) once grpcio has
sent the answer.

`AuditTrail` times every mutating call (Allocate, Free, Start, Stop of cells
and virtual machines) and records who did it to what, and how it ended.

`FaultTranslation` is the one place runtime errors become gRPC statuses: a
RuntimeFault aborts with its status, its message and, when it blames a
request field, a google.rpc.BadRequest detail naming that field (the SDK
surfaces it as `error.field`). A request that is not a valid protobuf message
gets INVALID_ARGUMENT (grpcio alone would answer INTERNAL). Anything else is a
bug: it is logged with its traceback and answered INTERNAL.

grpcio's server interceptors see the method name but not the peer, so each
one wraps the handler's behaviour and works inside it, where the
ServicerContext (and its auth context) is. Each method's handler is wrapped
once, on its first call (`HandlerWrapper`), so a call pays only for what the
wrappers do.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import Message

from auraed.admission import LongLivedCalls, OverBudget, Ticket
from auraed.audit import AuditEntry, AuditLog
from auraed.authz import Policy, PrincipalPattern
from auraed.errors import RuntimeFault
from auraed.identity import PeerIdentity, peer_identity_of
from auraed.runtime.deferred import after_answer, answering

log = logging.getLogger("auraed.rpc")

Behavior = Callable[[Any, grpc.ServicerContext], Any]
# Generic only in grpcio's stubs: spelled as strings, never evaluated.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Handler | None]"
_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")

# What each mutating call acts on, as the audit log names it.
_CELLS = "/aurae.cells.v0.CellService/"
_VMS = "/aurae.vms.v0.VmService/"
_INSTANCES = "/aurae.instances.v0.InstanceService/"
AUDITED_TARGETS: dict[str, Callable[[Any], dict[str, str]]] = {
    _CELLS + "Allocate": lambda r: {"cell": r.cell.name},
    _CELLS + "Free": lambda r: {"cell": r.cell_name},
    _CELLS + "Start": lambda r: {"cell": r.cell_name, "executable": r.executable.name},
    _CELLS + "Stop": lambda r: {"cell": r.cell_name, "executable": r.executable_name},
    _CELLS + "Update": lambda r: {"cell": r.cell.name},
    _VMS + "Allocate": lambda r: {"vm": r.machine.id},
    _VMS + "Free": lambda r: {"vm": r.vm_id},
    _VMS + "Start": lambda r: {"vm": r.vm_id},
    _VMS + "Stop": lambda r: {"vm": r.vm_id},
    _INSTANCES + "Spawn": lambda r: {"instance": r.instance.name},
    _INSTANCES + "Free": lambda r: {"instance": r.instance_name},
}

# Unary calls that last as long as a workload lets them: they hold a thread like a stream.
LONG_LIVED_UNARY = frozenset({_CELLS + "Wait", _CELLS + "Stop"})
# Unary calls whose answer follows their own work at once (auraed.runtime.deferred.Deferred):
# what they publish is written after their answer. The others (a VM's Start waits for its
# guest, an instance's Spawn for its daemon) would hold their events back as long.
PROMPT_UNARY = frozenset({_CELLS + "Allocate", _CELLS + "Free", _CELLS + "Start",
                          _CELLS + "Stop", _CELLS + "Update"})


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str,
          field: str | None = None) -> None:
    """Abort the RPC with `code` and, when given, the blamed request field."""
    # Imported at the first error: a VM guest's first answer does not wait on them (docs/vms.md).
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    status = status_pb2.Status(code=code.value[0], message=message)
    if field:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
                ]
            )
        )
        status.details.append(detail)
    context.abort_with_status(rpc_status.to_status(status))  # type: ignore[no-untyped-call]


def audit_target(method: str, request: object) -> dict[str, str]:
    """The cell, executable or VM a request names (only the names it sets)."""
    extract = AUDITED_TARGETS.get(method)
    if extract is None or not isinstance(request, Message):
        return {}
    return {key: value for key, value in extract(request).items() if value}


# The identity of the call this thread serves, named once by Authorization (grpcio builds the
# auth context anew on every auth_context(): ~20 us a look here) and looked up by the wrappers
# inside it. Kept with its context, so a stream's later steps never see another call's.
_caller = threading.local()


def caller_of(context: grpc.ServicerContext) -> PeerIdentity:
    """The peer identity of the call `context` belongs to, parsed once per call."""
    known: tuple[grpc.ServicerContext, PeerIdentity] | None = getattr(_caller, "call", None)
    if known is not None and known[0] is context:
        return known[1]
    identity = peer_identity_of(context)
    _caller.call = (context, identity)
    return identity


def _forget_caller() -> None:
    _caller.call = None


def _with(handler: Handler, **changes: Any) -> Handler:
    # grpcio's handlers are namedtuples; its stubs do not say so.
    return handler._replace(**changes)  # type: ignore[attr-defined,no-any-return]


def _wrap(handler: Handler, wrap: Callable[[Behavior], Behavior]) -> Handler:
    """The handler with its behaviour (whichever of the four kinds it has) wrapped."""
    for kind in _KINDS:
        inner = getattr(handler, kind)
        if inner is not None:
            return _with(handler, **{kind: wrap(inner)})
    return handler


class HandlerWrapper(grpc.ServerInterceptor):
    """An interceptor that wraps each method's handler once and reuses the result.

    The daemon's handlers never change after start, so asking the rest of the chain and
    building wrappers on every call would only add to each call's cost. Methods nobody
    serves are not remembered: their names come from the callers.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, Handler] = {}

    def intercept_service(self, continuation: Continuation,
                          details: grpc.HandlerCallDetails) -> Handler | None:
        method: str = details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = continuation(details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = self.wrap_handler(method, handler)
        return wrapped

    @abstractmethod
    def wrap_handler(self, method: str, handler: Handler) -> Handler:
        """`handler` of `method` as this interceptor serves it."""


class Authorization(HandlerWrapper):
    def __init__(self, policy: Policy | None, audit: AuditLog) -> None:
        super().__init__()
        self._policy = policy
        self._audit = audit

    def wrap_handler(self, method: str, handler: Handler) -> Handler:
        def wrap(inner: Behavior) -> Behavior:
            def authorized(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    self._authorize(method, request, context)
                    return inner(request, context)
                finally:
                    _forget_caller()

            return authorized

        return _wrap(handler, wrap)

    def _authorize(self, method: str, request: object, context: grpc.ServicerContext) -> None:
        identity = caller_of(context)
        if identity.spiffe_id is None and (self._policy is not None or identity.misleading):
            assert identity.problem is not None
            self._refuse(context, identity, method, request,
                         grpc.StatusCode.UNAUTHENTICATED, identity.problem)
            return
        if self._policy is None or identity.spiffe_id is None:
            return
        decision = self._policy.decide(identity.spiffe_id, method)
        if not decision.allowed:
            self._refuse(context, identity, method, request,
                         grpc.StatusCode.PERMISSION_DENIED, decision.reason)

    def _refuse(self, context: grpc.ServicerContext, identity: PeerIdentity, method: str,
                request: object, code: grpc.StatusCode, reason: str) -> None:
        peer = str(identity)
        self._audit.record(AuditEntry(
            peer=peer, method=method, decision="deny", code=code.name, duration_ms=0.0,
            target=audit_target(method, request), reason=reason,
            # What the certificate claimed, byte for byte, when that is why it is refused.
            uris=identity.uris if identity.spiffe_id is None else None,
        ))
        log.info("call refused", extra={"peer": peer, "method": method, "code": code.name})
        context.abort(code, reason)


class Admission(HandlerWrapper):
    def __init__(self, calls: LongLivedCalls, operators: tuple[PrincipalPattern, ...],
                 audit: AuditLog) -> None:
        super().__init__()
        self._calls = calls
        self._operators = operators
        self._audit = audit

    def wrap_handler(self, method: str, handler: Handler) -> Handler:
        if handler.unary_unary is not None and method not in LONG_LIVED_UNARY:
            return handler

        def single(inner: Behavior) -> Behavior:
            # Unary response (Wait, Stop, a client stream): released when the behaviour returns.
            def admitted(request: Any, context: grpc.ServicerContext) -> Any:
                ticket = self._admit(method, request, context)
                try:
                    return inner(request, context)
                finally:
                    ticket.release()

            return admitted

        def streaming(inner: Behavior) -> Behavior:
            # A generator: admitted at the first response asked for, released when the stream
            # ends, fails, or is abandoned (closed) by grpcio.
            def admitted(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                ticket = self._admit(method, request, context)
                try:
                    yield from inner(request, context)
                finally:
                    ticket.release()

            return admitted

        streams = handler.unary_stream is not None or handler.stream_stream is not None
        return _wrap(handler, streaming if streams else single)

    def _admit(self, method: str, request: object, context: grpc.ServicerContext) -> Ticket:
        identity = caller_of(context)
        operator = identity.spiffe_id is not None and any(
            pattern.matches(identity.spiffe_id) for pattern in self._operators)
        try:
            return self._calls.admit(str(identity), operator=operator)
        except OverBudget as refusal:
            reason = str(refusal)
        peer = str(identity)
        self._audit.record(AuditEntry(
            peer=peer, method=method, decision="deny", code="RESOURCE_EXHAUSTED",
            duration_ms=0.0, target=audit_target(method, request), reason=reason,
        ))
        log.info("call refused", extra={"peer": peer, "method": method,
                                        "code": "RESOURCE_EXHAUSTED"})
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
        raise AssertionError("unreachable: abort raises")


class AfterAnswer(HandlerWrapper):
    """Serves each unary call inside `answering()` and runs what it left once it is over."""

    def wrap_handler(self, method: str, handler: Handler) -> Handler:
        if handler.unary_unary is None:
            return handler

        prompt = method in PROMPT_UNARY

        def wrap(inner: Behavior) -> Behavior:
            def answered(request: Any, context: grpc.ServicerContext) -> Any:
                with answering(prompt) as deferred:
                    try:
                        return inner(request, context)
                    finally:
                        # grpcio runs a call's callbacks when it is over, however it ended,
                        # before a stopping server's stop() returns; False: it is over already.
                        if deferred and not context.add_callback(deferred.run):
                            deferred.run()

            return answered

        return _wrap(handler, wrap)


class AuditTrail(HandlerWrapper):
    def __init__(self, audit: AuditLog) -> None:
        super().__init__()
        self._audit = audit

    def wrap_handler(self, method: str, handler: Handler) -> Handler:
        if method not in AUDITED_TARGETS:
            return handler

        def wrap(inner: Behavior) -> Behavior:
            def audited(request: Any, context: grpc.ServicerContext) -> Any:
                started = time.monotonic()
                failed = True
                try:
                    response = inner(request, context)
                    failed = False
                    return response
                finally:
                    # Set by an abort, None after a plain return (grpcio has code(); its
                    # stubs do not).
                    code = context.code()  # type: ignore[attr-defined]
                    entry = AuditEntry(
                        peer=str(caller_of(context)),
                        method=method,
                        decision="allow",
                        code=_code_name(code, failed),
                        duration_ms=(time.monotonic() - started) * 1000,
                        target=audit_target(method, request),
                    )
                    # Queued once the answer is out (AfterAnswer): the writer's wake-up is
                    # then no thread switch the answer competes with.
                    after_answer(lambda: self._audit.record(entry))

            return audited

        return _wrap(handler, wrap)


def _code_name(code: grpc.StatusCode | None, failed: bool) -> str:
    if code is not None:
        return code.name
    return "UNKNOWN" if failed else "OK"


class MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the handler can refuse it."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as error:  # noqa: BLE001 - DecodeError, invalid UTF-8 in a string, ...
            return MalformedRequest(error)

    return parse


def _refuse_malformed(context: grpc.ServicerContext, request: MalformedRequest) -> None:
    abort(context, grpc.StatusCode.INVALID_ARGUMENT,
          f"the request is not a valid protobuf message of this method's type: {request.error}")


def _fail(context: grpc.ServicerContext, method: str, error: BaseException) -> None:
    if isinstance(error, RuntimeFault):
        abort(context, grpc.StatusCode[error.status], error.message, error.field)
    log.error("unexpected error in %s", method, exc_info=error, extra={"method": method})
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the daemon log")


def _is_abort(error: BaseException) -> bool:
    # context.abort() raises a bare Exception after setting the status; let it through.
    return type(error) is Exception and not error.args


class FaultTranslation(HandlerWrapper):
    def wrap_handler(self, method: str, handler: Handler) -> Handler:
        if handler.request_deserializer is not None:
            handler = _with(handler, request_deserializer=_tolerant(handler.request_deserializer))
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, MalformedRequest):
                    _refuse_malformed(context, request)
                try:
                    return inner_unary(request, context)
                except Exception as error:
                    if _is_abort(error):
                        raise
                    _fail(context, method, error)

            return _with(handler, unary_unary=unary)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                if isinstance(request, MalformedRequest):
                    _refuse_malformed(context, request)
                try:
                    yield from inner_stream(request, context)
                except Exception as error:
                    if _is_abort(error):
                        raise
                    _fail(context, method, error)

            return _with(handler, unary_stream=stream)

        def checked(inner: Behavior) -> Behavior:
            # Streaming requests (reflection): refuse at the first malformed message.
            def behavior(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                return inner(_parsed(requests, context), context)

            return behavior

        return _wrap(handler, checked)


def _parsed(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, MalformedRequest):
            _refuse_malformed(context, request)
        yield request


__all__ = ["Admission", "AuditTrail", "Authorization", "FaultTranslation", "HandlerWrapper", "abort",
           "audit_target"]
