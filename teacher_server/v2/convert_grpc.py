"""v2 over gRPC: `inference.ModelInferRequest` and friends <-> the core's types."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np

from protocol import codec
from protocol.errors import InvalidArgument
from protocol.kserve_v2 import grpc_predict_v2_pb2 as pb
from teacher_server.serving.schema import ModelInfo, SoftTargets
from teacher_server.v2 import convert
from teacher_server.v2.metadata import model_metadata

# gRPC: the InferTensorContents field holding each datatype's typed values (FP16: raw only).
_CONTENTS_FIELD: Final[dict[str, str]] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def parameters_from_pb(
    parameters: Mapping[str, pb.InferParameter],
) -> dict[str, convert.Parameter | None]:
    values: dict[str, convert.Parameter | None] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, choice) if choice is not None else None
    return values


def parameter_to_pb(value: convert.Parameter) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=value)


def _grpc_inputs(message: pb.ModelInferRequest, max_elements: int) -> dict[str, np.ndarray]:
    """The input arrays by name: `inputs`, and `lengths` for a sequence model."""
    convert.check_input_names([tensor.name for tensor in message.inputs])
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidArgument(
            f"raw_input_contents: expected one entry per input ({len(message.inputs)}), got "
            f"{len(raw)}",
            "raw_input_contents",
        )
    arrays = {}
    for index, tensor in enumerate(message.inputs):
        where = tensor.name  # `inputs` or `lengths`
        dtype = convert.numpy_dtype(tensor.datatype, where)
        shape = tuple(int(d) for d in tensor.shape)
        count = codec.element_count(shape, where, max_elements)
        if raw:
            arrays[where] = convert.array_from_bytes(
                raw[index], dtype, shape, count, "raw_input_contents"
            )
            continue
        contents_field = _CONTENTS_FIELD.get(tensor.datatype)
        if contents_field is None:
            raise InvalidArgument(
                f"{where}.contents: {tensor.datatype} has no typed contents; send "
                "raw_input_contents",
                f"{where}.contents",
            )
        values = list(getattr(tensor.contents, contents_field))
        arrays[where] = convert.array_from_values(
            values, dtype, shape, count, f"{where}.contents.{contents_field}"
        )
    return arrays


def decode_grpc_infer(
    message: pb.ModelInferRequest, model_version: str, max_elements: int
) -> convert.DecodedInfer:
    """Decode a `ModelInferRequest` (data from raw_input_contents or the typed contents);
    `model_version` is the version its `model_version` resolved to ("": the default)."""
    parameters = parameters_from_pb(message.parameters)
    arrays = _grpc_inputs(message, max_elements)
    names = [output.name for output in message.outputs]
    return convert.DecodedInfer(
        request=convert.soft_targets_request(
            message.model_name,
            model_version,
            message.id,
            parameters,
            arrays[convert.INPUT_NAME],
            names,
            arrays.get(convert.LENGTHS_NAME),
        ),
        timeout=convert.timeout_seconds(parameters),
    )


def encode_grpc_infer(result: SoftTargets, decoded: convert.DecodedInfer) -> pb.ModelInferResponse:
    """The response, with every output's bytes in raw_output_contents (as Triton sends them)."""
    response = pb.ModelInferResponse(
        model_name=result.model, model_version=result.model_version, id=result.batch_id
    )
    for key, value in convert.response_parameters(result, decoded.request).items():
        response.parameters[key].CopyFrom(parameter_to_pb(value))
    for name, array in convert.output_tensors(result):
        response.outputs.add(name=name, datatype=convert.OUTPUT_DATATYPE, shape=list(array.shape))
        response.raw_output_contents.append(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return response


def model_metadata_pb(info: ModelInfo, versions: Sequence[str] = ()) -> pb.ModelMetadataResponse:
    meta = model_metadata(info, versions)
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=meta["name"],
        versions=meta["versions"],
        platform=meta["platform"],
        inputs=[tensor(**entry) for entry in meta["inputs"]],
        outputs=[tensor(**entry) for entry in meta["outputs"]],
    )
