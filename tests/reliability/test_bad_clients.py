"""Bad clients: the bad-input cases that tests/teacher_server/test_bad_input.py does not cover,
sent as raw bytes (gRPC with an identity serializer, HTTP `application/x-protobuf` and JSON), and
a well-behaved client whose results stay bitwise identical while bad clients hammer the server.

Every case is refused with the right status (gRPC status + `error-code`/`error-field` metadata;
HTTP status + the standard error body naming the field). Things that are expected to succeed by
design are tested separately (unknown protobuf field numbers are ignored: protobuf's forward
compatibility).
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from protocol import codec
from protocol.errors import GRPC_CODE_KEY, GRPC_FIELD_KEY, ResourceExhausted
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from student_client import SoftTargetLoader, TeacherClient
from student_client.online.retry import is_retryable
from tests.reliability.conftest import (
    MODEL,
    Deadline,
    Launcher,
    Teacher,
    Transport,
    grpc_channel,
    http_client,
)

LIMIT = 262_144  # --max-message-bytes of this module's teacher (the 100k-nesting body fits)
TIMEOUT = 30.0
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
PATH = f"/v1/models/{MODEL}/soft-targets"
GOOD = np.full((2, 1, 28, 28), 0.5, dtype=np.float32)
PINNED = "sha256:" + "f" * 64
SERVED = "{served}"  # replaced by the served model version in fragments

STATUSES = {
    # error code: (gRPC status, HTTP status)
    "INVALID_ARGUMENT": (grpc.StatusCode.INVALID_ARGUMENT, 400),
    "NOT_FOUND": (grpc.StatusCode.NOT_FOUND, 404),
    "FAILED_PRECONDITION": (grpc.StatusCode.FAILED_PRECONDITION, 412),
    "RESOURCE_EXHAUSTED": (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
}


def tensor(shape: list[int], data: bytes, dtype: Any = pb.FLOAT32) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def pb_bytes(inputs: np.ndarray | pb.Tensor | None = None, **fields: Any) -> bytes:
    """A serialized SoftTargetsRequest (the good one unless told otherwise)."""
    if inputs is None:
        inputs = GOOD
    if isinstance(inputs, np.ndarray):
        inputs = codec.encode(inputs)
    return pb.SoftTargetsRequest(
        model=fields.pop("model", MODEL), inputs=inputs, **fields
    ).SerializeToString()


def json_bytes(inputs: np.ndarray | list[Any] | None = None, **fields: Any) -> bytes:
    import json

    if inputs is None:
        inputs = GOOD
    if isinstance(inputs, np.ndarray):
        inputs = inputs.tolist()
    return json.dumps({"inputs": inputs, **fields}).encode()


def chunked(body: bytes, size: int = 16_384) -> Iterator[bytes]:
    """The body as a generator: httpx then sends it chunked, without a content-length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


@dataclass(frozen=True)
class Case:
    """One bad request. `protobuf` (bytes) is sent over raw gRPC and/or HTTP `x-protobuf`; `json`
    (bytes, or an iterator for a chunked body) over HTTP with `content_type`."""

    name: str
    code: str
    field: str
    protobuf: Callable[[], bytes] | None = None
    json: Callable[[], bytes | Iterator[bytes]] | None = None
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()
    on_grpc: bool = True  # send `protobuf` over gRPC too (not only over HTTP x-protobuf)
    http_status: int | None = None  # when not the code's usual one (413)
    fragments: tuple[str, ...] = ()  # each in the message ({served}: the served version)
    grpc_by_grpc: bool = False  # refused by grpc itself: no error-code/field metadata
    grpc_xfail: str = ""  # a known server bug on the gRPC door


TRUNCATED = pb_bytes()[:-100]
GARBAGE = b"\xff" * 16  # a 10-byte varint can never end: "Wire format was corrupt"
OVERSIZED = np.zeros((100, 1, 28, 28), np.float32)  # 313,600 bytes of data > LIMIT
BILLION = [1_275_511, 1, 28, 28]  # 1,000,000,624 elements, the model's per-sample shape

CASES = [
    Case(
        "truncated protobuf",
        "INVALID_ARGUMENT",
        "body",
        protobuf=lambda: TRUNCATED,
        fragments=("not a distill.v1.SoftTargetsRequest",),
    ),
    Case(
        "garbage protobuf",
        "INVALID_ARGUMENT",
        "body",
        protobuf=lambda: GARBAGE,
        fragments=("not a distill.v1.SoftTargetsRequest",),
    ),
    Case(
        "oversized message",
        "RESOURCE_EXHAUSTED",
        "body",
        protobuf=lambda: pb_bytes(OVERSIZED),
        json=lambda: json_bytes(OVERSIZED),
        http_status=413,
        fragments=(str(LIMIT),),
        grpc_by_grpc=True,
    ),
    Case(
        "oversized chunked body without content-length",
        "RESOURCE_EXHAUSTED",
        "body",
        json=lambda: chunked(json_bytes(OVERSIZED)),
        http_status=413,
        fragments=(f"more than the limit of {LIMIT}",),
    ),
    Case(
        "a billion elements declared with 4 bytes",
        "INVALID_ARGUMENT",
        "inputs.shape",
        protobuf=lambda: pb_bytes(tensor(BILLION, bytes(4))),
        json=lambda: json_bytes([0.5], shape=BILLION),
        fragments=("1000000624",),
    ),
    Case(
        "negative dimension",
        "INVALID_ARGUMENT",
        "inputs.shape",
        protobuf=lambda: pb_bytes(tensor([-2, 1, 28, 28], GOOD.tobytes())),
        json=lambda: json_bytes(GOOD.ravel(), shape=[-2, 1, 28, 28]),
        fragments=(">= 1", "-2"),
    ),
    Case(
        "zero inner dimension",
        "INVALID_ARGUMENT",
        "inputs.shape",
        protobuf=lambda: pb_bytes(tensor([2, 0, 28, 28], b"")),
        json=lambda: json_bytes([], shape=[2, 0, 28, 28]),
        fragments=(">= 1",),
    ),
    Case(
        "shape without dimensions",
        "INVALID_ARGUMENT",
        "inputs.shape",
        protobuf=lambda: pb_bytes(tensor([], bytes(4))),
        json=lambda: json_bytes([0.5], shape=[]),
        fragments=("at least one dimension",),
    ),
    Case(
        "more bytes than the shape needs",
        "INVALID_ARGUMENT",
        "inputs.data",
        protobuf=lambda: pb_bytes(tensor([2, 1, 28, 28], GOOD.tobytes() + bytes(4))),
        fragments=("needs 6272 bytes, got 6276",),
    ),
    Case(
        "more JSON values than the shape needs",
        "INVALID_ARGUMENT",
        "shape",
        json=lambda: json_bytes([*GOOD.ravel().tolist(), 0.5], shape=[2, 1, 28, 28]),
        fragments=("needs 1568 values", "1569"),
    ),
    Case(
        "dtype UNSPECIFIED",
        "INVALID_ARGUMENT",
        "inputs.dtype",
        protobuf=lambda: pb_bytes(tensor([2, 1, 28, 28], GOOD.tobytes(), pb.DATA_TYPE_UNSPECIFIED)),
    ),
    Case(
        "empty protobuf message",
        "INVALID_ARGUMENT",
        "inputs",
        protobuf=lambda: b"",
        fragments=("missing",),
    ),
    Case("empty JSON body", "INVALID_ARGUMENT", "body", json=lambda: b""),
    Case(
        "content-type text/plain",
        "INVALID_ARGUMENT",
        "content-type",
        json=lambda: json_bytes(),
        content_type="text/plain",
        fragments=("text/plain",),
    ),
    Case(
        "content-type octet-stream",
        "INVALID_ARGUMENT",
        "content-type",
        json=lambda: pb_bytes(),
        content_type="application/octet-stream",
        fragments=("application/octet-stream",),
    ),
    Case(
        "protobuf bytes labelled JSON",
        "INVALID_ARGUMENT",
        "body",
        json=lambda: pb_bytes(),
        fragments=("Invalid JSON",),
    ),
    Case(
        "100k nested JSON lists",
        "INVALID_ARGUMENT",
        "body",
        json=lambda: b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        fragments=("recursion limit",),
    ),
    Case(
        "invalid UTF-8 in JSON",
        "INVALID_ARGUMENT",
        "body",
        json=lambda: b'{"inputs": [0.5], "batch_id": "\xff\xfe\xc3"}',
        fragments=("Invalid JSON",),
    ),
    Case(
        "body names another model than the path",
        "INVALID_ARGUMENT",
        "model",
        protobuf=lambda: pb_bytes(model="another-model"),
        on_grpc=False,
        fragments=("another-model", MODEL),
    ),
    Case(
        "X-Request-Timeout not a number",
        "INVALID_ARGUMENT",
        "x-request-timeout",
        json=lambda: json_bytes(),
        headers=(("x-request-timeout", "soon"),),
        fragments=("soon",),
    ),
    Case(
        "X-Request-Timeout zero",
        "INVALID_ARGUMENT",
        "x-request-timeout",
        protobuf=lambda: pb_bytes(),
        on_grpc=False,
        headers=(("x-request-timeout", "0"),),
    ),
    Case(
        "JSON temperature a word",
        "INVALID_ARGUMENT",
        "temperature",
        json=lambda: json_bytes(temperature="hot"),
        fragments=("hot",),
    ),
    Case(
        "JSON inputs of strings",
        "INVALID_ARGUMENT",
        "inputs",
        json=lambda: json_bytes([[[["a"] * 28] * 28]]),
    ),
    Case(
        "JSON inputs an object",
        "INVALID_ARGUMENT",
        "inputs",
        json=lambda: b'{"inputs": {"path": "/etc/passwd"}}',
    ),
    Case(
        "JSON uint8 value out of range",
        "INVALID_ARGUMENT",
        "inputs",
        json=lambda: json_bytes(np.full((1, 1, 28, 28), 300).tolist(), dtype="uint8"),
        fragments=("300",),
    ),
    Case(
        "JSON shape of floats",
        "INVALID_ARGUMENT",
        "shape.0",  # pydantic's location of the bad element
        json=lambda: json_bytes(GOOD.ravel(), shape=[2.5, 1, 28, 28]),
    ),
    Case(
        "JSON tasks a string",
        "INVALID_ARGUMENT",
        "tasks",
        json=lambda: json_bytes(tasks="digit"),
    ),
    Case(
        "JSON batch_id a number",
        "INVALID_ARGUMENT",
        "batch_id",
        json=lambda: json_bytes(batch_id=7),
    ),
    Case(
        "hint listed twice",
        "INVALID_ARGUMENT",
        "hints",
        protobuf=lambda: pb_bytes(hints=["features", "features"]),
        json=lambda: json_bytes(hints=["features", "features"]),
    ),
    Case(
        "top_k at the uint32 maximum",
        "INVALID_ARGUMENT",
        "top_k",
        protobuf=lambda: pb_bytes(tasks=["digit"], top_k=2**32 - 1),
        json=lambda: json_bytes(tasks=["digit"], top_k=10**20),
        fragments=("between 0 (dense) and 10",),
    ),
    Case(
        "unknown pinned version names both versions",
        "FAILED_PRECONDITION",
        "model_version",
        protobuf=lambda: pb_bytes(model_version=PINNED),
        json=lambda: json_bytes(model_version=PINNED),
        fragments=(PINNED, SERVED),
    ),
]


def _params() -> list[Any]:
    params = []
    for case in CASES:
        transports = []
        if case.protobuf is not None:
            if case.on_grpc:
                transports.append("grpc")
            transports.append("http-protobuf")
        if case.json is not None:
            transports.append("http")
        for transport in transports:
            marks = []
            if transport == "grpc" and case.grpc_xfail:
                marks.append(pytest.mark.xfail(strict=True, reason=case.grpc_xfail))
            params.append(
                pytest.param(
                    case, transport, id=f"{case.name}-{transport}".replace(" ", "_"), marks=marks
                )
            )
    return params


MATRIX = _params()


@dataclass
class Outcome:
    ok: bool
    status: grpc.StatusCode | int
    code: str
    field: str
    message: str
    headers: dict[str, str]


class Door:
    """Raw access to one teacher: gRPC bytes in, bytes out; HTTP bodies as given."""

    def __init__(self, teacher: Teacher) -> None:
        self.channel = grpc_channel(teacher.grpc_address)
        self.raw = self.channel.unary_unary(
            "/distill.v1.TeacherService/GetSoftTargets",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        self.stub = pb_grpc.TeacherServiceStub(self.channel)
        self.http = http_client(teacher.http_url)

    def close(self) -> None:
        self.http.close()
        self.channel.close()

    def grpc(self, body: bytes) -> Outcome:
        try:
            self.raw(body, timeout=TIMEOUT)
        except grpc.RpcError as error:
            metadata = dict(error.trailing_metadata() or ())
            return Outcome(
                False,
                error.code(),
                str(metadata.get(GRPC_CODE_KEY, "")),
                str(metadata.get(GRPC_FIELD_KEY, "")),
                error.details() or "",
                {},
            )
        return Outcome(True, grpc.StatusCode.OK, "", "", "", {})

    def post(self, body: bytes | Iterator[bytes], content_type: str, headers: Any) -> Outcome:
        response = self.http.post(
            PATH, content=body, headers={"content-type": content_type, **dict(headers)}
        )
        if response.status_code < 400:
            return Outcome(True, response.status_code, "", "", "", dict(response.headers))
        if response.headers.get("content-type", "").startswith(PROTOBUF):
            error = pb.Error.FromString(response.content)
            code, field, message = error.code, error.field, error.message
        else:
            assert response.headers["content-type"] == JSON, response.text
            detail = response.json()["error"]
            code, field, message = detail["code"], detail["field"], detail["message"]
        return Outcome(False, response.status_code, code, field, message, dict(response.headers))

    def send(self, case: Case, transport: str) -> Outcome:
        if transport == "grpc":
            assert case.protobuf is not None
            return self.grpc(case.protobuf())
        if transport == "http-protobuf":
            assert case.protobuf is not None
            return self.post(case.protobuf(), PROTOBUF, case.headers)
        assert case.json is not None
        return self.post(case.json(), case.content_type, case.headers)


def problems(case: Case, transport: str, outcome: Outcome, served: str) -> list[str]:
    """What is wrong with `outcome` for `case` (empty: as expected)."""
    grpc_status, http_status = STATUSES[case.code]
    wrong = []
    if transport == "grpc":
        if outcome.status != grpc_status:
            wrong.append(f"gRPC status {outcome.status}, expected {grpc_status}")
        if not case.grpc_by_grpc:
            if (outcome.code, outcome.field) != (case.code, case.field):
                wrong.append(f"metadata {outcome.code}/{outcome.field!r}, expected {case.field!r}")
            if case.field not in outcome.message:
                wrong.append(f"field {case.field!r} not in message {outcome.message!r}")
    else:
        expected = case.http_status or http_status
        if outcome.status != expected:
            wrong.append(f"HTTP {outcome.status}, expected {expected}")
        if (outcome.code, outcome.field) != (case.code, case.field):
            wrong.append(f"error {outcome.code}/{outcome.field!r}, expected {case.field!r}")
        if case.field not in outcome.message:
            wrong.append(f"field {case.field!r} not in message {outcome.message!r}")
        if expected in (429, 503) and outcome.headers.get("retry-after") is None:
            wrong.append("no Retry-After header")
    for fragment in case.fragments:
        fragment = served if fragment == SERVED else fragment
        if fragment not in outcome.message:
            wrong.append(f"{fragment!r} not in message {outcome.message!r}")
    return [f"{case.name} over {transport}: {w}" for w in wrong]


@pytest.fixture(scope="module")
def teacher(module_launcher: Launcher) -> Teacher:
    return module_launcher.start("--max-message-bytes", str(LIMIT))


@pytest.fixture(scope="module")
def door(teacher: Teacher) -> Iterator[Door]:
    door = Door(teacher)
    yield door
    door.close()


@pytest.fixture(scope="module")
def served(door: Door) -> str:
    info = door.stub.GetModelInfo(pb.GetModelInfoRequest(model=MODEL), timeout=TIMEOUT)
    return str(info.model_version)


@pytest.mark.parametrize(("case", "transport"), MATRIX)
def test_bad_request(case: Case, transport: str, door: Door, served: str) -> None:
    outcome = door.send(case, transport)
    assert not outcome.ok, f"{case.name} over {transport} was answered"
    assert problems(case, transport, outcome, served) == []


def test_undecodable_grpc_request_is_refused_and_harmless(door: Door, served: str) -> None:
    """Bytes that are not a SoftTargetsRequest: INVALID_ARGUMENT naming `body`; the server goes on."""
    for body in (TRUNCATED, GARBAGE, b"\x0a\xff\xff\xff\xff\x0f"):
        outcome = door.grpc(body)
        assert not outcome.ok
        assert outcome.status == grpc.StatusCode.INVALID_ARGUMENT
    assert door.grpc(pb_bytes()).ok


def test_unknown_protobuf_fields_are_ignored(door: Door) -> None:
    """Expected behaviour, by protobuf's design (forward compatibility): field numbers the
    server's schema does not know are skipped, over gRPC and HTTP alike, and the answer is the
    same as without them. (JSON is strict instead: an unknown key is a 400, see test_bad_input.)"""
    request = pb.SoftTargetsRequest.FromString(pb_bytes(batch_id="unknown-fields"))
    # field 99, varint 1; field 100, length-delimited "hello"; field 5000, fixed32.
    extra = b"\x98\x06\x01" + b"\xa2\x06\x05hello" + b"\xc5\xb8\x02\x00\x00\x80\x3f"
    with_extra = request.SerializeToString() + extra
    parsed = pb.SoftTargetsRequest.FromString(with_extra)
    parsed.DiscardUnknownFields()
    assert parsed == request  # the known fields are read as if the unknown ones were absent

    plain = pb.SoftTargetsResponse.FromString(
        door.raw(request.SerializeToString(), timeout=TIMEOUT)
    )
    over_grpc = pb.SoftTargetsResponse.FromString(door.raw(with_extra, timeout=TIMEOUT))
    response = door.http.post(PATH, content=with_extra, headers={"content-type": PROTOBUF})
    assert response.status_code == 200, response.content
    over_http = pb.SoftTargetsResponse.FromString(response.content)
    assert over_grpc == plain
    assert over_http == plain


def _load_existing_matrix() -> list[Any]:
    path = Path(__file__).parents[1] / "teacher_server" / "test_bad_input.py"
    spec = importlib.util.spec_from_file_location("_existing_bad_input_matrix", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return list(module.CASES)


def test_at_least_30_distinct_bad_input_cases() -> None:
    """The existing matrix (tests/teacher_server/test_bad_input.py) and this one together."""
    existing = {case.name for case in _load_existing_matrix()}
    added = {case.name for case in CASES}
    assert len(added) == len(CASES), "case names are unique"
    assert not existing & added, f"already in the existing matrix: {existing & added}"
    assert len(existing | added) >= 30
    assert len(MATRIX) >= len(CASES)


GOOD_BATCHES = 12
BAD_THREADS = 4
BAD_ROUNDS = 3  # each bad thread sends the whole matrix at most this many times
BAD_SECONDS = 40.0


def good_run(door: Door, images: np.ndarray) -> list[list[np.ndarray]]:
    """One well-behaved client's pass: gRPC and HTTP protobuf requests, one at a time."""
    results = []
    for i in range(GOOD_BATCHES):
        batch = images[i * 8 : (i + 1) * 8]
        request = pb.SoftTargetsRequest(
            model=MODEL,
            inputs=codec.encode(batch),
            temperature=2.0 + i % 3,
            batch_id=f"good-{i}",
            top_k=2 if i % 4 == 3 else 0,
            hints=["features"] if i % 2 else [],
        )
        if i % 3 == 2:
            response = door.http.post(
                PATH, content=request.SerializeToString(), headers={"content-type": PROTOBUF}
            )
            assert response.status_code == 200, response.content
            message = pb.SoftTargetsResponse.FromString(response.content)
        else:
            message = door.stub.GetSoftTargets(request, timeout=TIMEOUT)
        arrays = []
        for output in message.outputs:
            arrays.append(codec.decode(output.values, max_elements=1 << 30))
            if output.HasField("indices"):
                arrays.append(codec.decode(output.indices, max_elements=1 << 30))
                arrays.append(codec.decode(output.tail_mass, max_elements=1 << 30))
        arrays.extend(codec.decode(h.tensor, max_elements=1 << 30) for h in message.hints)
        results.append(arrays)
    return results


def test_good_client_is_unaffected_by_bad_clients(
    teacher: Teacher,
    door: Door,
    served: str,
    mnist_test_images: tuple[np.ndarray, np.ndarray],
) -> None:
    """Bad requests fail validation (or decoding, or the size check) before the batcher, so they
    never share a forward with the good client's requests, whose results must be bitwise the
    same as in a run without bad clients."""
    images = mnist_test_images[0]
    before = good_run(door, images)

    stop = threading.Event()
    wrong: list[str] = []
    sent = [0] * BAD_THREADS
    deadline = Deadline(BAD_SECONDS)
    pairs: list[tuple[Case, str]] = [tuple(p.values) for p in MATRIX]  # type: ignore[misc]

    def bad_client(index: int) -> None:
        own = Door(teacher)
        try:
            order = pairs[index:] + pairs[:index]
            for case, transport in itertools.islice(
                itertools.cycle(order), BAD_ROUNDS * len(order)
            ):
                if (stop.is_set() and sent[index] >= len(order)) or deadline.passed:
                    break
                outcome = own.send(case, transport)
                sent[index] += 1
                if outcome.ok:
                    wrong.append(f"{case.name} over {transport} was answered")
                elif not (transport == "grpc" and case.grpc_xfail):
                    wrong.extend(problems(case, transport, outcome, served))
        except Exception as error:  # reported below, not lost in the thread
            wrong.append(f"bad client {index} crashed: {error!r}")
        finally:
            own.close()

    threads = [threading.Thread(target=bad_client, args=(i,)) for i in range(BAD_THREADS)]
    for thread in threads:
        thread.start()
    try:
        during = [good_run(door, images) for _ in range(2)]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=BAD_SECONDS + TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    assert wrong == []
    assert min(sent) >= len(pairs), f"each bad client sent the whole matrix at least once: {sent}"
    for run in during:
        for got, want in zip(run, before, strict=True):
            assert len(got) == len(want)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b)
    assert teacher.process.poll() is None
    assert door.http.get("/healthz").status_code == 200


@pytest.mark.parametrize("transport", ["grpc", "http", "http-json"])
def test_client_does_not_retry_a_message_too_large(teacher: Teacher, transport: Transport) -> None:
    """Over gRPC the size check is grpc's own (RESOURCE_EXHAUSTED, no error metadata); the client
    must still see a message too large (field `body`), which no retry can fix, and fail at once
    instead of retrying for the policy's 60 s. The loader likewise."""
    address = teacher.grpc_address if transport == "grpc" else teacher.http_url
    with TeacherClient(address, transport=transport) as client:  # default retries: 60 s
        started = time.monotonic()
        with pytest.raises(ResourceExhausted) as info:
            client.soft_targets(OVERSIZED)
        assert info.value.field == "body", info.value
        assert not is_retryable(info.value)
        assert time.monotonic() - started < 10.0
        batches = [GOOD, OVERSIZED, GOOD]
        started = time.monotonic()
        with pytest.raises(ResourceExhausted) as info:
            list(SoftTargetLoader(batches, client, depth=1))
        assert info.value.field == "body", info.value
        assert time.monotonic() - started < 10.0
