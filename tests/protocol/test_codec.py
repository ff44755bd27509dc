"""`protocol.codec` (tensors <-> bytes, validated) and `protocol.errors` (the error table)."""

from __future__ import annotations

import math
import time

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol import codec
from protocol.errors import (
    ERRORS,
    GRPC_CODE_KEY,
    GRPC_FIELD_KEY,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TeacherError,
    Unauthenticated,
    Unavailable,
    error_from_code,
    error_from_grpc_status,
)
from protocol.v1 import teacher_pb2 as pb

NUMPY_DTYPES = {
    pb.FLOAT32: np.float32,
    pb.FLOAT16: np.float16,
    pb.UINT8: np.uint8,
    pb.INT64: np.int64,
    pb.INT32: np.int32,
    pb.FLOAT64: np.float64,
}
SHAPES = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6)
# bfloat16 keeps 8 significant bits: round to nearest is within half a unit in the last place.
BFLOAT16_RTOL = 2.0**-8
BFLOAT16_MAX = 3.3895313892515355e38


def assert_same(decoded: np.ndarray, original: np.ndarray) -> None:
    assert decoded.dtype == original.dtype
    assert decoded.shape == original.shape
    np.testing.assert_array_equal(decoded, original)  # NaN == NaN here
    # Bit-exact, which also checks -0.0 and NaN payloads.
    assert decoded.tobytes() == np.ascontiguousarray(original).tobytes()


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(NUMPY_DTYPES), ids=codec.dtype_name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip_every_dtype(dtype: int, data: st.DataObject) -> None:
    array = data.draw(hnp.arrays(NUMPY_DTYPES[dtype], SHAPES))
    tensor = codec.encode(array)
    assert tensor.dtype == dtype
    assert list(tensor.shape) == list(array.shape)
    assert len(tensor.data) == array.nbytes
    # Through the serialized message, as on the wire.
    decoded = codec.decode(pb.Tensor.FromString(tensor.SerializeToString()))
    assert_same(decoded, array)
    assert not decoded.flags.writeable  # a view of the message bytes, not a copy


@settings(max_examples=40, deadline=None)
@given(array=hnp.arrays(np.float64, SHAPES), target=st.sampled_from(sorted(NUMPY_DTYPES)))
def test_encode_converts_to_the_requested_dtype(array: np.ndarray, target: int) -> None:
    array = np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=-1.0).clip(-100, 100)
    if NUMPY_DTYPES[target] == np.uint8:
        array = np.abs(array)
    expected = array.astype(NUMPY_DTYPES[target])
    assert_same(codec.decode(codec.encode(array, target)), expected)


def test_encode_is_little_endian() -> None:
    tensor = codec.encode(np.array([1], dtype=">i4"), pb.INT32)
    assert tensor.data == b"\x01\x00\x00\x00"
    assert codec.encode(np.array([1.0], dtype=np.float32)).data == b"\x00\x00\x80\x3f"


def test_encode_rejects_unsupported_numpy_dtype() -> None:
    with pytest.raises(TypeError, match="cannot encode"):
        codec.encode(np.array([1], dtype=np.int16))


BFLOAT16_VALUES = st.one_of(
    st.floats(min_value=-BFLOAT16_MAX, max_value=BFLOAT16_MAX, width=32, allow_subnormal=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0]),
)


@settings(max_examples=80, deadline=None)
@given(array=hnp.arrays(np.float32, SHAPES, elements=BFLOAT16_VALUES))
def test_bfloat16_round_trip(array: np.ndarray) -> None:
    tensor = codec.encode(array, pb.BFLOAT16)
    assert tensor.dtype == pb.BFLOAT16
    assert len(tensor.data) == 2 * array.size
    decoded = codec.decode(pb.Tensor.FromString(tensor.SerializeToString()))
    assert decoded.dtype == np.float32
    assert decoded.shape == array.shape
    nan = np.isnan(array)
    np.testing.assert_array_equal(np.isnan(decoded), nan)  # NaN stays NaN
    finite = ~nan
    np.testing.assert_array_equal(np.signbit(decoded[finite]), np.signbit(array[finite]))
    np.testing.assert_allclose(decoded[finite], array[finite], rtol=BFLOAT16_RTOL, atol=1e-39)
    # bfloat16 values survive a second round trip exactly.
    assert_same(codec.decode(codec.encode(decoded, pb.BFLOAT16)), decoded)


def test_bfloat16_rounds_to_nearest_even() -> None:
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF], dtype=np.uint32)
    values = bits.view(np.float32)
    rounded = codec.float32_to_bfloat16_bits(values)
    # halfway: to even (down, then up); above halfway: up; past the largest bfloat16: infinity.
    assert rounded.tolist() == [0x3F80, 0x3F82, 0x3F81, 0x7F80]


def test_bfloat16_keeps_nan_whose_rounding_would_overflow() -> None:
    nan = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001], dtype=np.uint32).view(np.float32)
    assert np.isnan(codec.decode(codec.encode(nan, pb.BFLOAT16))).all()


# --- decode rejections ------------------------------------------------------------------------


def rejected(tensor: pb.Tensor, **kwargs: int) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        codec.decode(tensor, "inputs", **kwargs)
    return info.value


@pytest.mark.parametrize("dtype", [pb.DATA_TYPE_UNSPECIFIED, 8, 99])
def test_decode_rejects_unknown_dtype(dtype: int) -> None:
    error = rejected(pb.Tensor(dtype=dtype, shape=[1], data=b"\x00" * 4))
    assert error.field == "inputs.dtype"
    assert error.message.startswith("inputs.dtype:")


def test_decode_rejects_empty_shape() -> None:
    error = rejected(pb.Tensor(dtype=pb.FLOAT32, shape=[], data=b"\x00" * 4))
    assert error.field == "inputs.shape"
    assert "at least one dimension" in error.message


@pytest.mark.parametrize("shape", [[0], [2, 0, 3], [-1], [4, -2], [0, 1, 28, 28]])
def test_decode_rejects_zero_or_negative_dimension(shape: list[int]) -> None:
    error = rejected(pb.Tensor(dtype=pb.FLOAT32, shape=shape, data=b""))
    assert error.field == "inputs.shape"
    assert str(shape) in error.message


def test_decode_rejects_huge_declared_shape_without_allocating() -> None:
    tensor = pb.Tensor(dtype=pb.FLOAT32, shape=[10**6, 10**6], data=b"\x00" * 4)
    start = time.perf_counter()
    error = rejected(tensor)
    assert time.perf_counter() - start < 0.1
    assert error.field == "inputs.shape"
    assert str(10**12) in error.message


def test_decode_rejects_shape_above_max_elements() -> None:
    tensor = pb.Tensor(dtype=pb.UINT8, shape=[11], data=b"\x00" * 11)
    assert rejected(tensor, max_elements=10).field == "inputs.shape"
    assert codec.decode(tensor, max_elements=11).shape == (11,)


@pytest.mark.parametrize("length", [0, 3, 5, 8])
def test_decode_rejects_byte_length_mismatch(length: int) -> None:
    error = rejected(pb.Tensor(dtype=pb.FLOAT32, shape=[1], data=b"\x00" * length))
    assert error.field == "inputs.data"
    assert "needs 4 bytes" in error.message and f"got {length}" in error.message


def test_decode_names_the_given_field() -> None:
    with pytest.raises(InvalidArgument) as info:
        codec.decode(pb.Tensor(dtype=pb.FLOAT32, shape=[2], data=b""), "hints.x")
    assert info.value.field == "hints.x.data"


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.integers(0, 10),
    shape=st.lists(st.integers(-3, 2**40), max_size=5),
    data=st.binary(max_size=256),
)
def test_decode_fuzz(dtype: int, shape: list[int], data: bytes) -> None:
    tensor = pb.Tensor(dtype=dtype, shape=shape, data=data)
    try:
        array = codec.decode(tensor)
    except InvalidArgument as error:
        assert error.field in ("inputs.dtype", "inputs.shape", "inputs.data")
        return
    assert array.shape == tuple(shape)
    expected = 2 * len(data) if dtype == pb.BFLOAT16 else len(data)
    assert array.nbytes == expected


@settings(max_examples=100, deadline=None)
@given(
    dtype=st.sampled_from([*sorted(NUMPY_DTYPES), pb.BFLOAT16]),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    data=st.data(),
)
def test_decode_fuzz_valid_lengths(dtype: int, shape: list[int], data: st.DataObject) -> None:
    """Random bytes of exactly the right length always decode (every bit pattern is allowed)."""
    size = math.prod(shape) * codec.itemsize(dtype)
    payload = data.draw(st.binary(min_size=size, max_size=size))
    array = codec.decode(pb.Tensor(dtype=dtype, shape=shape, data=payload))
    assert array.shape == tuple(shape)
    assert array.nbytes == (2 * size if dtype == pb.BFLOAT16 else size)


def test_dtype_names() -> None:
    assert codec.dtype_name(pb.FLOAT32) == "float32"
    assert codec.dtype_name(pb.BFLOAT16) == "bfloat16"
    assert codec.dtype_name(42) == "unknown(42)"
    assert all(codec.parse_dtype_name(n, "dtype") == v for n, v in codec.DTYPES_BY_NAME.items())
    with pytest.raises(InvalidArgument) as info:
        codec.parse_dtype_name("float8", "dtype")
    assert info.value.field == "dtype"


# --- errors -----------------------------------------------------------------------------------

DOCUMENTED = {
    # code: (class, gRPC status, HTTP status, retryable)
    "INVALID_ARGUMENT": (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, 400, False),
    "NOT_FOUND": (NotFound, grpc.StatusCode.NOT_FOUND, 404, False),
    "FAILED_PRECONDITION": (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, 412, False),
    "RESOURCE_EXHAUSTED": (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, 429, True),
    "UNAVAILABLE": (Unavailable, grpc.StatusCode.UNAVAILABLE, 503, True),
    "DEADLINE_EXCEEDED": (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, 504, True),
    "UNAUTHENTICATED": (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, 401, False),
    "PERMISSION_DENIED": (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, 403, False),
    "INTERNAL": (Internal, grpc.StatusCode.INTERNAL, 500, False),
}


def test_error_table_is_as_documented() -> None:
    assert set(ERRORS) == set(DOCUMENTED)
    for code, (cls, grpc_status, http_status, retryable) in DOCUMENTED.items():
        assert ERRORS[code] is cls
        assert cls.code == code
        assert cls.grpc_status == grpc_status
        assert cls.http_status == http_status
        assert cls.retryable is retryable
        assert issubclass(cls, TeacherError)


def test_error_classes_have_distinct_codes_and_statuses() -> None:
    classes = list(ERRORS.values())
    assert len({cls.code for cls in classes}) == len(classes)
    assert len({cls.grpc_status for cls in classes}) == len(classes)
    assert len({cls.http_status for cls in classes}) == len(classes)
    assert GRPC_CODE_KEY == "error-code" and GRPC_FIELD_KEY == "error-field"


@pytest.mark.parametrize("code", sorted(DOCUMENTED))
def test_error_from_code_round_trips(code: str) -> None:
    cls = DOCUMENTED[code][0]
    original = cls("inputs.shape: expected [N, 1, 28, 28], got [4, 784]", "inputs.shape")
    rebuilt = error_from_code(original.code, original.message, original.field)
    assert type(rebuilt) is cls
    assert (rebuilt.code, rebuilt.message, rebuilt.field) == (
        original.code,
        original.message,
        original.field,
    )
    assert (
        rebuilt.to_dict()
        == original.to_dict()
        == {
            "code": code,
            "message": original.message,
            "field": "inputs.shape",
        }
    )
    assert str(rebuilt) == original.message
    assert type(error_from_grpc_status(cls.grpc_status, "m", "f")) is cls


def test_unknown_codes_and_statuses_become_internal() -> None:
    assert type(error_from_code("NO_SUCH_CODE", "m")) is Internal
    assert type(error_from_grpc_status(grpc.StatusCode.DATA_LOSS, "m")) is Internal
    assert type(error_from_grpc_status(grpc.StatusCode.CANCELLED, "m")) is Unavailable
    assert error_from_code("NOT_FOUND", "m").field == ""


# --- UINT16: top-k indices of token-level tasks ---------------------------------------------


@settings(max_examples=60, deadline=None)
@given(array=hnp.arrays(np.uint16, SHAPES))
def test_uint16_round_trip(array: np.ndarray) -> None:
    tensor = codec.encode(array)
    assert tensor.dtype == pb.UINT16
    assert codec.dtype_name(tensor.dtype) == "uint16"
    assert len(tensor.data) == 2 * array.size
    decoded = codec.decode(pb.Tensor.FromString(tensor.SerializeToString()))
    assert_same(decoded, array)


@settings(max_examples=60, deadline=None)
@given(indices=hnp.arrays(np.int64, SHAPES, elements=st.integers(0, 65_535)))
def test_uint16_encodes_int64_indices_exactly(indices: np.ndarray) -> None:
    """What the server does with a token-level task's int64 indices below 65,536."""
    tensor = codec.encode(indices, pb.UINT16)
    assert tensor.data == indices.astype("<u2").tobytes()
    decoded = codec.decode(tensor)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded.astype(np.int64), indices)


def test_uint16_is_little_endian() -> None:
    assert codec.encode(np.array([1, 65_535], dtype=np.uint16)).data == b"\x01\x00\xff\xff"
    assert codec.decode(pb.Tensor(dtype=pb.UINT16, shape=[1], data=b"\x02\x01"))[0] == 258


def test_uint16_byte_length_is_checked() -> None:
    error = rejected(pb.Tensor(dtype=pb.UINT16, shape=[2], data=b"\x00" * 3))
    assert error.field == "inputs.data"
    assert "needs 4 bytes, got 3" in error.message


@pytest.mark.parametrize(
    ("classes", "token_level", "expected"),
    [
        (2, False, pb.UINT8),
        (256, False, pb.UINT8),
        (256, True, pb.UINT8),
        (257, True, pb.UINT16),
        (4096, True, pb.UINT16),
        (65_536, True, pb.UINT16),
        (65_537, True, pb.INT32),
        (257, False, pb.INT32),  # sequence-level: the dtypes old clients know
        (65_536, False, pb.INT32),
    ],
)
def test_index_dtype_is_the_narrowest(classes: int, token_level: bool, expected: int) -> None:
    assert codec.index_dtype(classes, token_level) == expected


@settings(max_examples=100, deadline=None)
@given(classes=st.integers(1, 1 << 20), token_level=st.booleans(), data=st.data())
def test_index_dtype_holds_every_index(
    classes: int, token_level: bool, data: st.DataObject
) -> None:
    dtype = codec.index_dtype(classes, token_level)
    indices = np.array([0, classes - 1, data.draw(st.integers(0, classes - 1))], dtype=np.int64)
    decoded = codec.decode(codec.encode(indices, dtype)).astype(np.int64)
    np.testing.assert_array_equal(decoded, indices)
    if not token_level:
        assert dtype in (pb.UINT8, pb.INT32)
