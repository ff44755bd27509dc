"""Conversion between protocol v1 messages and the student client's types (gRPC and HTTP
protobuf share it)."""

from __future__ import annotations

import numpy as np

from protocol import codec, packed
from protocol.v1 import teacher_pb2 as pb
from student_client.types import (
    ModelInfo,
    SoftTargets,
    TargetOptions,
    TaskInfo,
    TaskTargets,
    TeacherInputs,
    TokenBatch,
    TokenizerInfo,
)

_KINDS = {pb.PROBS: "probs", pb.LOG_PROBS: "log_probs", pb.LOGITS: "logits"}
_KINDS_TO_PB = {name: value for value, name in _KINDS.items()}
TOP_K_ENCODINGS = {
    "tensors": pb.TOP_K_ENCODING_UNSPECIFIED,
    "packed": pb.PACKED,
    "log_prob_codes": pb.PACKED_LOG_PROB_CODES,
}


def top_k_encoding(inputs: TeacherInputs, options: TargetOptions) -> str:
    """The encoding a request asks for: the options' for sequence top-k requests, else tensors
    (an image request's answer stays as older servers and clients know it)."""
    if options.top_k_encoding not in TOP_K_ENCODINGS:
        raise ValueError(
            f"top_k_encoding must be one of {list(TOP_K_ENCODINGS)}, got {options.top_k_encoding!r}"
        )
    if isinstance(inputs, TokenBatch) and options.top_k > 0:
        return options.top_k_encoding
    return "tensors"


def _decode_array(tensor: pb.Tensor, field: str) -> np.ndarray:
    return codec.decode(tensor, field, max_elements=1 << 34)


def request_to_pb(
    inputs: TeacherInputs, options: TargetOptions, model: str, batch_id: str
) -> pb.SoftTargetsRequest:
    if options.output not in _KINDS_TO_PB:
        raise ValueError(f"output must be one of {list(_KINDS_TO_PB)}, got {options.output!r}")
    request = pb.SoftTargetsRequest(
        model=model,
        model_version=options.model_version,
        tasks=list(options.tasks),
        temperature=options.temperature,
        output=_KINDS_TO_PB[options.output],
        inputs=codec.encode(inputs.ids if isinstance(inputs, TokenBatch) else inputs),
        batch_id=batch_id,
        top_k=options.top_k,
        output_dtype=codec.parse_dtype_name(options.output_dtype, "output_dtype"),
        hints=list(options.hints),
        tokenizer_hash=options.tokenizer_hash,
    )
    if isinstance(inputs, TokenBatch):
        request.lengths.CopyFrom(codec.encode(np.ascontiguousarray(inputs.lengths)))
        request.top_k_encoding = TOP_K_ENCODINGS[top_k_encoding(inputs, options)]
        if inputs.scored_ids is not None:
            request.scored_ids.CopyFrom(codec.encode(np.ascontiguousarray(inputs.scored_ids)))
    return request


def soft_targets_from_pb(message: pb.SoftTargetsResponse) -> SoftTargets:
    outputs = {}
    for output in message.outputs:
        field = f"outputs[{output.task}]"
        kind = _KINDS.get(output.kind, "probs")
        values: np.ndarray
        indices: np.ndarray | None
        tail_mass: np.ndarray | None
        if output.HasField("packed"):
            values, indices, tail_mass = packed.decode_top_k(
                output.packed, kind, field + ".packed", max_elements=1 << 34
            )
        else:
            values = _decode_array(output.values, field + ".values")
            indices = (
                _decode_array(output.indices, field + ".indices").astype(np.int64)
                if output.HasField("indices")
                else None
            )
            tail_mass = (
                _decode_array(output.tail_mass, field + ".tail_mass")
                if output.HasField("tail_mass")
                else None
            )
        outputs[output.task] = TaskTargets(
            task=output.task,
            kind=kind,
            values=values,
            indices=indices,
            tail_mass=tail_mass,
            level=output.level or "sequence",
            scored_values=_decode_array(output.scored_values, field + ".scored_values")
            if output.HasField("scored_values")
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
        lengths=_decode_array(message.lengths, "lengths").astype(np.int64)
        if message.HasField("lengths")
        else None,
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
                t.level or "sequence",
                t.num_classes,
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
        input_kind=message.input_kind or "tensor",
        max_length=message.max_length,
        vocab_size=message.vocab_size,
        max_batch_tokens=message.max_batch_tokens,
        tokenizer=TokenizerInfo(
            message.tokenizer.file_name,
            message.tokenizer.sha256,
            message.tokenizer.vocab_size,
            dict(message.tokenizer.special_ids),
        )
        if message.HasField("tokenizer")
        else None,
        held_out_metrics=dict(message.held_out_metrics),
    )
