"""Start a teacher server as a separate local process and wait until it is healthy.

Used by the quickstart (`student-client demo`) and the end-to-end tests. The teacher is started
through its command line (`python -m teacher_server.cli serve`), on 127.0.0.1 with ports chosen by
the OS; readiness is the gRPC health service reporting SERVING, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class TeacherStartError(RuntimeError):
    pass


class TeacherProcess:
    """A running teacher: `grpc_address` (`127.0.0.1:PORT`), `http_url`, `process`.
    Use as a context manager; `stop()` sends SIGTERM and waits."""

    def __init__(
        self,
        repository: Path,
        extra_args: list[str] | None = None,
        log: IO[bytes] | int | None = None,
        start_timeout: float = 600.0,
    ) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="teacher-")
        port_file = Path(self._workdir.name) / "ports.json"
        command = [
            sys.executable,
            "-m",
            "teacher_server.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--model-repository",
            str(repository),
            "--port-file",
            str(port_file),
            *(extra_args or []),
        ]
        self.process = subprocess.Popen(command, stdout=log, stderr=log, env=os.environ.copy())
        try:
            ports = self._wait_for_port_file(port_file, start_timeout)
            self.grpc_address = f"127.0.0.1:{ports['grpc_port']}"
            self.http_url = f"http://127.0.0.1:{ports['http_port']}"
            self._wait_serving(start_timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_for_port_file(self, port_file: Path, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TeacherStartError(
                    f"teacher exited with code {self.process.returncode} during start-up"
                )
            if port_file.exists():
                return json.loads(port_file.read_text())
            time.sleep(0.05)
        raise TeacherStartError(f"teacher did not start within {timeout:.0f}s")

    def _wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.grpc_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TeacherStartError(f"teacher at {self.grpc_address} not SERVING within {timeout:.0f}s")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait (kill after `timeout`). Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._workdir.cleanup()
        return int(self.process.returncode)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> TeacherProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
