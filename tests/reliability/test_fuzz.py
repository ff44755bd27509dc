"""Property-based fuzzing of request decoding, with no server: whatever a client sends, decoding
and validation either give a valid request or raise a `protocol.errors.TeacherError` (which each
door turns into a status naming the field), never another exception (which would be a 500 /
UNKNOWN, or worse, a crash).

Covered: `teacher_server.v1.convert.request_from_pb` + `teacher_server.serving.validation.validate` with
arbitrary protobuf field values; the HTTP protobuf body parser
(`teacher_server.v1.convert.request_from_protobuf`) with arbitrary and mutated bytes; the HTTP JSON
body parser (`teacher_server.v1.convert.request_from_json`) with arbitrary bytes, arbitrary JSON
and JSON objects with the body's keys and arbitrary values.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import TeacherError
from protocol.v1 import teacher_pb2 as pb
from teacher_server.serving.schema import ModelInfo, SoftTargetsRequest, TaskInfo, ValidatedRequest
from teacher_server.serving.validation import validate
from teacher_server.v1 import convert
from teacher_server.v1.convert import request_from_json as _request_from_json
from teacher_server.v1.convert import request_from_protobuf as _request_from_protobuf

MODEL = "fuzz-model"
VERSION = "sha256:" + "ab" * 32
MAX_ELEMENTS = 4096
MAX_BATCH = 4
EXAMPLES = 300

# A small image model (per-sample shape 1x2x2, so valid inputs are a few bytes and hypothesis
# reaches the accepting paths often) and a token model (int64 ids < 50).
IMAGE_MODEL = ModelInfo(
    name=MODEL,
    model_version=VERSION,
    tasks=(TaskInfo("a", ("x", "y", "z"), 0.9), TaskInfo("b", ("even", "odd"), None)),
    input_shape=(1, 2, 2),
    input_dtype="float32",
    accepted_input_dtypes=("float32", "float16", "uint8"),
    uint8_scale=1 / 255,
    hints={"features": (4,)},
    max_batch_size=MAX_BATCH,
    description="hand-built for fuzzing",
    parameter_count=10,
    ready=True,
)
TOKEN_MODEL = ModelInfo(
    name=MODEL,
    model_version=VERSION,
    tasks=(TaskInfo("a", ("x", "y", "z"), None),),
    input_shape=(5,),
    input_dtype="int64",
    accepted_input_dtypes=("int64", "int32"),
    uint8_scale=1.0,
    hints={},
    max_batch_size=MAX_BATCH,
    description="hand-built token model",
    parameter_count=10,
    ready=True,
)
for _field, _value in (("max_value", 50),):  # newer ModelInfo fields, when the schema has them
    if hasattr(TOKEN_MODEL, _field):
        object.__setattr__(TOKEN_MODEL, _field, _value)

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure here is reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
NAMES = st.sampled_from(["a", "b", "features", ""]) | st.text(max_size=6)
DTYPES = (
    st.sampled_from([pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.UINT8, pb.INT64, pb.INT32]) | INT32
)
SHAPES = st.builds(
    lambda n, rest: [n, *rest], st.integers(-1, 6), st.sampled_from([[1, 2, 2], [5]])
) | st.lists(st.integers(-2, 5) | INT64, max_size=5)


def mostly(draw: st.DrawFn, valid: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]) -> Any:
    """A valid value 4 times in 5, else anything: most examples then break one or two fields, so
    both the accepting and the refusing paths are reached."""
    return draw(valid) if draw(st.integers(0, 4)) else draw(anything)


ITEMSIZE = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.UINT8: 1, pb.INT64: 8, pb.INT32: 4}


@st.composite
def tensors(draw: st.DrawFn, info: ModelInfo) -> pb.Tensor:
    image = info.input_dtype == "float32"
    valid_dtypes = (
        [pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.UINT8] if image else [pb.INT64, pb.INT32]
    )
    dtype = mostly(draw, st.sampled_from(valid_dtypes), DTYPES)
    valid_shape = st.integers(1, MAX_BATCH).map(lambda n: [n, *info.input_shape])
    shape = mostly(draw, valid_shape, SHAPES)
    itemsize = ITEMSIZE.get(dtype, 4)
    count = math.prod(shape) if shape and all(0 < d < 64 for d in shape) else -1
    if 0 < count <= 64 and draw(st.integers(0, 4)):
        if dtype in (pb.INT64, pb.INT32) and draw(st.booleans()):  # ids in the model's range
            ids = draw(st.lists(st.integers(0, 49), min_size=count, max_size=count))
            data = np.asarray(ids, dtype="<i8" if dtype == pb.INT64 else "<i4").tobytes()
        else:
            data = draw(st.binary(min_size=count * itemsize, max_size=count * itemsize))
    else:
        data = draw(st.binary(max_size=64))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def pb_requests(draw: st.DrawFn, info: ModelInfo) -> pb.SoftTargetsRequest:
    names = [task.name for task in info.tasks]
    message = pb.SoftTargetsRequest(
        model=mostly(draw, st.just(MODEL), st.text(max_size=8)),
        model_version=mostly(draw, st.sampled_from(["", VERSION]), st.text(max_size=8)),
        tasks=mostly(
            draw, st.lists(st.sampled_from(names), unique=True), st.lists(NAMES, max_size=3)
        ),
        output=mostly(draw, st.sampled_from([0, 1, 2, 3]), INT32),
        batch_id=mostly(draw, st.text(max_size=20), st.text(max_size=140)),
        top_k=mostly(draw, st.integers(0, 2), st.integers(0, 2**32 - 1)),
        output_dtype=mostly(draw, st.sampled_from([0, 1, 2, 3]), INT32),
        hints=mostly(
            draw,
            st.lists(st.sampled_from(sorted(info.hints) or [""]), max_size=1),
            st.lists(NAMES, max_size=2),
        ),
    )
    temperature = mostly(draw, st.none() | st.floats(0.1, 10.0), st.floats())
    if temperature is not None:
        message.temperature = temperature
    inputs = mostly(draw, tensors(info), st.none())
    if inputs is not None:
        message.inputs.CopyFrom(inputs)
    return message


def check_valid(validated: ValidatedRequest, info: ModelInfo) -> None:
    """What an accepted request promises the engine."""
    inputs = validated.inputs
    assert inputs.shape[1:] == info.input_shape
    assert 1 <= inputs.shape[0] <= info.max_batch_size
    assert inputs.dtype.name in info.accepted_input_dtypes
    if inputs.dtype.kind == "f":
        assert np.isfinite(inputs).all()
    names = [task.name for task in info.tasks]
    assert validated.tasks and set(validated.tasks) <= set(names)
    assert len(set(validated.tasks)) == len(validated.tasks)
    request = validated.request
    assert math.isfinite(request.temperature) and request.temperature > 0
    assert set(request.hints) <= set(info.hints)


def outcome(decode: Callable[[], SoftTargetsRequest], info: ModelInfo) -> str:
    """'valid' or the TeacherError's code; any other exception fails the test."""
    try:
        validated = validate(decode(), info)
    except TeacherError as error:
        assert error.field, f"no field named: {error!r}"
        assert error.message, f"no message: {error!r}"
        return error.code
    check_valid(validated, info)
    return "valid"


def run(test: Callable[[Counter[str]], None]) -> Counter[str]:
    counts: Counter[str] = Counter()
    test(counts)
    return counts


def test_protobuf_request_decoding_and_validation() -> None:
    def fuzz(counts: Counter[str]) -> None:
        @FUZZ
        @given(data=st.data(), info=st.sampled_from([IMAGE_MODEL, TOKEN_MODEL]))
        def check(data: st.DataObject, info: ModelInfo) -> None:
            message = data.draw(pb_requests(info))
            counts[outcome(lambda: convert.request_from_pb(message, MAX_ELEMENTS), info)] += 1

        check()

    counts = run(fuzz)
    assert counts["valid"] > 0 and counts["INVALID_ARGUMENT"] > 0, counts


VALID_BYTES = pb.SoftTargetsRequest(
    model=MODEL,
    inputs=pb.Tensor(dtype=pb.FLOAT32, shape=[1, 1, 2, 2], data=bytes(16)),
    tasks=["a"],
    temperature=2.0,
    hints=["features"],
).SerializeToString()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid serialized request with bytes flipped, cut, inserted or appended."""
    data = bytearray(VALID_BYTES)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "append"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        else:
            data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def test_http_protobuf_body_decoding() -> None:
    def fuzz(counts: Counter[str]) -> None:
        @FUZZ
        @given(raw=st.binary(max_size=200) | mutated() | st.just(VALID_BYTES))
        def check(raw: bytes) -> None:
            decode = lambda: _request_from_protobuf(MODEL, raw, MAX_ELEMENTS)  # noqa: E731
            counts[outcome(decode, IMAGE_MODEL)] += 1

        check()

    counts = run(fuzz)
    assert counts["valid"] > 0 and counts["INVALID_ARGUMENT"] > 0, counts


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)
BODY_KEYS = [
    "inputs",
    "shape",
    "dtype",
    "tasks",
    "temperature",
    "output",
    "batch_id",
    "model_version",
    "top_k",
    "output_dtype",
    "hints",
]


def _sample_lists(draw: st.DrawFn) -> Any:
    """Inputs close to valid for IMAGE_MODEL: [N, 1, 2, 2] nested lists of numbers."""
    numbers: st.SearchStrategy[Any]
    if draw(st.integers(0, 4)):
        numbers = st.integers(0, 255) | st.floats(0.0, 1.0)
    else:
        numbers = st.integers() | st.floats() | st.none() | st.text(max_size=2)
    batch = mostly(draw, st.integers(1, MAX_BATCH), st.integers(0, MAX_BATCH + 2))
    return [[[[draw(numbers) for _ in range(2)] for _ in range(2)]] for _ in range(batch)]


VALID_JSON = {
    "shape": st.none(),
    "dtype": st.sampled_from(["float32", "float16", "uint8", "int64", "bfloat16"]),
    "tasks": st.lists(st.sampled_from(["a", "b"]), unique=True),
    "temperature": st.floats(0.1, 10.0) | st.integers(1, 5),
    "output": st.sampled_from(["probs", "log_probs", "logits"]),
    "batch_id": st.text(max_size=10),
    "model_version": st.sampled_from(["", VERSION]),
    "top_k": st.integers(0, 2),
    "output_dtype": st.sampled_from(["float32", "float16", "bfloat16"]),
    "hints": st.sampled_from([[], ["features"]]),
}


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return draw(st.binary(max_size=120))
    if choice == 1:
        return json.dumps(draw(JSON_VALUES)).encode()
    body: dict[str, Any] = {"inputs": _sample_lists(draw) if choice > 2 else draw(JSON_VALUES)}
    for key in draw(st.lists(st.sampled_from(BODY_KEYS[1:]), unique=True, max_size=6)):
        body[key] = mostly(draw, VALID_JSON[key], JSON_VALUES)
    if body.get("shape", 0) is None:
        del body["shape"]
    if not draw(st.integers(0, 9)):
        body[draw(st.text(max_size=6))] = draw(JSON_VALUES)  # maybe an unknown key
    return json.dumps(body).encode()  # NaN / Infinity as the server's parser accepts them


def test_http_json_body_decoding() -> None:
    def fuzz(counts: Counter[str]) -> None:
        @FUZZ
        @given(raw=json_bodies())
        def check(raw: bytes) -> None:
            counts[outcome(lambda: _request_from_json(MODEL, raw), IMAGE_MODEL)] += 1

        check()

    counts = run(fuzz)
    assert counts["valid"] > 0 and counts["INVALID_ARGUMENT"] > 0, counts
