"""The HTTP door of our own protocol: the `/v1` routes, over the same core as gRPC.

Routes decode the body into the core's request (`teacher_server.v1.convert`), call the core,
encode. `POST /v1/models/{model}/soft-targets` speaks JSON or, with `Content-Type:
application/x-protobuf`, the same `distill.v1` messages as gRPC (binary tensors, no JSON number
parsing). Errors are answered by `teacher_server.http_errors`: `{"error": {"code", "message",
"field"}}` (a `distill.v1.Error` message for protobuf requests), with the HTTP code from
`protocol.errors`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.routing import Route

from protocol.errors import InvalidArgument
from teacher_server.http_body import read_body
from teacher_server.http_errors import PROTOBUF, is_protobuf, media_type
from teacher_server.serving.core import TeacherCore
from teacher_server.v1 import convert

TIMEOUT_HEADER = "x-request-timeout"
TOKENIZER_SHA256_HEADER = "x-tokenizer-sha256"


def _timeout(request: Request) -> float | None:
    """The client's deadline in seconds from the `X-Request-Timeout` header, if any."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise InvalidArgument(
            f"{TIMEOUT_HEADER}: expected seconds > 0, got {raw!r}", TIMEOUT_HEADER
        )
    return value


_SOFT_TARGETS_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": convert.SoftTargetsBody.model_json_schema()},
            PROTOBUF: {
                "schema": {"type": "string", "format": "binary"},
                "description": "a serialized distill.v1.SoftTargetsRequest; the answer is a "
                "serialized distill.v1.SoftTargetsResponse",
            },
        },
    }
}


def create_v1_router(core: TeacherCore, max_message_bytes: int) -> APIRouter:
    """The `/v1` routes over `core`; request bodies above `max_message_bytes` get 413."""
    router = APIRouter()

    @router.get("/v1/models", tags=["models"])
    async def list_models() -> dict[str, Any]:
        """Every served version of every model (`default_version` marks the one a request without
        `model_version` gets), and model folders that failed to load (`ready` false, `error`)."""
        return {"models": [asdict(m) for m in core.list_models()]}

    @router.get("/v1/models/{model}", tags=["models"])
    async def get_model(model: str, model_version: str = "") -> dict[str, Any]:
        """Tasks (class names, held-out accuracy), input shape and dtypes, version, hints; of the
        default version, or of `?model_version=sha256:...`."""
        return asdict(core.model_info(model, model_version))

    @router.get(
        "/v1/models/{model}/tokenizer",
        tags=["models"],
        response_class=Response,
        responses={200: {"content": {"application/json": {}}}},
    )
    async def get_tokenizer(model: str, model_version: str = "") -> Response:
        """A sequence model's tokenizer file, as stored (`tokenizer.json`), with its
        `sha256:<hex>` in `X-Tokenizer-Sha256` (the same as the model info's `tokenizer.sha256`)."""
        tokenizer, content = core.tokenizer_file(model, model_version)
        return Response(
            content,
            media_type="application/json",
            headers={
                TOKENIZER_SHA256_HEADER: tokenizer.sha256,
                "content-disposition": f'attachment; filename="{tokenizer.file_name}"',
            },
        )

    @router.post("/v1/models/{model}/reload", tags=["models"])
    async def reload_model(model: str) -> dict[str, Any]:
        """Admin: re-read the model's repository folder; new versions load, removed versions
        finish what they accepted and unload (protected by the bearer token when auth is on)."""
        return asdict(await core.reload(model))

    @router.post(
        "/v1/models/{model}/soft-targets",
        tags=["soft targets"],
        openapi_extra=_SOFT_TARGETS_OPENAPI,
        response_model=None,
    )
    async def soft_targets(model: str, request: Request) -> Response:
        """Soft targets for one batch: JSON (`SoftTargetsBody`) or `application/x-protobuf`."""
        protobuf = is_protobuf(request)
        stamps = core.stages.begin("http-protobuf" if protobuf else "http-json")  # None: off
        raw = await read_body(request, max_message_bytes)
        if stamps is not None:
            stamps.mark("received")  # the body, read from the connection
        if protobuf:
            query = convert.request_from_protobuf(model, raw, max_message_bytes)
            if stamps is not None:
                stamps.mark("decoded")
            result = await core.soft_targets(query, _timeout(request), "http-protobuf")
            body = convert.response_to_pb(result).SerializeToString()
            if stamps is not None:
                stamps.mark("encoded")
            core.metrics.record_bytes("http-protobuf", len(raw), len(body))
            core.stages.finish(stamps)
            return Response(body, media_type=PROTOBUF)
        content_type = media_type(request.headers.get("content-type"))
        if content_type not in ("", "application/json"):
            raise InvalidArgument(
                f"content-type: {content_type!r} is not application/json or {PROTOBUF}",
                "content-type",
            )
        query = convert.request_from_json(model, raw)
        if stamps is not None:
            stamps.mark("decoded")
        result = await core.soft_targets(query, _timeout(request), "http-json")
        response = JSONResponse(convert.soft_targets_json(result))
        if stamps is not None:
            stamps.mark("encoded")
        core.metrics.record_bytes("http-json", len(raw), len(response.body))
        core.stages.finish(stamps)
        return response

    async def soft_targets_route(request: Request) -> Response:
        """`soft_targets` as a plain Starlette route: the hot path skips FastAPI's parameter
        solving. Put before the FastAPI route, which documents the endpoint in the schema."""
        return await soft_targets(request.path_params["model"], request)

    router.routes.insert(
        0,
        Route(
            "/v1/models/{model}/soft-targets",
            soft_targets_route,
            methods=["POST"],
            include_in_schema=False,
        ),
    )
    return router
