"""Conversion between protocol v1 messages and the core's types, for gRPC and HTTP protobuf."""

from __future__ import annotations

import numpy as np

from protocol import codec
from protocol.errors import InvalidArgument
from protocol.v1 import teacher_pb2 as pb
from teacher_server.core import VersionSummary
from teacher_server.schema import ModelInfo, SoftTargets, SoftTargetsRequest

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
    if message.inputs.dtype == pb.BFLOAT16:
        raise InvalidArgument(
            "inputs.dtype: bfloat16 inputs are not accepted; send float32, float16 or uint8",
            "inputs.dtype",
        )
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
    )


def response_to_pb(result: SoftTargets) -> pb.SoftTargetsResponse:
    output_dtype = codec.DTYPES_BY_NAME[result.output_dtype]
    outputs = []
    for task in result.outputs:
        output = pb.TaskOutput(
            task=task.task,
            kind=_KIND_TO_PB[task.kind],
            values=codec.encode(task.values, output_dtype),
        )
        if task.indices is not None:
            # The narrowest integer type that holds every class index: UINT8 up to 256 classes.
            narrow = np.uint8 if task.classes <= 256 else np.int32
            output.indices.CopyFrom(codec.encode(task.indices.astype(narrow)))
        if task.tail_mass is not None:
            output.tail_mass.CopyFrom(codec.encode(task.tail_mass))
        outputs.append(output)
    return pb.SoftTargetsResponse(
        model=result.model,
        model_version=result.model_version,
        batch_id=result.batch_id,
        temperature=result.temperature,
        outputs=outputs,
        hints=[pb.NamedTensor(name=n, tensor=codec.encode(v)) for n, v in result.hints.items()],
    )


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
    return pb.ModelInfo(
        name=info.name,
        model_version=info.model_version,
        tasks=[
            pb.TaskInfo(name=t.name, class_names=t.class_names, test_accuracy=t.test_accuracy)
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
    )
