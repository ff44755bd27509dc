"""The Open Inference Protocol (KServe v2 / Triton) mapped onto the core's types, for both doors.

The transport-free part of the v2 conversion, used by `teacher_server.v2.convert_http` (JSON and
the binary tensor data extension) and `teacher_server.v2.convert_grpc`. The mapping (see
docs/v2-protocol.md):

- one v2 model per served model; its versions are the served `model_version`s (`sha256:...`),
  also reachable by their labels (version subfolder names, e.g. "2"); no version: the default;
- one input tensor, named `inputs`, shape `[N, *input_shape]`; for a sequence model padded ids
  `[N, L]` and a second input, `lengths` `[N]`;
- one output per task, named after the task, FP32 `[N, classes]` (a token-level task: one row per
  real token, `[sum(lengths), classes]`); requested outputs select tasks
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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from protocol import codec
from protocol.errors import InvalidArgument
from teacher_server.serving.schema import SoftTargets, SoftTargetsRequest

INPUT_NAME: Final = "inputs"
LENGTHS_NAME: Final = "lengths"  # sequence models: the second input, each sequence's length
HINT_PREFIX: Final = "hint:"
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


def check_input_names(names: Sequence[object]) -> None:
    """One input named `inputs`, or (sequence models) two: `inputs` and `lengths`, either order."""
    if len(names) == 2 and set(names) == {INPUT_NAME, LENGTHS_NAME}:
        return
    if len(names) != 1:
        raise InvalidArgument(
            f"inputs: expected exactly one input tensor named {INPUT_NAME!r} (and, for a sequence "
            f"model, one named {LENGTHS_NAME!r}), got {len(names)}",
            "inputs",
        )
    if names[0] != INPUT_NAME:
        raise InvalidArgument(
            f"inputs.name: the input tensor must be named {INPUT_NAME!r}, got {names[0]!r}",
            "inputs.name",
        )


def numpy_dtype(datatype: object, where: str = INPUT_NAME) -> np.dtype:
    try:
        return DATATYPES[datatype]  # type: ignore[index]
    except (KeyError, TypeError):
        raise InvalidArgument(
            f"{where}.datatype: unsupported datatype {datatype!r}; expected one of "
            f"{list(DATATYPES)}",
            f"{where}.datatype",
        ) from None


def parse_shape(value: Any, where: str = INPUT_NAME) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        raise InvalidArgument(
            f"{where}.shape: expected a list of integers, got {value!r}", f"{where}.shape"
        )
    return tuple(value)


def array_from_bytes(
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


def array_from_values(
    values: Any, dtype: np.dtype, shape: tuple[int, ...], count: int, where: str
) -> np.ndarray:
    try:
        if dtype.kind in "iuf":
            # JSON numbers are doubles: refuse those the cast would change (0.7 to 0, 300 to 44)
            parsed = np.asarray(values, dtype=np.float64)
            codec.check_json_cast(parsed, dtype, where, DATATYPE_OF_NUMPY[dtype.name])
        if dtype.kind == "f":
            array = parsed.astype(dtype)
        else:  # integers from the values themselves: a double cannot hold every int64
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


def timeout_seconds(parameters: Mapping[str, Parameter | None]) -> float | None:
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
    lengths: np.ndarray | None = None,
) -> SoftTargetsRequest:
    """The core's request for a decoded v2 request; `outputs` are the requested output names;
    `lengths` the `lengths` input of a sequence model's request."""
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
        lengths=lengths,
    )


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
