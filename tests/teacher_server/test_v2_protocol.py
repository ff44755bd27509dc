"""The Open Inference Protocol (KServe v2 / Triton) beside distill.v1.

Standard clients get the same soft targets as our own client (`student_client.TeacherClient`):
`tritonclient.http` in this process (JSON and the binary tensor data extension), and
`tritonclient.grpc` in a subprocess (`v2_grpc_client.py`), because its `inference.*` protobuf
symbols clash with those of `protocol.kserve_v2`, which this module imports. Then metadata, health,
errors, the .proto's field numbers against tritonclient's copy, the docs' examples, and unit tests
of `teacher_server.v2.convert*`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from protocol.errors import InvalidArgument, NotFound
from protocol.kserve_v2 import grpc_predict_v2_pb2 as v2pb
from protocol.kserve_v2 import grpc_predict_v2_pb2_grpc as v2pb_grpc
from student_client import TeacherClient
from teacher_server.serving.schema import (
    ModelInfo,
    SoftTargets,
    TaskInfo,
    TaskResult,
    VersionSummary,
)
from teacher_server.v2 import convert, convert_grpc, convert_http, metadata

MODEL = "mnist-multitask"
TASKS = {"digit": 10, "parity": 2, "loops": 3}
ATOL = 1e-6
TIMEOUT = 30.0
MAX_ELEMENTS = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
GRPC_CLIENT = Path(__file__).with_name("v2_grpc_client.py")


# --- helpers and fixtures ---------------------------------------------------------------------


def _env() -> dict[str, str]:
    """The environment for client subprocesses: no proxy (everything is 127.0.0.1)."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def triton_grpc(teacher: Any, *calls: dict[str, Any]) -> list[dict[str, Any]]:
    """Run `calls` with tritonclient.grpc in a subprocess (see v2_grpc_client.py)."""
    done = subprocess.run(
        [sys.executable, str(GRPC_CLIENT)],
        input=json.dumps({"address": teacher.grpc_address, "calls": list(calls)}),
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


@pytest.fixture(scope="module")
def images(mnist_test_images: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(mnist_test_images[0][:8])


@pytest.fixture(scope="module")
def own(teacher: Any) -> Iterator[TeacherClient]:
    with TeacherClient(teacher.grpc_address) as client:
        yield client


@pytest.fixture(scope="module")
def triton_http(teacher: Any) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(teacher.http_url.removeprefix("http://"))
    yield client
    client.close()


def expected(own: TeacherClient, images: np.ndarray, temperature: float, output: str) -> Any:
    return own.soft_targets(images, MODEL, temperature=temperature, output=output)


def assert_same(values: dict[str, np.ndarray], reference: Any, tasks: Any = TASKS) -> None:
    assert set(values) == set(tasks)
    for task in tasks:
        got = np.asarray(values[task])
        assert got.dtype == np.float32 or isinstance(values[task], list)
        np.testing.assert_allclose(got, reference.outputs[task].values, rtol=0, atol=ATOL)


def fake_info() -> ModelInfo:
    return ModelInfo(
        name="m",
        model_version="sha256:abc",
        tasks=(
            TaskInfo("digit", tuple("0123456789"), None),
            TaskInfo("parity", ("even", "odd"), None),
        ),
        input_shape=(1, 4, 4),
        input_dtype="float32",
        accepted_input_dtypes=("float32", "float16", "uint8"),
        uint8_scale=1 / 255,
        hints={"features": (8,)},
        max_batch_size=64,
        description="",
        parameter_count=0,
        ready=True,
    )


def fake_result(batch_id: str = "b1") -> SoftTargets:
    rng = np.random.default_rng(1)
    return SoftTargets(
        model="m",
        model_version="sha256:abc",
        batch_id=batch_id,
        temperature=4.0,
        output_dtype="float32",
        outputs=(
            TaskResult("digit", "log_probs", rng.random((3, 10), dtype=np.float32)),
            TaskResult("parity", "log_probs", rng.random((3, 2), dtype=np.float32)),
        ),
        hints={"features": rng.random((3, 8), dtype=np.float32)},
    )


def http_body(header: dict[str, Any]) -> bytes:
    return json.dumps(header).encode()


def an_input(**fields: Any) -> dict[str, Any]:
    entry = {"name": "inputs", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": [0.5] * 16}
    entry.update(fields)
    return entry


# --- standard clients get our soft targets ----------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("output", ["probs", "log_probs"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_tritonclient_http_matches_own_client(
    triton_http: httpclient.InferenceServerClient,
    own: TeacherClient,
    images: np.ndarray,
    temperature: float,
    output: str,
    binary: bool,
) -> None:
    tensor = httpclient.InferInput("inputs", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(task, binary_data=binary) for task in TASKS]
    result = triton_http.infer(
        MODEL,
        [tensor],
        outputs=outputs,
        request_id="batch-7",
        parameters={"temperature": temperature, "output": output},
    )
    reference = expected(own, images, temperature, output)
    assert_same({task: result.as_numpy(task) for task in TASKS}, reference)
    response = result.get_response()
    assert response["id"] == "batch-7"
    assert response["model_version"] == reference.model_version
    assert response["parameters"] == {"temperature": temperature, "output": output}
    for entry in response["outputs"]:
        assert entry["datatype"] == "FP32"
        assert entry["shape"] == [len(images), TASKS[entry["name"]]]
        assert ("binary_data_size" in entry.get("parameters", {})) == binary


def test_tritonclient_http_all_outputs_by_default(
    triton_http: httpclient.InferenceServerClient, own: TeacherClient, images: np.ndarray
) -> None:
    """No outputs requested: every task, binary (tritonclient sets binary_data_output)."""
    tensor = httpclient.InferInput("inputs", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = triton_http.infer(MODEL, [tensor])
    assert_same({task: result.as_numpy(task) for task in TASKS}, expected(own, images, 1, "probs"))


def test_tritonclient_grpc_matches_own_client(
    teacher: Any, own: TeacherClient, images: np.ndarray
) -> None:
    cases = [(t, kind) for t in (1.0, 4.0) for kind in ("probs", "log_probs")]
    calls = [
        {
            "op": "infer",
            "model": MODEL,
            "inputs": images.tolist(),
            "outputs": list(TASKS),
            "parameters": {"temperature": t, "output": kind},
            "id": f"case-{n}",
        }
        for n, (t, kind) in enumerate(cases)
    ]
    calls.append({"op": "infer", "model": MODEL, "inputs": images.tolist()})  # all tasks
    results = triton_grpc(teacher, *calls)
    for n, ((t, kind), result) in enumerate(zip(cases, results, strict=False)):
        assert "ok" in result, result
        reference = expected(own, images, t, kind)
        got = {task: np.asarray(v, dtype=np.float32) for task, v in result["ok"]["outputs"].items()}
        assert_same(got, reference)
        assert result["ok"]["id"] == f"case-{n}"
        assert result["ok"]["model_version"] == reference.model_version
        assert result["ok"]["parameters"] == {
            "temperature": {"doubleParam": t},
            "output": {"stringParam": kind},
        }
    everything = results[-1]["ok"]["outputs"]
    assert_same(
        {task: np.asarray(v, dtype=np.float32) for task, v in everything.items()},
        expected(own, images, 1.0, "probs"),
    )


def test_grpc_typed_contents(teacher: Any, own: TeacherClient, images: np.ndarray) -> None:
    """Inputs in `fp32_contents` (not raw), temperature as int64_param, through our own stub."""
    request = v2pb.ModelInferRequest(model_name=MODEL, id="typed")
    request.inputs.add(
        name="inputs",
        datatype="FP32",
        shape=list(images.shape),
        contents=v2pb.InferTensorContents(fp32_contents=images.ravel().tolist()),
    )
    request.parameters["temperature"].int64_param = 4
    request.outputs.add(name="digit")
    with grpc.insecure_channel(teacher.grpc_address, [("grpc.enable_http_proxy", 0)]) as channel:
        response = v2pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT)
    assert [o.name for o in response.outputs] == ["digit"]
    digit = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(response.outputs[0].shape)
    reference = expected(own, images, 4.0, "probs")
    np.testing.assert_allclose(digit, reference.outputs["digit"].values, rtol=0, atol=ATOL)
    assert response.parameters["temperature"].double_param == 4.0


def test_http_json_nested_data(teacher: Any, own: TeacherClient, images: np.ndarray) -> None:
    """A plain JSON client (curl-style): nested `data`, an integer temperature, hints by name."""
    body = {
        "id": "nested",
        "parameters": {"temperature": 4, "output": "logits"},
        "inputs": [
            {
                "name": "inputs",
                "datatype": "FP32",
                "shape": list(images.shape),
                "data": images.tolist(),
            }
        ],
        "outputs": [{"name": "parity"}, {"name": "hint:features"}],
    }
    with httpx.Client(base_url=teacher.http_url, timeout=TIMEOUT, trust_env=False) as http:
        response = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert answer["id"] == "nested"
    assert answer["parameters"] == {"temperature": 4.0, "output": "logits"}
    assert [o["name"] for o in answer["outputs"]] == ["parity", "hint:features"]
    reference = own.soft_targets(
        images, MODEL, temperature=4.0, output="logits", hints=["features"]
    )
    parity = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(
        answer["outputs"][0]["shape"]
    )
    np.testing.assert_allclose(parity, reference.outputs["parity"].values, rtol=0, atol=ATOL)
    features = answer["outputs"][1]
    assert features["shape"] == [len(images), *reference.hints["features"].shape[1:]]
    np.testing.assert_allclose(
        np.asarray(features["data"], np.float32).reshape(features["shape"]),
        reference.hints["features"],
        rtol=0,
        atol=ATOL,
    )


# --- metadata and health ----------------------------------------------------------------------


def test_http_health_and_metadata(
    teacher: Any, triton_http: httpclient.InferenceServerClient, own: TeacherClient
) -> None:
    version = own.model_info(MODEL).model_version
    assert triton_http.is_server_live()
    assert triton_http.is_server_ready()
    assert triton_http.is_model_ready(MODEL)
    assert triton_http.is_model_ready(MODEL, version)
    assert not triton_http.is_model_ready(MODEL, "1")
    assert not triton_http.is_model_ready("no-such-model")
    server = triton_http.get_server_metadata()
    assert server["name"] == "distill-teacher"
    assert server["extensions"] == ["binary_tensor_data"]
    for meta in (
        triton_http.get_model_metadata(MODEL),
        triton_http.get_model_metadata(MODEL, version),
    ):
        assert meta["name"] == MODEL
        assert meta["versions"] == [version]
        assert meta["inputs"] == [{"name": "inputs", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
        assert meta["outputs"] == [
            {"name": task, "datatype": "FP32", "shape": [-1, classes]}
            for task, classes in TASKS.items()
        ]
    with httpx.Client(base_url=teacher.http_url, timeout=TIMEOUT, trust_env=False) as http:
        assert http.get("/v2/health/live").json() == {"live": True}
        assert http.get("/v2/health/ready").json() == {"ready": True}


def test_grpc_health_and_metadata(teacher: Any, own: TeacherClient) -> None:
    version = own.model_info(MODEL).model_version
    results = triton_grpc(
        teacher,
        {"op": "live"},
        {"op": "ready"},
        {"op": "model_ready", "model": MODEL},
        {"op": "model_ready", "model": MODEL, "version": version},
        {"op": "model_ready", "model": MODEL, "version": "1"},
        {"op": "model_ready", "model": "no-such-model"},
        {"op": "server_metadata"},
        {"op": "model_metadata", "model": MODEL},
    )
    assert [r["ok"] for r in results[:6]] == [True, True, True, True, False, False]
    server = results[6]["ok"]
    assert server["name"] == "distill-teacher"
    assert server["extensions"] == ["binary_tensor_data"]
    meta = results[7]["ok"]
    assert meta["name"] == MODEL
    assert meta["versions"] == [version]
    assert [(o["name"], o["datatype"], [int(d) for d in o["shape"]]) for o in meta["outputs"]] == [
        (task, "FP32", [-1, classes]) for task, classes in TASKS.items()
    ]
    assert [int(d) for d in meta["inputs"][0]["shape"]] == [-1, 1, 28, 28]


@pytest.fixture(scope="module")
def versioned(
    default_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
    teacher_factory: Callable[..., Any],
) -> Any:
    """A server whose model has two versions, in subfolders `1` and `2` (2 is the default)."""
    root = tmp_path_factory.mktemp("versioned_repository")
    source = default_repository / MODEL
    for label in ("1", "2"):
        target = root / MODEL / label
        target.mkdir(parents=True)
        shutil.copy(source / "model.safetensors", target)
        config = json.loads((source / "config.json").read_text())
        config["description"] = f"version {label}"  # another config: another model_version
        (target / "config.json").write_text(json.dumps(config))
    return teacher_factory(root)


def test_versions_by_label_or_model_version(versioned: Any, images: np.ndarray) -> None:
    client = httpclient.InferenceServerClient(versioned.http_url.removeprefix("http://"))
    try:
        one, two = client.get_model_metadata(MODEL)["versions"]
        assert one.startswith("sha256:") and two.startswith("sha256:") and one != two
        assert client.get_model_metadata(MODEL, "1")["versions"] == [one, two]
        tensor = httpclient.InferInput("inputs", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        for version, served in [("", two), ("1", one), ("2", two), (one, one), (two, two)]:
            assert client.is_model_ready(MODEL, version)
            result = client.infer(MODEL, [tensor], model_version=version)
            assert result.get_response()["model_version"] == served, version
        assert not client.is_model_ready(MODEL, "3")
        with pytest.raises(InferenceServerException) as error:
            client.infer(MODEL, [tensor], model_version="3")
        assert error.value.status() == "404"
        assert "it serves ['1', '2']" in error.value.message()
    finally:
        client.close()
    results = triton_grpc(
        versioned,
        {"op": "model_ready", "model": MODEL, "version": "1"},
        {"op": "model_ready", "model": MODEL, "version": "3"},
        {"op": "infer", "model": MODEL, "version": "1", "inputs": images[:1].tolist()},
        {"op": "model_metadata", "model": MODEL, "version": "3"},
    )
    assert results[0]["ok"] is True
    assert results[1]["ok"] is False
    assert results[2]["ok"]["model_version"] == one
    assert results[3]["error"]["status"] == "StatusCode.NOT_FOUND"


# --- errors -----------------------------------------------------------------------------------


def test_http_errors(
    teacher: Any, triton_http: httpclient.InferenceServerClient, images: np.ndarray
) -> None:
    flat = images.reshape(len(images), -1)
    tensor = httpclient.InferInput("inputs", list(flat.shape), "FP32")
    tensor.set_data_from_numpy(flat)
    with pytest.raises(InferenceServerException) as bad_shape:
        triton_http.infer(MODEL, [tensor])
    assert bad_shape.value.status() == "400"
    assert "inputs.shape" in bad_shape.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        triton_http.infer("no-such-model", [tensor])
    assert unknown.value.status() == "404"

    with httpx.Client(base_url=teacher.http_url, timeout=TIMEOUT, trust_env=False) as http:
        body = {
            "inputs": [
                {"name": "inputs", "datatype": "FP32", "shape": [2, 784], "data": [0.0] * 1568}
            ]
        }
        response = http.post(f"/v2/models/{MODEL}/infer", json=body)
        assert response.status_code == 400
        assert response.json() == {"error": "inputs.shape: expected [N, 1, 28, 28], got [2, 784]"}
        assert http.get("/v2/models/no-such-model").status_code == 404
        assert "error" in http.get("/v2/models/no-such-model").json()
        assert http.get(f"/v2/models/{MODEL}/versions/1").status_code == 404
        misspelt = {**body, "parameters": {"temprature": 4}}
        misspelt["inputs"] = [{**body["inputs"][0], "shape": [2, 1, 28, 28]}]
        response = http.post(f"/v2/models/{MODEL}/infer", json=misspelt)
        assert response.status_code == 400
        assert response.json()["error"].startswith("parameters.temprature: unknown parameter")
        response = http.post(f"/v2/models/{MODEL}/infer", content=b"{not json")
        assert response.status_code == 400
        assert response.json()["error"].startswith("body: not valid JSON")


def test_grpc_errors(teacher: Any, images: np.ndarray) -> None:
    flat = images.reshape(len(images), -1).tolist()
    results = triton_grpc(
        teacher,
        {"op": "infer", "model": MODEL, "inputs": flat},
        {"op": "infer", "model": "no-such-model", "inputs": images.tolist()},
        {
            "op": "infer",
            "model": MODEL,
            "inputs": images.tolist(),
            "parameters": {"temperature": -1.0},
        },
        {"op": "infer", "model": MODEL, "inputs": images.tolist(), "input_name": "x"},
        {"op": "model_metadata", "model": "no-such-model"},
        {"op": "call", "method": "ModelConfig"},
    )
    errors = [result.get("error", {}) for result in results]
    assert errors[0]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "inputs.shape: expected [N, 1, 28, 28], got [8, 784]" in errors[0]["message"]
    assert errors[1]["status"] == "StatusCode.NOT_FOUND"
    assert errors[2]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "temperature" in errors[2]["message"]
    assert errors[3]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "inputs.name" in errors[3]["message"]
    assert errors[4]["status"] == "StatusCode.NOT_FOUND"
    assert errors[5]["status"] == "StatusCode.UNIMPLEMENTED"


# --- the .proto against tritonclient's, and the docs ------------------------------------------

MESSAGES = [
    "ServerLiveRequest",
    "ServerLiveResponse",
    "ServerReadyRequest",
    "ServerReadyResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ServerMetadataRequest",
    "ServerMetadataResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "ModelInferRequest",
    "ModelInferResponse",
    "InferParameter",
    "InferTensorContents",
]


def _describe(descriptor: Any) -> dict[str, Any]:
    """The same description as v2_grpc_client.describe, of our own descriptors."""
    return {
        "fields": {
            f.name: {
                "number": f.number,
                "type": f.type,
                "repeated": f.is_repeated,
                "message": f.message_type.full_name if f.message_type else "",
                "oneof": f.containing_oneof.name if f.containing_oneof else "",
            }
            for f in descriptor.fields
        },
        "nested": {nested.name: _describe(nested) for nested in descriptor.nested_types},
    }


def test_proto_matches_tritonclient(teacher: Any) -> None:
    """Every message we define has tritonclient's field names, numbers, types and oneofs, and
    every RPC we serve is in its service with the same types."""
    assert sorted(v2pb.DESCRIPTOR.message_types_by_name) == sorted(MESSAGES)
    [result] = triton_grpc(teacher, {"op": "descriptors", "names": MESSAGES})
    theirs = result["ok"]
    for name in MESSAGES:
        ours = _describe(v2pb.DESCRIPTOR.message_types_by_name[name])
        assert ours == theirs[name], name
    service = v2pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in service.methods] == [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    ]
    for method in service.methods:
        assert method.input_type.full_name == f"inference.{method.name}Request"
        assert method.output_type.full_name == f"inference.{method.name}Response"


# --- unit: v2.convert* -------------------------------------------------------------------------


def test_binary_body_round_trip() -> None:
    header = {"outputs": [{"name": "a", "parameters": {"binary_data_size": 3}}]}
    body, length = convert_http.join_binary_body(header, [b"xy", b"z"])
    json_part, binary = convert_http.split_binary_body(body, str(length))
    assert json.loads(json_part) == header
    assert binary == b"xyz"
    assert convert_http.split_binary_body(b"{}", None) == (b"{}", b"")
    for bad in ("-1", "3", "x"):
        with pytest.raises(InvalidArgument) as error:
            convert_http.split_binary_body(b"{}", bad)
        assert error.value.field == "Inference-Header-Content-Length"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ["FP32", "FP16", "UINT8"])
def test_decode_tritonclient_http_request(binary: bool, datatype: str) -> None:
    """A body made by tritonclient's own encoder decodes to the exact array and options."""
    dtype = convert.DATATYPES[datatype]
    array = (np.random.default_rng(0).random((2, 1, 4, 4)) * 200).astype(dtype)
    tensor = httpclient.InferInput("inputs", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [tensor],
        outputs=[
            httpclient.InferRequestedOutput("digit", binary_data=binary),
            httpclient.InferRequestedOutput("hint:features", binary_data=False),
        ],
        request_id="r1",
        parameters={"temperature": 2, "output": "log_probs"},
    )
    assert (json_size is not None) == binary
    decoded = convert_http.decode_http_infer(
        "m", "", body, None if json_size is None else str(json_size), MAX_ELEMENTS
    )
    request = decoded.request
    assert request.inputs.dtype == array.dtype
    np.testing.assert_array_equal(request.inputs, array)
    assert request.tasks == ("digit",)
    assert request.hints == ("features",)
    assert (request.temperature, request.output, request.batch_id) == (2.0, "log_probs", "r1")
    assert decoded.binary("digit") == binary
    assert not decoded.binary("hint:features")
    assert not decoded.binary("parity")  # not requested: binary_data_output, unset here


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encode_http_response_read_by_tritonclient(binary: bool) -> None:
    result = fake_result()
    request = convert.soft_targets_request(
        "m", "", "b1", {"temperature": 4.0, "output": "log_probs"}, np.zeros((3, 1, 4, 4)), []
    )
    decoded = convert.DecodedInfer(request, binary_default=binary)
    body, length = convert_http.encode_http_infer(result, decoded)
    assert (length is not None) == binary
    parsed = httpclient.InferResult.from_response_body(body, header_length=length)
    for task in result.outputs:
        np.testing.assert_array_equal(parsed.as_numpy(task.task), task.values)
    np.testing.assert_array_equal(parsed.as_numpy("hint:features"), result.hints["features"])
    response = parsed.get_response()
    assert response["id"] == "b1"
    assert response["parameters"] == {"temperature": 4.0, "output": "log_probs"}


def test_decode_http_nested_and_flat_json() -> None:
    nested = np.arange(16, dtype=np.uint8).reshape(1, 1, 4, 4)
    for data in (nested.tolist(), nested.ravel().tolist()):
        body = http_body({"inputs": [an_input(datatype="UINT8", data=data)]})
        decoded = convert_http.decode_http_infer("m", "v", body, None, MAX_ELEMENTS)
        np.testing.assert_array_equal(decoded.request.inputs, nested)
        assert decoded.request.inputs.dtype == np.uint8
        assert decoded.request.model_version == "v"
        assert decoded.request.tasks == ()  # every task
        assert (decoded.request.temperature, decoded.request.output) == (1.0, "probs")


@pytest.mark.parametrize(
    ("header", "binary", "field"),
    [
        ({"inputs": []}, b"", "inputs"),
        ({"inputs": [an_input(), an_input()]}, b"", "inputs"),
        ({"inputs": [an_input(name="x")]}, b"", "inputs.name"),
        ({"inputs": [an_input(datatype="BYTES")]}, b"", "inputs.datatype"),
        ({"inputs": [an_input(datatype="BF16")]}, b"", "inputs.datatype"),
        ({"inputs": [an_input(shape="1x16")]}, b"", "inputs.shape"),
        ({"inputs": [an_input(shape=[1, 0, 4, 4])]}, b"", "inputs.shape"),
        ({"inputs": [an_input(shape=[1 << 20, 1 << 20])]}, b"", "inputs.shape"),
        ({"inputs": [an_input(data=[0.5] * 15)]}, b"", "inputs.data"),
        ({"inputs": [an_input(data=[[0.5] * 8, [0.5] * 7])]}, b"", "inputs.data"),
        ({"inputs": [an_input(data=["a"] * 16)]}, b"", "inputs.data"),
        ({"inputs": [an_input(datatype="UINT8", data=[300] * 16)]}, b"", "inputs.data"),
        ({"inputs": [an_input(datatype="UINT8", data=[0.7] * 16)]}, b"", "inputs.data"),
        ({"inputs": [an_input(datatype="INT64", data=[1.5] * 16)]}, b"", "inputs.data"),
        ({"inputs": [{"name": "inputs", "datatype": "FP32", "shape": [1]}]}, b"", "inputs.data"),
        (
            {"inputs": [an_input(data=None, parameters={"binary_data_size": 60})]},
            b"\0" * 60,
            "inputs.data",
        ),
        (
            {"inputs": [an_input(data=None, parameters={"binary_data_size": 64})]},
            b"\0" * 60,
            "inputs.parameters.binary_data_size",
        ),
        ({"inputs": [an_input()]}, b"\0" * 4, "body"),
        (
            {"inputs": [an_input(parameters={"shared_memory_region": "r"})]},
            b"",
            "inputs.parameters",
        ),
        ({"inputs": [an_input()], "parameters": {"temprature": 4}}, b"", "parameters.temprature"),
        (
            {"inputs": [an_input()], "parameters": {"temperature": "4"}},
            b"",
            "parameters.temperature",
        ),
        (
            {"inputs": [an_input()], "parameters": {"temperature": True}},
            b"",
            "parameters.temperature",
        ),
        ({"inputs": [an_input()], "parameters": {"output": 1}}, b"", "parameters.output"),
        ({"inputs": [an_input()], "parameters": {"timeout": -5}}, b"", "parameters.timeout"),
        ({"inputs": [an_input()], "parameters": []}, b"", "parameters"),
        ({"inputs": [an_input()], "outputs": [{"id": 1}]}, b"", "outputs.name"),
        (
            {
                "inputs": [an_input()],
                "outputs": [{"name": "d", "parameters": {"classification": 3}}],
            },
            b"",
            "outputs.parameters",
        ),
        ({"inputs": [an_input()], "id": 5}, b"", "id"),
    ],
)
def test_decode_http_errors(header: dict[str, Any], binary: bytes, field: str) -> None:
    text = http_body(header)
    length = str(len(text)) if binary else None
    with pytest.raises(InvalidArgument) as error:
        convert_http.decode_http_infer("m", "", text + binary, length, 1 << 20)
    assert error.value.field == field, error.value.message
    assert error.value.message.startswith(field), error.value.message


def test_decode_http_not_json() -> None:
    for body in (b"{not json", b"[1, 2]", b"\xff"):
        with pytest.raises(InvalidArgument) as error:
            convert_http.decode_http_infer("m", "", body, None, MAX_ELEMENTS)
        assert error.value.field == "body"


def test_parameters() -> None:
    inputs = np.zeros((1, 1, 4, 4), np.float32)
    request = convert.soft_targets_request(
        "m",
        "",
        "",
        {"temperature": 3, "priority": 1, "binary_data_output": True, "triton_x": 1},
        inputs,
        ["digit", "hint:features", "parity"],
    )
    assert request.temperature == 3.0
    assert request.tasks == ("digit", "parity")
    assert request.hints == ("features",)
    body = http_body({"inputs": [an_input()], "parameters": {"timeout": 2_500_000}})
    assert convert_http.decode_http_infer("m", "", body, None, MAX_ELEMENTS).timeout == 2.5
    body = http_body({"inputs": [an_input()], "parameters": {"timeout": 0}})
    assert convert_http.decode_http_infer("m", "", body, None, MAX_ELEMENTS).timeout is None


def grpc_request(**tensor_fields: Any) -> v2pb.ModelInferRequest:
    request = v2pb.ModelInferRequest(model_name="m", model_version="", id="g1")
    tensor = {"name": "inputs", "datatype": "FP32", "shape": [1, 1, 4, 4], **tensor_fields}
    request.inputs.add(**tensor)
    return request


def test_decode_grpc_raw_and_typed() -> None:
    array = np.random.default_rng(0).random((1, 1, 4, 4), dtype=np.float32)
    raw = grpc_request()
    raw.raw_input_contents.append(array.tobytes())
    raw.parameters["temperature"].double_param = 2.0
    raw.parameters["output"].string_param = "logits"
    raw.parameters["timeout"].int64_param = 1_000_000
    raw.outputs.add(name="parity")
    decoded = convert_grpc.decode_grpc_infer(raw, "", MAX_ELEMENTS)
    np.testing.assert_array_equal(decoded.request.inputs, array)
    assert decoded.request.temperature == 2.0
    assert decoded.request.output == "logits"
    assert decoded.request.tasks == ("parity",)
    assert decoded.request.batch_id == "g1"
    assert decoded.request.model_version == ""
    assert decoded.timeout == 1.0

    typed = grpc_request(contents=v2pb.InferTensorContents(fp32_contents=array.ravel().tolist()))
    np.testing.assert_array_equal(
        convert_grpc.decode_grpc_infer(typed, "", MAX_ELEMENTS).request.inputs, array
    )
    uint8 = grpc_request(
        datatype="UINT8", contents=v2pb.InferTensorContents(uint_contents=[7] * 16)
    )
    decoded_uint8 = convert_grpc.decode_grpc_infer(uint8, "", MAX_ELEMENTS).request.inputs
    assert decoded_uint8.dtype == np.uint8
    assert decoded_uint8.shape == (1, 1, 4, 4)
    uint64 = grpc_request()
    uint64.raw_input_contents.append(array.tobytes())
    uint64.parameters["temperature"].uint64_param = 5
    decoded_uint64 = convert_grpc.decode_grpc_infer(uint64, "sha256:x", MAX_ELEMENTS).request
    assert (decoded_uint64.temperature, decoded_uint64.model_version) == (5.0, "sha256:x")


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("raw size", "raw_input_contents"),
        ("two raw", "raw_input_contents"),
        ("fp16 typed", "inputs.contents"),
        ("typed count", "inputs.contents.fp32_contents"),
        ("uint8 overflow", "inputs.contents.uint_contents"),
        ("no inputs", "inputs"),
        ("string temperature", "parameters.temperature"),
        ("unset parameter", "parameters.temperature"),
    ],
)
def test_decode_grpc_errors(case: str, field: str) -> None:
    request = grpc_request()
    if case == "raw size":
        request.raw_input_contents.append(b"\0" * 63)
    elif case == "two raw":
        request.raw_input_contents.extend([b"\0" * 64, b"\0" * 64])
    elif case == "fp16 typed":
        request = grpc_request(datatype="FP16")
    elif case == "typed count":
        request = grpc_request(contents=v2pb.InferTensorContents(fp32_contents=[0.0] * 15))
    elif case == "uint8 overflow":
        contents = v2pb.InferTensorContents(uint_contents=[300] * 16)
        request = grpc_request(datatype="UINT8", contents=contents)
    elif case == "no inputs":
        request = v2pb.ModelInferRequest(model_name="m")
    elif case == "string temperature":
        request.raw_input_contents.append(b"\0" * 64)
        request.parameters["temperature"].string_param = "4"
    elif case == "unset parameter":
        request.raw_input_contents.append(b"\0" * 64)
        request.parameters["temperature"].CopyFrom(v2pb.InferParameter())
    with pytest.raises(InvalidArgument) as error:
        convert_grpc.decode_grpc_infer(request, "", MAX_ELEMENTS)
    assert error.value.field == field, error.value.message


def test_encode_grpc_response() -> None:
    result = fake_result()
    request = convert.soft_targets_request(
        "m", "", "b1", {"output": "log_probs"}, np.zeros((3, 1, 4, 4)), []
    )
    response = convert_grpc.encode_grpc_infer(result, convert.DecodedInfer(request))
    assert (response.model_name, response.model_version, response.id) == ("m", "sha256:abc", "b1")
    assert [o.name for o in response.outputs] == ["digit", "parity", "hint:features"]
    arrays = [*(task.values for task in result.outputs), result.hints["features"]]
    for output, raw, array in zip(
        response.outputs, response.raw_output_contents, arrays, strict=True
    ):
        assert output.datatype == "FP32"
        assert list(output.shape) == list(array.shape)
        np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(array.shape), array)
    assert convert_grpc.parameters_from_pb(response.parameters) == {
        "temperature": 4.0,
        "output": "log_probs",
    }


def test_model_metadata_and_version() -> None:
    info = fake_info()
    meta = metadata.model_metadata(info)
    assert meta == {
        "name": "m",
        "versions": ["sha256:abc"],
        "platform": "pytorch",
        "inputs": [{"name": "inputs", "datatype": "FP32", "shape": [-1, 1, 4, 4]}],
        "outputs": [
            {"name": "digit", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "parity", "datatype": "FP32", "shape": [-1, 2]},
        ],
    }
    message = convert_grpc.model_metadata_pb(info)
    assert [o.name for o in message.outputs] == ["digit", "parity"]
    assert list(message.inputs[0].shape) == [-1, 1, 4, 4]
    versions = metadata.model_metadata(info, ["sha256:old", "sha256:abc"])["versions"]
    assert versions == ["sha256:old", "sha256:abc"]


def test_resolve_version() -> None:
    summaries = [
        VersionSummary("m", "sha256:one", True, label="1"),
        VersionSummary("m", "sha256:two", True, default_version=True, label="2"),
        VersionSummary("single", "sha256:s", True, default_version=True),
        VersionSummary("broken", "", False, error="failed"),
    ]
    assert metadata.resolve_version(summaries, "m", "1") == "sha256:one"
    assert metadata.resolve_version(summaries, "m", "sha256:two") == "sha256:two"
    assert metadata.resolve_version(summaries, "single", "sha256:s") == "sha256:s"
    for model, version in [("m", "3"), ("m", "sha256:s"), ("single", "1"), ("broken", "x")]:
        with pytest.raises(NotFound) as error:
            metadata.resolve_version(summaries, model, version)
        assert error.value.field == "model_version"
    with pytest.raises(NotFound, match=r"has no version '3'; it serves \['1', '2'\]"):
        metadata.resolve_version(summaries, "m", "3")
