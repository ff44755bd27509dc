"""Roles: student and operator credentials, on real servers over both doors.

- With a tokens file (a student with scope `infer`, an operator with `infer` and `admin`, one
  stored as a SHA-256 digest): the student infers but cannot reload (PERMISSION_DENIED / 403,
  the message naming the scope needed), the operator can; no token is UNAUTHENTICATED / 401.
- The old single token (`--auth-token`) is a student credential: it infers, and reload is off
  (PERMISSION_DENIED / 403 saying no operator credential is configured); so is reload on a
  server with no credential at all, whose inference stays open.
- With only an operator token, inference stays open to clients without a token, reload needs
  the operator token (401 without one).
- A loop of concurrent reloads (threads over both doors, the model's files rewritten with the
  same bytes meanwhile) never runs two reloads at once (the server's `reload of ...: started` and
  `reloaded ...` log lines alternate) and answers repeated reloads of unchanged files without
  re-reading them (`teacher_model_reloads_total{result="unchanged"}`).
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from protocol import codec
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from student_client.teacher_process import TeacherProcess
from teacher_server.security import token_sha256
from tests.conftest import grpc_channel, http_client, start_teacher

MODEL = "mnist-multitask"
TIMEOUT = 30.0
STUDENT, OPERATOR = "student-secret", "operator-secret"
INPUTS = codec.encode(np.full((2, 1, 28, 28), 0.5, dtype=np.float32))
RELOAD_THREADS = 6
RELOADS_PER_THREAD = 12  # at least; each thread goes on until the rewrites are done
MAX_RELOADS_PER_THREAD = 400  # bound on the loop whatever the machine's speed
REWRITES = 3


def bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"authorization": f"Bearer {token}"}


def grpc_reload(address: str, token: str | None) -> grpc.StatusCode | None:
    """None when the reload succeeded, else its status code (and the details in the exception)."""
    with grpc_channel(address) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        try:
            stub.ReloadModel(
                pb.ReloadModelRequest(model=MODEL),
                timeout=TIMEOUT,
                metadata=tuple(bearer(token).items()),
            )
        except grpc.RpcError as error:
            return error.code()
    return None


def grpc_refusal(address: str, token: str | None) -> tuple[grpc.StatusCode, str]:
    with grpc_channel(address) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ReloadModel(
                pb.ReloadModelRequest(model=MODEL),
                timeout=TIMEOUT,
                metadata=tuple(bearer(token).items()),
            )
    return info.value.code(), info.value.details() or ""


def grpc_infer(address: str, token: str | None) -> None:
    with grpc_channel(address) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        request = pb.SoftTargetsRequest(model=MODEL, inputs=INPUTS)
        response = stub.GetSoftTargets(
            request, timeout=TIMEOUT, metadata=tuple(bearer(token).items())
        )
    assert response.outputs


def http_reload(http: httpx.Client, token: str | None) -> httpx.Response:
    return http.post(f"/v1/models/{MODEL}/reload", headers=bearer(token))


def http_infer(http: httpx.Client, token: str | None) -> httpx.Response:
    body = {"inputs": np.full((1, 1, 28, 28), 0.5).tolist()}
    return http.post(f"/v1/models/{MODEL}/soft-targets", json=body, headers=bearer(token))


@pytest.fixture(scope="module")
def with_tokens_file(
    default_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TeacherProcess]:
    folder = tmp_path_factory.mktemp("roles")
    tokens = folder / "tokens.toml"
    tokens.write_text(
        f"""
[[clients]]
name = "alice"
token = "{STUDENT}"
scopes = ["infer"]

[[clients]]
name = "ops"
token_sha256 = "{token_sha256(OPERATOR)}"
scopes = ["infer", "admin"]
"""
    )
    with start_teacher(default_repository, folder, "--auth-tokens-file", str(tokens)) as teacher:
        yield teacher


def test_a_student_token_cannot_reload_an_operator_token_can(
    with_tokens_file: TeacherProcess,
) -> None:
    teacher = with_tokens_file
    grpc_infer(teacher.grpc_address, STUDENT)
    code, details = grpc_refusal(teacher.grpc_address, STUDENT)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "scope 'admin'" in details and "'alice'" in details, details
    assert grpc_reload(teacher.grpc_address, OPERATOR) is None
    code, _ = grpc_refusal(teacher.grpc_address, None)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    with http_client(teacher.http_url) as http:
        assert http_infer(http, STUDENT).status_code == 200
        assert http_infer(http, None).status_code == 401
        refused = http_reload(http, STUDENT)
        assert refused.status_code == 403, refused.text
        error = refused.json()["error"]
        assert error["code"] == "PERMISSION_DENIED" and error["field"] == "authorization"
        assert "scope 'admin'" in error["message"], error
        answer = http_reload(http, OPERATOR)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == MODEL
        assert http_reload(http, "not-a-token").status_code == 401


def test_the_old_single_token_is_a_student_and_reload_is_off_without_an_operator(
    default_repository: Path, tmp_path: Path, teacher: TeacherProcess
) -> None:
    with start_teacher(default_repository, tmp_path, "--auth-token", STUDENT) as single:
        grpc_infer(single.grpc_address, STUDENT)
        code, details = grpc_refusal(single.grpc_address, STUDENT)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "is off" in details and "operator" in details, details
        with http_client(single.http_url) as http:
            assert http_infer(http, STUDENT).status_code == 200
            refused = http_reload(http, STUDENT)
            assert refused.status_code == 403
            assert "is off" in refused.json()["error"]["message"]
    # The shared session teacher has no credential at all: inference open, reload off.
    grpc_infer(teacher.grpc_address, None)
    code, _ = grpc_refusal(teacher.grpc_address, None)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    with http_client(teacher.http_url) as http:
        assert http_infer(http, None).status_code == 200
        assert http_reload(http, None).status_code == 403


def reload_events(log: str) -> list[str]:
    """'start' / 'end' for each reload of MODEL, in log order."""
    pattern = re.compile(rf"(reload of {MODEL}: started|reloaded {MODEL}:)")
    return ["start" if "started" in m.group(1) else "end" for m in pattern.finditer(log)]


def test_a_reload_loop_runs_one_reload_at_a_time_and_skips_unchanged_files(
    default_repository: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(default_repository, repository)
    weights = repository / MODEL / "model.safetensors"
    with start_teacher(repository, tmp_path / "server", "--operator-token", OPERATOR) as teacher:
        grpc_infer(teacher.grpc_address, None)  # inference stays open to clients without a token
        assert grpc_refusal(teacher.grpc_address, None)[0] == grpc.StatusCode.UNAUTHENTICATED
        failures: list[object] = []
        done = threading.Event()
        rewritten = threading.Event()
        made = [0] * RELOAD_THREADS

        def loop(number: int) -> None:
            # Unchanged reloads answer at once: without waiting for the writer, a fast loop
            # could end before the first rewrite and no real reload would be tested.
            with http_client(teacher.http_url) as http:
                for i in range(MAX_RELOADS_PER_THREAD):
                    if i >= RELOADS_PER_THREAD and rewritten.is_set():
                        break
                    made[number] += 1
                    if (number + i) % 2:
                        status = http_reload(http, OPERATOR).status_code
                        if status != 200:
                            failures.append(status)
                    elif (code := grpc_reload(teacher.grpc_address, OPERATOR)) is not None:
                        failures.append(code)

        def rewrite() -> None:  # same bytes, new mtime: a real reload, the same version
            content = weights.read_bytes()
            staged = tmp_path / "staged.tmp"  # same file system, outside the model folder
            try:
                for _ in range(REWRITES):
                    if done.wait(0.3):
                        return
                    staged.write_bytes(content)  # in one step, as docs/model-repository.md asks:
                    staged.replace(weights)  # a reload never reads a half-written file
                done.wait(0.3)  # the reloads after the last rewrite see it
            finally:
                rewritten.set()

        threads = [threading.Thread(target=loop, args=(n,)) for n in range(RELOAD_THREADS)]
        writer = threading.Thread(target=rewrite)
        for thread in [*threads, writer]:
            thread.start()
        for thread in threads:
            thread.join(120)
        done.set()
        writer.join(10)
        assert not any(t.is_alive() for t in threads), "reload loop did not finish"
        assert not failures, failures[:5]
        with http_client(teacher.http_url) as http:
            metrics = http.get("/metrics").text
        deadline = time.monotonic() + 10
        while not teacher.log().count(f"reloaded {MODEL}:") >= reload_events(teacher.log()).count(
            "start"
        ) and (time.monotonic() < deadline):
            time.sleep(0.05)
        events = reload_events(teacher.log())
    calls = sum(made)
    # Strictly alternating: no reload of the model starts before the previous one ended.
    assert events == ["start", "end"] * (len(events) // 2), events
    # Real reloads: at most one per rewrite (plus one if a rewrite lands mid-reload); the
    # rest were answered from the fingerprint without re-reading the files.
    assert 1 <= events.count("start") <= REWRITES + 1, events
    unchanged = re.search(
        rf'teacher_model_reloads_total{{model="{MODEL}",result="unchanged"}} (\S+)', metrics
    )
    assert unchanged is not None, metrics[-2000:]
    assert float(unchanged.group(1)) >= calls - events.count("start")
