"""Reloading a model while students use it: versions added and removed under load (ReloadModel over
gRPC, `POST /v1/models/{model}/reload` over HTTP), and the optional repository polling.

Every answer must come from the version its `model_version` names (outputs equal to an in-process
forward of that version), no unpinned request may fail, and a pinned request to a removed version
fails with FAILED_PRECONDITION once the reload has returned.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from protocol import codec
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.models.multitask_cnn import MultiTaskCNN
from teacher_server.repository.package import package_model
from tests.conftest import grpc_channel, http_client, start_teacher

MODEL = "tiny"
TIMEOUT = 30.0
ATOL = 1e-5
TASKS = {"digit": [str(d) for d in range(10)], "parity": ["even", "odd"]}
KWARGS = {"channels": [4, 8], "feature_dim": 16}
WAIT_S = 30.0  # the most any phase may take
MAX_REQUESTS = 5000  # per client thread (far more than the test needs: a bound, not a target)
OPERATOR = "operator-token"  # reload is an admin call: it needs an operator credential
ADMIN = (("authorization", f"Bearer {OPERATOR}"),)
BATCHES = [np.random.default_rng(i).random((3, 1, 28, 28), dtype=np.float32) for i in range(4)]

Probs = dict[str, np.ndarray]


def package_versions(staging: Path, seeds: dict[str, int]) -> dict[str, tuple[str, Probs]]:
    """Package one random-weight tiny CNN per label into `staging/tiny/<label>`; label ->
    (model version, expected probs per batch in `BATCHES`)."""
    versions = {}
    for label, seed in seeds.items():
        torch.manual_seed(seed)
        module = MultiTaskCNN({t: len(c) for t, c in TASKS.items()}, **KWARGS).eval()
        version = package_model(
            staging / MODEL / label,
            module,
            name=MODEL,
            architecture="teacher_server.models.multitask_cnn:MultiTaskCNN",
            kwargs=KWARGS,
            tasks=TASKS,
            input_shape=(1, 28, 28),
        )
        with torch.inference_mode():
            expected = [
                {t: torch.softmax(z, 1).numpy() for t, z in module(torch.from_numpy(b)).items()}
                for b in BATCHES
            ]
        versions[label] = (version, expected)
    return versions


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll `condition` until true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def listed_versions(stub: pb_grpc.TeacherServiceStub) -> dict[str, tuple[str, bool]]:
    """model_version -> (label, default) of every served version of MODEL."""
    models = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT).models
    return {m.model_version: (m.label, m.default_version) for m in models if m.name == MODEL}


# --- clients sending requests in threads -------------------------------------------------------


@dataclass
class Answer:
    batch: int
    started: float  # time.monotonic() when sent, and when answered
    ended: float
    model_version: str
    probs: Probs


@dataclass
class Failure:
    started: float
    ended: float
    code: str
    message: str


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


Send = Callable[[np.ndarray, str], tuple[str, Probs]]  # (inputs, pinned version) -> answer


def grpc_sender(address: str) -> tuple[Send, Callable[[], None]]:
    channel = grpc_channel(address)
    stub = pb_grpc.TeacherServiceStub(channel)

    def send(inputs: np.ndarray, pinned: str) -> tuple[str, Probs]:
        request = pb.SoftTargetsRequest(
            model=MODEL, inputs=codec.encode(inputs), model_version=pinned
        )
        try:
            response = stub.GetSoftTargets(request, timeout=TIMEOUT)
        except grpc.RpcError as error:
            raise RequestError(error.code().name, error.details() or "") from None
        probs = {o.task: codec.decode(o.values, "values") for o in response.outputs}
        return response.model_version, probs

    return send, channel.close


def http_sender(url: str) -> tuple[Send, Callable[[], None]]:
    client = http_client(url)

    def send(inputs: np.ndarray, pinned: str) -> tuple[str, Probs]:
        body = {"inputs": inputs.tolist(), "model_version": pinned}
        answer = client.post(f"/v1/models/{MODEL}/soft-targets", json=body)
        if answer.status_code != 200:
            error = answer.json()["error"]
            raise RequestError(error["code"], error["message"])
        result = answer.json()
        probs = {t: np.asarray(o["values"]) for t, o in result["outputs"].items()}
        return result["model_version"], probs

    return send, client.close


@dataclass
class Client:
    """A thread sending the batches in turn, unpinned or `pinned`, until stopped (or
    MAX_REQUESTS / WAIT_S), recording every answer and failure."""

    name: str
    connect: Callable[[], tuple[Send, Callable[[], None]]]
    pinned: str = ""
    answers: list[Answer] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def count(self) -> int:
        return len(self.answers) + len(self.failures)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        send, close = self.connect()
        deadline = time.monotonic() + 3 * WAIT_S
        try:
            while not self.stop.is_set() and self.count < MAX_REQUESTS:
                if time.monotonic() > deadline:
                    break
                batch = self.count % len(BATCHES)
                started = time.monotonic()
                try:
                    version, probs = send(BATCHES[batch], self.pinned)
                except RequestError as error:
                    ended = time.monotonic()
                    self.failures.append(Failure(started, ended, error.code, error.message))
                else:
                    ended = time.monotonic()
                    self.answers.append(Answer(batch, started, ended, version, probs))
        finally:
            close()

    def join(self) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout=TIMEOUT)
        assert not self.thread.is_alive(), f"client {self.name} did not stop"


def assert_answers_match(client: Client, expected: dict[str, list[Probs]]) -> None:
    """Each answer equals the in-process forward of the version it names."""
    for answer in client.answers:
        assert answer.model_version in expected, (client.name, answer.model_version)
        want = expected[answer.model_version][answer.batch]
        assert set(answer.probs) == set(want)
        for task in want:
            np.testing.assert_allclose(
                answer.probs[task],
                want[task],
                atol=ATOL,
                err_msg=f"{client.name}: batch {answer.batch} answered as {answer.model_version}",
            )


# --- tests --------------------------------------------------------------------------------------


def test_reload_under_load_adds_and_removes_versions(tmp_path: Path) -> None:
    staging, repository = tmp_path / "staging", tmp_path / "repository"
    versions = package_versions(staging, {"1": 11, "2": 12, "3": 13})
    (v1, _), (v2, _), (v3, _) = versions["1"], versions["2"], versions["3"]
    expected = dict(versions.values())
    (repository / MODEL).mkdir(parents=True)
    for label in ("1", "2"):
        shutil.copytree(staging / MODEL / label, repository / MODEL / label)

    with (
        start_teacher(repository, tmp_path / "server", "--operator-token", OPERATOR) as teacher,
        grpc_channel(teacher.grpc_address) as channel,
        http_client(teacher.http_url) as http,
    ):
        stub = pb_grpc.TeacherServiceStub(channel)
        assert listed_versions(stub) == {v1: ("1", False), v2: ("2", True)}

        def over_grpc() -> tuple[Send, Callable[[], None]]:
            return grpc_sender(teacher.grpc_address)

        def over_http() -> tuple[Send, Callable[[], None]]:
            return http_sender(teacher.http_url)

        clients = [
            Client("grpc", over_grpc),
            Client("http", over_http),
            Client("grpc pinned v2", over_grpc, pinned=v2),
            Client("grpc pinned v1", over_grpc, pinned=v1),
            Client("http pinned v1", over_http, pinned=v1),
        ]
        unpinned, pinned_v2, pinned_v1 = clients[:2], clients[2], clients[3:]

        def progress(n: int = 3) -> None:
            """Wait until every client has sent `n` more requests."""
            counts = [client.count for client in clients]

            def done() -> bool:
                stopped = [c.name for c in clients if not (c.thread and c.thread.is_alive())]
                assert not stopped, f"client threads ended early: {stopped}"
                return all(c.count >= k + n for c, k in zip(clients, counts, strict=True))

            wait_for(done, f"{n} more requests from every client")

        for client in clients:
            client.start()
        try:
            progress()
            # Add version 3 (moved in at once, as `package_model` does), reload over gRPC.
            os.replace(staging / MODEL / "3", repository / MODEL / "3")
            first_reload_started = time.monotonic()
            reply = stub.ReloadModel(
                pb.ReloadModelRequest(model=MODEL), timeout=TIMEOUT, metadata=ADMIN
            )
            first_reload_done = time.monotonic()
            assert reply.model == MODEL
            assert list(reply.loaded) == [v3] and list(reply.unloaded) == []
            assert {(v.model_version, v.label, v.default_version) for v in reply.versions} == {
                (v1, "1", False),
                (v2, "2", False),
                (v3, "3", True),
            }
            progress()
            # Remove version 1, reload over HTTP: it drains, then unloads.
            os.replace(repository / MODEL / "1", staging / "removed-1")
            second_reload_started = time.monotonic()
            answer = http.post(f"/v1/models/{MODEL}/reload", headers=dict(ADMIN))
            second_reload_done = time.monotonic()
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["loaded"] == [] and body["unloaded"] == [v1]
            assert {
                (v["model_version"], v["label"], v["default_version"]) for v in body["versions"]
            } == {
                (v2, "2", False),
                (v3, "3", True),
            }
            progress()
        finally:
            for client in clients:
                client.join()

        assert listed_versions(stub) == {v2: ("2", False), v3: ("3", True)}
        # Pinned to the removed version: FAILED_PRECONDITION naming it and the served ones.
        send, close = grpc_sender(teacher.grpc_address)
        try:
            with pytest.raises(RequestError) as caught:
                send(BATCHES[0], v1)
        finally:
            close()
        assert caught.value.code == "FAILED_PRECONDITION"
        assert all(v in caught.value.message for v in (v1, v2, v3))

    # No unpinned or v2-pinned request failed, and every answer is its version's.
    for client in clients:
        assert_answers_match(client, expected)
    for client in [*unpinned, pinned_v2]:
        assert client.failures == [], (client.name, client.failures[:3])
    for client in unpinned:
        seen = [a.model_version for a in client.answers]
        assert v2 in seen and v3 in seen, client.name
        # The default switched at the first reload: answered before it began, v2; sent after it
        # returned, v3 (requests in flight meanwhile may get either).
        assert all(a.model_version == v2 for a in client.answers if a.ended < first_reload_started)
        assert all(a.model_version == v3 for a in client.answers if a.started > first_reload_done)
    assert {a.model_version for a in pinned_v2.answers} == {v2}

    # Pinned to v1: answered by v1 until its removal (requests in flight finish on it); sent after
    # the reload returned, only FAILED_PRECONDITION (in flight meanwhile: either).
    for client in pinned_v1:
        assert {a.model_version for a in client.answers} == {v1}, client.name
        assert all(a.started < second_reload_done for a in client.answers), client.name
        assert client.failures, f"{client.name}: nothing was sent after the removal"
        for failure in client.failures:
            assert failure.code == "FAILED_PRECONDITION", (client.name, failure)
            assert failure.ended > second_reload_started, (client.name, failure)
            assert v1 in failure.message


def test_polling_serves_added_versions_and_unloads_removed_ones(tmp_path: Path) -> None:
    staging, repository = tmp_path / "staging", tmp_path / "repository"
    versions = package_versions(staging, {"1": 21, "2": 22})
    (v1, _), (v2, expected_v2) = versions["1"], versions["2"]
    (repository / MODEL).mkdir(parents=True)
    shutil.copytree(staging / MODEL / "1", repository / MODEL / "1")

    with (
        start_teacher(repository, tmp_path / "server", "--repository-poll-s", "0.2") as teacher,
        grpc_channel(teacher.grpc_address) as channel,
    ):
        stub = pb_grpc.TeacherServiceStub(channel)
        assert listed_versions(stub) == {v1: ("1", True)}

        os.replace(staging / MODEL / "2", repository / MODEL / "2")  # no reload call
        wait_for(
            lambda: listed_versions(stub) == {v1: ("1", False), v2: ("2", True)},
            "the poll to serve version 2",
        )
        send, close = grpc_sender(teacher.grpc_address)
        try:
            version, probs = send(BATCHES[1], "")
            assert version == v2
            for task, want in expected_v2[1].items():
                np.testing.assert_allclose(probs[task], want, atol=ATOL)

            shutil.rmtree(repository / MODEL / "1")
            wait_for(
                lambda: listed_versions(stub) == {v2: ("2", True)}, "the poll to unload version 1"
            )
            with pytest.raises(RequestError) as caught:
                send(BATCHES[0], v1)
            assert caught.value.code == "FAILED_PRECONDITION"
        finally:
            close()
        with http_client(teacher.http_url) as http:
            assert http.get("/readyz").status_code == 200
