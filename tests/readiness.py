"""Polling a starting teacher server until both doors answer: shared by the test conftests.

`check(stage)` is called before every poll; it fails the test (with the server's output) when the
process exited or the start-up deadline passed, naming the stage it was waiting for.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

Check = Callable[[str], None]


def wait_for_ports(port_file: Path, check: Check, poll_s: float) -> dict[str, int]:
    """The `{grpc_port, http_port, ...}` the server writes (atomically) once it listens."""
    while True:
        check("waiting for the port file")
        if port_file.is_file():
            with contextlib.suppress(ValueError):  # written atomically, but be tolerant
                ports: dict[str, int] = json.loads(port_file.read_text())
                return ports
        time.sleep(poll_s)


def wait_for_doors(channel: grpc.Channel, http: httpx.Client, check: Check, poll_s: float) -> None:
    """Until gRPC health says SERVING, then until `GET /readyz` is 200."""
    health = health_pb2_grpc.HealthStub(channel)
    while True:
        check("waiting for gRPC health SERVING")
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        time.sleep(poll_s)
    while True:
        check("waiting for GET /readyz 200")
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
