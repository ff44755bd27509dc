"""Fair shares between clients on a real teacher (default MNIST teacher, tokens file with named
clients), over real gRPC streams and HTTP:

- two heavy students with equal weights, one keeping 4x as many batches in flight as the other,
  get served rows within 10% of each other while both are backlogged (first come, first served
  would give the deeper one about 4x the rows);
- a client over its cap of queued rows is refused (RESOURCE_EXHAUSTED on its stream, 429 with
  Retry-After over HTTP, naming the client and the cap) while the heavy students are still served
  without a single error;
- every batch of every client is answered exactly once, with the soft targets of its own input.

Served rows are the server's own count (`teacher_client_served_rows_total`), read from /metrics
twice while both students run. Bounded: each student stops after `RUN_S` seconds (or
`MAX_BATCHES` batches).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from protocol import codec
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from student_client.teacher_process import TeacherProcess
from tests.conftest import grpc_channel, http_client, start_teacher

MODEL = "mnist-multitask"
BATCH = 64
RUN_S = 25.0  # the longest a student streams
MAX_BATCHES = 4000  # per student: a bound, not a target
WINDOW_S = 4.0  # served rows are compared over this window, both students backlogged
TIMEOUT = 60.0
TOKENS = {"deep": "deep-token", "shallow": "shallow-token", "capped": "capped-token"}
CAP_ROWS = 64


def tokens_file(folder: Path) -> Path:
    path = folder / "tokens.toml"
    path.write_text(
        f"""
[[clients]]
name = "deep"
token = "{TOKENS["deep"]}"
scopes = ["infer"]

[[clients]]
name = "shallow"
token = "{TOKENS["shallow"]}"
scopes = ["infer"]
weight = 1.0

[[clients]]
name = "capped"
token = "{TOKENS["capped"]}"
scopes = ["infer"]
max_queued_rows = {CAP_ROWS}
"""
    )
    return path


def auth(client: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TOKENS[client]}"),)


def images(value: int) -> np.ndarray:
    return np.full((BATCH, 1, 28, 28), value, dtype=np.uint8)


@dataclass(eq=False)
class Student(threading.Thread):
    """A gRPC stream keeping `depth` batches of 64 in flight until stopped; every batch's input is
    the constant `value`, so each answer can be checked against its own input's soft targets."""

    address: str
    client: str
    depth: int
    value: int
    answers: Counter[str] = field(default_factory=Counter)  # batch id -> answers
    errors: list[str] = field(default_factory=list)
    probs: dict[str, list[np.ndarray]] = field(default_factory=dict)  # one sample per answer
    sent: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        super().__init__(name=self.client, daemon=True)

    def requests(self, slots: threading.Semaphore) -> Iterator[pb.SoftTargetsRequest]:
        inputs = codec.encode(images(self.value))
        deadline = time.monotonic() + RUN_S
        while not self.stop.is_set() and self.sent < MAX_BATCHES and time.monotonic() < deadline:
            if not slots.acquire(timeout=0.1):
                continue
            yield pb.SoftTargetsRequest(model=MODEL, inputs=inputs, batch_id=str(self.sent))
            self.sent += 1

    def run(self) -> None:
        slots = threading.Semaphore(self.depth)
        with grpc_channel(self.address) as channel:
            stub = pb_grpc.TeacherServiceStub(channel)
            stream = stub.StreamSoftTargets(self.requests(slots), metadata=auth(self.client))
            for response in stream:
                slots.release()
                self.answers[response.batch_id] += 1
                if response.HasField("error"):
                    self.errors.append(f"{response.error.code}: {response.error.message}")
                    continue
                digit = next(o for o in response.soft_targets.outputs if o.task == "digit")
                values = codec.decode(digit.values, "values")
                self.probs.setdefault("digit", []).append(values)

    @property
    def answered(self) -> int:
        return sum(self.answers.values())


def served_rows(http: object, client: str) -> float:
    text = http.get("/metrics").text  # type: ignore[attr-defined]
    pattern = rf'teacher_client_served_rows_total{{client="{client}",model="{MODEL}"}} (\S+)'
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def teacher(
    default_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TeacherProcess]:
    folder = tmp_path_factory.mktemp("fair")
    with start_teacher(
        default_repository,
        folder,
        "--auth-tokens-file",
        str(tokens_file(folder)),
        "--max-queue-size",
        "1024",
    ) as process:
        yield process


def reference(teacher: TeacherProcess, client: str, value: int) -> np.ndarray:
    with grpc_channel(teacher.grpc_address) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        request = pb.SoftTargetsRequest(model=MODEL, inputs=codec.encode(images(value)))
        response = stub.GetSoftTargets(request, timeout=TIMEOUT, metadata=auth(client))
    digit = next(o for o in response.outputs if o.task == "digit")
    return codec.decode(digit.values, "values")


def wait_until(condition: object, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def assert_answered_once(student: Student, want: np.ndarray) -> None:
    """Every batch sent answered exactly once, without error, with its own input's targets."""
    assert not student.errors, (student.client, student.errors[:3])
    assert set(student.answers) == {str(i) for i in range(student.sent)}, student.client
    assert set(student.answers.values()) == {1}, student.client
    for got in student.probs["digit"]:
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=student.client)


def test_equal_weights_get_equal_rows_and_every_batch_is_answered_once(
    teacher: TeacherProcess,
) -> None:
    want = {
        name: reference(teacher, name, value) for name, value in (("deep", 40), ("shallow", 200))
    }
    deep = Student(teacher.grpc_address, "deep", depth=64, value=40)
    shallow = Student(teacher.grpc_address, "shallow", depth=16, value=200)
    with http_client(teacher.http_url) as http:
        deep.start()
        shallow.start()
        try:
            wait_until(lambda: deep.answered > 2 * 64 and shallow.answered > 2 * 16, "warm-up")
            before = {name: served_rows(http, name) for name in ("deep", "shallow")}
            time.sleep(WINDOW_S)
            after = {name: served_rows(http, name) for name in ("deep", "shallow")}
            running = deep.is_alive() and shallow.is_alive()
        finally:
            deep.stop.set()
            shallow.stop.set()
            deep.join(TIMEOUT)
            shallow.join(TIMEOUT)
    assert running, "a student stopped before the window ended (RUN_S too short?)"
    assert not deep.is_alive() and not shallow.is_alive()
    rows = {name: after[name] - before[name] for name in before}
    assert min(rows.values()) > 0, rows
    assert abs(rows["deep"] - rows["shallow"]) <= 0.10 * max(rows.values()), rows
    assert_answered_once(deep, want["deep"])
    assert_answered_once(shallow, want["shallow"])


def test_a_client_over_its_cap_is_refused_while_others_are_served(
    teacher: TeacherProcess,
) -> None:
    deep = Student(teacher.grpc_address, "deep", depth=64, value=40)
    capped = Student(teacher.grpc_address, "capped", depth=16, value=90)
    deep.start()
    try:
        wait_until(lambda: deep.answered > 64, "the heavy student's warm-up")
        # Over HTTP: 8 concurrent requests of 64 rows against a cap of 64 queued rows.
        body = {"inputs": images(90)[:BATCH].astype(np.float32).tolist()}
        headers = {"authorization": f"Bearer {TOKENS['capped']}"}
        with http_client(teacher.http_url) as http, ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda _: http.post(
                        f"/v1/models/{MODEL}/soft-targets", json=body, headers=headers
                    ),
                    range(8),
                )
            )
        # Over gRPC: a stream with 16 batches of 64 in flight at once.
        capped.start()
        wait_until(lambda: capped.answered >= 48, "the capped student's answers")
        capped.stop.set()
        capped.join(TIMEOUT)
    finally:
        deep.stop.set()
        deep.join(TIMEOUT)
    codes = Counter(answer.status_code for answer in answers)
    assert codes[200] >= 1 and codes[429] >= 1, codes
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "RESOURCE_EXHAUSTED" and error["field"] == "queue", error
    assert "'capped'" in error["message"] and f"{CAP_ROWS} rows" in error["message"], error
    assert capped.errors and all(e.startswith("RESOURCE_EXHAUSTED") for e in capped.errors)
    assert capped.answered == capped.sent  # refused batches are answered too, once each
    assert not deep.errors, deep.errors[:3]  # the others are still served
    assert deep.answered == deep.sent
