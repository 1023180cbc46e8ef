"""Server interceptors: what every RPC passes through.

`FaultTranslation` is the one place runtime errors become gRPC statuses: a
RuntimeFault aborts with its status, its message and, when it blames a
request field, a google.rpc.BadRequest detail naming that field (the SDK
surfaces it as `error.field`). Anything else is a bug: it is logged with its
traceback and answered INTERNAL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from auraed.errors import RuntimeFault

log = logging.getLogger("auraed.rpc")


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str,
          field: str | None = None) -> None:
    """Abort the RPC with `code` and, when given, the blamed request field."""
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
    context.abort_with_status(rpc_status.to_status(status))


def _fail(context: grpc.ServicerContext, method: str, error: BaseException) -> None:
    if isinstance(error, RuntimeFault):
        abort(context, grpc.StatusCode[error.status], error.message, error.field)
    log.error("unexpected error in %s", method, exc_info=error, extra={"method": method})
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the daemon log")


def _is_abort(error: BaseException) -> bool:
    # context.abort() raises a bare Exception after setting the status; let it through.
    return type(error) is Exception and not error.args


class FaultTranslation(grpc.ServerInterceptor):
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method  # type: ignore[attr-defined]
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return inner_unary(request, context)
                except Exception as error:
                    if _is_abort(error):
                        raise
                    _fail(context, method, error)

            return handler._replace(unary_unary=unary)  # type: ignore[attr-defined,no-any-return]
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from inner_stream(request, context)
                except Exception as error:
                    if _is_abort(error):
                        raise
                    _fail(context, method, error)

            return handler._replace(unary_stream=stream)  # type: ignore[attr-defined,no-any-return]
        return handler


__all__ = ["FaultTranslation", "abort"]
