"""Overload: a teacher with a tiny queue (`--max-queue-size 2 --max-queue-delay-ms 5`) and many
concurrent clients.

- Without retries, some requests are refused at once with RESOURCE_EXHAUSTED (gRPC) / 429 with
  `Retry-After` (HTTP), naming the queue; every answered request is right.
- The module's teacher also has `--max-batch-size 16`: a forward merges at most two requests.
- With the default retries, every request is eventually answered, right.
- A loader's stream gets per-batch RESOURCE_EXHAUSTED answers and re-sends those batches: every
  batch is yielded exactly once, with the right soft targets.
- The server's memory stays bounded (VmRSS < 1.5x the RSS after warm-up) throughout.

"Right" is compared with soft targets computed beforehand, one request at a time. Under load the
batcher merges requests into other forwards; on this CPU build the results are bitwise the same
whatever the merge (checked: 8 requests alone vs merged), but that is a property of the BLAS /
oneDNN kernels, not a promise, so merged results are compared within 1e-6 (rtol 1e-5).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from protocol import codec
from protocol.errors import ResourceExhausted, TeacherError
from protocol.v1 import teacher_pb2 as pb
from student_client import SoftTargetLoader, TargetOptions, TeacherClient
from student_client.online.messages import soft_targets_from_pb
from student_client.online.retry import NO_RETRY, RetryPolicy
from student_client.types import SoftTargets
from tests.reliability.conftest import (
    MODEL,
    Deadline,
    Launcher,
    Teacher,
    Transport,
    assert_same_targets,
    http_client,
)

THREADS = 16
HTTP_THREADS = 4  # of THREADS: raw HTTP, to see the 429 and its Retry-After
REQUESTS = 10  # per thread
BATCH = 8
DISTINCT = 20  # distinct batches, each with its reference
ROUND_SECONDS = 90.0
RSS_FACTOR = 1.5
OPTIONS = TargetOptions(temperature=3.0, output_dtype="float32")  # compared with raw requests


@pytest.fixture(scope="module")
def teacher(module_launcher: Launcher) -> Teacher:
    # --max-batch-size 16: a forward merges at most two of these 8-sample requests, so a burst
    # of a stream's batches cannot all be swallowed by one forward while the queue stays short.
    return module_launcher.start(
        "--max-queue-size", "2", "--max-queue-delay-ms", "5", "--max-batch-size", str(2 * BATCH)
    )


@pytest.fixture(scope="module")
def batches(mnist_test_images: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    images = mnist_test_images[0]
    return [images[i * BATCH : (i + 1) * BATCH] for i in range(DISTINCT)]


@pytest.fixture(scope="module")
def reference(teacher: Teacher, batches: list[np.ndarray]) -> list[SoftTargets]:
    """Each batch's soft targets, asked alone before any load."""
    with TeacherClient(teacher.grpc_address) as client:
        return [client.soft_targets_with(batch, OPTIONS) for batch in batches]


class RssMonitor:
    """Samples the server's VmRSS every 50 ms in a thread; `peak` is the largest seen."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher
        self.peak = teacher.rss_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.teacher.rss_kib())

    def __enter__(self) -> RssMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def baseline_rss(teacher: Teacher, reference: list[SoftTargets]) -> int:
    """VmRSS after warm-up: the references computed, then a short burst of concurrent load."""
    with TeacherClient(teacher.grpc_address, retry=RetryPolicy(max_elapsed_s=30)) as client:
        threads = [
            threading.Thread(
                target=client.soft_targets_with,
                args=(np.zeros((BATCH, 1, 28, 28), np.float32), OPTIONS),
            )
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return teacher.rss_kib()


def run_threads(worker: Any, count: int) -> None:
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=ROUND_SECONDS + 30)
    assert not any(thread.is_alive() for thread in threads), "a client thread hung"


def request_body(batch: np.ndarray, batch_id: str) -> bytes:
    return pb.SoftTargetsRequest(
        model=MODEL, inputs=codec.encode(batch), temperature=OPTIONS.temperature, batch_id=batch_id
    ).SerializeToString()


def test_small_queue_refuses_without_retries(
    teacher: Teacher,
    batches: list[np.ndarray],
    reference: list[SoftTargets],
    baseline_rss: int,
) -> None:
    outcomes: Counter[str] = Counter()
    wrong: list[str] = []
    lock = threading.Lock()
    deadline = Deadline(ROUND_SECONDS)

    def record(kind: str, problem: str | None = None) -> None:
        with lock:
            outcomes[kind] += 1
            if problem:
                wrong.append(problem)

    def grpc_client(index: int) -> None:
        with TeacherClient(teacher.grpc_address, retry=NO_RETRY) as client:
            for n in range(REQUESTS):
                if deadline.passed:
                    return
                k = (index * REQUESTS + n) % DISTINCT
                try:
                    answer = client.soft_targets_with(batches[k], OPTIONS)
                except ResourceExhausted as error:
                    ok = error.field == "queue" and "queue" in error.message
                    record("grpc refused", None if ok else f"gRPC refusal {error!r}")
                    continue
                except TeacherError as error:
                    record("grpc other", f"gRPC {error!r}")
                    continue
                try:
                    assert_same_targets(answer, reference[k], exact=False)
                    record("grpc ok")
                except AssertionError as error:
                    record("grpc wrong", f"gRPC batch {k}: {error}")

    def http_raw_client(index: int) -> None:
        with http_client(teacher.http_url) as http:
            for n in range(REQUESTS):
                if deadline.passed:
                    return
                k = (index * REQUESTS + n) % DISTINCT
                response = http.post(
                    f"/v1/models/{MODEL}/soft-targets",
                    content=request_body(batches[k], f"http-{index}-{n}"),
                    headers={"content-type": "application/x-protobuf"},
                )
                if response.status_code == 429:
                    error = pb.Error.FromString(response.content)
                    ok = (
                        response.headers.get("retry-after") == "1"
                        and error.code == "RESOURCE_EXHAUSTED"
                        and error.field == "queue"
                    )
                    record("http 429", None if ok else f"429 {response.headers} {error}")
                    continue
                if response.status_code != 200:
                    record("http other", f"HTTP {response.status_code}: {response.content!r}")
                    continue
                answer = soft_targets_from_pb(pb.SoftTargetsResponse.FromString(response.content))
                try:
                    assert_same_targets(answer, reference[k], exact=False)
                    record("http ok")
                except AssertionError as error:
                    record("http wrong", f"HTTP batch {k}: {error}")

    def worker(index: int) -> None:
        if index < HTTP_THREADS:
            http_raw_client(index)
        else:
            grpc_client(index)

    with RssMonitor(teacher) as rss:
        run_threads(worker, THREADS)
    assert wrong == [], outcomes
    assert sum(outcomes.values()) == THREADS * REQUESTS, outcomes
    assert outcomes["grpc refused"] + outcomes["http 429"] > 0, f"nothing was refused: {outcomes}"
    assert outcomes["grpc ok"] + outcomes["http ok"] > 0, outcomes
    assert rss.peak < RSS_FACTOR * baseline_rss, (rss.peak, baseline_rss)


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_default_retries_answer_every_request(
    teacher: Teacher,
    batches: list[np.ndarray],
    reference: list[SoftTargets],
    baseline_rss: int,
    transport: Transport,
) -> None:
    address = teacher.grpc_address if transport == "grpc" else teacher.http_url
    answered: list[int] = []
    wrong: list[str] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        try:
            with TeacherClient(address, transport=transport) as client:  # default retries
                for n in range(REQUESTS):
                    k = (index * REQUESTS + n) % DISTINCT
                    answer = client.soft_targets_with(batches[k], OPTIONS)
                    assert_same_targets(answer, reference[k], exact=False)
                    with lock:
                        answered.append(k)
        except (TeacherError, AssertionError) as error:
            with lock:
                wrong.append(f"client {index}: {error!r}")

    with RssMonitor(teacher) as rss:
        run_threads(worker, THREADS)
    assert wrong == []
    assert len(answered) == THREADS * REQUESTS
    assert rss.peak < RSS_FACTOR * baseline_rss, (rss.peak, baseline_rss)


def _batches_with_labels(batches: list[np.ndarray], rounds: int) -> Iterator[tuple[Any, int]]:
    for n in range(rounds * len(batches)):
        yield batches[n % len(batches)], n


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_loader_resends_refused_batches_exactly_once(
    teacher: Teacher,
    batches: list[np.ndarray],
    reference: list[SoftTargets],
    baseline_rss: int,
    transport: Transport,
) -> None:
    """32 batches in flight, a queue of 2 and at most 2 requests per forward: over gRPC the
    server answers most of the stream's first burst with per-batch RESOURCE_EXHAUSTED errors,
    and the loader re-sends exactly those, each after its own backoff, while it goes on handling
    the other answers. (Over HTTP the loader's pool has 4 threads, so refusals are possible but
    not certain.) Before the loader scheduled its re-sends, it slept each refused batch's backoff
    in turn before looking at the next answer: with this depth and a 10 s retry policy it gave up
    with RESOURCE_EXHAUSTED after ~11 s having received nothing, although the teacher was
    answering."""
    total = 2 * DISTINCT
    address = teacher.grpc_address if transport == "grpc" else teacher.http_url
    started = time.monotonic()
    retry = RetryPolicy(max_elapsed_s=10.0)
    with (
        RssMonitor(teacher) as rss,
        TeacherClient(address, transport=transport, retry=retry) as client,
    ):
        loader = SoftTargetLoader(_batches_with_labels(batches, 2), client, OPTIONS, depth=32)
        labels, ids = [], []
        for _, label, targets in loader:
            labels.append(label)
            ids.append(targets.batch_id)
            assert_same_targets(targets, reference[label % DISTINCT], exact=False)
    assert labels == list(range(total)), "every batch once, in order"
    assert len(set(ids)) == total
    stats = loader.stats
    assert (stats.sent, stats.received, stats.yielded) == (total, total, total), stats
    assert stats.samples == total * BATCH
    if transport == "grpc":
        assert stats.resent > 0, f"the small queue refused nothing: {stats}"
    assert stats.reconnects == 0, stats
    assert rss.peak < RSS_FACTOR * baseline_rss, (rss.peak, baseline_rss)
    assert time.monotonic() - started < ROUND_SECONDS
