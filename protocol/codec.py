"""Tensors on the wire: numpy arrays <-> `distill.v1.Tensor` (dtype, shape, little-endian bytes).

Decoding is where untrusted bytes meet memory, so it validates before it allocates: the dtype must
be known, every dimension positive, the element count within `max_elements` (checked with Python
integers, so a declared shape of 10^12 elements costs nothing), and the byte length exact. No
per-element Python loops: arrays are views made with `numpy.frombuffer`.

bfloat16 has no numpy dtype: it travels as the upper 16 bits of float32 (round to nearest even) and
decodes to float32.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np

from protocol.errors import InvalidArgument
from protocol.v1 import teacher_pb2 as pb

# Wire dtype enum <-> the name used in JSON, config files and docs.
DTYPE_NAMES: Final[dict[pb.DataType, str]] = {
    pb.FLOAT32: "float32",
    pb.FLOAT16: "float16",
    pb.BFLOAT16: "bfloat16",
    pb.UINT8: "uint8",
    pb.INT64: "int64",
    pb.INT32: "int32",
    pb.FLOAT64: "float64",
    pb.UINT16: "uint16",
}
DTYPES_BY_NAME: Final[dict[str, pb.DataType]] = {name: value for value, name in DTYPE_NAMES.items()}

# Little-endian numpy dtype of the bytes on the wire (bfloat16: raw 16-bit patterns).
_WIRE_NUMPY: Final[dict[pb.DataType, np.dtype]] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.BFLOAT16: np.dtype("<u2"),
    pb.UINT8: np.dtype("u1"),
    pb.INT64: np.dtype("<i8"),
    pb.INT32: np.dtype("<i4"),
    pb.FLOAT64: np.dtype("<f8"),
    pb.UINT16: np.dtype("<u2"),
}
_DTYPE_BY_NUMPY: Final[dict[np.dtype, pb.DataType]] = {
    np.dtype(np.float32): pb.FLOAT32,
    np.dtype(np.float16): pb.FLOAT16,
    np.dtype(np.uint8): pb.UINT8,
    np.dtype(np.int64): pb.INT64,
    np.dtype(np.int32): pb.INT32,
    np.dtype(np.float64): pb.FLOAT64,
    np.dtype(np.uint16): pb.UINT16,
}

DEFAULT_MAX_ELEMENTS: Final = 1 << 28


def dtype_name(dtype: int) -> str:
    """The JSON/config name of a wire dtype (`float32`, ...); `unknown(<n>)` for other values."""
    for value, name in DTYPE_NAMES.items():
        if value == dtype:
            return name
    return f"unknown({dtype})"


def parse_dtype_name(name: str, field: str) -> pb.DataType:
    """The wire dtype for a name such as `float32`, or `InvalidArgument` naming `field`."""
    try:
        return DTYPES_BY_NAME[name]
    except (KeyError, TypeError):
        raise InvalidArgument(
            f"{field}: unknown dtype {name!r}; expected one of {sorted(DTYPES_BY_NAME)}",
            field,
        ) from None


def refuse_bfloat16_inputs(dtype: int, field: str) -> None:
    """Inputs are never bfloat16 (it is an output rounding only): `InvalidArgument` naming `field`
    if `dtype` is BFLOAT16. Every door that reads an input dtype calls this."""
    if dtype == pb.BFLOAT16:
        raise InvalidArgument(
            f"{field}: bfloat16 inputs are not accepted; send float32, float16 or uint8", field
        )


def check_json_cast(parsed: np.ndarray, dtype: np.dtype, field: str, type_name: str) -> None:
    """Refuse JSON numbers (`parsed`, as float64: JSON numbers are doubles) that a cast to `dtype`
    would change: for an integer dtype a fraction, a non-finite number or one out of range (numpy
    would truncate 0.7 to 0 or wrap 300 to 44); for a float dtype a finite number beyond its range
    (it would become inf). `type_name` is the dtype as the request named it (`int64`, `INT64`)."""
    if not parsed.size:
        return
    if dtype.kind in "iu":
        limits = np.iinfo(dtype)
        bad = (
            ~np.isfinite(parsed)
            | (parsed != np.round(parsed))
            | (parsed < limits.min)
            | (parsed > limits.max)
        )
        problem = f"is not a {type_name}"
    elif dtype.kind == "f":
        bad = np.isfinite(parsed) & (np.abs(parsed) > np.finfo(dtype).max)
        problem = f"is outside the {type_name} range"
    else:
        return
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        at = [int(i) for i in np.unravel_index(index, parsed.shape)]
        raise InvalidArgument(
            f"{field}: value {float(parsed.flat[index])!r} at index {at} {problem}", field
        )


def index_dtype(classes: int, token_level: bool) -> pb.DataType:
    """The wire dtype of top-k indices for a task of `classes` classes: the narrowest that holds
    every index. UINT8 up to 256 classes; UINT16 up to 65,536 for token-level tasks only (so a
    client of sequence-level, image-like tasks sees the dtypes it always saw); else INT32."""
    if classes <= 1 << 8:
        return pb.UINT8
    if token_level and classes <= 1 << 16:
        return pb.UINT16
    return pb.INT32


def itemsize(dtype: pb.DataType) -> int:
    return _WIRE_NUMPY[dtype].itemsize


def float32_to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest even) and return the 16-bit patterns (uint16)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    # NaN must stay NaN (rounding could carry it into infinity).
    nan = np.isnan(array)
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode(array: np.ndarray, dtype: pb.DataType | None = None) -> pb.Tensor:
    """Encode an array as a Tensor. `dtype` (a wire DataType) converts first, e.g. pb.FLOAT16 or
    pb.BFLOAT16 for compact outputs; by default the array's own dtype is kept (it must be one of
    float32/float16/uint8/uint16/int64/int32/float64)."""
    array = np.asarray(array)
    if dtype is None:
        if array.dtype not in _DTYPE_BY_NUMPY:
            raise TypeError(f"cannot encode numpy dtype {array.dtype}; convert it first")
        dtype = _DTYPE_BY_NUMPY[array.dtype]
    if dtype == pb.BFLOAT16:
        payload = float32_to_bfloat16_bits(array.astype(np.float32, copy=False))
    else:
        payload = array.astype(_WIRE_NUMPY[dtype], copy=False)
    return pb.Tensor(
        dtype=dtype,
        shape=list(array.shape),
        data=np.ascontiguousarray(payload).tobytes(),
    )


def element_count(shape: list[int] | tuple[int, ...], field: str, max_elements: int) -> int:
    """Validate a declared shape (non-empty, every dim >= 1, product <= max_elements)."""
    if len(shape) == 0:
        raise InvalidArgument(
            f"{field}.shape: must have at least one dimension, got []", field + ".shape"
        )
    bad = [d for d in shape if d < 1]
    if bad:
        raise InvalidArgument(
            f"{field}.shape: every dimension must be >= 1, got {list(shape)}",
            field + ".shape",
        )
    count = math.prod(int(d) for d in shape)
    if count > max_elements:
        raise InvalidArgument(
            f"{field}.shape: {list(shape)} declares {count} elements, above the limit of {max_elements}",
            field + ".shape",
        )
    return count


def decode(
    tensor: pb.Tensor, field: str = "inputs", max_elements: int = DEFAULT_MAX_ELEMENTS
) -> np.ndarray:
    """Decode and validate a Tensor. Returns a read-only numpy array of the wire dtype, except
    bfloat16, which decodes to float32. Raises `InvalidArgument` naming `field.dtype`,
    `field.shape` or `field.data`."""
    if tensor.dtype not in _WIRE_NUMPY:
        raise InvalidArgument(
            f"{field}.dtype: unsupported dtype {dtype_name(tensor.dtype)}; expected one of "
            f"{sorted(DTYPES_BY_NAME)}",
            field + ".dtype",
        )
    shape = tuple(int(d) for d in tensor.shape)
    count = element_count(shape, field, max_elements)
    wire = _WIRE_NUMPY[tensor.dtype]
    expected = count * wire.itemsize
    if len(tensor.data) != expected:
        raise InvalidArgument(
            f"{field}.data: shape {list(shape)} of {dtype_name(tensor.dtype)} needs {expected} bytes, "
            f"got {len(tensor.data)}",
            field + ".data",
        )
    array = np.frombuffer(tensor.data, dtype=wire).reshape(shape)
    if tensor.dtype == pb.BFLOAT16:
        return bfloat16_bits_to_float32(array)
    return array
