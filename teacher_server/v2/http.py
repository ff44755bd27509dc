"""The HTTP door of the Open Inference Protocol (KServe v2 / Triton), beside our own `/v1` routes.

`create_v2_router(core)` adds `/v2` (server metadata), `/v2/health/{live,ready}`,
`/v2/models/{model}[/versions/{version}]` (metadata), `.../ready` and `.../infer` (JSON or the
binary tensor data extension), so `tritonclient.http` works unchanged. The version in a path is a
served `model_version` or its label (see `teacher_server.v2.metadata.resolve`); leaving it out
means the default. Handlers decode (`teacher_server.v2.convert_http`), call the core, encode.
Errors are answered by `teacher_server.http_errors` with the v2 body `{"error": "<message>"}` and
the HTTP code of their `protocol.errors` class.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from teacher_server.http_body import read_body
from teacher_server.serving.core import TeacherCore
from teacher_server.v2 import convert_http, metadata

BINARY_MEDIA_TYPE = "application/octet-stream"


def create_v2_router(core: TeacherCore, max_message_bytes: int | None = None) -> APIRouter:
    """The v2 routes over `core`; request bodies above `max_message_bytes` (default: the core's
    settings) get 413."""
    limit = core.settings.max_message_bytes if max_message_bytes is None else max_message_bytes
    router = APIRouter(tags=["open inference protocol (v2)"])

    @router.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        """Server name, version and extensions."""
        return metadata.server_metadata()

    @router.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        """Liveness: the process answers."""
        return {"live": True}

    @router.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        """Readiness: 200 when accepting requests, 503 while starting or stopping."""
        return JSONResponse({"ready": core.ready}, status_code=200 if core.ready else 503)

    async def model_metadata(model: str, version: str = "") -> dict[str, Any]:
        """Model metadata: input `inputs` [-1, *input_shape], one FP32 output per task."""
        info = metadata.resolve(core, model, version)
        return metadata.model_metadata(info, metadata.served_versions(core, model))

    async def model_ready(model: str, version: str = "") -> JSONResponse:
        """200 when the model (and version) is served and the server is ready."""
        metadata.resolve(core, model, version)
        return JSONResponse({"ready": core.ready}, status_code=200 if core.ready else 503)

    async def infer(request: Request, model: str, version: str = "") -> Response:
        """Soft targets for one batch: JSON, or the binary tensor data extension."""
        stamps = core.stages.begin("v2-http")  # None unless stage timing is on
        pinned = metadata.resolve(core, model, version).model_version if version else ""
        body = await read_body(request, limit)
        if stamps is not None:
            stamps.mark("received")  # the body, read from the connection
        decoded = convert_http.decode_http_infer(
            model, pinned, body, request.headers.get(convert_http.HEADER_LENGTH), limit
        )
        if stamps is not None:
            stamps.mark("decoded")
        result = await core.soft_targets(decoded.request, decoded.timeout, "v2-http")
        content, header_length = convert_http.encode_http_infer(result, decoded)
        if header_length is None:
            response = Response(content, media_type="application/json")
        else:
            response = Response(
                content,
                media_type=BINARY_MEDIA_TYPE,
                headers={convert_http.HEADER_LENGTH: str(header_length)},
            )
        if stamps is not None:
            stamps.door = "v2-http-json" if header_length is None else "v2-http-binary"
            stamps.mark("encoded")
        core.stages.finish(stamps)
        return response

    async def infer_route(request: Request) -> Response:
        """`infer` as a plain Starlette route: the hot path skips FastAPI's parameter solving."""
        params = request.path_params
        return await infer(request, params["model"], params.get("version", ""))

    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        router.add_api_route(prefix, model_metadata, methods=["GET"])
        router.add_api_route(prefix + "/ready", model_ready, methods=["GET"])
        # Matched first, so it serves every call; the FastAPI route after it documents the same
        # endpoint in the OpenAPI schema.
        router.add_route(prefix + "/infer", infer_route, methods=["POST"], include_in_schema=False)
        router.add_api_route(prefix + "/infer", infer, methods=["POST"], response_model=None)
    return router
