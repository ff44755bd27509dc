"""Conversion between protocol v1 messages and the student client's types (gRPC and HTTP
protobuf share it)."""

from __future__ import annotations

import numpy as np

from protocol import codec
from protocol.v1 import teacher_pb2 as pb
from student_client.types import (
    ModelInfo,
    SoftTargets,
    TargetOptions,
    TaskInfo,
    TaskTargets,
)

_KINDS = {pb.PROBS: "probs", pb.LOG_PROBS: "log_probs", pb.LOGITS: "logits"}
_KINDS_TO_PB = {name: value for value, name in _KINDS.items()}


def _decode_array(tensor: pb.Tensor, field: str) -> np.ndarray:
    return codec.decode(tensor, field, max_elements=1 << 34)


def request_to_pb(
    inputs: np.ndarray, options: TargetOptions, model: str, batch_id: str
) -> pb.SoftTargetsRequest:
    if options.output not in _KINDS_TO_PB:
        raise ValueError(f"output must be one of {list(_KINDS_TO_PB)}, got {options.output!r}")
    return pb.SoftTargetsRequest(
        model=model,
        model_version=options.model_version,
        tasks=list(options.tasks),
        temperature=options.temperature,
        output=_KINDS_TO_PB[options.output],
        inputs=codec.encode(inputs),
        batch_id=batch_id,
        top_k=options.top_k,
        output_dtype=codec.parse_dtype_name(options.output_dtype, "output_dtype"),
        hints=list(options.hints),
    )


def soft_targets_from_pb(message: pb.SoftTargetsResponse) -> SoftTargets:
    outputs = {}
    for output in message.outputs:
        field = f"outputs[{output.task}]"
        outputs[output.task] = TaskTargets(
            task=output.task,
            kind=_KINDS.get(output.kind, "probs"),
            values=_decode_array(output.values, field + ".values"),
            indices=_decode_array(output.indices, field + ".indices").astype(np.int64)
            if output.HasField("indices")
            else None,
            tail_mass=_decode_array(output.tail_mass, field + ".tail_mass")
            if output.HasField("tail_mass")
            else None,
        )
    return SoftTargets(
        model=message.model,
        model_version=message.model_version,
        batch_id=message.batch_id,
        temperature=message.temperature,
        outputs=outputs,
        hints={
            hint.name: _decode_array(hint.tensor, f"hints[{hint.name}]") for hint in message.hints
        },
    )


def model_info_from_pb(message: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=message.name,
        model_version=message.model_version,
        tasks=tuple(
            TaskInfo(
                t.name,
                tuple(t.class_names),
                t.test_accuracy if t.HasField("test_accuracy") else None,
            )
            for t in message.tasks
        ),
        input_shape=tuple(message.input_shape),
        input_dtype=codec.dtype_name(message.input_dtype),
        accepted_input_dtypes=tuple(codec.dtype_name(d) for d in message.accepted_input_dtypes),
        uint8_scale=message.uint8_scale,
        hints={h.name: tuple(h.shape) for h in message.hints},
        max_batch_size=message.max_batch_size,
        description=message.description,
        parameter_count=message.parameter_count,
    )
