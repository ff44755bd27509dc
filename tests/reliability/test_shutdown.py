"""Graceful shutdown under load: SIGTERM while several clients send requests continuously.

- Every request gets either its right soft targets or a refusal that says "not accepted, retry
  elsewhere" (gRPC UNAVAILABLE, HTTP 503 UNAVAILABLE, or a refused / closed connection): nothing
  the server accepted is dropped, cancelled or answered wrong.
- gRPC CANCELLED is also a refusal here, but only when the server exited before its grace
  period ended: grpc cancels the calls that reached its transport after `server.stop()` began
  but were never handed to a handler (traced: such calls never reach `GetSoftTargets`), while a
  handler in flight is only cancelled when the grace period runs out. `TeacherClient` maps
  CANCELLED to `Unavailable`, which it retries.
- Readiness turns false first: a gRPC health `Watch` opened before the signal sees NOT_SERVING;
  `/readyz`, polled throughout, never says 200 again once it said 503 or refused the connection.
- The process exits with code 0 within `--shutdown-grace-s` plus a small margin.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from typing import Any

import grpc
import httpx
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protocol import codec
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from student_client import TeacherClient
from student_client.online.messages import soft_targets_from_pb
from student_client.types import SoftTargets, TargetOptions
from tests.reliability.conftest import (
    MODEL,
    Deadline,
    Launcher,
    assert_same_targets,
    grpc_channel,
    http_client,
)

GRACE_S = 3.0
MARGIN_S = 3.0
GRPC_CLIENTS = 3
HTTP_CLIENTS = 1
BATCH = 8
OPTIONS = TargetOptions(temperature=1.5, output_dtype="float32")  # compared with float32 answers
MAX_REQUESTS = 3000  # per client
MAX_REFUSALS = 50  # a client stops after this many refusals (10 ms apart)
LOAD_SECONDS = 60.0
WARM_ANSWERS = 3  # each client has this many answers before the signal


def request(batch: np.ndarray, batch_id: str) -> pb.SoftTargetsRequest:
    return pb.SoftTargetsRequest(
        model=MODEL, inputs=codec.encode(batch), temperature=OPTIONS.temperature, batch_id=batch_id
    )


class Client(threading.Thread):
    """Sends one batch again and again until told to stop; records every outcome."""

    def __init__(self, index: int, transport: str, address: str, batch: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.index, self.transport, self.address, self.batch = index, transport, address, batch
        self.outcomes: Counter[str] = Counter()
        self.answers: list[SoftTargets] = []
        self.wrong: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = Deadline(LOAD_SECONDS)
        if self.transport == "grpc":
            channel = grpc_channel(self.address)
            call = pb_grpc.TeacherServiceStub(channel).GetSoftTargets
            try:
                for n in range(MAX_REQUESTS):
                    if self._done(deadline):
                        break
                    self._grpc(call, n)
            finally:
                channel.close()
        else:
            with http_client(self.address, timeout=10.0) as http:
                for n in range(MAX_REQUESTS):
                    if self._done(deadline):
                        break
                    self._http(http, n)

    def _done(self, deadline: Deadline) -> bool:
        refused = sum(v for k, v in self.outcomes.items() if k != "answered")
        if refused:
            time.sleep(0.01)  # a refused client backs off a little (and spares the CPU)
        return self.stop.is_set() or deadline.passed or refused >= MAX_REFUSALS

    def _grpc(self, call: Any, n: int) -> None:
        try:
            response = call(request(self.batch, f"{self.index}-{n}"), timeout=10.0)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                self.outcomes["unavailable"] += 1
            elif error.code() == grpc.StatusCode.CANCELLED:
                self.outcomes["cancelled"] += 1  # see the module docstring
            else:
                self.outcomes["wrong"] += 1
                self.wrong.append(f"gRPC {error.code()}: {error.details()}")
            return
        self.outcomes["answered"] += 1
        self.answers.append(soft_targets_from_pb(response))

    def _http(self, http: httpx.Client, n: int) -> None:
        try:
            response = http.post(
                f"/v1/models/{MODEL}/soft-targets",
                content=request(self.batch, f"{self.index}-{n}").SerializeToString(),
                headers={"content-type": "application/x-protobuf"},
            )
        except httpx.TransportError as error:  # refused, or closed before the request was read
            self.outcomes[f"connection {type(error).__name__}"] += 1
            return
        if response.status_code == 503:
            refusal = pb.Error.FromString(response.content)
            if refusal.code == "UNAVAILABLE" and response.headers.get("retry-after"):
                self.outcomes["unavailable"] += 1
            else:
                self.outcomes["wrong"] += 1
                self.wrong.append(f"HTTP 503 {refusal} {response.headers}")
            return
        if response.status_code != 200:
            self.outcomes["wrong"] += 1
            self.wrong.append(f"HTTP {response.status_code}: {response.content!r}")
            return
        self.outcomes["answered"] += 1
        self.answers.append(
            soft_targets_from_pb(pb.SoftTargetsResponse.FromString(response.content))
        )


class HealthWatch(threading.Thread):
    """gRPC health `Watch` of the teacher service: records statuses; stops at NOT_SERVING."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.statuses: list[int] = []
        self.ended = ""
        self._channel = grpc_channel(address)
        stub = health_pb2_grpc.HealthStub(self._channel)
        self._call = stub.Watch(
            health_pb2.HealthCheckRequest(service="distill.v1.TeacherService"), timeout=60.0
        )
        self.first = threading.Event()

    def run(self) -> None:
        try:
            for reply in self._call:
                self.statuses.append(reply.status)
                self.first.set()
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    self._call.cancel()  # an open Watch would hold the shutdown to its grace
        except grpc.RpcError as error:
            self.ended = str(error.code())
        finally:
            self.first.set()
            self._channel.close()


class ReadyPoller(threading.Thread):
    """Polls `/readyz` (a fresh connection each time) until told to stop."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.seen: list[str] = []
        self.stop = threading.Event()
        self.signalled = threading.Event()

    def run(self) -> None:
        deadline = Deadline(LOAD_SECONDS)
        for _ in range(20_000):
            if self.stop.is_set() or deadline.passed:
                return
            try:
                with httpx.Client(trust_env=False, timeout=2.0) as http:
                    status = str(http.get(self.url + "/readyz").status_code)
            except httpx.TransportError as error:
                status = f"refused ({type(error).__name__})"
            if self.signalled.is_set():
                self.seen.append(status)
            time.sleep(0.01)


def test_sigterm_under_load(
    launcher: Launcher, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    teacher = launcher.start("--shutdown-grace-s", str(GRACE_S))
    images = mnist_test_images[0]
    batches = [images[i * BATCH : (i + 1) * BATCH] for i in range(GRPC_CLIENTS + HTTP_CLIENTS)]
    with TeacherClient(teacher.grpc_address) as reference_client:
        expected = [reference_client.soft_targets_with(batch, OPTIONS) for batch in batches]

    clients = [Client(i, "grpc", teacher.grpc_address, batches[i]) for i in range(GRPC_CLIENTS)] + [
        Client(GRPC_CLIENTS + i, "http", teacher.http_url, batches[GRPC_CLIENTS + i])
        for i in range(HTTP_CLIENTS)
    ]
    watch = HealthWatch(teacher.grpc_address)
    ready = ReadyPoller(teacher.http_url)
    for thread in (*clients, watch, ready):
        thread.start()
    try:
        assert watch.first.wait(30), "health Watch answered nothing"
        assert watch.statuses == [health_pb2.HealthCheckResponse.SERVING]
        warm = Deadline(30.0)
        while min(c.outcomes["answered"] for c in clients) < WARM_ANSWERS:
            assert not warm.passed, [dict(c.outcomes) for c in clients]
            assert all(c.is_alive() for c in clients)
            time.sleep(0.02)

        ready.signalled.set()
        signalled = time.monotonic()
        teacher.process.send_signal(signal.SIGTERM)
        code = teacher.process.wait(timeout=GRACE_S + 30)
        elapsed = time.monotonic() - signalled
        time.sleep(0.2)  # let the clients see the closed ports (bounded by their own deadlines)
    finally:
        for client in clients:
            client.stop.set()
        ready.stop.set()
        for thread in (*clients, ready, watch):
            thread.join(timeout=30)

    assert code == 0, teacher.log()[-3000:]
    assert elapsed < GRACE_S + MARGIN_S, f"exit took {elapsed:.1f} s"
    cancelled = sum(c.outcomes["cancelled"] for c in clients)
    assert cancelled == 0 or elapsed < GRACE_S, "calls cancelled when the grace period ran out"

    wrong = [w for c in clients for w in c.wrong]
    assert wrong == [], wrong
    for client in clients:
        assert client.outcomes["answered"] >= WARM_ANSWERS, client.outcomes
        for answer in client.answers:
            assert_same_targets(answer, expected[client.index], exact=False)

    assert watch.statuses == [
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    ], (watch.statuses, watch.ended)
    after = ready.seen
    first_down = next((i for i, s in enumerate(after) if s != "200"), None)
    assert first_down is not None, f"/readyz never went down: {after}"
    assert all(s == "503" or s.startswith("refused") for s in after[first_down:]), after
