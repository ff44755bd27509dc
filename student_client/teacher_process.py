"""The one way to start a teacher server as a local subprocess and wait until it is ready.

Used by the quickstart (`student-client demo`), the examples, the benchmarks and the tests. The
teacher is started through its command line (`python -m teacher_server.cli serve`, so nothing of
`teacher_server` is imported here), on 127.0.0.1, on ports chosen by the OS (port 0, read back
from the port file the server writes) or on given ports (to restart a teacher where it was).
Ready means: the port file is written, gRPC health says SERVING, then `GET /readyz` answers 200
(over TLS when `ca_file` is given) — polled, never a fixed sleep. A start that fails (the process
exits, or the deadline passes) raises `TeacherStartError` naming the stage and, when the output
goes to a log file, its tail.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

HOST = "127.0.0.1"
POLL_S = 0.05
STOP_TIMEOUT_S = 20.0
LOG_TAIL_CHARS = 4000
# Everything here is loopback: never through a proxy named in the environment.
GRPC_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


class TeacherStartError(RuntimeError):
    """The teacher exited during start-up or was not ready in time; the message says which stage
    it was in and ends with the tail of its log (when it writes to a log file)."""


class TeacherProcess:
    """One `teacher_server.cli serve` subprocess on 127.0.0.1.

    `TeacherProcess(repository, extra_args)` starts it and returns once it is ready (with
    `wait=False` it returns at once: call `wait_ready()`). `grpc_port`/`http_port` 0 let the OS
    choose; after `wait_ready()` they hold the bound ports. `env` is added to the environment the
    child gets: this process's own, or, with `inherit_teacher_env=False`, this process's without
    its `TEACHER_*` variables (so only the flags given configure the server). `log` is a file path
    (stdout and stderr go there; `log()` reads it back), a binary stream or file descriptor (both
    go there), or None (both inherited). Use as a context manager; leaving it calls `stop()`.
    One teacher's methods are not meant to be called from two threads at once.
    """

    def __init__(
        self,
        repository: Path,
        extra_args: Sequence[str] = (),
        *,
        grpc_port: int = 0,
        http_port: int = 0,
        ca_file: Path | None = None,
        env: Mapping[str, str] | None = None,
        inherit_teacher_env: bool = True,
        log: Path | IO[bytes] | int | None = None,
        cwd: Path | None = None,
        start_timeout: float = 600.0,
        wait: bool = True,
    ) -> None:
        self.ca_file = ca_file
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.log_path = log if isinstance(log, Path) else None
        self._workdir = tempfile.TemporaryDirectory(prefix="teacher-")
        self._port_file = Path(self._workdir.name) / "ports.json"
        command = [
            sys.executable,
            "-m",
            "teacher_server.cli",
            "serve",
            "--host",
            HOST,
            "--model-repository",
            str(repository),
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--port-file",
            str(self._port_file),
            *extra_args,
        ]
        child_env = {
            name: value
            for name, value in os.environ.items()
            if inherit_teacher_env or not name.upper().startswith("TEACHER_")
        }
        child_env.update(env or {})
        with contextlib.ExitStack() as stack:
            output: IO[bytes] | int | None = log if not isinstance(log, Path) else None
            if self.log_path is not None:
                output = stack.enter_context(self.log_path.open("wb"))
            self.process = subprocess.Popen(
                command,
                stdout=output,
                stderr=None if output is None else subprocess.STDOUT,
                cwd=cwd,
                env=child_env,
            )
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.kill()
                self._workdir.cleanup()
                raise

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def grpc_address(self) -> str:
        """`127.0.0.1:PORT`, what a gRPC channel dials."""
        return f"{HOST}:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        """`127.0.0.1:PORT`, the HTTP door without a scheme."""
        return f"{HOST}:{self.http_port}"

    @property
    def http_url(self) -> str:
        """`http://127.0.0.1:PORT`, or `https://` when the teacher serves TLS (`ca_file`)."""
        scheme = "https" if self.ca_file is not None else "http"
        return f"{scheme}://{self.http_address}"

    def log(self) -> str:
        """Everything the server wrote so far ("" when its output does not go to a log file)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float | None = None) -> TeacherProcess:
        """Poll until the port file is written, gRPC health says SERVING and `GET /readyz` is
        200 (`timeout` seconds, default `start_timeout`); raises `TeacherStartError`."""
        limit = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        ports = self._wait_for_ports(deadline, limit)
        self.grpc_port, self.http_port = int(ports["grpc_port"]), int(ports["http_port"])
        with loopback_channel(self.grpc_address, self.ca_file) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not self._serving(health):
                self._check(deadline, limit, "waiting for gRPC health SERVING")
                time.sleep(POLL_S)
        with loopback_http_client(self.http_url, self.ca_file, timeout=1.0) as http:
            while not _ready(http):
                self._check(deadline, limit, "waiting for GET /readyz 200")
                time.sleep(POLL_S)
        return self

    def _wait_for_ports(self, deadline: float, limit: float) -> dict[str, int]:
        """The `{grpc_port, http_port, ...}` the server writes (atomically) once it listens."""
        while True:
            self._check(deadline, limit, "waiting for the port file")
            if self._port_file.is_file():
                with contextlib.suppress(ValueError):  # written atomically, but be tolerant
                    ports: dict[str, int] = json.loads(self._port_file.read_text())
                    return ports
            time.sleep(POLL_S)

    def _serving(self, health: health_pb2_grpc.HealthStub) -> bool:
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def _check(self, deadline: float, limit: float, stage: str) -> None:
        if self.process.poll() is not None:
            self._fail(f"exited with code {self.process.returncode} ({stage})")
        if time.monotonic() > deadline:
            self._fail(f"not ready within {limit:.0f} s ({stage})")

    def _fail(self, why: str) -> None:
        message = f"teacher server did not start: {why}"
        if self.log_path is not None:
            tail = self.log()[-LOG_TAIL_CHARS:]
            message += f"\n--- server output ({self.log_path}) ---\n{tail}"
        raise TeacherStartError(message)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to `timeout` seconds (then SIGKILL); the exit code (negative: the
        signal that ended it)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._workdir.cleanup()
        return int(self.process.returncode)

    terminate = stop

    def kill(self) -> None:
        """SIGKILL: no grace, no clean-up, like a crashed machine; waits until it is gone."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(STOP_TIMEOUT_S)

    def __enter__(self) -> TeacherProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def loopback_channel(address: str, ca_file: Path | None = None) -> grpc.Channel:
    """A gRPC channel to a local teacher that never goes through a proxy named in the
    environment; TLS trusting `ca_file` when given."""
    if ca_file is None:
        return grpc.insecure_channel(address, options=GRPC_CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
    return grpc.secure_channel(address, credentials, options=GRPC_CHANNEL_OPTIONS)


def loopback_http_client(
    base_url: str, ca_file: Path | None = None, timeout: float = 30.0
) -> httpx.Client:
    """An HTTP client for a local teacher that ignores proxies of the environment; TLS trusting
    `ca_file` when given. `timeout` in seconds."""
    verify: ssl.SSLContext | bool = True
    if ca_file is not None:
        verify = ssl.create_default_context(cafile=str(ca_file))
    return httpx.Client(base_url=base_url, timeout=timeout, trust_env=False, verify=verify)


def _ready(http: httpx.Client) -> bool:
    try:
        return http.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False
