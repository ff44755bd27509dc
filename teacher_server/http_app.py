"""The HTTP front door: a FastAPI app over the same core as gRPC (OpenAPI docs at `/docs`).

Routes decode the body into the core's request, call the core, encode. `POST
/v1/models/{model}/soft-targets` speaks JSON or, with `Content-Type: application/x-protobuf`, the
same `distill.v1` messages as gRPC (binary tensors, no JSON number parsing). Errors use one body
shape, `{"error": {"code", "message", "field"}}` (a `distill.v1.Error` message for protobuf
requests), with the HTTP code from `protocol.errors`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from google.protobuf.message import DecodeError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocol import codec
from protocol.errors import InvalidArgument, TeacherError
from protocol.v1 import teacher_pb2 as pb
from teacher_server import wire
from teacher_server.core import TeacherCore
from teacher_server.http_body import read_body
from teacher_server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from teacher_server.schema import SoftTargets, SoftTargetsRequest
from teacher_server.security import HttpTokenMiddleware
from teacher_server.v2_http import create_v2_router


class SoftTargetsBody(BaseModel):
    """JSON body of `POST /v1/models/{model}/soft-targets`."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] = Field(
        description="the batch as nested lists, shape [N, *input_shape]; or flat, with `shape`"
    )
    shape: list[int] | None = Field(None, description="reshape a flat `inputs` list to this shape")
    dtype: str = Field(
        "float32", description="element type of `inputs`: float32, float16, uint8, int64"
    )
    tasks: list[str] = Field(default_factory=list, description="tasks to return; empty: all")
    temperature: float = Field(1.0, strict=True, description="softmax temperature T > 0")
    output: str = Field("probs", description="probs, log_probs or logits")
    batch_id: str = Field("", description="echoed in the response")
    model_version: str = Field("", description="if set, fail unless the served version equals it")
    top_k: int = Field(0, ge=0, description="0: dense; k: the k largest classes per row")
    output_dtype: str = Field("float32", description="float32, float16 or bfloat16 rounding")
    hints: list[str] = Field(default_factory=list, description="intermediate features to return")


def _inputs_array(body: SoftTargetsBody) -> np.ndarray:
    dtype_value = codec.parse_dtype_name(body.dtype, "dtype")
    if dtype_value == codec.DTYPES_BY_NAME["bfloat16"]:
        raise InvalidArgument("dtype: bfloat16 inputs are not accepted over JSON", "dtype")
    try:
        # Parsed as float64 first: JSON numbers are doubles, and integer dtypes must not silently
        # truncate 0.7 to 0 or wrap 300 to 44.
        parsed = np.asarray(body.inputs, dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as error:
        raise InvalidArgument(
            f"inputs: not a rectangular array of numbers ({error})", "inputs"
        ) from None
    dtype = np.dtype(body.dtype)
    # the cast below must not change a value: no truncated, wrapped or infinite numbers
    if dtype.kind in "iu" and parsed.size:
        info = np.iinfo(dtype)
        bad = (
            ~np.isfinite(parsed)
            | (parsed != np.round(parsed))
            | (parsed < info.min)
            | (parsed > info.max)
        )
        problem = f"is not a {body.dtype}"
    elif dtype.kind == "f" and parsed.size:
        bad = np.isfinite(parsed) & (np.abs(parsed) > np.finfo(dtype).max)
        problem = f"is outside the {body.dtype} range"
    else:
        bad, problem = np.zeros(0, bool), ""
    if bad.any():
        where = [int(i) for i in np.argwhere(bad)[0]]
        raise InvalidArgument(
            f"inputs: value {float(parsed[tuple(where)])!r} at index {where} {problem}", "inputs"
        )
    array = parsed.astype(dtype)
    if body.shape is not None:
        count = codec.element_count(body.shape, "inputs", codec.DEFAULT_MAX_ELEMENTS)
        if array.size != count:
            raise InvalidArgument(
                f"shape: {body.shape} needs {count} values, inputs has {array.size}", "shape"
            )
        array = array.reshape(body.shape)
    return array


def soft_targets_json(result: SoftTargets) -> dict[str, Any]:
    outputs: dict[str, Any] = {}
    for task in result.outputs:
        entry: dict[str, Any] = {"kind": task.kind, "values": task.values.tolist()}
        if task.indices is not None:
            entry["indices"] = task.indices.tolist()
        if task.tail_mass is not None:
            entry["tail_mass"] = task.tail_mass.tolist()
        outputs[task.task] = entry
    return {
        "model": result.model,
        "model_version": result.model_version,
        "batch_id": result.batch_id,
        "temperature": result.temperature,
        "outputs": outputs,
        "hints": {name: value.tolist() for name, value in result.hints.items()},
    }


PROTOBUF = "application/x-protobuf"
_PROTOBUF_TYPES = (PROTOBUF, "application/protobuf", "application/vnd.google.protobuf")


def _is_protobuf(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip() in _PROTOBUF_TYPES


RETRY_AFTER_S = 1


def _error_response(error: TeacherError, protobuf: bool = False) -> Response:
    # Overload is temporary: tell well-behaved clients when to come back.
    headers = {"retry-after": str(RETRY_AFTER_S)} if error.http_status in (429, 503) else None
    if protobuf:
        message = pb.Error(code=error.code, message=error.message, field=error.field)
        return Response(
            message.SerializeToString(), error.http_status, headers=headers, media_type=PROTOBUF
        )
    return JSONResponse({"error": error.to_dict()}, status_code=error.http_status, headers=headers)


def _validation_error(errors: list[Any]) -> InvalidArgument:
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


TIMEOUT_HEADER = "x-request-timeout"


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


def _request_from_json(model: str, raw: bytes) -> SoftTargetsRequest:
    try:
        body = SoftTargetsBody.model_validate_json(raw)
    except ValidationError as error:
        raise _validation_error(error.errors()) from None
    return SoftTargetsRequest(
        model=model,
        inputs=_inputs_array(body),
        tasks=tuple(body.tasks),
        temperature=body.temperature,
        output=body.output,
        batch_id=body.batch_id,
        model_version=body.model_version,
        top_k=body.top_k,
        output_dtype=body.output_dtype,
        hints=tuple(body.hints),
    )


def _request_from_protobuf(model: str, raw: bytes, max_elements: int) -> SoftTargetsRequest:
    try:
        message = pb.SoftTargetsRequest.FromString(raw)
    except DecodeError as error:
        raise InvalidArgument(
            f"body: not a distill.v1.SoftTargetsRequest ({error})", "body"
        ) from None
    if message.model and message.model != model:
        raise InvalidArgument(
            f"model: the body names {message.model!r} but the path names {model!r}", "model"
        )
    message.model = model
    return wire.request_from_pb(message, max_elements)


_SOFT_TARGETS_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SoftTargetsBody.model_json_schema()},
            PROTOBUF: {
                "schema": {"type": "string", "format": "binary"},
                "description": "a serialized distill.v1.SoftTargetsRequest; the answer is a "
                "serialized distill.v1.SoftTargetsResponse",
            },
        },
    }
}


def create_app(
    core: TeacherCore, max_message_bytes: int = 64 * 1024 * 1024, token: str | None = None
) -> FastAPI:
    """The app over `core`. Request bodies above `max_message_bytes` get 413; with `token`, every
    route but health, metrics and docs needs `authorization: Bearer <token>`."""
    app = FastAPI(
        title="Distillation teacher",
        summary="Soft targets of a multi-task teacher, per task, at a chosen temperature.",
        version="1",
    )
    if token:
        app.add_middleware(HttpTokenMiddleware, token=token)

    @app.exception_handler(TeacherError)
    async def teacher_error(request: Request, error: TeacherError) -> Response:
        return _error_response(error, _is_protobuf(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """Unknown routes and methods get the same error body as everything else."""
        code = {404: "NOT_FOUND", 405: "INVALID_ARGUMENT"}.get(error.status_code, "INTERNAL")
        body = {
            "code": code,
            "message": f"{request.method} {request.url.path}: {error.detail}",
            "field": "path",
        }
        return JSONResponse({"error": body}, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> Response:
        return _error_response(_validation_error(list(error.errors())))

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

    @app.get("/v1/models", tags=["models"])
    async def list_models() -> dict[str, Any]:
        """Every served version of every model (`default_version` marks the one a request without
        `model_version` gets), and model folders that failed to load (`ready` false, `error`)."""
        return {"models": [asdict(m) for m in core.list_models()]}

    @app.get("/v1/models/{model}", tags=["models"])
    async def get_model(model: str, model_version: str = "") -> dict[str, Any]:
        """Tasks (class names, held-out accuracy), input shape and dtypes, version, hints; of the
        default version, or of `?model_version=sha256:...`."""
        return asdict(core.model_info(model, model_version))

    @app.post("/v1/models/{model}/reload", tags=["models"])
    async def reload_model(model: str) -> dict[str, Any]:
        """Admin: re-read the model's repository folder; new versions load, removed versions
        finish what they accepted and unload (protected by the bearer token when auth is on)."""
        return asdict(await core.reload(model))

    @app.post(
        "/v1/models/{model}/soft-targets",
        tags=["soft targets"],
        openapi_extra=_SOFT_TARGETS_OPENAPI,
        response_model=None,
    )
    async def soft_targets(model: str, request: Request) -> Response:
        """Soft targets for one batch: JSON (`SoftTargetsBody`) or `application/x-protobuf`."""
        raw = await read_body(request, max_message_bytes)
        if _is_protobuf(request):
            query = _request_from_protobuf(model, raw, max_message_bytes)
            result = await core.soft_targets(query, _timeout(request), "http-protobuf")
            body = wire.response_to_pb(result).SerializeToString()
            core.metrics.record_bytes("http-protobuf", len(raw), len(body))
            return Response(body, media_type=PROTOBUF)
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type not in ("", "application/json"):
            raise InvalidArgument(
                f"content-type: {content_type!r} is not application/json or {PROTOBUF}",
                "content-type",
            )
        query = _request_from_json(model, raw)
        result = await core.soft_targets(query, _timeout(request), "http-json")
        response = JSONResponse(soft_targets_json(result))
        core.metrics.record_bytes("http-json", len(raw), len(response.body))
        return response

    app.include_router(create_v2_router(core, max_message_bytes))
    return app
