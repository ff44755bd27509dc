"""The error model: one small hierarchy, one table from error code to gRPC status and HTTP code.

Every error the teacher returns is a `TeacherError` subclass carrying a `message` that names the
field and the value, and the `field` itself (e.g. `inputs.shape`). The server raises them from its
core; each transport turns them into its own status with `grpc_status` / `http_status` (and, for
temporary refusals, a `Retry-After` of `retry_after_s`); the client turns a status back into the
same class with `error_from_code`, so a training script catches `InvalidArgument` whatever
transport it used. The classes are the one table: code, gRPC status, HTTP status, Retry-After.

On gRPC the code and field also travel as trailing metadata (`error-code`, `error-field`); on HTTP
the body is `{"error": {"code": ..., "message": ..., "field": ...}}` (`{"error": "<message>"}` on
the v2 routes).
"""

from __future__ import annotations

from typing import ClassVar

import grpc

GRPC_CODE_KEY = "error-code"
GRPC_FIELD_KEY = "error-field"


class TeacherError(Exception):
    """Base of every error the teacher service reports. `field` names the request field at fault."""

    code: ClassVar[str] = "INTERNAL"
    grpc_status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False
    retry_after_s: ClassVar[int | None] = None  # HTTP `Retry-After`: when to come back

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "field": self.field}

    def http_headers(self) -> dict[str, str]:
        """Headers an HTTP answer carries: `Retry-After` for temporary refusals."""
        return {} if self.retry_after_s is None else {"retry-after": str(self.retry_after_s)}

    def grpc_trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """The code and field as gRPC trailing metadata (`error-code`, `error-field`)."""
        return ((GRPC_CODE_KEY, self.code), (GRPC_FIELD_KEY, self.field))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, field={self.field!r})"


class InvalidArgument(TeacherError):
    """The request is malformed: wrong shape, dtype, value, unknown task... Never retry."""

    code = "INVALID_ARGUMENT"
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(TeacherError):
    """The named model (or route) does not exist."""

    code = "NOT_FOUND"
    grpc_status = grpc.StatusCode.NOT_FOUND
    http_status = 404


class FailedPrecondition(TeacherError):
    """The request is valid but the server's state does not allow it (e.g. a pinned model version
    differs from the served one). Retrying the same request does not help."""

    code = "FAILED_PRECONDITION"
    grpc_status = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 412


class ResourceExhausted(TeacherError):
    """The server is overloaded (queue full) or a message is too large for its limits."""

    code = "RESOURCE_EXHAUSTED"
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    retryable = True
    retry_after_s: ClassVar[int | None] = 1


class MessageTooLarge(ResourceExhausted):
    """A message above the server's size limit. Same code and gRPC status as `ResourceExhausted`
    (what gRPC itself reports for oversized messages), HTTP 413; retrying the same message cannot
    help. Clients see it as `ResourceExhausted` with field `body`."""

    http_status = 413
    retryable = False
    retry_after_s = None


class Unavailable(TeacherError):
    """The server (or the model) cannot answer now: starting, shutting down, unreachable."""

    code = "UNAVAILABLE"
    grpc_status = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    retryable = True
    retry_after_s: ClassVar[int | None] = 1


class DeadlineExceeded(TeacherError):
    """The request's deadline passed before it was answered."""

    code = "DEADLINE_EXCEEDED"
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    retryable = True


class Unauthenticated(TeacherError):
    """No valid credentials were sent."""

    code = "UNAUTHENTICATED"
    grpc_status = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class PermissionDenied(TeacherError):
    """The credentials are valid but lack the scope the call needs (e.g. a student token calling
    the admin reload). Retrying with the same credentials does not help."""

    code = "PERMISSION_DENIED"
    grpc_status = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class Internal(TeacherError):
    """A bug or an unexpected failure in the server; the message says what failed."""


ERRORS: dict[str, type[TeacherError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        Internal,
    )
}
"""The table: error code -> class (each class holds its gRPC status and HTTP code)."""

_BY_GRPC_STATUS: dict[grpc.StatusCode, type[TeacherError]] = {
    cls.grpc_status: cls for cls in ERRORS.values()
}
_BY_GRPC_STATUS[grpc.StatusCode.CANCELLED] = Unavailable

_BY_HTTP_STATUS: dict[int, type[TeacherError]] = {cls.http_status: cls for cls in ERRORS.values()}
_BY_HTTP_STATUS[405] = InvalidArgument  # a method the route does not take


def error_from_code(code: str, message: str, field: str = "") -> TeacherError:
    """Rebuild the error a server reported as `code` (unknown codes become `Internal`)."""
    return ERRORS.get(code, Internal)(message, field)


def error_from_grpc_status(status: grpc.StatusCode, message: str, field: str = "") -> TeacherError:
    """Map a gRPC status (with no `error-code` metadata, e.g. from grpc itself) to an error."""
    return _BY_GRPC_STATUS.get(status, Internal)(message, field)


def error_from_http_status(status: int, message: str, field: str = "") -> TeacherError:
    """Map an HTTP status (e.g. a router's 404 or 405, with no error body of ours) to an error."""
    return _BY_HTTP_STATUS.get(status, Internal)(message, field)
