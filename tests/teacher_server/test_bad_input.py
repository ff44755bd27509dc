"""A matrix of bad requests, each sent over gRPC unary and (where JSON can express it) HTTP: every
one is refused with the right status, the error names the field, and the server keeps serving the
same results afterwards."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from protocol import codec
from protocol.errors import GRPC_CODE_KEY, GRPC_FIELD_KEY
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc

MODEL = "mnist-multitask"
TIMEOUT = 30.0
SMALL_MAX_BATCH = 8

STATUSES = {
    # error code: (gRPC status, HTTP status)
    "INVALID_ARGUMENT": (grpc.StatusCode.INVALID_ARGUMENT, 400),
    "NOT_FOUND": (grpc.StatusCode.NOT_FOUND, 404),
    "FAILED_PRECONDITION": (grpc.StatusCode.FAILED_PRECONDITION, 412),
}

GOOD = np.full((2, 1, 28, 28), 0.5, dtype=np.float32)


def grpc_request(
    inputs: pb.Tensor | np.ndarray | None = None, **fields: Any
) -> pb.SoftTargetsRequest:
    if inputs is None:
        inputs = GOOD
    if isinstance(inputs, np.ndarray):
        inputs = codec.encode(inputs)
    return pb.SoftTargetsRequest(model=fields.pop("model", MODEL), inputs=inputs, **fields)


def json_body(inputs: np.ndarray | list[Any] | None = None, **fields: Any) -> str:
    """A JSON body as text; Python's json writes NaN / Infinity literals, which the server's
    parser accepts (strict JSON cannot express them)."""
    if inputs is None:
        inputs = GOOD
    if isinstance(inputs, np.ndarray):
        inputs = inputs.tolist()
    return json.dumps({"inputs": inputs, **fields})


def _with_json_value(value: float) -> list[Any]:
    """GOOD as nested lists with one value no float32 array can hold."""
    inputs: list[Any] = GOOD.tolist()
    inputs[1][0][3][4] = value
    return inputs


def with_value(value: float) -> np.ndarray:
    inputs = GOOD.copy()
    inputs[1, 0, 3, 4] = value
    return inputs


@dataclass(frozen=True)
class Case:
    name: str
    code: str  # the error code: INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION
    field: str  # the field the error names, on gRPC (and on HTTP unless http_field says)
    grpc: Callable[[], pb.SoftTargetsRequest] | None = None
    http: Callable[[], str] | None = None  # the raw JSON body
    http_model: str = MODEL
    http_field: str | None = None
    fragment: str = ""  # also in the message
    small_server: bool = False  # sent to the server started with --max-batch-size 8


CASES = [
    Case(
        "wrong shape",
        "INVALID_ARGUMENT",
        "inputs.shape",
        grpc=lambda: grpc_request(GOOD.reshape(2, 784)),
        http=lambda: json_body(GOOD.reshape(2, 784)),
        fragment="expected [N, 1, 28, 28], got [2, 784]",
    ),
    Case(
        "wrong rank",
        "INVALID_ARGUMENT",
        "inputs.shape",
        grpc=lambda: grpc_request(GOOD[:, 0]),
        http=lambda: json_body(GOOD[:, 0]),
        fragment="got [2, 28, 28]",
    ),
    Case(
        "wrong dtype int64",
        "INVALID_ARGUMENT",
        "inputs.dtype",
        grpc=lambda: grpc_request(np.zeros((2, 1, 28, 28), dtype=np.int64)),
        http=lambda: json_body(np.zeros((2, 1, 28, 28), dtype=np.int64), dtype="int64"),
        fragment="int64",
    ),
    Case(
        "wrong dtype float64",
        "INVALID_ARGUMENT",
        "inputs.dtype",
        grpc=lambda: grpc_request(GOOD.astype(np.float64)),
        fragment="float64",
    ),
    Case(
        "unknown wire dtype",
        "INVALID_ARGUMENT",
        "inputs.dtype",
        grpc=lambda: grpc_request(pb.Tensor(dtype=42, shape=[1, 1, 28, 28], data=bytes(784))),
        fragment="unknown(42)",
    ),
    Case(
        "unknown JSON dtype name",
        "INVALID_ARGUMENT",
        "dtype",
        http=lambda: json_body(dtype="float8"),
        fragment="float8",
    ),
    Case(
        "bfloat16 JSON inputs",
        "INVALID_ARGUMENT",
        "dtype",
        http=lambda: json_body(dtype="bfloat16"),
        fragment="bfloat16",
    ),
    Case(
        "NaN values",
        "INVALID_ARGUMENT",
        "inputs",
        grpc=lambda: grpc_request(with_value(math.nan)),
        http=lambda: json_body(with_value(math.nan)),
        fragment="[1, 0, 3, 4]",
    ),
    Case(
        "inf values",
        "INVALID_ARGUMENT",
        "inputs",
        grpc=lambda: grpc_request(with_value(-math.inf)),
        http=lambda: json_body(with_value(math.inf)),
        fragment="not finite",
    ),
    Case(
        "a JSON number beyond float32",
        "INVALID_ARGUMENT",
        "inputs",
        http=lambda: json_body(_with_json_value(1e300)),
        fragment="value 1e+300 at index [1, 0, 3, 4] is outside the float32 range",
    ),
    Case(
        "unknown model",
        "NOT_FOUND",
        "model",
        grpc=lambda: grpc_request(model="no-such-model"),
        http=lambda: json_body(),
        http_model="no-such-model",
        fragment="no-such-model",
    ),
    Case(
        "unknown task",
        "INVALID_ARGUMENT",
        "tasks",
        grpc=lambda: grpc_request(tasks=["digit", "colour"]),
        http=lambda: json_body(tasks=["digit", "colour"]),
        fragment="colour",
    ),
    Case(
        "task twice",
        "INVALID_ARGUMENT",
        "tasks",
        grpc=lambda: grpc_request(tasks=["digit", "digit"]),
        http=lambda: json_body(tasks=["digit", "digit"]),
    ),
    *(
        Case(
            f"temperature {label}",
            "INVALID_ARGUMENT",
            "temperature",
            grpc=lambda t=value: grpc_request(temperature=t),
            http=lambda t=value: json_body(temperature=t),
            fragment=fragment,
        )
        for label, value, fragment in [
            ("0", 0.0, "got 0.0"),
            ("negative", -1.5, "got -1.5"),
            ("NaN", math.nan, "got nan"),
            ("inf", math.inf, "got inf"),
        ]
    ),
    Case(
        "empty batch",
        "INVALID_ARGUMENT",
        "inputs.shape",
        grpc=lambda: grpc_request(pb.Tensor(dtype=pb.FLOAT32, shape=[0, 1, 28, 28])),
        http=lambda: json_body([], shape=[0, 1, 28, 28]),
        fragment="[0, 1, 28, 28]",
    ),
    Case(
        "empty JSON batch",
        "INVALID_ARGUMENT",
        "inputs.shape",
        http=lambda: json_body([]),
    ),
    Case(
        "batch above the maximum",
        "INVALID_ARGUMENT",
        "inputs.shape",
        grpc=lambda: grpc_request(np.zeros((SMALL_MAX_BATCH + 1, 1, 28, 28), np.float32)),
        http=lambda: json_body(np.zeros((SMALL_MAX_BATCH + 1, 1, 28, 28), np.float32)),
        fragment=f"batch of {SMALL_MAX_BATCH + 1} is above the maximum of {SMALL_MAX_BATCH}",
        small_server=True,
    ),
    Case("malformed JSON", "INVALID_ARGUMENT", "body", http=lambda: '{"inputs": [[[0.5]]'),
    Case("JSON not an object", "INVALID_ARGUMENT", "body", http=lambda: "[1, 2, 3]"),
    Case(
        "missing inputs",
        "INVALID_ARGUMENT",
        "inputs",
        grpc=lambda: pb.SoftTargetsRequest(model=MODEL),
        http=lambda: "{}",
    ),
    Case(
        "ragged JSON inputs",
        "INVALID_ARGUMENT",
        "inputs",
        http=lambda: json_body([[[[0.5] * 28] * 28], [[[0.5] * 27] * 28]]),
    ),
    Case(
        "unknown output kind",
        "INVALID_ARGUMENT",
        "output",
        grpc=lambda: grpc_request(output=99),
        http=lambda: json_body(output="softmax"),
        http_field="output",
    ),
    Case(
        "unknown output dtype",
        "INVALID_ARGUMENT",
        "output_dtype",
        grpc=lambda: grpc_request(output_dtype=pb.UINT8),
        http=lambda: json_body(output_dtype="int8"),
    ),
    Case(
        "unknown JSON field",
        "INVALID_ARGUMENT",
        "temprature",
        http=lambda: json_body(temprature=2.0),
    ),
    Case(
        "byte length mismatch",
        "INVALID_ARGUMENT",
        "inputs.data",
        grpc=lambda: grpc_request(
            pb.Tensor(dtype=pb.FLOAT32, shape=[2, 1, 28, 28], data=GOOD.tobytes()[:-4])
        ),
        # JSON's counterpart: a flat list whose length does not fit `shape`.
        http=lambda: json_body(GOOD.ravel()[:-1], shape=[2, 1, 28, 28]),
        http_field="shape",
        fragment="needs",
    ),
    Case(
        "huge declared shape",
        "INVALID_ARGUMENT",
        "inputs.shape",
        grpc=lambda: grpc_request(pb.Tensor(dtype=pb.FLOAT32, shape=[10**6, 10**6], data=bytes(4))),
        http=lambda: json_body([0.5], shape=[10**6, 10**6]),
        fragment=str(10**12),
    ),
    Case(
        "top_k larger than classes",
        "INVALID_ARGUMENT",
        "top_k",
        grpc=lambda: grpc_request(tasks=["digit"], top_k=11),
        http=lambda: json_body(tasks=["digit"], top_k=11),
        fragment="got 11",
    ),
    Case(
        "top_k larger than the smallest task",
        "INVALID_ARGUMENT",
        "top_k",
        grpc=lambda: grpc_request(top_k=3),
        http=lambda: json_body(top_k=3),
        fragment="got 3",
    ),
    Case("negative top_k", "INVALID_ARGUMENT", "top_k", http=lambda: json_body(top_k=-1)),
    Case(
        "unknown hint",
        "INVALID_ARGUMENT",
        "hints",
        grpc=lambda: grpc_request(hints=["features", "attention"]),
        http=lambda: json_body(hints=["attention"]),
        fragment="attention",
    ),
    Case(
        "batch_id too long",
        "INVALID_ARGUMENT",
        "batch_id",
        grpc=lambda: grpc_request(batch_id="x" * 129),
        http=lambda: json_body(batch_id="x" * 129),
    ),
    Case(
        "pinned model_version mismatch",
        "FAILED_PRECONDITION",
        "model_version",
        grpc=lambda: grpc_request(model_version="sha256:" + "0" * 64),
        http=lambda: json_body(model_version="sha256:" + "0" * 64),
        fragment="sha256:" + "0" * 64,
    ),
]

MATRIX = [
    pytest.param(case, transport, id=f"{case.name}-{transport}".replace(" ", "_"))
    for case in CASES
    for transport in ("grpc", "http")
    if getattr(case, transport) is not None
]


@pytest.fixture(scope="module")
def small_teacher(
    default_repository: Path,
    teacher_factory: Callable[..., Any],
    connect: Callable[[Any], tuple[pb_grpc.TeacherServiceStub, httpx.Client]],
) -> tuple[pb_grpc.TeacherServiceStub, httpx.Client]:
    """A second server, started with --max-batch-size 8: its stub and HTTP client."""
    return connect(teacher_factory(default_repository, "--max-batch-size", str(SMALL_MAX_BATCH)))


@pytest.fixture(scope="module")
def small_stub(
    small_teacher: tuple[pb_grpc.TeacherServiceStub, httpx.Client],
) -> pb_grpc.TeacherServiceStub:
    return small_teacher[0]


@pytest.fixture(scope="module")
def small_http(small_teacher: tuple[pb_grpc.TeacherServiceStub, httpx.Client]) -> httpx.Client:
    return small_teacher[1]


def good_results(stub: pb_grpc.TeacherServiceStub, http: httpx.Client) -> tuple[bytes, Any]:
    request = grpc_request(
        np.linspace(0, 1, 4 * 784, dtype=np.float32).reshape(4, 1, 28, 28),
        temperature=2.0,
        batch_id="good",
        hints=["features"],
    )
    response = stub.GetSoftTargets(request, timeout=TIMEOUT)
    body = http.post(
        f"/v1/models/{MODEL}/soft-targets",
        content=json_body(GOOD, temperature=2.0, output="log_probs"),
        headers={"content-type": "application/json"},
    )
    assert body.status_code == 200, body.text
    return response.SerializeToString(deterministic=True), body.json()


@pytest.fixture(scope="module", autouse=True)
def before_matrix(stub: pb_grpc.TeacherServiceStub, http: httpx.Client) -> tuple[bytes, Any]:
    """A good request's results, taken before any bad request reaches the server."""
    return good_results(stub, http)


def check_grpc_error(error: grpc.RpcError, case: Case) -> None:
    status, _ = STATUSES[case.code]
    assert error.code() == status, error.details()
    metadata = dict(error.trailing_metadata() or ())
    assert metadata.get(GRPC_CODE_KEY) == case.code
    assert metadata.get(GRPC_FIELD_KEY) == case.field
    details = error.details()
    assert case.field in details
    assert case.fragment in details


@pytest.mark.parametrize(("case", "transport"), MATRIX)
def test_bad_request(
    case: Case,
    transport: str,
    request: pytest.FixtureRequest,
) -> None:
    if transport == "grpc":
        stub = request.getfixturevalue("small_stub" if case.small_server else "stub")
        assert case.grpc is not None
        with pytest.raises(grpc.RpcError) as info:
            stub.GetSoftTargets(case.grpc(), timeout=TIMEOUT)
        check_grpc_error(info.value, case)
    else:
        http = request.getfixturevalue("small_http" if case.small_server else "http")
        assert case.http is not None
        response = http.post(
            f"/v1/models/{case.http_model}/soft-targets",
            content=case.http(),
            headers={"content-type": "application/json"},
        )
        _, http_status = STATUSES[case.code]
        assert response.status_code == http_status, response.text
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        field = case.http_field or case.field
        assert error["code"] == case.code
        assert error["field"] == field
        assert field in error["message"]
        assert case.fragment in error["message"]


def test_small_server_accepts_its_maximum(
    small_stub: pb_grpc.TeacherServiceStub, small_http: httpx.Client
) -> None:
    info = small_stub.GetModelInfo(pb.GetModelInfoRequest(model=MODEL), timeout=TIMEOUT)
    assert info.max_batch_size == SMALL_MAX_BATCH
    full = np.zeros((SMALL_MAX_BATCH, 1, 28, 28), np.float32)
    response = small_stub.GetSoftTargets(grpc_request(full), timeout=TIMEOUT)
    assert codec.decode(response.outputs[0].values).shape == (SMALL_MAX_BATCH, 10)
    body = small_http.post(f"/v1/models/{MODEL}/soft-targets", json={"inputs": full.tolist()})
    assert body.status_code == 200, body.text


def test_unknown_model_info(stub: pb_grpc.TeacherServiceStub, http: httpx.Client) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModelInfo(pb.GetModelInfoRequest(model="no-such-model"), timeout=TIMEOUT)
    check_grpc_error(info.value, Case("model info", "NOT_FOUND", "model", fragment="no-such-model"))
    response = http.get("/v1/models/no-such-model")
    assert response.status_code == 404
    assert response.json()["error"]["field"] == "model"


def test_bad_batch_in_a_stream(stub: pb_grpc.TeacherServiceStub) -> None:
    bad = {
        "b3": (
            grpc_request(GOOD.reshape(2, 784), batch_id="b3"),
            "INVALID_ARGUMENT",
            "inputs.shape",
        ),
        "b5": (grpc_request(batch_id="b5", tasks=["colour"]), "INVALID_ARGUMENT", "tasks"),
        "b6": (grpc_request(batch_id="b6", model="nope"), "NOT_FOUND", "model"),
        "b8": (grpc_request(with_value(math.nan), batch_id="b8"), "INVALID_ARGUMENT", "inputs"),
    }
    requests = [
        bad[f"b{i}"][0] if f"b{i}" in bad else grpc_request(batch_id=f"b{i}") for i in range(10)
    ]
    expected = stub.GetSoftTargets(grpc_request(), timeout=TIMEOUT).outputs
    responses = list(stub.StreamSoftTargets(iter(requests), timeout=TIMEOUT))
    assert sorted(r.batch_id for r in responses) == sorted(r.batch_id for r in requests)
    for response in responses:
        if response.batch_id in bad:
            _, code, field = bad[response.batch_id]
            assert response.WhichOneof("result") == "error"
            assert response.error.code == code
            assert response.error.field == field
            assert field in response.error.message
        else:
            assert response.WhichOneof("result") == "soft_targets", response.error
            assert response.soft_targets.batch_id == response.batch_id
            for got, want in zip(response.soft_targets.outputs, expected, strict=True):
                np.testing.assert_allclose(
                    codec.decode(got.values), codec.decode(want.values), atol=1e-5
                )


def test_server_unharmed_after_the_matrix(
    stub: pb_grpc.TeacherServiceStub, http: httpx.Client, before_matrix: tuple[bytes, Any]
) -> None:
    """Runs last in this module: the same good request gives exactly the same results."""
    after = good_results(stub, http)
    assert after[0] == before_matrix[0]
    assert after[1] == before_matrix[1]
