"""Optional bearer-token authentication for both doors, and TLS material.

With a token configured (`TEACHER_AUTH_TOKEN`, or a file named by `TEACHER_AUTH_TOKEN_FILE`), every
request must carry `authorization: Bearer <token>` (gRPC metadata or HTTP header), except the
health checks (gRPC `grpc.health.v1.Health`, HTTP `/healthz`, `/readyz`, `/v2/health/*`), the
metrics scrape (`/metrics`) and the API docs (`/docs`, `/openapi.json`), which orchestrators and
operators reach without credentials. Tokens are compared in constant time. Without a token nothing
is checked.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from starlette.types import ASGIApp, Receive, Scope, Send

from protocol.errors import Unauthenticated
from teacher_server.http_errors import error_response

EXEMPT_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
EXEMPT_HTTP_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/openapi.json",
        "/v2/health/live",
        "/v2/health/ready",
    }
)


def authorized(header: str | None, token: str) -> bool:
    expected = f"Bearer {token}".encode()
    return header is not None and hmac.compare_digest(header.encode(), expected)


def _missing() -> Unauthenticated:
    return Unauthenticated("authorization: missing or wrong bearer token", "authorization")


class GrpcTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the bearer token with UNAUTHENTICATED (health and reflection exempt).
    Goes after `teacher_server.grpc_errors.ErrorInterceptor`, which answers the refusal."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method  # type: ignore[attr-defined]
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(EXEMPT_GRPC_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())  # type: ignore[attr-defined]
        if authorized(metadata.get("authorization"), self._token):
            return handler
        return _refusing(handler)


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    raise _missing()  # answered by teacher_server.grpc_errors.ErrorInterceptor


async def _refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    raise _missing()
    yield  # a generator, as grpc expects of a response-streaming handler


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that raises `Unauthenticated`."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_refuse_stream, **kwargs)  # type: ignore[arg-type]
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_refuse, **kwargs)  # type: ignore[arg-type]
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_refuse_stream, **kwargs)  # type: ignore[arg-type]
    return grpc.unary_unary_rpc_method_handler(_refuse, **kwargs)  # type: ignore[arg-type]


class HttpTokenMiddleware:
    """ASGI middleware: 401, in the error body of the API the path belongs to, for requests
    without the token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_HTTP_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if authorized(headers.get("authorization"), self.token):
            await self.app(scope, receive, send)
            return
        response = error_response(scope["path"], _missing(), headers={"www-authenticate": "Bearer"})
        await response(scope, receive, send)


def grpc_server_credentials(cert_file: Path, key_file: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(key_file.read_bytes(), cert_file.read_bytes())])
