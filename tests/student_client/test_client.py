"""TeacherClient against the real server, over gRPC and HTTP."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from protocol.errors import InvalidArgument, NotFound, Unavailable
from student_client import TeacherClient
from student_client.online.retry import RetryPolicy

TRANSPORTS = ["grpc", "http", "http-json"]


@pytest.fixture(scope="module", params=TRANSPORTS)
def client(request: pytest.FixtureRequest, teacher) -> TeacherClient:  # type: ignore[no-untyped-def]
    address = teacher.grpc_address if request.param == "grpc" else teacher.http_url
    with TeacherClient(address, transport=request.param) as client:
        yield client


def test_model_info(client: TeacherClient) -> None:
    info = client.model_info()
    assert info.name == "mnist-multitask"
    assert info.model_version.startswith("sha256:")
    assert [t.name for t in info.tasks] == ["digit", "parity", "loops"]
    assert info.task("digit").class_names == tuple(str(d) for d in range(10))
    assert info.task("digit").test_accuracy is not None and info.task("digit").test_accuracy >= 0.95
    assert info.input_shape == (1, 28, 28)
    assert info.parameter_count > 100_000
    assert set(info.hints) == {"features", "feature_map"}


def test_soft_targets_same_over_both_transports(teacher, mnist_test_images) -> None:  # type: ignore[no-untyped-def]
    images = mnist_test_images[0][:8]
    results = []
    for address, transport in (
        (teacher.grpc_address, "grpc"),
        (teacher.http_url, "http"),
        (teacher.http_url, "http-json"),
    ):
        with TeacherClient(address, transport=transport) as client:
            results.append(client.soft_targets(images, temperature=3.0, batch_id="same"))
    grpc_result = results[0]
    for other in results[1:]:
        assert other.model_version == grpc_result.model_version
        assert other.batch_id == "same"
        for task in ("digit", "parity", "loops"):
            # Binary transports carry the same float32 bytes; JSON round-trips them exactly too.
            np.testing.assert_array_equal(
                other.outputs[task].values, grpc_result.outputs[task].values
            )
    for task in ("digit", "parity", "loops"):
        np.testing.assert_allclose(grpc_result.outputs[task].values.sum(1), 1.0, atol=1e-5)


def test_torch_inputs_and_top_k(client: TeacherClient, mnist_test_images) -> None:  # type: ignore[no-untyped-def]
    images = torch.from_numpy(mnist_test_images[0][:4])
    dense = client.soft_targets(images, tasks=["digit"], temperature=2.0)
    sparse = client.soft_targets(images, tasks=["digit"], temperature=2.0, top_k=3)
    assert list(sparse.outputs) == ["digit"]
    top = sparse.outputs["digit"]
    assert top.values.shape == (4, 3) and top.indices is not None and top.tail_mass is not None
    expected = np.take_along_axis(dense.outputs["digit"].values, top.indices, axis=1)
    np.testing.assert_allclose(top.values, expected, atol=1e-6)
    np.testing.assert_allclose(top.tail_mass, 1 - expected.sum(1), atol=1e-5)
    assert dense.tensor("digit").dtype == torch.float32


def test_server_errors_raise_protocol_errors(client: TeacherClient) -> None:
    with pytest.raises(InvalidArgument) as caught:
        client.soft_targets(np.zeros((2, 784), dtype=np.float32))
    assert caught.value.field == "inputs.shape"
    assert "[2, 784]" in caught.value.message
    with pytest.raises(InvalidArgument) as caught:
        client.soft_targets(np.zeros((1, 1, 28, 28), dtype=np.float32), temperature=-1.0)
    assert caught.value.field == "temperature"
    with pytest.raises(NotFound) as missing:
        client.soft_targets(np.zeros((1, 1, 28, 28), dtype=np.float32), model="no-such-model")
    assert "no-such-model" in missing.value.message


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unreachable_teacher_names_the_address(transport: str) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    quick = RetryPolicy(max_elapsed_s=1.0)  # retried, briefly: the address stays closed
    with TeacherClient(f"127.0.0.1:{port}", transport=transport, timeout=3, retry=quick) as client:  # type: ignore[arg-type]
        with pytest.raises(Unavailable) as caught:
            client.list_models()
    assert str(port) in caught.value.message
