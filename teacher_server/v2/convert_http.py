"""v2 over HTTP: JSON bodies and the binary tensor data extension <-> the core's types."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

import numpy as np

from protocol import codec
from protocol.errors import InvalidArgument
from teacher_server.serving.schema import SoftTargets
from teacher_server.v2 import convert

HEADER_LENGTH: Final = "Inference-Header-Content-Length"


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
    """The input array of one JSON input entry (named `inputs`, or a sequence model's `lengths`),
    and how many bytes of `binary` (the binary data after the previous inputs') it used."""
    if not isinstance(entry, dict):
        raise InvalidArgument(f"inputs: expected an object, got {entry!r}", "inputs")
    where = entry["name"]  # checked by `convert.check_input_names`: `inputs` or `lengths`
    dtype = convert.numpy_dtype(entry.get("datatype"), where)
    shape = convert.parse_shape(entry.get("shape"), where)
    count = codec.element_count(shape, where, max_elements)
    parameters = _json_parameters(entry.get("parameters"), f"{where}.parameters")
    if any(key.startswith("shared_memory") for key in parameters):
        raise InvalidArgument(
            f"{where}.parameters: shared memory is not supported; send the data",
            f"{where}.parameters",
        )
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
            raise InvalidArgument(
                f"{where}.parameters.binary_data_size: {size!r} is not a byte count within the "
                f"{len(binary)} binary bytes after the JSON header",
                f"{where}.parameters.binary_data_size",
            )
        return convert.array_from_bytes(binary[:size], dtype, shape, count, f"{where}.data"), size
    if "data" not in entry:
        raise InvalidArgument(
            f"{where}.data: missing; give `data`, or the bytes after the JSON header with "
            "parameters.binary_data_size",
            f"{where}.data",
        )
    data = entry["data"]
    if not isinstance(data, list):
        raise InvalidArgument(
            f"{where}.data: expected a list, got {type(data).__name__}", f"{where}.data"
        )
    return convert.array_from_values(data, dtype, shape, count, f"{where}.data"), 0


def _binary_flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}: expected true or false, got {value!r}", where)
    return value


def decode_http_infer(
    model: str, version: str, body: bytes, header_length: str | None, max_elements: int
) -> convert.DecodedInfer:
    """Decode `POST /v2/models/{model}[/versions/{version}]/infer`: JSON, or the binary tensor
    data extension (a JSON header of `header_length` bytes, then the binary inputs in order)."""
    header, binary = split_binary_body(body, header_length)
    message = _json_object(header)
    inputs = message.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument(f"inputs: expected a list, got {inputs!r}", "inputs")
    convert.check_input_names(
        [entry.get("name") if isinstance(entry, dict) else entry for entry in inputs]
    )
    arrays, used = {}, 0
    for entry in inputs:  # binary data follows the header in the order of the inputs
        arrays[entry["name"]], size = _http_input(entry, binary[used:], max_elements)
        used += size
    if used != len(binary):
        raise InvalidArgument(
            f"body: {len(binary) - used} bytes after the JSON header belong to no input "
            "(check binary_data_size and Inference-Header-Content-Length)",
            "body",
        )
    parameters = _json_parameters(message.get("parameters"), "parameters")
    binary_default = _binary_flag(
        parameters.get(convert.BINARY_DATA_OUTPUT, False), convert.BINARY_DATA_OUTPUT
    )
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
    return convert.DecodedInfer(
        request=convert.soft_targets_request(
            model,
            version,
            request_id,
            parameters,
            arrays[convert.INPUT_NAME],
            names,
            arrays.get(convert.LENGTHS_NAME),
        ),
        timeout=convert.timeout_seconds(parameters),
        binary_outputs=binary_outputs,
        binary_default=binary_default,
    )


def encode_http_infer(
    result: SoftTargets, decoded: convert.DecodedInfer
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when outputs travel as binary (None: the
    body is all JSON)."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in convert.output_tensors(result):
        entry: dict[str, Any] = {
            "name": name,
            "datatype": convert.OUTPUT_DATATYPE,
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
    header["parameters"] = convert.response_parameters(result, decoded.request)
    header["outputs"] = outputs
    if blobs:
        return join_binary_body(header, blobs)
    return json.dumps(header, separators=(",", ":")).encode(), None
