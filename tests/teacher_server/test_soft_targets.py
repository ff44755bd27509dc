"""Soft targets from a real teacher server, over gRPC unary, gRPC stream and HTTP JSON, on real
held-out MNIST images."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protocol import codec
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc

MODEL = "mnist-multitask"
TASKS = {"digit": 10, "parity": 2, "loops": 3}
TIMEOUT = 30.0
ATOL = 1e-5

Outputs = dict[str, dict[str, np.ndarray]]  # task -> {"values", "indices"?, "tail_mass"?}


# --- helpers ----------------------------------------------------------------------------------


def grpc_request(images: np.ndarray, **fields: Any) -> pb.SoftTargetsRequest:
    return pb.SoftTargetsRequest(model=MODEL, inputs=codec.encode(images), **fields)


def grpc_outputs(response: pb.SoftTargetsResponse) -> Outputs:
    outputs: Outputs = {}
    for output in response.outputs:
        entry = {"values": codec.decode(output.values, "values")}
        if output.HasField("indices"):
            entry["indices"] = codec.decode(output.indices, "indices")
        if output.HasField("tail_mass"):
            entry["tail_mass"] = codec.decode(output.tail_mass, "tail_mass")
        outputs[output.task] = entry
    return outputs


def unary(
    stub: pb_grpc.TeacherServiceStub, images: np.ndarray, **fields: Any
) -> tuple[pb.SoftTargetsResponse, Outputs]:
    response = stub.GetSoftTargets(grpc_request(images, **fields), timeout=TIMEOUT)
    return response, grpc_outputs(response)


def post(
    http: httpx.Client, images: np.ndarray, dtype: str = "float32", **fields: Any
) -> dict[str, Any]:
    body = {"inputs": images.tolist(), "dtype": dtype, **fields}
    response = http.post(f"/v1/models/{MODEL}/soft-targets", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def http_outputs(body: dict[str, Any]) -> Outputs:
    outputs: Outputs = {}
    for task, entry in body["outputs"].items():
        arrays = {"values": np.asarray(entry["values"], dtype=np.float32)}
        if "indices" in entry:
            arrays["indices"] = np.asarray(entry["indices"], dtype=np.int64)
        if "tail_mass" in entry:
            arrays["tail_mass"] = np.asarray(entry["tail_mass"], dtype=np.float32)
        outputs[task] = arrays
    return outputs


def stream(
    stub: pb_grpc.TeacherServiceStub, requests: list[pb.SoftTargetsRequest]
) -> list[pb.StreamSoftTargetsResponse]:
    def generate() -> Iterator[pb.SoftTargetsRequest]:
        yield from requests

    return list(stub.StreamSoftTargets(generate(), timeout=TIMEOUT))


def entropy(probs: np.ndarray) -> np.ndarray:
    p = probs.astype(np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)


def assert_outputs_close(actual: Outputs, expected: Outputs, atol: float = ATOL) -> None:
    assert list(actual) == list(expected)
    for task, arrays in expected.items():
        assert set(actual[task]) == set(arrays), task
        for name, array in arrays.items():
            np.testing.assert_allclose(
                actual[task][name], array, rtol=0, atol=atol, err_msg=f"{task}.{name}"
            )


@pytest.fixture(scope="module")
def images(mnist_test_images: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return mnist_test_images[0][:16]


@pytest.fixture(scope="module")
def served_version(stub: pb_grpc.TeacherServiceStub) -> str:
    (model,) = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT).models
    return model.model_version


@pytest.fixture(scope="module")
def info(stub: pb_grpc.TeacherServiceStub) -> pb.ModelInfo:
    return stub.GetModelInfo(pb.GetModelInfoRequest(model=MODEL), timeout=TIMEOUT)


# --- health, discovery, docs ------------------------------------------------------------------


def test_grpc_health_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "distill.v1.TeacherService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_http_health_and_readiness(http: httpx.Client) -> None:
    healthz = http.get("/healthz")
    assert healthz.status_code == 200
    assert healthz.json() == {"status": "ok"}
    readyz = http.get("/readyz")
    assert readyz.status_code == 200
    assert readyz.json() == {"ready": True}


def test_docs_and_openapi(http: httpx.Client) -> None:
    docs = http.get("/docs")
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]
    spec = http.get("/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    assert "post" in paths["/v1/models/{model}/soft-targets"]
    assert "/v1/models" in paths and "/v1/models/{model}" in paths
    # the inference endpoints are served by plain routes but documented once each
    assert set(paths["/v2/models/{model}/infer"]) == {"post"}
    assert set(paths["/v1/models/{model}/soft-targets"]) == {"post"}
    assert "/v2/models/{model}/versions/{version}/infer" in paths


def test_list_models(stub: pb_grpc.TeacherServiceStub, http: httpx.Client) -> None:
    (model,) = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT).models
    assert model.name == MODEL
    assert model.ready
    assert model.model_version.startswith("sha256:")
    assert len(model.model_version) == len("sha256:") + 64
    listed = http.get("/v1/models")
    assert listed.status_code == 200
    assert model.default_version and not model.error and model.label == ""
    assert listed.json() == {
        "models": [
            {
                "name": MODEL,
                "model_version": model.model_version,
                "ready": True,
                "default_version": True,
                "error": "",
                "label": "",
            }
        ]
    }


def test_model_info_over_grpc(info: pb.ModelInfo, served_version: str) -> None:
    assert info.name == MODEL
    assert info.model_version == served_version
    assert [t.name for t in info.tasks] == list(TASKS)
    assert [len(t.class_names) for t in info.tasks] == list(TASKS.values())
    assert list(info.tasks[0].class_names) == [str(d) for d in range(10)]
    assert list(info.tasks[1].class_names) == ["even", "odd"]
    for task in info.tasks:
        assert task.HasField("test_accuracy")
        assert 0.9 <= task.test_accuracy <= 1.0
    assert list(info.input_shape) == [1, 28, 28]
    assert info.input_dtype == pb.FLOAT32
    assert set(info.accepted_input_dtypes) == {pb.FLOAT32, pb.FLOAT16, pb.UINT8}
    assert info.uint8_scale == pytest.approx(1 / 255)
    assert {h.name for h in info.hints} == {"features", "feature_map"}
    assert info.max_batch_size == 1024
    assert info.description


def test_model_info_over_http(http: httpx.Client, info: pb.ModelInfo) -> None:
    response = http.get(f"/v1/models/{MODEL}")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == MODEL
    assert body["model_version"] == info.model_version
    accuracy = {task["name"]: task["test_accuracy"] for task in body["tasks"]}
    assert accuracy["digit"] >= 0.95
    assert accuracy == pytest.approx({t.name: t.test_accuracy for t in info.tasks})
    assert body["input_shape"] == [1, 28, 28]
    assert body["hints"] == {h.name: list(h.shape) for h in info.hints}
    assert body["max_batch_size"] == info.max_batch_size


# --- soft targets -----------------------------------------------------------------------------


def test_unary_probs(
    stub: pb_grpc.TeacherServiceStub, images: np.ndarray, served_version: str
) -> None:
    response, outputs = unary(stub, images, batch_id="unary-1", temperature=2.0)
    assert response.model == MODEL
    assert response.model_version == served_version
    assert response.batch_id == "unary-1"
    assert response.temperature == 2.0
    assert not response.hints
    assert [o.task for o in response.outputs] == list(TASKS)
    for output in response.outputs:
        assert output.kind == pb.PROBS
        assert output.values.dtype == pb.FLOAT32
        assert not output.HasField("indices") and not output.HasField("tail_mass")
    for task, classes in TASKS.items():
        probs = outputs[task]["values"]
        assert probs.shape == (len(images), classes)
        assert (probs >= 0).all() and (probs <= 1).all()
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=ATOL)


def test_default_temperature_is_one(stub: pb_grpc.TeacherServiceStub, images: np.ndarray) -> None:
    default_response, default = unary(stub, images)
    assert default_response.temperature == 1.0
    _, explicit = unary(stub, images, temperature=1.0, output=pb.PROBS)
    assert_outputs_close(default, explicit, atol=0)


def test_http_probs(http: httpx.Client, images: np.ndarray, served_version: str) -> None:
    body = post(http, images, batch_id="http-1", temperature=2.0)
    assert body["model"] == MODEL
    assert body["model_version"] == served_version
    assert body["batch_id"] == "http-1"
    assert body["temperature"] == 2.0
    assert body["hints"] == {}
    assert list(body["outputs"]) == list(TASKS)
    outputs = http_outputs(body)
    for task, classes in TASKS.items():
        assert body["outputs"][task]["kind"] == "probs"
        probs = outputs[task]["values"]
        assert probs.shape == (len(images), classes)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=ATOL)


def test_higher_temperature_gives_higher_entropy(
    stub: pb_grpc.TeacherServiceStub, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    batch = mnist_test_images[0][:64]
    entropies = []
    for temperature in (0.5, 1.0, 4.0, 20.0):
        _, outputs = unary(stub, batch, temperature=temperature)
        entropies.append({t: entropy(outputs[t]["values"]).mean() for t in TASKS})
    for task in TASKS:
        series = [e[task] for e in entropies]
        assert series == sorted(series) and len(set(series)) == len(series), (task, series)
        assert series[-1] <= np.log(TASKS[task]) + 1e-6


def test_log_probs_and_logits(stub: pb_grpc.TeacherServiceStub, images: np.ndarray) -> None:
    _, probs = unary(stub, images, temperature=3.0, output=pb.PROBS)
    response, log_probs = unary(stub, images, temperature=3.0, output=pb.LOG_PROBS)
    assert {o.kind for o in response.outputs} == {pb.LOG_PROBS}
    response, raw = unary(stub, images, temperature=1.0, output=pb.LOGITS)
    assert {o.kind for o in response.outputs} == {pb.LOGITS}
    _, scaled = unary(stub, images, temperature=3.0, output=pb.LOGITS)
    for task in TASKS:
        p, lp = probs[task]["values"], log_probs[task]["values"]
        assert (lp <= 0).all()
        np.testing.assert_allclose(np.exp(lp), p, atol=ATOL)
        normal = p > 1e-30  # log of a float32 subnormal loses precision
        np.testing.assert_allclose(lp[normal], np.log(p[normal]), atol=ATOL)
        logits = raw[task]["values"].astype(np.float64)
        np.testing.assert_allclose(scaled[task]["values"], logits / 3.0, rtol=1e-6, atol=ATOL)
        z = logits / 3.0
        expected = z - z.max(axis=1, keepdims=True)
        expected -= np.log(np.exp(expected).sum(axis=1, keepdims=True))
        np.testing.assert_allclose(lp, expected, atol=1e-4)


def test_same_outputs_over_every_transport_alone_or_batched(
    stub: pb_grpc.TeacherServiceStub, http: httpx.Client, images: np.ndarray
) -> None:
    fields = {"temperature": 2.5, "output": pb.LOG_PROBS}
    _, reference = unary(stub, images, **fields)

    http_batch = http_outputs(post(http, images, temperature=2.5, output="log_probs"))
    assert_outputs_close(http_batch, reference)

    (streamed,) = stream(stub, [grpc_request(images, batch_id="s", **fields)])
    assert streamed.WhichOneof("result") == "soft_targets"
    assert_outputs_close(grpc_outputs(streamed.soft_targets), reference)

    def row(outputs: Outputs, i: int) -> Outputs:
        return {t: {"values": a["values"][i : i + 1]} for t, a in outputs.items()}

    alone_requests = [grpc_request(images[i : i + 1], batch_id=str(i), **fields) for i in range(16)]
    alone_streamed = {r.batch_id: r for r in stream(stub, alone_requests)}
    for i in range(len(images)):
        _, alone = unary(stub, images[i : i + 1], **fields)
        assert_outputs_close(alone, row(reference, i))
        assert_outputs_close(grpc_outputs(alone_streamed[str(i)].soft_targets), row(reference, i))
    for i in (0, 7, 15):
        alone_http = http_outputs(
            post(http, images[i : i + 1], temperature=2.5, output="log_probs")
        )
        assert_outputs_close(alone_http, row(reference, i))


def test_stream_many_batches_in_flight(
    stub: pb_grpc.TeacherServiceStub,
    mnist_test_images: tuple[np.ndarray, np.ndarray],
    served_version: str,
) -> None:
    pool = mnist_test_images[0][:100]
    _, reference = unary(stub, pool, tasks=["digit", "parity"])
    requests, rows = [], {}
    start = 0
    for i in range(40):
        size = 1 + i % 4
        batch_id = f"batch-{i:02d}"
        rows[batch_id] = slice(start, start + size)
        requests.append(
            grpc_request(pool[rows[batch_id]], batch_id=batch_id, tasks=["digit", "parity"])
        )
        start += size
    responses = stream(stub, requests)
    batch_ids = [r.batch_id for r in responses]
    assert sorted(batch_ids) == sorted(rows), "every batch_id exactly once"
    for response in responses:
        assert response.WhichOneof("result") == "soft_targets", response.error
        result = response.soft_targets
        assert result.batch_id == response.batch_id
        assert result.model_version == served_version
        expected = {
            t: {"values": a["values"][rows[response.batch_id]]} for t, a in reference.items()
        }
        assert_outputs_close(grpc_outputs(result), expected)


def test_tasks_subset_and_order(
    stub: pb_grpc.TeacherServiceStub, http: httpx.Client, images: np.ndarray
) -> None:
    _, everything = unary(stub, images)
    response, subset = unary(stub, images, tasks=["loops", "digit"])
    assert [o.task for o in response.outputs] == ["loops", "digit"]
    assert_outputs_close(subset, {t: everything[t] for t in ("loops", "digit")})
    body = post(http, images, tasks=["parity", "loops"])
    assert list(body["outputs"]) == ["parity", "loops"]
    assert_outputs_close(http_outputs(body), {t: everything[t] for t in ("parity", "loops")})
    _, single = unary(stub, images, tasks=["parity"])
    assert list(single) == ["parity"]


def test_top_k(stub: pb_grpc.TeacherServiceStub, http: httpx.Client, images: np.ndarray) -> None:
    _, dense = unary(stub, images, temperature=2.0, tasks=["digit", "loops"])
    response, top = unary(stub, images, temperature=2.0, tasks=["digit", "loops"], top_k=2)
    for output in response.outputs:
        assert output.indices.dtype == pb.UINT8  # the narrowest type for <= 256 classes
        assert output.tail_mass.dtype == pb.FLOAT32
    body = post(http, images, temperature=2.0, tasks=["digit", "loops"], top_k=2)
    assert_outputs_close(http_outputs(body), top)
    for task in ("digit", "loops"):
        values, indices = top[task]["values"], top[task]["indices"]
        tail = top[task]["tail_mass"]
        assert values.shape == indices.shape == (len(images), 2)
        assert indices.dtype.kind in "iu"
        assert tail.shape == (len(images),)
        assert (np.diff(values, axis=1) <= 0).all(), "sorted by decreasing value"
        full = dense[task]["values"]
        np.testing.assert_allclose(np.take_along_axis(full, indices, axis=1), values, atol=1e-7)
        np.testing.assert_array_equal(indices[:, 0], full.argmax(axis=1))
        np.testing.assert_allclose(tail, 1.0 - values.sum(axis=1), atol=ATOL)

    response, top_log = unary(stub, images, tasks=["digit"], output=pb.LOG_PROBS, top_k=5)
    values = top_log["digit"]["values"]
    assert values.shape == (len(images), 5)
    assert (np.diff(values, axis=1) <= 0).all()
    np.testing.assert_allclose(
        top_log["digit"]["tail_mass"], 1.0 - np.exp(values).sum(axis=1), atol=ATOL
    )
    response, top_logits = unary(stub, images, tasks=["digit"], output=pb.LOGITS, top_k=10)
    assert not response.outputs[0].HasField("tail_mass")
    assert sorted(top_logits["digit"]["indices"][0].tolist()) == list(range(10))


@pytest.mark.parametrize(
    ("output_dtype", "name"), [(pb.FLOAT16, "float16"), (pb.BFLOAT16, "bfloat16")]
)
def test_output_dtype(
    stub: pb_grpc.TeacherServiceStub,
    http: httpx.Client,
    images: np.ndarray,
    output_dtype: int,
    name: str,
) -> None:
    fields = {"temperature": 2.0, "output": pb.LOG_PROBS}
    _, full = unary(stub, images, **fields)
    response, compact = unary(stub, images, output_dtype=output_dtype, **fields)
    assert {o.values.dtype for o in response.outputs} == {output_dtype}
    assert len(response.outputs[0].values.data) == 2 * len(images) * TASKS["digit"]
    body = post(http, images, temperature=2.0, output="log_probs", output_dtype=name)
    over_http = http_outputs(body)
    for task in TASKS:
        np.testing.assert_allclose(compact[task]["values"], full[task]["values"], rtol=1e-2)
        # HTTP carries the same rounded values (as JSON numbers).
        np.testing.assert_allclose(over_http[task]["values"], compact[task]["values"], atol=ATOL)
    _, compact_probs = unary(stub, images, output_dtype=output_dtype)
    _, full_probs = unary(stub, images)
    for task in TASKS:
        np.testing.assert_allclose(
            compact_probs[task]["values"], full_probs[task]["values"], rtol=1e-2, atol=1e-6
        )


def test_uint8_and_float16_inputs(
    stub: pb_grpc.TeacherServiceStub, http: httpx.Client, images: np.ndarray
) -> None:
    pixels = np.rint(images * 255).astype(np.uint8)
    scaled = (pixels / 255.0).astype(np.float32)
    _, from_float = unary(stub, scaled)
    _, from_uint8 = unary(stub, pixels)
    assert_outputs_close(from_uint8, from_float, atol=1e-4)
    from_uint8_http = http_outputs(post(http, pixels, dtype="uint8"))
    assert_outputs_close(from_uint8_http, from_float, atol=1e-4)
    _, from_float16 = unary(stub, scaled.astype(np.float16))
    assert_outputs_close(from_float16, from_float, atol=1e-2)


def test_teacher_accuracy_on_held_out_images(
    stub: pb_grpc.TeacherServiceStub, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images, digits = mnist_test_images
    _, outputs = unary(stub, images[:200], tasks=["digit"])
    accuracy = (outputs["digit"]["values"].argmax(axis=1) == digits[:200]).mean()
    assert accuracy >= 0.95


def test_hints(
    stub: pb_grpc.TeacherServiceStub, http: httpx.Client, images: np.ndarray, info: pb.ModelInfo
) -> None:
    shapes = {h.name: tuple(h.shape) for h in info.hints}
    assert shapes["features"] == (256,) and len(shapes["feature_map"]) == 3
    response, outputs = unary(stub, images, tasks=["digit"], hints=["feature_map", "features"])
    assert [h.name for h in response.hints] == ["feature_map", "features"]
    hints = {h.name: codec.decode(h.tensor, "hints") for h in response.hints}
    for name, shape in shapes.items():
        assert hints[name].shape == (len(images), *shape)
        assert hints[name].dtype == np.float32
        assert np.isfinite(hints[name]).all()
    body = post(http, images[:2], tasks=["digit"], hints=["features"])
    assert list(body["hints"]) == ["features"]
    features = np.asarray(body["hints"]["features"], dtype=np.float32)
    assert features.shape == (2, *shapes["features"])
    np.testing.assert_allclose(features, hints["features"][:2], atol=ATOL)
    assert_outputs_close(outputs, {"digit": unary(stub, images, tasks=["digit"])[1]["digit"]})
