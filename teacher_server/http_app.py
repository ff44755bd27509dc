"""The HTTP front door: a FastAPI app over the same core as gRPC (OpenAPI docs at `/docs`).

Routes decode JSON into the core's request, call the core, encode. Errors use one body shape,
`{"error": {"code", "message", "field"}}`, with the HTTP code from `protocol.errors`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocol import codec
from protocol.errors import InvalidArgument, TeacherError
from teacher_server.core import TeacherCore
from teacher_server.schema import SoftTargets, SoftTargetsRequest


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
    temperature: float = Field(1.0, description="softmax temperature T > 0")
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
        array = np.asarray(body.inputs, dtype=body.dtype)
    except (ValueError, TypeError, OverflowError) as error:
        raise InvalidArgument(
            f"inputs: not a rectangular array of {body.dtype} numbers ({error})", "inputs"
        ) from None
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


def _error_response(error: TeacherError) -> JSONResponse:
    return JSONResponse({"error": error.to_dict()}, status_code=error.http_status)


def create_app(core: TeacherCore) -> FastAPI:
    app = FastAPI(
        title="Distillation teacher",
        summary="Soft targets of a multi-task teacher, per task, at a chosen temperature.",
        version="1",
    )

    @app.exception_handler(TeacherError)
    async def teacher_error(request: Request, error: TeacherError) -> JSONResponse:
        return _error_response(error)

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
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        field = ".".join(location) or "body"
        if first.get("type") == "json_invalid":
            field = "body"
        message = f"{field}: {first.get('msg', 'invalid')}"
        if "input" in first and first.get("type") != "json_invalid":
            message += f", got {str(first['input'])[:80]!r}"
        return _error_response(InvalidArgument(message, field))

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        """Readiness: models loaded and accepting requests (503 while starting or stopping)."""
        ready = core.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/v1/models", tags=["models"])
    async def list_models() -> dict[str, Any]:
        return {
            "models": [
                {"name": m.name, "model_version": m.model_version, "ready": m.ready}
                for m in core.list_models()
            ]
        }

    @app.get("/v1/models/{model}", tags=["models"])
    async def get_model(model: str) -> dict[str, Any]:
        """Tasks (class names, held-out accuracy), input shape and dtypes, version, hints."""
        return asdict(core.model_info(model))

    @app.post("/v1/models/{model}/soft-targets", tags=["soft targets"])
    async def soft_targets(model: str, body: SoftTargetsBody) -> dict[str, Any]:
        request = SoftTargetsRequest(
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
        return soft_targets_json(await core.soft_targets(request))

    return app
