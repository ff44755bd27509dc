"""Who may do what, for both doors: credentials with scopes, the client identity, and TLS material.

Credentials are bearer tokens (`authorization: Bearer <token>`, gRPC metadata or HTTP header),
each naming a client with scopes: `infer` (soft targets, model info: what students do) and `admin`
(the reload: what operators do). They come from three settings, all optional:

- `auth_tokens_file`: a TOML file of named clients (`[[clients]]` with `name`, `token_sha256` or
  `token`, `scopes`, `weight`, `max_queued_rows`; docs/operations.md, Roles);
- `auth_token` / `auth_token_file`: the one shared token of before, now a student credential
  (client `student`, scope `infer`);
- `operator_token` / `operator_token_file`: one operator credential (client `operator`, scopes
  `infer` and `admin`).

Rules: once any student credential (scope `infer` without `admin`) is configured, every call
needs a valid token; without one, calls without a token may infer (as before: no student
credential, no check), so adding an operator token alone protects the reload and nothing else. A
token that is sent but unknown is always refused (UNAUTHENTICATED). Admin calls (`ReloadModel`,
`POST /v1/models/{model}/reload`) need scope `admin`, and are off entirely (PERMISSION_DENIED)
unless an operator credential is configured. Exempt, with or without a token: the health checks
(gRPC `grpc.health.v1.Health`, HTTP `/healthz`, `/readyz`, `/v2/health/*`), reflection, the
metrics scrape (`/metrics`) and the API docs (`/docs`, `/openapi.json`).

Identity: a call with a token is its client's (all its connections and streams are one client,
so opening more streams buys no larger share); a call without one is named by its peer address,
`host:port` (one connection: a gRPC channel with all its streams, one HTTP keep-alive
connection) or `host` (`Settings.anonymous_client_key`). The checks run once per call in
`GrpcAuthInterceptor` / `HttpAuthMiddleware`, which also set the call's
`teacher_server.serving.clients.Client` for the batcher. Tokens are stored and compared as
SHA-256 digests (`hmac.compare_digest` on the digest), never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import tomllib
from starlette.types import ASGIApp, Receive, Scope, Send

from protocol.errors import PermissionDenied, TeacherError, Unauthenticated
from teacher_server.http_errors import error_response
from teacher_server.serving.clients import ADMIN, INFER, SCOPES, Client, set_current_client
from teacher_server.settings import Settings

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
ADMIN_GRPC_METHODS = frozenset({"/distill.v1.TeacherService/ReloadModel"})
ADMIN_HTTP_PATH = re.compile(r"^/v1/models/.+/reload/?$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def token_sha256(token: str) -> str:
    """The hex SHA-256 of a token: what a tokens file stores (`token_sha256`)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Credentials:
    """The configured credentials: token digest -> client. Build with `load_credentials`."""

    clients: dict[str, Client]
    anonymous_key: Literal["connection", "host"] = "connection"

    @property
    def anonymous_may_infer(self) -> bool:
        """No student credential (scope `infer` without `admin`) is configured: calls without a
        token may infer, as on a server with no credential at all."""
        return not any(
            INFER in client.scopes and ADMIN not in client.scopes
            for client in self.clients.values()
        )

    @property
    def admin_configured(self) -> bool:
        return any(ADMIN in client.scopes for client in self.clients.values())

    @property
    def client_names(self) -> list[str]:
        return sorted(client.name for client in self.clients.values())

    def authenticate(self, header: str | None) -> Client | None:
        """The client a bearer header names; None for no header when anonymous calls are
        allowed to try (see `authorize`). Raises `Unauthenticated` for a wrong token, or for
        none when a student credential is required."""
        if header is None or not self.clients:
            if self.anonymous_may_infer:
                return None
            raise _missing()
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or not token:
            raise _missing()
        digest = token_sha256(token)
        for known, client in self.clients.items():  # a handful: constant time per entry
            if hmac.compare_digest(known, digest):
                return client
        raise _missing()

    def authorize(self, client: Client | None, scope: str, what: str) -> None:
        """Raise unless `client` (None: no token) may make a call needing `scope`."""
        if scope == ADMIN and not self.admin_configured:
            raise PermissionDenied(
                f"authorization: {what} is off: no operator credential (scope 'admin') is "
                "configured (set TEACHER_OPERATOR_TOKEN, or a tokens file entry with scope "
                "'admin'; docs/operations.md)",
                "authorization",
            )
        if client is None:
            if scope == INFER:
                return  # `authenticate` let it through: no student credential is configured
            raise Unauthenticated(
                f"authorization: {what} needs a bearer token with scope {scope!r}",
                "authorization",
            )
        if scope not in client.scopes:
            raise PermissionDenied(
                f"authorization: {what} needs a token with scope {scope!r}; client "
                f"{client.name!r} has {sorted(client.scopes)}",
                "authorization",
            )

    def anonymous(self, host: str, port: int | None) -> Client:
        """The client a call without a token stands for, named by its peer address."""
        bracketed = f"[{host}]" if ":" in host else host
        name = bracketed if self.anonymous_key == "host" or port is None else f"{bracketed}:{port}"
        return Client(name, scopes=frozenset({INFER}))


def _missing() -> Unauthenticated:
    return Unauthenticated("authorization: missing or wrong bearer token", "authorization")


def read_tokens_file(path: Path) -> list[tuple[str, Client]]:
    """(token digest, client) per `[[clients]]` entry of a TOML tokens file. Raises ValueError
    naming the file, the entry and the field at fault."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"auth_tokens_file {path}: {error}") from error
    unknown = set(data) - {"clients"}
    if unknown:
        raise ValueError(f"auth_tokens_file {path}: unknown keys {sorted(unknown)}")
    entries = data.get("clients", [])
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"auth_tokens_file {path}: expected one or more [[clients]] tables")
    out = []
    for index, entry in enumerate(entries):
        where = f"auth_tokens_file {path}: clients[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a table")
        unknown = set(entry) - {
            "name",
            "token",
            "token_sha256",
            "scopes",
            "weight",
            "max_queued_rows",
        }
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}.name: expected a non-empty string, got {name!r}")
        where = f"{where} ({name!r})"
        if ("token" in entry) == ("token_sha256" in entry):
            raise ValueError(f"{where}: give exactly one of token, token_sha256")
        if "token" in entry:
            token = entry["token"]
            if not isinstance(token, str) or not token or any(c.isspace() for c in token):
                raise ValueError(f"{where}.token: expected a non-empty string without spaces")
            digest = token_sha256(token)
        else:
            digest = str(entry["token_sha256"]).lower()
            if not _SHA256_HEX.match(digest):
                raise ValueError(f"{where}.token_sha256: expected 64 hex digits, got {digest!r}")
        scopes = entry.get("scopes", [INFER])
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= SCOPES:
            raise ValueError(
                f"{where}.scopes: expected a non-empty list of {sorted(SCOPES)}, got {scopes!r}"
            )
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"{where}.weight: expected a number > 0, got {weight!r}")
        if not (math.isfinite(weight) and 0 < weight <= 1000):
            raise ValueError(f"{where}.weight: expected a number in (0, 1000], got {weight!r}")
        cap = entry.get("max_queued_rows")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise ValueError(f"{where}.max_queued_rows: expected an integer >= 0, got {cap!r}")
        client = Client(name, frozenset(scopes), float(weight), cap, named=True)
        out.append((digest, client))
    return out


def load_credentials(settings: Settings) -> Credentials:
    """Every credential the settings configure (tokens file, student token, operator token).
    Raises ValueError for a bad tokens file, or two entries with one token or one name."""
    entries: list[tuple[str, Client]] = []
    if settings.auth_tokens_file is not None:
        entries += read_tokens_file(settings.auth_tokens_file)
    student = settings.token()
    if student:
        entries.append((token_sha256(student), Client("student", frozenset({INFER}), named=True)))
    operator = settings.operator()
    if operator:
        client = Client("operator", frozenset({INFER, ADMIN}), named=True)
        entries.append((token_sha256(operator), client))
    clients: dict[str, Client] = {}
    names: set[str] = set()
    for digest, client in entries:
        if digest in clients:
            raise ValueError(
                f"credentials: clients {clients[digest].name!r} and {client.name!r} have the "
                "same token"
            )
        if client.name in names:
            raise ValueError(f"credentials: two clients are named {client.name!r}")
        names.add(client.name)
        clients[digest] = client
    return Credentials(clients, settings.anonymous_client_key)


# ---- gRPC ------------------------------------------------------------------------------------


def _grpc_peer(peer: str) -> tuple[str, int | None]:
    """`ipv4:127.0.0.1:5000` / `ipv6:[::1]:5000` / `unix:/path` -> (host, port)."""
    _, _, address = peer.partition(":")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address or peer, None
    return host.strip("[]"), int(port)


Behaviour = Callable[[Any, grpc.aio.ServicerContext], Any]


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call's token and scope (health and reflection exempt) and sets its client.
    Goes after `teacher_server.grpc_errors.ErrorInterceptor`, which answers the refusals."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

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
        scope = ADMIN if method in ADMIN_GRPC_METHODS else INFER
        try:
            client = self._credentials.authenticate(metadata.get("authorization"))
            self._credentials.authorize(client, scope, method.rsplit("/", 1)[-1])
        except TeacherError as error:
            return _refusing(handler, error)
        return _as_client(handler, client, self._credentials)


def _as_client(
    handler: grpc.RpcMethodHandler, client: Client | None, credentials: Credentials
) -> grpc.RpcMethodHandler:
    """`handler`, run as `client` (None: the anonymous client of the call's peer)."""

    def enter(context: grpc.aio.ServicerContext) -> None:
        # Each call runs in its own task: the value is the call's (and its tasks') alone.
        set_current_client(client or credentials.anonymous(*_grpc_peer(context.peer())))

    def unary(inner: Behaviour) -> Behaviour:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
            enter(context)
            return await inner(request, context)

        return behaviour

    def streaming(inner: Behaviour) -> Behaviour:
        if not inspect.isasyncgenfunction(inner):
            return unary(inner)

        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            enter(context)
            async for response in inner(request, context):
                yield response

        return behaviour

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)


def _refusing(handler: grpc.RpcMethodHandler, error: TeacherError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that raises `error`."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        raise error  # answered by teacher_server.grpc_errors.ErrorInterceptor

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        raise error
        yield  # a generator, as grpc expects of a response-streaming handler

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)  # type: ignore[arg-type]
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)  # type: ignore[arg-type]
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kwargs)  # type: ignore[arg-type]
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)  # type: ignore[arg-type]


# ---- HTTP ------------------------------------------------------------------------------------


class HttpAuthMiddleware:
    """ASGI middleware: checks each request's token and scope (401 / 403 in the error body of the
    API the path belongs to) and sets its client for the handlers."""

    def __init__(self, app: ASGIApp, credentials: Credentials) -> None:
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in EXEMPT_HTTP_PATHS:
            await self.app(scope, receive, send)
            return
        header = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                header = value.decode("latin-1")
                break
        needed = ADMIN if ADMIN_HTTP_PATH.match(path) else INFER
        try:
            client = self.credentials.authenticate(header)
            self.credentials.authorize(client, needed, f"{scope['method']} {path}")
        except TeacherError as error:
            headers = {"www-authenticate": "Bearer"} if isinstance(error, Unauthenticated) else {}
            response = error_response(path, error, headers=headers)
            await response(scope, receive, send)
            return
        if client is None:
            host, port = scope.get("client") or ("unknown", None)
            client = self.credentials.anonymous(host, port)
        set_current_client(client)
        await self.app(scope, receive, send)


def grpc_server_credentials(cert_file: Path, key_file: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(key_file.read_bytes(), cert_file.read_bytes())])
