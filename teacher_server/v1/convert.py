"""Conversion between `distill.v1` messages (protobuf, and the HTTP JSON body) and the core's types.

Protobuf serves the gRPC service and HTTP `application/x-protobuf`; the JSON body is the HTTP
default. Decoding checks what the wire needs; the core validates the rest, once for every door.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol import codec, packed
from protocol.errors import InvalidArgument
from protocol.v1 import teacher_pb2 as pb
from teacher_server.http_errors import invalid_argument
from teacher_server.serving.schema import (
    ModelInfo,
    SoftTargets,
    SoftTargetsRequest,
    TaskResult,
    TokenizerInfo,
    VersionSummary,
)

_KIND_FROM_PB = {
    pb.OUTPUT_KIND_UNSPECIFIED: "probs",
    pb.PROBS: "probs",
    pb.LOG_PROBS: "log_probs",
    pb.LOGITS: "logits",
}
_KIND_TO_PB = {"probs": pb.PROBS, "log_probs": pb.LOG_PROBS, "logits": pb.LOGITS}
_OUTPUT_DTYPE_FROM_PB = {pb.DATA_TYPE_UNSPECIFIED: "float32"} | {
    value: codec.DTYPE_NAMES[value] for value in (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16)
}
_TOP_K_ENCODING_FROM_PB = {
    pb.TOP_K_ENCODING_UNSPECIFIED: "tensors",
    pb.PACKED: "packed",
    pb.PACKED_LOG_PROB_CODES: "log_prob_codes",
}


def request_from_pb(message: pb.SoftTargetsRequest, max_elements: int) -> SoftTargetsRequest:
    """Decode the wire request; the core validates the rest."""
    if message.output not in _KIND_FROM_PB:
        raise InvalidArgument(f"output: unknown output kind {message.output}", "output")
    if message.output_dtype not in _OUTPUT_DTYPE_FROM_PB:
        raise InvalidArgument(
            f"output_dtype: {codec.dtype_name(message.output_dtype)} is not one of "
            "FLOAT32, FLOAT16, BFLOAT16",
            "output_dtype",
        )
    if not message.HasField("inputs"):
        raise InvalidArgument("inputs: missing", "inputs")
    if message.top_k_encoding not in _TOP_K_ENCODING_FROM_PB:
        raise InvalidArgument(
            f"top_k_encoding: unknown encoding {message.top_k_encoding}", "top_k_encoding"
        )
    codec.refuse_bfloat16_inputs(message.inputs.dtype, "inputs.dtype")
    lengths = scored_ids = None
    if message.HasField("lengths"):
        lengths = codec.decode(message.lengths, "lengths", max_elements)
    if message.HasField("scored_ids"):
        scored_ids = codec.decode(message.scored_ids, "scored_ids", max_elements)
    return SoftTargetsRequest(
        model=message.model,
        inputs=codec.decode(message.inputs, "inputs", max_elements),
        tasks=tuple(message.tasks),
        temperature=message.temperature if message.HasField("temperature") else 1.0,
        output=_KIND_FROM_PB[message.output],
        batch_id=message.batch_id,
        model_version=message.model_version,
        top_k=message.top_k,
        output_dtype=_OUTPUT_DTYPE_FROM_PB[message.output_dtype],
        hints=tuple(message.hints),
        lengths=lengths,
        scored_ids=scored_ids,
        tokenizer_hash=message.tokenizer_hash,
        top_k_encoding=_TOP_K_ENCODING_FROM_PB[message.top_k_encoding],
    )


def _packed_top_k(task: TaskResult, result: SoftTargets) -> pb.PackedTopK | None:
    """The task's top-k answer packed, if the request asked for it and the task has top-k."""
    if result.top_k_encoding == "tensors" or task.indices is None:
        return None
    return packed.encode_top_k(
        task.values,
        task.indices,
        task.tail_mass,
        task.kind,
        task.classes,
        codec.DTYPES_BY_NAME[result.output_dtype],
        codes=result.top_k_encoding == "log_prob_codes",
    )


def response_to_pb(result: SoftTargets) -> pb.SoftTargetsResponse:
    output_dtype = codec.DTYPES_BY_NAME[result.output_dtype]
    outputs = []
    for task in result.outputs:
        output = pb.TaskOutput(task=task.task, kind=_KIND_TO_PB[task.kind], level=task.level)
        top_k = _packed_top_k(task, result)
        if top_k is not None:
            output.packed.CopyFrom(top_k)
        else:
            output.values.CopyFrom(codec.encode(task.values, output_dtype))
        if top_k is None and task.indices is not None:
            index_dtype = codec.index_dtype(task.classes, task.level == "token")
            output.indices.CopyFrom(codec.encode(task.indices, index_dtype))
        if top_k is None and task.tail_mass is not None:
            output.tail_mass.CopyFrom(codec.encode(task.tail_mass))
        if task.scored_values is not None:
            output.scored_values.CopyFrom(codec.encode(task.scored_values, output_dtype))
        outputs.append(output)
    response = pb.SoftTargetsResponse(
        model=result.model,
        model_version=result.model_version,
        batch_id=result.batch_id,
        temperature=result.temperature,
        outputs=outputs,
        hints=[pb.NamedTensor(name=n, tensor=codec.encode(v)) for n, v in result.hints.items()],
    )
    if result.lengths is not None:
        response.lengths.CopyFrom(codec.encode(result.lengths, pb.INT64))
    return response


def summary_to_pb(summary: VersionSummary) -> pb.ModelSummary:
    return pb.ModelSummary(
        name=summary.name,
        model_version=summary.model_version,
        ready=summary.ready,
        default_version=summary.default_version,
        error=summary.error,
        label=summary.label,
    )


def model_info_to_pb(info: ModelInfo) -> pb.ModelInfo:
    message = pb.ModelInfo(
        name=info.name,
        model_version=info.model_version,
        tasks=[
            pb.TaskInfo(
                name=t.name,
                class_names=t.class_names,
                test_accuracy=t.test_accuracy,
                level=t.level,
                num_classes=t.num_classes or len(t.class_names),
            )
            for t in info.tasks
        ],
        input_shape=info.input_shape,
        input_dtype=codec.DTYPES_BY_NAME[info.input_dtype],
        accepted_input_dtypes=[codec.DTYPES_BY_NAME[d] for d in info.accepted_input_dtypes],
        uint8_scale=info.uint8_scale,
        hints=[pb.HintInfo(name=n, shape=s) for n, s in info.hints.items()],
        max_batch_size=info.max_batch_size,
        description=info.description,
        parameter_count=info.parameter_count,
        input_kind=info.input_kind,
        max_length=info.max_length,
        vocab_size=info.vocab_size,
        max_batch_tokens=info.max_batch_tokens,
        held_out_metrics=info.held_out_metrics,
    )
    if info.tokenizer is not None:
        message.tokenizer.CopyFrom(tokenizer_info_to_pb(info.tokenizer))
    return message


def tokenizer_info_to_pb(tokenizer: TokenizerInfo) -> pb.TokenizerInfo:
    return pb.TokenizerInfo(
        file_name=tokenizer.file_name,
        sha256=tokenizer.sha256,
        vocab_size=tokenizer.vocab_size,
        special_ids=tokenizer.special_ids,
    )


# --- HTTP: the protobuf body and the JSON body ------------------------------------------------


def request_from_protobuf(model: str, raw: bytes, max_elements: int) -> SoftTargetsRequest:
    """Decode an HTTP `application/x-protobuf` body for the model its path names."""
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
    return request_from_pb(message, max_elements)


class SoftTargetsBody(BaseModel):
    """JSON body of `POST /v1/models/{model}/soft-targets`."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] = Field(
        description="the batch as nested lists, shape [N, *input_shape]; or flat, with `shape`; "
        "sequence models: padded ids [N, L] or packed ids [sum(lengths)], with `lengths`"
    )
    shape: list[int] | None = Field(None, description="reshape a flat `inputs` list to this shape")
    dtype: str = Field(
        "float32",
        description="element type of `inputs`: float32, float16, uint8, int64, int32; "
        "int64 by default when `lengths` is given",
    )
    tasks: list[str] = Field(default_factory=list, description="tasks to return; empty: all")
    temperature: float = Field(1.0, strict=True, description="softmax temperature T > 0")
    output: str = Field("probs", description="probs, log_probs or logits")
    batch_id: str = Field("", description="echoed in the response")
    model_version: str = Field("", description="if set, fail unless the served version equals it")
    top_k: int = Field(0, ge=0, description="0: dense; k: the k largest classes per row")
    output_dtype: str = Field("float32", description="float32, float16 or bfloat16 rounding")
    hints: list[str] = Field(default_factory=list, description="intermediate features to return")
    lengths: list[int] | None = Field(
        None, description="sequence models: the real length of each sequence, [N]"
    )
    scored_ids: list[Any] | None = Field(
        None, description="sequence models: [sum(lengths), m] ids to score per real token"
    )
    tokenizer_hash: str = Field(
        "", description="sequence models: sha256:<hex> of the tokenizer the ids came from"
    )
    top_k_encoding: str = Field(
        "tensors",
        description="top-k outputs as number lists (tensors), or `packed` (packed, "
        "log_prob_codes): the bytes of distill.v1.PackedTopK in base64",
    )


def _json_array(values: list[Any], dtype_name: str, field: str) -> np.ndarray:
    """Nested JSON lists as an array of `dtype_name`, refusing values the cast would change."""
    try:
        # Parsed as float64 first: JSON numbers are doubles; the cast below must not change one.
        parsed = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as error:
        raise InvalidArgument(
            f"{field}: not a rectangular array of numbers ({error})", field
        ) from None
    dtype = np.dtype(dtype_name)
    codec.check_json_cast(parsed, dtype, field, dtype_name)
    return parsed.astype(dtype)


def _inputs_array(body: SoftTargetsBody) -> np.ndarray:
    # Token ids by default when the body has `lengths`: a sequence model's request.
    dtype = body.dtype if "dtype" in body.model_fields_set or body.lengths is None else "int64"
    codec.refuse_bfloat16_inputs(codec.parse_dtype_name(dtype, "dtype"), "dtype")
    array = _json_array(body.inputs, dtype, "inputs")
    if body.shape is not None:
        count = codec.element_count(body.shape, "inputs", codec.DEFAULT_MAX_ELEMENTS)
        if array.size != count:
            raise InvalidArgument(
                f"shape: {body.shape} needs {count} values, inputs has {array.size}", "shape"
            )
        array = array.reshape(body.shape)
    return array


def request_from_json(model: str, raw: bytes) -> SoftTargetsRequest:
    """Decode an HTTP JSON body (`SoftTargetsBody`) for the model its path names."""
    try:
        body = SoftTargetsBody.model_validate_json(raw)
    except ValidationError as error:
        raise invalid_argument(error.errors()) from None
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
        lengths=None if body.lengths is None else _json_array(body.lengths, "int64", "lengths"),
        scored_ids=None
        if body.scored_ids is None
        else _json_array(body.scored_ids, "int64", "scored_ids"),
        tokenizer_hash=body.tokenizer_hash,
        top_k_encoding=body.top_k_encoding,
    )


def _packed_ints_json(message: pb.PackedInts) -> dict[str, Any]:
    return {
        "bits": message.bits,
        "shape": list(message.shape),
        "data": base64.b64encode(message.data).decode("ascii"),
    }


def packed_top_k_json(message: pb.PackedTopK) -> dict[str, Any]:
    """A `PackedTopK` in JSON: dtypes by name, each `PackedInts` as bits, shape and base64 data."""
    entry: dict[str, Any] = {
        "indices": _packed_ints_json(message.indices),
        "values": _packed_ints_json(message.values),
        "values_dtype": codec.dtype_name(message.values_dtype),
    }
    if message.values_dtype == pb.UINT8:
        entry["log_prob_step"] = message.log_prob_step
    if message.HasField("tail_mass"):
        entry["tail_mass"] = _packed_ints_json(message.tail_mass)
        entry["tail_dtype"] = codec.dtype_name(message.tail_dtype)
    return entry


def soft_targets_json(result: SoftTargets) -> dict[str, Any]:
    """The JSON answer: per task `kind`, `level`, `values` (and `indices`, `tail_mass` for top-k,
    or `packed` instead of the three when the request asked for a packed encoding;
    `scored_values` for scored ids); `lengths` for sequence requests."""
    outputs: dict[str, Any] = {}
    for task in result.outputs:
        entry: dict[str, Any] = {"kind": task.kind, "level": task.level}
        top_k = _packed_top_k(task, result)
        if top_k is not None:
            entry["packed"] = packed_top_k_json(top_k)
        else:
            entry["values"] = task.values.tolist()
        if top_k is None and task.indices is not None:
            entry["indices"] = task.indices.tolist()
        if top_k is None and task.tail_mass is not None:
            entry["tail_mass"] = task.tail_mass.tolist()
        if task.scored_values is not None:
            entry["scored_values"] = task.scored_values.tolist()
        outputs[task.task] = entry
    body: dict[str, Any] = {
        "model": result.model,
        "model_version": result.model_version,
        "batch_id": result.batch_id,
        "temperature": result.temperature,
        "outputs": outputs,
        "hints": {name: value.tolist() for name, value in result.hints.items()},
    }
    if result.lengths is not None:
        body["lengths"] = result.lengths.tolist()
    return body
