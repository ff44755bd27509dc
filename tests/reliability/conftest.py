"""Helpers for the reliability tests: teachers on chosen (or free) ports, killed and restarted.

Each teacher is a `student_client.teacher_process.TeacherProcess` (the one launcher): a
subprocess on 127.0.0.1, optionally over TLS, that a test may kill (-9), terminate (SIGTERM) and
restart on the same ports; readiness is always polled (gRPC health SERVING, then `GET /readyz`
200), never a fixed sleep.

`launcher` (per test) and `module_launcher` (per module) start teachers and stop whatever still
runs at the end: SIGTERM, then SIGKILL after `STOP_TIMEOUT_S`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from student_client.teacher_process import (
    TeacherProcess,
    TeacherStartError,
    loopback_channel,
    loopback_http_client,
)
from student_client.types import SoftTargets

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
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


# `grpc_channel(address, ca_file=None)`, `http_client(base_url, ca_file=None, timeout=30.0)`.
grpc_channel = loopback_channel
http_client = loopback_http_client


class Teacher(TeacherProcess):
    """A launcher's teacher: its folder is its working directory and holds `server.log`."""

    @property
    def folder(self) -> Path:
        assert self.cwd is not None
        return self.cwd

    def rss_kib(self) -> int:
        return rss_kib(self.pid)


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
        """Start a teacher process and return at once (see `wait_ready`). No `TEACHER_*`
        variable of this environment reaches it: only the flags given configure it."""
        with self._lock:
            self._count += 1
            folder = self.root / f"teacher-{self._count}"
        folder.mkdir(parents=True, exist_ok=True)
        teacher = Teacher(
            self.repository,
            ["--train-default-if-missing", "false", *extra_args],
            grpc_port=grpc_port,
            http_port=http_port,
            ca_file=ca_file,
            inherit_teacher_env=False,
            log=folder / "server.log",
            cwd=folder,
            start_timeout=START_TIMEOUT_S,
            wait=False,
        )
        with self._lock:
            self.teachers.append(teacher)
        with _LIVE_LOCK:
            _LIVE.append(teacher)
        return teacher

    def start(
        self,
        *extra_args: str,
        grpc_port: int = 0,
        http_port: int = 0,
        ca_file: Path | None = None,
    ) -> Teacher:
        """Start a teacher and wait until both doors are ready."""
        launched = self.launch(
            *extra_args, grpc_port=grpc_port, http_port=http_port, ca_file=ca_file
        )
        return wait_ready(launched)

    def start_many(self, *arg_lists: Sequence[str]) -> list[Teacher]:
        """Start several teachers at once (their start-ups overlap), each ready on return."""
        teachers = [self.launch(*args) for args in arg_lists]
        return [wait_ready(teacher) for teacher in teachers]

    def close(self) -> None:
        for teacher in self.teachers:
            teacher.terminate(STOP_TIMEOUT_S)
            with _LIVE_LOCK:
                if teacher in _LIVE:
                    _LIVE.remove(teacher)


def wait_ready(teacher: Teacher, timeout: float = START_TIMEOUT_S) -> Teacher:
    """Poll until the port file is written, gRPC health says SERVING and `/readyz` is 200; a
    failed start fails the test with the server's output."""
    try:
        teacher.wait_ready(timeout)
    except TeacherStartError as error:
        pytest.fail(str(error), pytrace=False)
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
