"""Ensembles, token models and hints on one real teacher server.

The repository holds the default teacher (hints `features`, `feature_map`), two small random CNNs
`a` and `b`, an ensemble `ens` of them, and a token classifier `topics` (int64 ids). Every answer
is compared with an in-process forward of the same weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch

from protocol import codec
from protocol.errors import GRPC_FIELD_KEY
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.models.multitask_cnn import MultiTaskCNN
from teacher_server.models.text_classifier import TokenClassifier
from teacher_server.repository.default_teacher import DEFAULT_MODEL_NAME
from teacher_server.repository.package import package_model
from teacher_server.repository.store import LoadedModel, load_model
from tests.conftest import grpc_channel, http_client, start_teacher

TIMEOUT = 30.0
OPERATOR = "operator-token"  # the reload below is an admin call
CNN = "teacher_server.models.multitask_cnn:MultiTaskCNN"
CNN_TASKS = {"digit": [str(d) for d in range(10)], "parity": ["even", "odd"]}
CNN_KWARGS: dict[str, Any] = {"channels": [4, 8], "feature_dim": 16}
TOKEN_TASKS = {"topic": ["news", "sport", "science", "art"], "sentiment": ["negative", "positive"]}
VOCAB, SEQ_LEN = 50, 12
PROTOBUF = "application/x-protobuf"


def random_cnn(seed: int) -> MultiTaskCNN:
    torch.manual_seed(seed)
    return MultiTaskCNN({t: len(c) for t, c in CNN_TASKS.items()}, **CNN_KWARGS).eval()


def package_cnn(out: Path, module: MultiTaskCNN, overwrite: bool = False) -> str:
    return package_model(
        out,
        module,
        name=out.name,
        architecture=CNN,
        kwargs=CNN_KWARGS,
        tasks=CNN_TASKS,
        input_shape=(1, 28, 28),
        uint8_scale=1 / 255,
        overwrite=overwrite,
    )


@dataclass
class Served:
    repository: Path
    stub: pb_grpc.TeacherServiceStub
    http: httpx.Client
    members: dict[str, MultiTaskCNN]
    tokens: TokenClassifier
    mnist: LoadedModel


@pytest.fixture(scope="module")
def served(default_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("ensemble_tokens_hints")
    repository = root / "repository"
    shutil.copytree(default_repository / DEFAULT_MODEL_NAME, repository / DEFAULT_MODEL_NAME)
    members = {"a": random_cnn(31), "b": random_cnn(32)}
    for name, module in members.items():
        package_cnn(repository / name, module)
    member_config = json.loads((repository / "a" / "config.json").read_text())
    (repository / "ens").mkdir()
    ensemble = {
        "name": "ens",
        "description": "mean of a and b",
        "ensemble": {"members": ["a", "b"]},
        "tasks": member_config["tasks"],
        "input": member_config["input"],
    }
    (repository / "ens" / "config.json").write_text(json.dumps(ensemble, indent=2))
    torch.manual_seed(41)
    tokens = TokenClassifier(
        {t: len(c) for t, c in TOKEN_TASKS.items()}, vocab_size=VOCAB, embedding_dim=8
    ).eval()
    package_model(
        repository / "topics",
        tokens,
        name="topics",
        architecture="teacher_server.models.text_classifier:TokenClassifier",
        kwargs={"vocab_size": VOCAB, "embedding_dim": 8},
        tasks=TOKEN_TASKS,
        input_shape=[SEQ_LEN],
        input_dtype="int64",
        max_value=VOCAB,
        hints=["features"],
    )
    mnist = load_model(
        repository / DEFAULT_MODEL_NAME, torch.device("cpu"), ("teacher_server.models.",)
    )
    with (
        start_teacher(repository, root / "server", "--operator-token", OPERATOR) as teacher,
        grpc_channel(teacher.grpc_address) as channel,
        http_client(teacher.http_url) as http,
    ):
        yield Served(repository, pb_grpc.TeacherServiceStub(channel), http, members, tokens, mnist)


# --- helpers ----------------------------------------------------------------------------------


def request(model: str, inputs: np.ndarray, **fields: Any) -> pb.SoftTargetsRequest:
    return pb.SoftTargetsRequest(model=model, inputs=codec.encode(inputs), **fields)


def outputs(response: pb.SoftTargetsResponse) -> dict[str, np.ndarray]:
    return {o.task: codec.decode(o.values, "values") for o in response.outputs}


def json_outputs(body: dict[str, Any]) -> dict[str, np.ndarray]:
    return {task: np.asarray(o["values"]) for task, o in body["outputs"].items()}


def post_json(http: httpx.Client, model: str, body: dict[str, Any]) -> httpx.Response:
    return http.post(f"/v1/models/{model}/soft-targets", json=body)


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float) -> None:
    assert list(got) == list(want)
    for task in want:
        np.testing.assert_allclose(got[task], want[task], atol=atol, rtol=0, err_msg=task)


def logits_of(module: torch.nn.Module, inputs: np.ndarray) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return {t: z.double() for t, z in module(torch.from_numpy(inputs)).items()}


def served_versions(stub: pb_grpc.TeacherServiceStub) -> dict[str, str]:
    return {m.name: m.model_version for m in stub.ListModels(pb.ListModelsRequest()).models}


def grpc_error(stub: pb_grpc.TeacherServiceStub, message: pb.SoftTargetsRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetSoftTargets(message, timeout=TIMEOUT)
    return caught.value


def error_field(error: grpc.RpcError) -> str:
    return dict(error.trailing_metadata() or ()).get(GRPC_FIELD_KEY, "")


# --- ensembles --------------------------------------------------------------------------------


def ensemble_expectation(
    members: list[torch.nn.Module], inputs: np.ndarray, temperature: float
) -> dict[str, np.ndarray]:
    """Mean of the members' probabilities at `temperature` (float64)."""
    per_member = [logits_of(m, inputs) for m in members]
    return {
        task: torch.stack([torch.softmax(lg[task] / temperature, 1) for lg in per_member])
        .mean(0)
        .numpy()
        for task in CNN_TASKS
    }


def ensemble_version(repository: Path, versions: dict[str, str]) -> str:
    config = (repository / "ens" / "config.json").read_bytes()
    return "sha256:" + hashlib.sha256(config + (versions["a"] + versions["b"]).encode()).hexdigest()


def test_ensemble_is_the_mean_of_its_members_probabilities(served: Served) -> None:
    stub, http = served.stub, served.http
    images = np.random.default_rng(3).random((5, 1, 28, 28), dtype=np.float32)
    members = [served.members["a"], served.members["b"]]
    versions = served_versions(stub)
    assert versions["ens"] == ensemble_version(served.repository, versions)
    info = http.get("/v1/models/ens").json()
    assert info["members"] == ["a", "b"] and info["hints"] == {}
    assert info["parameter_count"] == 2 * sum(p.numel() for p in members[0].parameters())

    for temperature in (1.0, 3.0):
        want = ensemble_expectation(members, images, temperature)
        response = stub.GetSoftTargets(
            request("ens", images, temperature=temperature), timeout=TIMEOUT
        )
        assert response.model_version == versions["ens"]
        assert_close(outputs(response), want, atol=1e-6)
        log_probs = stub.GetSoftTargets(
            request("ens", images, temperature=temperature, output=pb.LOG_PROBS), timeout=TIMEOUT
        )
        assert_close(outputs(log_probs), {t: np.log(p) for t, p in want.items()}, atol=1e-5)
        answer = post_json(http, "ens", {"inputs": images.tolist(), "temperature": temperature})
        assert answer.status_code == 200, answer.text
        assert_close(json_outputs(answer.json()), want, atol=1e-6)

    # uint8 inputs are scaled once, by the ensemble's (= every member's) uint8_scale.
    pixels = (images * 255).astype(np.uint8)
    scaled = (pixels.astype(np.float32) * np.float32(1 / 255)).astype(np.float32)
    response = stub.GetSoftTargets(request("ens", pixels), timeout=TIMEOUT)
    assert_close(outputs(response), ensemble_expectation(members, scaled, 1.0), atol=1e-6)


def test_ensemble_version_follows_a_reloaded_member(served: Served) -> None:
    stub = served.stub
    images = np.random.default_rng(4).random((3, 1, 28, 28), dtype=np.float32)
    before = served_versions(stub)
    replacement = random_cnn(33)
    new_a = package_cnn(served.repository / "a", replacement, overwrite=True)
    assert new_a != before["a"]

    reply = stub.ReloadModel(
        pb.ReloadModelRequest(model="a"),
        timeout=TIMEOUT,
        metadata=(("authorization", f"Bearer {OPERATOR}"),),
    )
    assert list(reply.loaded) == [new_a] and list(reply.unloaded) == [before["a"]]
    after = served_versions(stub)
    assert after["a"] == new_a and after["b"] == before["b"]
    assert after["ens"] != before["ens"]
    assert after["ens"] == ensemble_version(served.repository, after)
    served.members["a"] = replacement

    response = stub.GetSoftTargets(request("ens", images, temperature=3.0), timeout=TIMEOUT)
    assert response.model_version == after["ens"]
    want = ensemble_expectation([replacement, served.members["b"]], images, 3.0)
    assert_close(outputs(response), want, atol=1e-6)
    error = grpc_error(stub, request("ens", images, model_version=before["ens"]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


# --- hints ------------------------------------------------------------------------------------


def test_hints_of_the_default_teacher_over_grpc_and_http(
    served: Served, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    stub, http = served.stub, served.http
    images = np.ascontiguousarray(mnist_test_images[0][:6])
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model=DEFAULT_MODEL_NAME), timeout=TIMEOUT)
    shapes = {hint.name: tuple(hint.shape) for hint in info.hints}
    assert shapes == {"features": (256,), "feature_map": (64, 7, 7)}
    http_info = http.get(f"/v1/models/{DEFAULT_MODEL_NAME}").json()
    assert {name: tuple(shape) for name, shape in http_info["hints"].items()} == shapes

    assert served.mnist.forward_features is not None
    with torch.inference_mode():
        features = served.mnist.forward_features(torch.from_numpy(images))
    want = {name: features[name].numpy() for name in shapes}

    response = stub.GetSoftTargets(
        request(DEFAULT_MODEL_NAME, images, hints=["features", "feature_map"]), timeout=TIMEOUT
    )
    got = {hint.name: codec.decode(hint.tensor, "hints") for hint in response.hints}
    assert list(got) == ["features", "feature_map"]
    for name, values in want.items():
        assert got[name].shape == (len(images), *shapes[name])
        np.testing.assert_allclose(got[name], values, atol=1e-5, rtol=0, err_msg=name)

    answer = post_json(
        http, DEFAULT_MODEL_NAME, {"inputs": images.tolist(), "hints": ["feature_map", "features"]}
    )
    assert answer.status_code == 200, answer.text
    hints = answer.json()["hints"]
    assert list(hints) == ["feature_map", "features"]
    for name, values in want.items():
        np.testing.assert_allclose(np.asarray(hints[name]), values, atol=1e-5, rtol=0)

    # The token model's one hint, and no hints where none are declared.
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ_LEN))
    response = stub.GetSoftTargets(request("topics", ids, hints=["features"]), timeout=TIMEOUT)
    with torch.inference_mode():
        embedded = served.tokens.forward_features(torch.from_numpy(ids))["features"].numpy()
    np.testing.assert_allclose(codec.decode(response.hints[0].tensor, "hints"), embedded, atol=1e-5)
    error = grpc_error(stub, request("ens", images, hints=["features"]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_field(error) == "hints"


# --- token models -----------------------------------------------------------------------------


def test_token_model_over_grpc_and_http(served: Served) -> None:
    stub, http = served.stub, served.http
    ids = np.random.default_rng(5).integers(0, VOCAB, (6, SEQ_LEN), dtype=np.int64)
    ids[0, 0], ids[1, -1] = 0, VOCAB - 1  # both ends of the vocabulary
    want = {t: torch.softmax(z / 2.0, 1).numpy() for t, z in logits_of(served.tokens, ids).items()}

    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="topics"), timeout=TIMEOUT)
    assert list(info.input_shape) == [SEQ_LEN] and info.input_dtype == pb.INT64
    assert list(info.accepted_input_dtypes) == [pb.INT64, pb.INT32]
    assert served.http.get("/v1/models/topics").json()["max_value"] == VOCAB

    for inputs in (ids, ids.astype(np.int32)):  # gRPC, int64 and int32
        response = stub.GetSoftTargets(request("topics", inputs, temperature=2.0), timeout=TIMEOUT)
        assert_close(outputs(response), want, atol=1e-5)

    body = {"inputs": ids.tolist(), "dtype": "int64", "temperature": 2.0}  # HTTP JSON
    answer = post_json(http, "topics", body)
    assert answer.status_code == 200, answer.text
    assert_close(json_outputs(answer.json()), want, atol=1e-5)

    message = request("topics", ids, temperature=2.0).SerializeToString()  # HTTP protobuf
    answer = http.post(
        "/v1/models/topics/soft-targets", content=message, headers={"content-type": PROTOBUF}
    )
    assert answer.status_code == 200, answer.text
    assert_close(outputs(pb.SoftTargetsResponse.FromString(answer.content)), want, atol=1e-5)


@pytest.mark.parametrize(
    ("value", "index"), [(VOCAB, (2, 5)), (VOCAB + 1000, (0, 0)), (-1, (4, 11))]
)
def test_token_ids_outside_the_vocabulary_are_refused(
    served: Served, value: int, index: tuple[int, int]
) -> None:
    ids = np.random.default_rng(6).integers(0, VOCAB, (5, SEQ_LEN), dtype=np.int64)
    ids[index] = value
    named = f"token id {value} at index {list(index)}"

    error = grpc_error(served.stub, request("topics", ids))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_field(error) == "inputs" and named in (error.details() or "")

    answer = post_json(served.http, "topics", {"inputs": ids.tolist(), "dtype": "int64"})
    assert answer.status_code == 400
    assert (
        answer.json()["error"]["field"] == "inputs" and named in answer.json()["error"]["message"]
    )

    answer = served.http.post(
        "/v1/models/topics/soft-targets",
        content=request("topics", ids).SerializeToString(),
        headers={"content-type": PROTOBUF},
    )
    assert answer.status_code == 400
    assert pb.Error.FromString(answer.content).field == "inputs"


def test_token_model_refuses_float_inputs(served: Served) -> None:
    ids = np.random.default_rng(7).integers(0, VOCAB, (2, SEQ_LEN))
    for inputs in (ids.astype(np.float32), ids.astype(np.uint8)):
        error = grpc_error(served.stub, request("topics", inputs))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_field(error) == "inputs.dtype"
        assert "int64" in (error.details() or "")
    answer = post_json(served.http, "topics", {"inputs": ids.tolist(), "dtype": "float32"})
    assert answer.status_code == 400
    assert answer.json()["error"]["field"] == "inputs.dtype"
    # ...and a float model refuses token ids the same way.
    error = grpc_error(served.stub, request("a", np.zeros((1, 1, 28, 28), np.int64)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_field(error) == "inputs.dtype"
