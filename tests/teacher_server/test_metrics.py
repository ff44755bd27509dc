"""`/metrics` after real traffic: counters and histograms with the right counts."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protocol.errors import InvalidArgument
from student_client import SoftTargetLoader, TargetOptions, TeacherClient


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return values


def _value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def fresh_teacher(default_repository: Path, teacher_factory):  # type: ignore[no-untyped-def]
    """A teacher of its own, so that its counters start at zero."""
    return teacher_factory(default_repository)


def test_metrics_count_the_traffic(fresh_teacher, mnist_test_images) -> None:  # type: ignore[no-untyped-def]
    images = mnist_test_images[0]
    unary, streamed, over_http, batch = 5, 6, 3, 4
    with TeacherClient(fresh_teacher.grpc_address) as client:
        for i in range(unary):
            client.soft_targets(images[i * batch : (i + 1) * batch], temperature=2.0)
        with pytest.raises(InvalidArgument):
            client.soft_targets(np.zeros((2, 3), dtype=np.float32))
        batches = [(images[i * batch : (i + 1) * batch], None) for i in range(streamed)]
        assert (
            len(list(SoftTargetLoader(batches, client, TargetOptions(tasks=("digit",)))))
            == streamed
        )
    with TeacherClient(fresh_teacher.http_url, transport="http-json") as client:
        for _ in range(over_http):
            client.soft_targets(images[:batch], tasks=["parity"])

    text = httpx.get(fresh_teacher.http_url + "/metrics", timeout=10).text
    samples = _samples(text)
    model = "mnist-multitask"
    assert (
        _value(samples, "teacher_requests_total", transport="grpc", model=model, status="OK")
        == unary
    )
    assert (
        _value(
            samples,
            "teacher_requests_total",
            transport="grpc",
            model=model,
            status="INVALID_ARGUMENT",
        )
        == 1
    )
    assert (
        _value(samples, "teacher_requests_total", transport="grpc-stream", model=model, status="OK")
        == streamed
    )
    assert (
        _value(samples, "teacher_requests_total", transport="http-json", model=model, status="OK")
        == over_http
    )
    # One task output per requested task per request.
    assert (
        _value(samples, "teacher_task_outputs_total", transport="grpc", model=model, task="loops")
        == unary
    )
    assert (
        _value(
            samples,
            "teacher_task_outputs_total",
            transport="grpc-stream",
            model=model,
            task="digit",
        )
        == streamed
    )
    assert (
        _value(
            samples, "teacher_task_outputs_total", transport="http-json", model=model, task="parity"
        )
        == over_http
    )
    # Every answered request was in exactly one forward.
    answered = unary + streamed + over_http
    assert _value(samples, "teacher_batch_requests_sum", model=model) == answered
    forwards = _value(samples, "teacher_batch_requests_count", model=model)
    assert 1 <= forwards <= answered
    assert _value(samples, "teacher_batch_samples_sum", model=model) == answered * batch
    assert _value(samples, "teacher_forward_seconds_count", model=model) == forwards
    assert (
        _value(samples, "teacher_request_seconds_count", transport="grpc", model=model) == unary + 1
    )
    # Telemetry: one observation per sample per task returned.
    digit_samples = (unary + streamed) * batch
    assert (
        _value(samples, "teacher_soft_target_entropy_nats_count", model=model, task="digit")
        == digit_samples
    )
    assert (
        _value(samples, "teacher_soft_target_top1_probability_count", model=model, task="parity")
        == (unary + over_http) * batch
    )
    entropy_sum = _value(samples, "teacher_soft_target_entropy_nats_sum", model=model, task="digit")
    assert 0 < entropy_sum < digit_samples * np.log(10)
    assert (
        _value(samples, "teacher_bytes_received_total", transport="grpc") > unary * batch * 784 * 4
    )
    assert _value(samples, "teacher_bytes_sent_total", transport="http-json") > 0
    assert _value(samples, "teacher_model_loads_total", model=model, result="ok") == 1
    assert ("teacher_queue_depth", frozenset({("model", model)})) in samples
