"""Shared fixtures: the default teacher trained once per session, and real teacher servers started
as subprocesses (`python -m teacher_server.cli serve`) on free ports of 127.0.0.1.

Set `TEACHER_TEST_REPOSITORY` to an existing model repository (a folder holding
`mnist-multitask/config.json`) to skip the ~20 s training during local iterations.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from protocol.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.repository.default_teacher import DEFAULT_MODEL_NAME
from tests.readiness import wait_for_doors, wait_for_ports

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.05
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


# Never route a test's traffic through a proxy from the environment: everything is 127.0.0.1.
GRPC_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


def grpc_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=GRPC_CHANNEL_OPTIONS)


def http_client(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=RPC_TIMEOUT_S, trust_env=False)


@dataclass
class TeacherProcess:
    """A running `teacher-server serve` subprocess."""

    process: subprocess.Popen[bytes]
    grpc_address: str  # "127.0.0.1:PORT"
    http_url: str  # "http://127.0.0.1:PORT"
    log_path: Path

    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")


def _fail_start(log_path: Path, why: str) -> None:
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    pytest.fail(f"teacher server did not start: {why}\n--- server output ---\n{log}", pytrace=False)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


def _wait_ready(
    process: subprocess.Popen[bytes], port_file: Path, log_path: Path
) -> TeacherProcess:
    deadline = time.monotonic() + START_TIMEOUT_S

    def check_alive(stage: str) -> None:
        if process.poll() is not None:
            _fail_start(log_path, f"exited with code {process.returncode} ({stage})")
        if time.monotonic() > deadline:
            _fail_start(log_path, f"not ready within {START_TIMEOUT_S:.0f} s ({stage})")

    ports = wait_for_ports(port_file, check_alive, POLL_INTERVAL_S)
    teacher = TeacherProcess(
        process=process,
        grpc_address=f"127.0.0.1:{ports['grpc_port']}",
        http_url=f"http://127.0.0.1:{ports['http_port']}",
        log_path=log_path,
    )
    with (
        grpc_channel(teacher.grpc_address) as channel,
        httpx.Client(base_url=teacher.http_url, timeout=1.0, trust_env=False) as http,
    ):
        wait_for_doors(channel, http, check_alive, POLL_INTERVAL_S)
    return teacher


@contextlib.contextmanager
def start_teacher(repository: Path, tmp_path: Path, *extra_args: str) -> Iterator[TeacherProcess]:
    """Start a real teacher server on `repository` (free ports), wait until both doors are ready,
    yield it, and stop it (SIGTERM, then kill after 15 s). Its output goes to a log file in
    `tmp_path`; a failed start fails the test with that output."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    port_file = tmp_path / "ports.json"
    port_file.unlink(missing_ok=True)
    log_path = tmp_path / "server.log"
    command = [
        sys.executable,
        "-m",
        "teacher_server.cli",
        "serve",
        "--model-repository",
        str(repository),
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--port-file",
        str(port_file),
        "--train-default-if-missing",
        "false",
        *extra_args,
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path, env=_server_env()
        )
    teacher = None
    try:
        teacher = _wait_ready(process, port_file, log_path)
        _RUNNING.append(teacher)
        yield teacher
    finally:
        _stop(process)
        if teacher is not None:
            _RUNNING.remove(teacher)


def _server_env() -> dict[str, str]:
    """The environment without TEACHER_* settings, so only the flags given here configure it."""
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("TEACHER_")}


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
