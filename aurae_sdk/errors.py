"""Exceptions the SDK raises: one class per gRPC status, under `AuraeError`.

The daemon names the offending request field in a standard
`google.rpc.BadRequest` detail; `AuraeError.field` carries it, so a script can
say which argument was wrong without parsing messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

# gRPC status codes by number; kept here so importing this module does not
# import grpc.
STATUS_NAMES = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class AuraeError(Exception):
    """A call to the daemon failed. `code` is the gRPC status name
    ("NOT_FOUND"), `status` its number, `field` the request field the daemon
    blamed (dotted path, or None)."""

    status: int = 2
    code: str = "UNKNOWN"

    def __init__(self, message: str, *, field: str | None = None, method: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.method = method

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        return f"{self.code}: {self.message}{where}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, field={self.field!r})"


class Cancelled(AuraeError):
    status, code = 1, "CANCELLED"


class Unknown(AuraeError):
    status, code = 2, "UNKNOWN"


class InvalidArgument(AuraeError):
    status, code = 3, "INVALID_ARGUMENT"


class DeadlineExceeded(AuraeError):
    status, code = 4, "DEADLINE_EXCEEDED"


class NotFound(AuraeError):
    status, code = 5, "NOT_FOUND"


class AlreadyExists(AuraeError):
    status, code = 6, "ALREADY_EXISTS"


class PermissionDenied(AuraeError):
    status, code = 7, "PERMISSION_DENIED"


class ResourceExhausted(AuraeError):
    status, code = 8, "RESOURCE_EXHAUSTED"


class FailedPrecondition(AuraeError):
    status, code = 9, "FAILED_PRECONDITION"


class Aborted(AuraeError):
    status, code = 10, "ABORTED"


class OutOfRange(AuraeError):
    status, code = 11, "OUT_OF_RANGE"


class Unimplemented(AuraeError):
    status, code = 12, "UNIMPLEMENTED"


class Internal(AuraeError):
    status, code = 13, "INTERNAL"


class Unavailable(AuraeError):
    status, code = 14, "UNAVAILABLE"


class DataLoss(AuraeError):
    status, code = 15, "DATA_LOSS"


class Unauthenticated(AuraeError):
    status, code = 16, "UNAUTHENTICATED"


ERRORS_BY_STATUS: dict[int, type[AuraeError]] = {
    cls.status: cls
    for cls in (
        Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated,
    )
}


def blamed_field(trailing_metadata: Any) -> str | None:
    """The first field violation in a google.rpc.Status detail, if any."""
    if not trailing_metadata:
        return None
    raw = next((value for key, value in trailing_metadata if key == STATUS_DETAILS_KEY), None)
    if not isinstance(raw, bytes):
        return None
    # Only errors pay for these imports.
    from google.rpc import error_details_pb2, status_pb2

    status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):  # type: ignore[arg-type]
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            if bad_request.field_violations:
                return str(bad_request.field_violations[0].field)
    return None


def from_rpc_error(error: grpc.RpcError, method: str | None = None) -> AuraeError:
    """Turn a grpc.RpcError (sync or asyncio) into the matching AuraeError."""
    code = error.code()
    number = code.value[0] if code is not None else 2
    details = error.details() or (code.value[1] if code is not None else "")
    try:
        field = blamed_field(error.trailing_metadata())
    except Exception:  # noqa: BLE001 - a malformed detail must not hide the real error
        field = None
    cls = ERRORS_BY_STATUS.get(number, Unknown)
    return cls(details, field=field, method=method)
