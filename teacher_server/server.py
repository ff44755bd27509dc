"""One teacher process: both doors, gRPC (`grpc.aio`) and HTTP (uvicorn + FastAPI), on one loop.

Both doors share one core (models, batchers) and speak both protocols, our own `distill.v1` and
the Open Inference Protocol (v2). Started by `teacher-server serve`.

Start-up order: load (or train) the models, start the batchers, bind both ports, then mark the
gRPC health service SERVING and write the port file, so a waiting client sees "ready" only when
both doors answer. On SIGTERM/SIGINT: readiness turns false, both servers stop accepting and
finish what is in flight within the grace period, then the process returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.grpc_errors import DecodeErrorInterceptor, ErrorInterceptor
from teacher_server.http_errors import add_error_handlers
from teacher_server.security import (
    Credentials,
    GrpcAuthInterceptor,
    HttpAuthMiddleware,
    grpc_server_credentials,
    load_credentials,
)
from teacher_server.serving.core import TeacherCore
from teacher_server.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from teacher_server.settings import Settings
from teacher_server.v1.grpc import TeacherServicer
from teacher_server.v1.http import create_v1_router
from teacher_server.v2.grpc import SERVICE_NAME as V2_SERVICE_NAME
from teacher_server.v2.grpc import add_inference_service
from teacher_server.v2.http import create_v2_router

log = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: this process handles signals once, for both doors."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def create_app(
    core: TeacherCore,
    max_message_bytes: int = 64 * 1024 * 1024,
    credentials: Credentials | None = None,
) -> FastAPI:
    """The HTTP door over `core`: our `/v1` routes, the v2 routes, health, metrics and the API
    docs at `/docs`. Request bodies above `max_message_bytes` get 413; `credentials` (default:
    none, so inference is open and the admin reload off) decide who may call what
    (`teacher_server.security`) and name each request's client."""
    app = FastAPI(
        title="Distillation teacher",
        summary="Soft targets of a multi-task teacher, per task, at a chosen temperature.",
        version="1",
    )
    app.add_middleware(HttpAuthMiddleware, credentials=credentials or Credentials({}))
    add_error_handlers(app)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        """Readiness: models loaded and accepting requests (503 while starting or stopping)."""
        ready = core.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus metrics (see docs/operations.md)."""
        return Response(core.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    app.include_router(create_v1_router(core, max_message_bytes))
    app.include_router(create_v2_router(core, max_message_bytes))
    return app


def _auth_summary(credentials: Credentials) -> str:
    """How the log line describes the credentials (names only, never tokens)."""
    infer = "open to every client" if credentials.anonymous_may_infer else "bearer token required"
    admin = "on" if credentials.admin_configured else "off (no operator credential)"
    names = f", clients {credentials.client_names}" if credentials.clients else ""
    return f"; inference {infer}, admin reload {admin}{names}"


def _write_port_file(path: Path, grpc_port: int, http_port: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"grpc_port": grpc_port, "http_port": http_port, "pid": os.getpid()}))
    tmp.replace(path)  # atomic: a reader never sees half a file


async def serve(settings: Settings, core: TeacherCore | None = None) -> None:
    """Serve until SIGTERM/SIGINT. Loads the repository (training the default teacher if absent)
    unless a `core` is given."""
    credentials = load_credentials(settings)  # a bad tokens file fails before any model loads
    if core is None:
        core = TeacherCore(settings)
        await asyncio.to_thread(core.load)
    core.metrics.client_labels.name(credentials.client_names)
    await core.start()

    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    # Errors first (it answers every TeacherError raised after it, the token check's included);
    # the token before decoding, so an unauthenticated call is refused whatever its body holds.
    interceptors: list[grpc.aio.ServerInterceptor] = [
        ErrorInterceptor(),
        GrpcAuthInterceptor(credentials),
        DecodeErrorInterceptor(),
    ]
    grpc_server = grpc.aio.server(options=options, interceptors=interceptors)
    max_elements = settings.max_message_bytes  # no tensor of N elements fits in fewer than N bytes
    pb_grpc.add_TeacherServiceServicer_to_server(
        TeacherServicer(core, max_elements, settings.stream_max_in_flight), grpc_server
    )
    add_inference_service(grpc_server, core, max_elements)  # Open Inference Protocol (v2)
    health = HealthServicer()
    for service in ("", "distill.v1.TeacherService"):  # SERVING only once both doors answer
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    reflection.enable_server_reflection(
        (
            pb.DESCRIPTOR.services_by_name["TeacherService"].full_name,
            V2_SERVICE_NAME,
            reflection.SERVICE_NAME,
        ),
        grpc_server,
    )
    grpc_address = f"{settings.host}:{settings.grpc_port}"
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        tls = grpc_server_credentials(settings.tls_cert_file, settings.tls_key_file)
        grpc_port = grpc_server.add_secure_port(grpc_address, tls)
    else:
        grpc_port = grpc_server.add_insecure_port(grpc_address)
    await grpc_server.start()

    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on such sockets, and without it Nagle
    # plus delayed ACKs add the peer's delayed-ACK timeout to every small HTTP response.
    http_socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    http_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    http_socket.bind((settings.host, settings.http_port))
    http_port = http_socket.getsockname()[1]
    http_server = _Uvicorn(
        uvicorn.Config(
            create_app(core, settings.max_message_bytes, credentials),
            log_level=settings.log_level,
            timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
            ssl_certfile=settings.tls_cert_file,
            ssl_keyfile=settings.tls_key_file,
        )
    )
    http_task = asyncio.create_task(http_server.serve(sockets=[http_socket]))
    while not http_server.started:
        if http_task.done():
            await http_task  # raises what failed
            raise RuntimeError("HTTP server stopped during start-up")
        await asyncio.sleep(0.01)

    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set("distill.v1.TeacherService", health_pb2.HealthCheckResponse.SERVING)
    if settings.port_file is not None:
        _write_port_file(settings.port_file, grpc_port, http_port)
    log.info(
        "teacher serving: gRPC %s:%d, HTTP %s://%s:%d (docs at /docs)%s",
        settings.host,
        grpc_port,
        "https" if settings.tls_cert_file else "http",
        settings.host,
        http_port,
        _auth_summary(credentials),
    )

    core.start_background_training()  # the default sequence teacher, if asked: not before ready
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info(
        "shutting down: no new requests, finishing what is in flight (grace %.0fs)",
        settings.shutdown_grace_s,
    )
    core.ready = False
    await health.enter_graceful_shutdown()
    http_server.should_exit = True
    await grpc_server.stop(settings.shutdown_grace_s)
    await http_task
    await core.stop()
    log.info("teacher stopped")
