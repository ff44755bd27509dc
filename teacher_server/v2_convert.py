"""Conversion between the Open Inference Protocol (KServe v2 / Triton) and the core's types.

Pure functions, shared by the v2 HTTP routes (`teacher_server.v2_http`) and the v2 gRPC service
(`teacher_server.v2_grpc`). The mapping (see docs/v2-protocol.md):

- one v2 model per served model; its versions are the served `model_version`s (`sha256:...`),
  also reachable by their labels (version subfolder names, e.g. "2"); no version: the default;
- one input tensor, named `inputs`, shape `[N, *input_shape]`;
- one output per task, named after the task, FP32 `[N, classes]`; requested outputs select tasks
  (none requested: every task); an output named `hint:<name>` returns that hint (only if named);
- request parameters `temperature` (number, default 1) and `output` (`probs`, `log_probs`,
  `logits`; default `probs`), echoed in the response's parameters; `timeout` (microseconds, as
  Triton's clients send it) bounds the wait.

Decoding checks only what the wire itself needs (one input named `inputs`, a known datatype, a
declared shape that matches the data, parameter types); the core validates everything else
(shape against the model, dtype, finiteness, temperature, output kind, tasks) once for every
transport.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Final

import numpy as np

from protocol import codec
from protocol.errors import InvalidArgument, NotFound
from protocol.kserve_v2 import grpc_predict_v2_pb2 as pb
from teacher_server.core import TeacherCore, VersionSummary
from teacher_server.schema import ModelInfo, SoftTargets, SoftTargetsRequest

INPUT_NAME: Final = "inputs"
HINT_PREFIX: Final = "hint:"
PLATFORM: Final = "pytorch"
SERVER_NAME: Final = "distill-teacher"
EXTENSIONS: Final = ("binary_tensor_data",)
HEADER_LENGTH: Final = "Inference-Header-Content-Length"
OUTPUT_DATATYPE: Final = "FP32"

# v2 datatype -> little-endian numpy dtype of its bytes. BYTES and BF16 are not accepted.
DATATYPES: Final[dict[str, np.dtype]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPE_OF_NUMPY: Final[dict[str, str]] = {dtype.name: name for name, dtype in DATATYPES.items()}

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

TEMPERATURE: Final = "temperature"
OUTPUT: Final = "output"
TIMEOUT: Final = "timeout"
BINARY_DATA_OUTPUT: Final = "binary_data_output"
# Request parameters standard clients send on their own (tritonclient: binary_data_output,
# priority, timeout, sequence_*): accepted, and ignored but for `timeout` and `binary_data_output`.
_STANDARD_PARAMETERS: Final = frozenset(
    {
        TIMEOUT,
        BINARY_DATA_OUTPUT,
        "priority",
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "headers",
    }
)
_TEACHER_PARAMETERS: Final = (TEMPERATURE, OUTPUT)

Parameter = bool | int | float | str


@dataclass(frozen=True)
class DecodedInfer:
    """A v2 inference request as the core's request, plus what only the transport uses."""

    request: SoftTargetsRequest
    timeout: float | None = None  # seconds, from the `timeout` parameter
    binary_outputs: Mapping[str, bool] = field(default_factory=dict)  # HTTP: per requested output
    binary_default: bool = False  # HTTP: for outputs not requested by name

    def binary(self, output: str) -> bool:
        return self.binary_outputs.get(output, self.binary_default)


# --- server and model metadata ----------------------------------------------------------------


def server_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0"


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}


def resolve_version(summaries: Iterable[VersionSummary], model: str, version: str) -> str:
    """The `model_version` (`sha256:...`) that a non-empty v2 `version` names: a served version's
    `model_version` itself, or its label (the name of its version subfolder, e.g. "2", as Triton
    numbers versions)."""
    served = [s for s in summaries if s.name == model and s.model_version]
    for summary in served:
        if version in (summary.model_version, summary.label):
            return summary.model_version
    raise NotFound(
        f"model_version: model {model!r} has no version {version!r}; it serves "
        f"{[s.label or s.model_version for s in served]} (or leave the version out)",
        "model_version",
    )


def resolve(core: TeacherCore, model: str, version: str) -> ModelInfo:
    """The info of the version of `model` that a v2 address names (empty: the default version).
    Raises the core's error for an unknown model, `NotFound` for an unknown version."""
    info = core.model_info(model)
    if not version:
        return info
    return core.model_info(model, resolve_version(core.list_models(), model, version))


def served_versions(core: TeacherCore, model: str) -> list[str]:
    return [s.model_version for s in core.list_models() if s.name == model and s.model_version]


def _input_metadata(info: ModelInfo) -> dict[str, Any]:
    return {
        "name": INPUT_NAME,
        "datatype": DATATYPE_OF_NUMPY[info.input_dtype],
        "shape": [-1, *info.input_shape],
    }


def model_metadata(info: ModelInfo, versions: Sequence[str] = ()) -> dict[str, Any]:
    """The v2 model metadata of one version: its inputs (one) and outputs (one FP32 per task; hints
    are not listed), and every served version of the model (default: `info`'s only)."""
    return {
        "name": info.name,
        "versions": list(versions) or [info.model_version],
        "platform": PLATFORM,
        "inputs": [_input_metadata(info)],
        "outputs": [
            {"name": task.name, "datatype": OUTPUT_DATATYPE, "shape": [-1, len(task.class_names)]}
            for task in info.tasks
        ],
    }


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


# --- requests: shared by both transports ------------------------------------------------------


def _check_input_names(names: Sequence[object]) -> None:
    if len(names) != 1:
        raise InvalidArgument(
            f"inputs: expected exactly one input tensor named {INPUT_NAME!r}, got {len(names)}",
            "inputs",
        )
    if names[0] != INPUT_NAME:
        raise InvalidArgument(
            f"inputs.name: the input tensor must be named {INPUT_NAME!r}, got {names[0]!r}",
            "inputs.name",
        )


def numpy_dtype(datatype: object) -> np.dtype:
    try:
        return DATATYPES[datatype]  # type: ignore[index]
    except (KeyError, TypeError):
        raise InvalidArgument(
            f"inputs.datatype: unsupported datatype {datatype!r}; expected one of "
            f"{list(DATATYPES)}",
            "inputs.datatype",
        ) from None


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        raise InvalidArgument(
            f"inputs.shape: expected a list of integers, got {value!r}", "inputs.shape"
        )
    return tuple(value)


def _from_bytes(
    data: bytes, dtype: np.dtype, shape: tuple[int, ...], count: int, where: str
) -> np.ndarray:
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{where}: shape {list(shape)} of {DATATYPE_OF_NUMPY[dtype.name]} needs {expected} "
            f"bytes, got {len(data)}",
            where,
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _check_integers(parsed: np.ndarray, dtype: np.dtype, where: str) -> None:
    if not parsed.size:
        return
    limits = np.iinfo(dtype)
    bad = (
        ~np.isfinite(parsed)
        | (parsed != np.round(parsed))
        | (parsed < limits.min)
        | (parsed > limits.max)
    )
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        at = [int(i) for i in np.unravel_index(index, parsed.shape)]
        raise InvalidArgument(
            f"{where}: value {float(parsed.flat[index])!r} at index {at} is not a "
            f"{DATATYPE_OF_NUMPY[dtype.name]}",
            where,
        )


def _from_values(
    values: Any, dtype: np.dtype, shape: tuple[int, ...], count: int, where: str
) -> np.ndarray:
    try:
        if dtype.kind in "iu":
            # JSON numbers may be fractional or out of range: refuse them instead of letting numpy
            # truncate 0.7 to 0 or wrap 300 to 44.
            _check_integers(np.asarray(values, dtype=np.float64), dtype, where)
        array = np.asarray(values, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as error:
        raise InvalidArgument(
            f"{where}: not an array of {DATATYPE_OF_NUMPY[dtype.name]} values ({error})", where
        ) from None
    if array.size != count:
        raise InvalidArgument(
            f"{where}: shape {list(shape)} needs {count} values, got {array.size}", where
        )
    return array.reshape(shape)


def _number(value: Parameter | None, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(
            f"parameters.{name}: expected a number, got {value!r}", f"parameters.{name}"
        )
    return float(value)


def _check_parameter_names(parameters: Mapping[str, Parameter | None]) -> None:
    for key in parameters:
        if key in _TEACHER_PARAMETERS or key in _STANDARD_PARAMETERS or key.startswith("triton_"):
            continue
        raise InvalidArgument(
            f"parameters.{key}: unknown parameter; this teacher takes {list(_TEACHER_PARAMETERS)}",
            f"parameters.{key}",
        )


def _timeout(parameters: Mapping[str, Parameter | None]) -> float | None:
    """Triton's `timeout` parameter, in microseconds (0: none), as seconds."""
    if TIMEOUT not in parameters:
        return None
    micros = _number(parameters[TIMEOUT], TIMEOUT)
    if not (math.isfinite(micros) and micros >= 0):
        raise InvalidArgument(
            f"parameters.{TIMEOUT}: expected microseconds >= 0, got {parameters[TIMEOUT]!r}",
            f"parameters.{TIMEOUT}",
        )
    return micros / 1e6 if micros > 0 else None


def soft_targets_request(
    model: str,
    version: str,
    request_id: str,
    parameters: Mapping[str, Parameter | None],
    inputs: np.ndarray,
    outputs: Sequence[str],
) -> SoftTargetsRequest:
    """The core's request for a decoded v2 request; `outputs` are the requested output names."""
    _check_parameter_names(parameters)
    temperature = (
        _number(parameters[TEMPERATURE], TEMPERATURE) if TEMPERATURE in parameters else 1.0
    )
    output = parameters.get(OUTPUT, "probs")
    if not isinstance(output, str):
        raise InvalidArgument(
            f"parameters.{OUTPUT}: expected 'probs', 'log_probs' or 'logits', got {output!r}",
            f"parameters.{OUTPUT}",
        )
    return SoftTargetsRequest(
        model=model,
        inputs=inputs,
        tasks=tuple(name for name in outputs if not name.startswith(HINT_PREFIX)),
        temperature=temperature,
        output=output,
        batch_id=request_id,
        model_version=version,
        hints=tuple(name[len(HINT_PREFIX) :] for name in outputs if name.startswith(HINT_PREFIX)),
    )


# --- results: shared by both transports -------------------------------------------------------


def output_tensors(result: SoftTargets) -> list[tuple[str, np.ndarray]]:
    """(name, float32 array) per output: the tasks in request order, then `hint:<name>`."""
    tensors = [(task.task, np.asarray(task.values, dtype=np.float32)) for task in result.outputs]
    tensors += [
        (HINT_PREFIX + name, np.asarray(value, dtype=np.float32))
        for name, value in result.hints.items()
    ]
    return tensors


def response_parameters(result: SoftTargets, request: SoftTargetsRequest) -> dict[str, Parameter]:
    return {TEMPERATURE: result.temperature, OUTPUT: request.output}


# --- HTTP: JSON and the binary tensor data extension ------------------------------------------


def join_binary_body(header: Mapping[str, Any], blobs: Iterable[bytes]) -> tuple[bytes, int]:
    """A binary-extension body: the JSON header, then the tensors' bytes. Returns the body and the
    header's length in bytes (the `Inference-Header-Content-Length` value)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b"".join(blobs), len(text)


def split_binary_body(body: bytes, header_length: str | int | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary part of a body (`header_length` None: all JSON)."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 <= length <= len(body):
        raise InvalidArgument(
            f"{HEADER_LENGTH}: expected a byte count between 0 and the body's {len(body)}, "
            f"got {header_length!r}",
            HEADER_LENGTH,
        )
    return body[:length], body[length:]


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"body: not valid JSON ({error})", "body") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"body: expected a JSON object, got {type(value).__name__}", "body")
    return value


def _json_parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}: expected an object, got {value!r}", where)
    return value


def _http_input(entry: Any, binary: bytes, max_elements: int) -> tuple[np.ndarray, int]:
    """The input array of one JSON input entry, and how many bytes of `binary` it used."""
    if not isinstance(entry, dict):
        raise InvalidArgument(f"inputs: expected an object, got {entry!r}", "inputs")
    dtype = numpy_dtype(entry.get("datatype"))
    shape = _shape(entry.get("shape"))
    count = codec.element_count(shape, "inputs", max_elements)
    parameters = _json_parameters(entry.get("parameters"), "inputs.parameters")
    if any(key.startswith("shared_memory") for key in parameters):
        raise InvalidArgument(
            "inputs.parameters: shared memory is not supported; send the data", "inputs.parameters"
        )
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
            raise InvalidArgument(
                f"inputs.parameters.binary_data_size: {size!r} is not a byte count within the "
                f"{len(binary)} binary bytes after the JSON header",
                "inputs.parameters.binary_data_size",
            )
        return _from_bytes(binary[:size], dtype, shape, count, "inputs.data"), size
    if "data" not in entry:
        raise InvalidArgument(
            "inputs.data: missing; give `data`, or the bytes after the JSON header with "
            "parameters.binary_data_size",
            "inputs.data",
        )
    data = entry["data"]
    if not isinstance(data, list):
        raise InvalidArgument(
            f"inputs.data: expected a list, got {type(data).__name__}", "inputs.data"
        )
    return _from_values(data, dtype, shape, count, "inputs.data"), 0


def _binary_flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}: expected true or false, got {value!r}", where)
    return value


def decode_http_infer(
    model: str, version: str, body: bytes, header_length: str | None, max_elements: int
) -> DecodedInfer:
    """Decode `POST /v2/models/{model}[/versions/{version}]/infer`: JSON, or the binary tensor
    data extension (a JSON header of `header_length` bytes, then the binary inputs in order)."""
    header, binary = split_binary_body(body, header_length)
    message = _json_object(header)
    inputs = message.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument(f"inputs: expected a list, got {inputs!r}", "inputs")
    _check_input_names(
        [entry.get("name") if isinstance(entry, dict) else entry for entry in inputs]
    )
    array, used = _http_input(inputs[0], binary, max_elements)
    if used != len(binary):
        raise InvalidArgument(
            f"body: {len(binary) - used} bytes after the JSON header belong to no input "
            "(check binary_data_size and Inference-Header-Content-Length)",
            "body",
        )
    parameters = _json_parameters(message.get("parameters"), "parameters")
    binary_default = _binary_flag(parameters.get(BINARY_DATA_OUTPUT, False), BINARY_DATA_OUTPUT)
    outputs = message.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument(f"outputs: expected a list, got {outputs!r}", "outputs")
    names: list[str] = []
    binary_outputs: dict[str, bool] = {}
    for entry in outputs:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise InvalidArgument(f"outputs.name: expected a string, got {entry!r}", "outputs.name")
        names.append(name)
        output_parameters = _json_parameters(entry.get("parameters"), "outputs.parameters")
        if output_parameters.get("classification") or any(
            key.startswith("shared_memory") for key in output_parameters
        ):
            raise InvalidArgument(
                "outputs.parameters: classification and shared memory are not supported",
                "outputs.parameters",
            )
        if "binary_data" in output_parameters:
            binary_outputs[name] = _binary_flag(
                output_parameters["binary_data"], "outputs.parameters.binary_data"
            )
    request_id = message.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument(f"id: expected a string, got {request_id!r}", "id")
    return DecodedInfer(
        request=soft_targets_request(model, version, request_id, parameters, array, names),
        timeout=_timeout(parameters),
        binary_outputs=binary_outputs,
        binary_default=binary_default,
    )


def encode_http_infer(result: SoftTargets, decoded: DecodedInfer) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when outputs travel as binary (None: the
    body is all JSON)."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in output_tensors(result):
        entry: dict[str, Any] = {
            "name": name,
            "datatype": OUTPUT_DATATYPE,
            "shape": list(array.shape),
        }
        if decoded.binary(name):
            blob = np.ascontiguousarray(array, dtype="<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    header: dict[str, Any] = {"model_name": result.model, "model_version": result.model_version}
    if result.batch_id:
        header["id"] = result.batch_id
    header["parameters"] = response_parameters(result, decoded.request)
    header["outputs"] = outputs
    if blobs:
        return join_binary_body(header, blobs)
    return json.dumps(header, separators=(",", ":")).encode(), None


# --- gRPC -------------------------------------------------------------------------------------


def parameters_from_pb(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Parameter | None]:
    values: dict[str, Parameter | None] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, choice) if choice is not None else None
    return values


def parameter_to_pb(value: Parameter) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=value)


def _grpc_input(message: pb.ModelInferRequest, max_elements: int) -> np.ndarray:
    _check_input_names([tensor.name for tensor in message.inputs])
    tensor = message.inputs[0]
    dtype = numpy_dtype(tensor.datatype)
    shape = tuple(int(d) for d in tensor.shape)
    count = codec.element_count(shape, "inputs", max_elements)
    if message.raw_input_contents:
        if len(message.raw_input_contents) != 1:
            raise InvalidArgument(
                "raw_input_contents: expected one entry per input (1), got "
                f"{len(message.raw_input_contents)}",
                "raw_input_contents",
            )
        return _from_bytes(message.raw_input_contents[0], dtype, shape, count, "raw_input_contents")
    contents_field = _CONTENTS_FIELD.get(tensor.datatype)
    if contents_field is None:
        raise InvalidArgument(
            f"inputs.contents: {tensor.datatype} has no typed contents; send raw_input_contents",
            "inputs.contents",
        )
    values = list(getattr(tensor.contents, contents_field))
    return _from_values(values, dtype, shape, count, f"inputs.contents.{contents_field}")


def decode_grpc_infer(
    message: pb.ModelInferRequest, model_version: str, max_elements: int
) -> DecodedInfer:
    """Decode a `ModelInferRequest` (data from raw_input_contents or the typed contents);
    `model_version` is the version its `model_version` resolved to ("": the default)."""
    parameters = parameters_from_pb(message.parameters)
    array = _grpc_input(message, max_elements)
    names = [output.name for output in message.outputs]
    return DecodedInfer(
        request=soft_targets_request(
            message.model_name, model_version, message.id, parameters, array, names
        ),
        timeout=_timeout(parameters),
    )


def encode_grpc_infer(result: SoftTargets, decoded: DecodedInfer) -> pb.ModelInferResponse:
    """The response, with every output's bytes in raw_output_contents (as Triton sends them)."""
    response = pb.ModelInferResponse(
        model_name=result.model, model_version=result.model_version, id=result.batch_id
    )
    for key, value in response_parameters(result, decoded.request).items():
        response.parameters[key].CopyFrom(parameter_to_pb(value))
    for name, array in output_tensors(result):
        response.outputs.add(name=name, datatype=OUTPUT_DATATYPE, shape=list(array.shape))
        response.raw_output_contents.append(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return response
