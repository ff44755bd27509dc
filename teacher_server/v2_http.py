"""The Open Inference Protocol (KServe v2 / Triton) over HTTP, beside our own `/v1` routes.

`create_v2_router(core)` adds `/v2` (server metadata), `/v2/health/{live,ready}`,
`/v2/models/{model}[/versions/{version}]` (metadata), `.../ready` and `.../infer` (JSON or the
binary tensor data extension), so `tritonclient.http` works unchanged. The version in a path is a
served `model_version` or its label (see `v2_convert.resolve`); leaving it out means the default. Handlers decode
(`teacher_server.v2_convert`), call the core, encode. Errors use the v2 body `{"error": "<message>"}`
with the HTTP code of their `protocol.errors` class.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from protocol.errors import TeacherError
from teacher_server import v2_convert
from teacher_server.core import TeacherCore
from teacher_server.http_body import read_body

RETRY_AFTER_S = 1
BINARY_MEDIA_TYPE = "application/octet-stream"


def error_response(error: TeacherError) -> JSONResponse:
    """The v2 error body, `{"error": "<message>"}`, with the error's HTTP status."""
    headers = {"retry-after": str(RETRY_AFTER_S)} if error.http_status in (429, 503) else None
    return JSONResponse({"error": error.message}, status_code=error.http_status, headers=headers)


class _V2Route(APIRoute):
    """A route whose `TeacherError`s become the v2 error body (not the `/v1` one)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except TeacherError as error:
                return error_response(error)

        return handle


def create_v2_router(core: TeacherCore, max_message_bytes: int | None = None) -> APIRouter:
    """The v2 routes over `core`; request bodies above `max_message_bytes` (default: the core's
    settings) get 413."""
    limit = core.settings.max_message_bytes if max_message_bytes is None else max_message_bytes
    router = APIRouter(route_class=_V2Route, tags=["open inference protocol (v2)"])

    @router.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        """Server name, version and extensions."""
        return v2_convert.server_metadata()

    @router.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        """Liveness: the process answers."""
        return {"live": True}

    @router.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        """Readiness: 200 when accepting requests, 503 while starting or stopping."""
        return JSONResponse({"ready": core.ready}, status_code=200 if core.ready else 503)

    async def metadata(model: str, version: str = "") -> dict[str, Any]:
        """Model metadata: input `inputs` [-1, *input_shape], one FP32 output per task."""
        info = v2_convert.resolve(core, model, version)
        return v2_convert.model_metadata(info, v2_convert.served_versions(core, model))

    async def model_ready(model: str, version: str = "") -> JSONResponse:
        """200 when the model (and version) is served and the server is ready."""
        v2_convert.resolve(core, model, version)
        return JSONResponse({"ready": core.ready}, status_code=200 if core.ready else 503)

    async def infer(request: Request, model: str, version: str = "") -> Response:
        """Soft targets for one batch: JSON, or the binary tensor data extension."""
        pinned = v2_convert.resolve(core, model, version).model_version if version else ""
        body = await read_body(request, limit)
        decoded = v2_convert.decode_http_infer(
            model, pinned, body, request.headers.get(v2_convert.HEADER_LENGTH), limit
        )
        result = await core.soft_targets(decoded.request, decoded.timeout, "v2-http")
        content, header_length = v2_convert.encode_http_infer(result, decoded)
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(
            content,
            media_type=BINARY_MEDIA_TYPE,
            headers={v2_convert.HEADER_LENGTH: str(header_length)},
        )

    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        router.add_api_route(prefix, metadata, methods=["GET"])
        router.add_api_route(prefix + "/ready", model_ready, methods=["GET"])
        router.add_api_route(prefix + "/infer", infer, methods=["POST"], response_model=None)
    return router
