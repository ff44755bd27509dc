"""Helpers for the reliability tests: teacher servers started as subprocesses on chosen (or free)
ports of 127.0.0.1, optionally over TLS, that a test may kill (-9), terminate (SIGTERM) and
restart on the same ports; readiness is always polled (gRPC health SERVING, then `GET /readyz`
200), never a fixed sleep.

`launcher` (per test) and `module_launcher` (per module) start teachers and stop whatever still
runs at the end: SIGTERM, then SIGKILL after `STOP_TIMEOUT_S`.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc
import httpx
import numpy as np
import pytest

from student_client.types import SoftTargets
from tests.readiness import wait_for_doors, wait_for_ports

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
POLL_S = 0.05
LOG_TAIL_CHARS = 3000

MODEL = "mnist-multitask"
Transport = Literal["grpc", "http", "http-json"]


def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def grpc_channel(address: str, ca_file: Path | None = None) -> grpc.Channel:
    """A channel that never goes through a proxy of the environment (everything is loopback)."""
    options = [("grpc.enable_http_proxy", 0)]
    if ca_file is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
    return grpc.secure_channel(address, credentials, options=options)


def http_client(base_url: str, ca_file: Path | None = None, timeout: float = 30.0) -> httpx.Client:
    return httpx.Client(
        base_url=base_url,
        timeout=timeout,
        trust_env=False,
        verify=ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else True,
    )


@dataclass
class Teacher:
    """One `teacher-server serve` subprocess."""

    process: subprocess.Popen[bytes]
    folder: Path
    log_path: Path
    ca_file: Path | None = None  # set when the teacher serves TLS
    grpc_port: int = 0
    http_port: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.ca_file is not None else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def kill(self) -> None:
        """SIGKILL: no grace, no clean-up, like a crashed machine."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to `timeout` (then SIGKILL); the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
        return int(self.process.returncode)


def _server_env() -> dict[str, str]:
    """The environment without TEACHER_* settings: only the flags given configure the server."""
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("TEACHER_")}


_LIVE: list[Teacher] = []
_LIVE_LOCK = threading.Lock()


class Launcher:
    """Starts teachers on `repository` and stops every one still running at `close()`."""

    def __init__(self, repository: Path, root: Path) -> None:
        self.repository = repository
        self.root = root
        self.teachers: list[Teacher] = []
        self._count = 0
        self._lock = threading.Lock()

    def launch(
        self,
        *extra_args: str,
        grpc_port: int = 0,
        http_port: int = 0,
        ca_file: Path | None = None,
    ) -> Teacher:
        """Start a teacher process and return at once (see `wait_ready`)."""
        with self._lock:
            self._count += 1
            folder = self.root / f"teacher-{self._count}"
        folder.mkdir(parents=True, exist_ok=True)
        port_file = folder / "ports.json"
        port_file.unlink(missing_ok=True)
        log_path = folder / "server.log"
        command = [
            sys.executable,
            "-m",
            "teacher_server.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--model-repository",
            str(self.repository),
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--port-file",
            str(port_file),
            "--train-default-if-missing",
            "false",
            *extra_args,
        ]
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, cwd=folder, env=_server_env()
            )
        teacher = Teacher(process, folder, log_path, ca_file)
        with self._lock:
            self.teachers.append(teacher)
        with _LIVE_LOCK:
            _LIVE.append(teacher)
        return teacher

    def start(self, *extra_args: str, **kwargs: object) -> Teacher:
        """Start a teacher and wait until both doors are ready."""
        return wait_ready(self.launch(*extra_args, **kwargs))  # type: ignore[arg-type]

    def start_many(self, *arg_lists: Sequence[str]) -> list[Teacher]:
        """Start several teachers at once (their start-ups overlap), each ready on return."""
        teachers = [self.launch(*args) for args in arg_lists]
        return [wait_ready(teacher) for teacher in teachers]

    def close(self) -> None:
        for teacher in self.teachers:
            teacher.terminate()
            with _LIVE_LOCK:
                if teacher in _LIVE:
                    _LIVE.remove(teacher)


def _fail_start(teacher: Teacher, why: str) -> None:
    pytest.fail(
        f"teacher did not start: {why}\n--- server output ---\n{teacher.log()[-LOG_TAIL_CHARS:]}",
        pytrace=False,
    )


def wait_ready(teacher: Teacher, timeout: float = START_TIMEOUT_S) -> Teacher:
    """Poll until the port file is written, gRPC health says SERVING and `/readyz` is 200."""
    deadline = time.monotonic() + timeout
    port_file = teacher.folder / "ports.json"

    def check(stage: str) -> None:
        if teacher.process.poll() is not None:
            _fail_start(teacher, f"exited with code {teacher.process.returncode} ({stage})")
        if time.monotonic() > deadline:
            _fail_start(teacher, f"not ready within {timeout:.0f} s ({stage})")

    ports = wait_for_ports(port_file, check, POLL_S)
    teacher.grpc_port, teacher.http_port = int(ports["grpc_port"]), int(ports["http_port"])
    with (
        grpc_channel(teacher.grpc_address, teacher.ca_file) as channel,
        http_client(teacher.http_url, teacher.ca_file, timeout=1.0) as http,
    ):
        wait_for_doors(channel, http, check, POLL_S)
    return teacher


@pytest.fixture
def launcher(default_repository: Path, tmp_path: Path) -> Iterator[Launcher]:
    """Start teachers for one test; each still running at the end is stopped."""
    pool = Launcher(default_repository, tmp_path)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module")
def module_launcher(
    default_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Launcher]:
    """Start teachers shared by one module's tests; stopped after the module."""
    pool = Launcher(default_repository, tmp_path_factory.mktemp("reliability"))
    try:
        yield pool
    finally:
        pool.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """When a test fails, attach the tail of the output of every teacher this folder started."""
    report = yield
    if report.failed:
        with _LIVE_LOCK:
            live = list(_LIVE)
        for number, teacher in enumerate(live):
            report.sections.append(
                (
                    f"reliability teacher {number} (pid {teacher.pid}, {teacher.folder}) output",
                    teacher.log()[-LOG_TAIL_CHARS:],
                )
            )
    return report


@dataclass
class Deadline:
    """A bound in wall time for loops that also have a bound in count."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    @property
    def passed(self) -> bool:
        return time.monotonic() - self.start > self.seconds


def assert_same_targets(got: SoftTargets, want: SoftTargets, exact: bool = True) -> None:
    """The same tasks with the same values (bitwise when `exact`, else within 1e-6)."""
    assert list(got.outputs) == list(want.outputs)
    assert got.model_version == want.model_version
    for task, expected in want.outputs.items():
        actual = got.outputs[task]
        assert actual.kind == expected.kind
        pairs = [(actual.values, expected.values)]
        if expected.indices is not None:
            assert actual.indices is not None
            np.testing.assert_array_equal(actual.indices, expected.indices)
        if expected.tail_mass is not None:
            assert actual.tail_mass is not None
            pairs.append((actual.tail_mass, expected.tail_mass))
        for a, b in pairs:
            if exact:
                np.testing.assert_array_equal(a, b, err_msg=f"task {task}")
            else:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"task {task}")
