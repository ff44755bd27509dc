"""The HTTP error path: every error answered in the body format of the API its path belongs to.

`/v2` and `/v2/...` are the Open Inference Protocol: `{"error": "<message>"}`. Every other path is
ours: `{"error": {"code", "message", "field"}}`, or a serialized `distill.v1.Error` when the request
was `application/x-protobuf`. The HTTP status and `Retry-After` come from the error's class in
`protocol.errors`; a router's own 404 and 405 and pydantic's validation errors take the same path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocol.errors import InvalidArgument, TeacherError, error_from_http_status
from protocol.v1 import teacher_pb2 as pb

PROTOBUF = "application/x-protobuf"
_PROTOBUF_TYPES = (PROTOBUF, "application/protobuf", "application/vnd.google.protobuf")


def invalid_argument(errors: list[Any]) -> InvalidArgument:
    """The first pydantic error as an `InvalidArgument` naming the field."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(location) or "body"
    if first.get("type") == "json_invalid":
        field = "body"
    message = f"{field}: {first.get('msg', 'invalid')}"
    if "input" in first and first.get("type") != "json_invalid":
        message += f", got {str(first['input'])[:80]!r}"
    return InvalidArgument(message, field)


def media_type(content_type: str | None) -> str:
    """A `Content-Type` header's media type, without parameters (`charset=...`)."""
    return (content_type or "").split(";")[0].strip()


def is_protobuf(request: Request) -> bool:
    return media_type(request.headers.get("content-type")) in _PROTOBUF_TYPES


def is_v2_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_response(
    path: str,
    error: TeacherError,
    *,
    protobuf: bool = False,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The answer to a request for `path` that failed with `error` (`status`: instead of the
    error's own HTTP status, e.g. a router's 405)."""
    status = error.http_status if status is None else status
    headers = {**error.http_headers(), **(headers or {})}
    if is_v2_path(path):
        return JSONResponse({"error": error.message}, status_code=status, headers=headers)
    if protobuf:
        message = pb.Error(code=error.code, message=error.message, field=error.field)
        return Response(message.SerializeToString(), status, headers=headers, media_type=PROTOBUF)
    return JSONResponse({"error": error.to_dict()}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Answer `TeacherError`s, unknown routes and methods, and invalid parameters per API."""

    @app.exception_handler(TeacherError)
    async def teacher_error(request: Request, error: TeacherError) -> Response:
        return error_response(request.url.path, error, protobuf=is_protobuf(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        path = request.url.path
        refusal = error_from_http_status(
            error.status_code, f"{request.method} {path}: {error.detail}", "path"
        )
        return error_response(path, refusal, status=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> Response:
        return error_response(request.url.path, invalid_argument(list(error.errors())))
