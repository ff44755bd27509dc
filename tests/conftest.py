"""Shared fixtures: the default teacher trained once per session, and real teacher servers started
as subprocesses (`python -m teacher_server.cli serve`) on free ports of 127.0.0.1.

Set `TEACHER_TEST_REPOSITORY` to an existing model repository (a folder holding
`mnist-multitask/config.json`) to skip the ~20 s training during local iterations.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from protocol.v1 import teacher_pb2_grpc as pb_grpc
from student_client.teacher_process import (
    TeacherProcess,
    TeacherStartError,
    loopback_channel,
    loopback_http_client,
)
from teacher_server.repository.default_teacher import DEFAULT_MODEL_NAME

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
RPC_TIMEOUT_S = 30.0

CONTAINER_TESTS = Path(__file__).parent / "container"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--container",
        action="store_true",
        help="also collect tests/container (needs a Docker engine; `make test-container`)",
    )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/container needs a Docker engine, which `make test` does not install: it runs only
    with --container (`make test-container`)."""
    if collection_path == CONTAINER_TESTS and not config.getoption("--container"):
        return True
    return None


def grpc_channel(address: str) -> grpc.Channel:
    return loopback_channel(address)


def http_client(base_url: str) -> httpx.Client:
    return loopback_http_client(base_url, timeout=RPC_TIMEOUT_S)


@contextlib.contextmanager
def start_teacher(repository: Path, tmp_path: Path, *extra_args: str) -> Iterator[TeacherProcess]:
    """Start a real teacher server on `repository` (free ports), wait until both doors are ready,
    yield it, and stop it (SIGTERM, then kill after 15 s). Its output goes to `server.log` in
    `tmp_path` (its working directory); a failed start fails the test with that output. No
    `TEACHER_*` variable of this environment reaches it: only the flags given configure it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    try:
        teacher = TeacherProcess(
            repository,
            ["--train-default-if-missing", "false", *extra_args],
            inherit_teacher_env=False,
            log=tmp_path / "server.log",
            cwd=tmp_path,
            start_timeout=START_TIMEOUT_S,
        )
    except TeacherStartError as error:
        pytest.fail(str(error), pytrace=False)
    _RUNNING.append(teacher)
    try:
        yield teacher
    finally:
        _RUNNING.remove(teacher)
        teacher.stop(STOP_TIMEOUT_S)


_RUNNING: list[TeacherProcess] = []
LOG_TAIL_CHARS = 4000


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """When a test fails, attach the tail of every running teacher server's output."""
    report = yield
    if report.failed:
        for number, teacher in enumerate(_RUNNING):
            report.sections.append(
                (
                    f"teacher server {number} ({teacher.http_url}) output",
                    teacher.log()[-LOG_TAIL_CHARS:],
                )
            )
    return report


@pytest.fixture(scope="session")
def default_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding the trained default teacher (trained once per session)."""
    reuse = os.environ.get("TEACHER_TEST_REPOSITORY")
    if reuse and (Path(reuse) / DEFAULT_MODEL_NAME / "config.json").is_file():
        return Path(reuse)
    import torch

    from teacher_server.repository.default_teacher import train_default_teacher

    root = tmp_path_factory.mktemp("model_repository")
    threads = torch.get_num_threads()
    if os.getloadavg()[0] >= 1.0:
        # Other processes are busy: torch's threads then wait on each other (one epoch took 46 s
        # with 2 threads and 6 s with 1 on a loaded 2-core machine), so train on one thread.
        torch.set_num_threads(1)
    try:
        train_default_teacher(root / DEFAULT_MODEL_NAME)
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="session")
def sequence_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding the small default sequence teacher (`pydoc-causal-lm`, a
    causal transformer with tokenizer.json; trained once per session, seconds): token-level
    `next_token` and sequence-level `topic_group`."""
    import torch

    from teacher_server.repository.default_sequence_teacher import (
        DEFAULT_SEQUENCE_MODEL_NAME,
        train_default_sequence_teacher,
    )

    root = tmp_path_factory.mktemp("sequence_repository")
    threads = torch.get_num_threads()
    if os.getloadavg()[0] >= 1.0:
        torch.set_num_threads(1)  # see default_repository: busy threads wait on each other
    try:
        train_default_sequence_teacher(root / DEFAULT_SEQUENCE_MODEL_NAME, small=True)
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="session")
def teacher(
    default_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TeacherProcess]:
    """One teacher server on the default repository, shared by most tests."""
    with start_teacher(default_repository, tmp_path_factory.mktemp("teacher")) as process:
        yield process


@pytest.fixture(scope="session")
def teacher_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., TeacherProcess]]:
    """`teacher_factory(repository, *extra_args)` starts another server, stopped at session end."""
    with contextlib.ExitStack() as stack:

        def factory(repository: Path, *extra_args: str) -> TeacherProcess:
            folder = tmp_path_factory.mktemp("teacher_extra")
            return stack.enter_context(start_teacher(repository, folder, *extra_args))

        yield factory


@pytest.fixture(scope="session")
def connect() -> Iterator[
    Callable[[TeacherProcess], tuple[pb_grpc.TeacherServiceStub, httpx.Client]]
]:
    """`connect(teacher)` gives a TeacherService stub and an HTTP client for another server;
    both are closed at session end."""
    with contextlib.ExitStack() as stack:

        def factory(teacher: TeacherProcess) -> tuple[pb_grpc.TeacherServiceStub, httpx.Client]:
            channel = stack.enter_context(grpc_channel(teacher.grpc_address))
            client = stack.enter_context(http_client(teacher.http_url))
            return pb_grpc.TeacherServiceStub(channel), client

        yield factory


@pytest.fixture(scope="session")
def channel(teacher: TeacherProcess) -> Iterator[grpc.Channel]:
    with grpc_channel(teacher.grpc_address) as channel:
        yield channel


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> pb_grpc.TeacherServiceStub:
    return pb_grpc.TeacherServiceStub(channel)


@pytest.fixture(scope="session")
def http(teacher: TeacherProcess) -> Iterator[httpx.Client]:
    with http_client(teacher.http_url) as client:
        yield client


@pytest.fixture(scope="session")
def mnist_test_images() -> tuple[np.ndarray, np.ndarray]:
    """The held-out split: images (1000, 1, 28, 28) float32 in [0, 1], digits (1000,) int64."""
    from teacher_server.repository.default_teacher import mnist_split

    _, _, images, digits = mnist_split()
    return images, digits
