"""The teacher as a container, for real: the image is built, `docker compose up` brings up the
teacher, the student and Prometheus, and the operator's day is played through against them.

Run by `make test-container` (`pytest --container tests/container`), which first makes sure a
Docker engine answers (scripts/docker_engine.sh), builds the local base images from Debian's
packages (scripts/local_images.sh) and fills the wheelhouse (scripts/fill_wheelhouse.sh). Compose
is Debian's docker-compose 1.29 with docker/compose.offline.yml over docker-compose.yml: the same
services, built on the local base from the wheelhouse, with Prometheus from Debian's package.

The tests run in file order on one compose project (a fixture of this module): each one is a step
of the day and says what it measured. Everything the project makes (containers, networks,
volumes) is removed at the end, whatever happened; the images stay, as the build cache of the next
run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from student_client import TeacherClient
from student_client.online.retry import NO_RETRY

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ("docker-compose.yml", "docker/compose.offline.yml")
IMAGE = "distill-teacher:local"
MODEL = "mnist-multitask"
PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "grpc_proxy", "no_proxy"}
BUILD_TIMEOUT_S = 1200.0
HEALTHY_TIMEOUT_S = 420.0  # the first start trains the default teacher (30-90 s), within 300 s
STUDENT_TIMEOUT_S = 900.0
SCRAPE_TIMEOUT_S = 120.0  # Prometheus scrapes and refreshes DNS every 15 s
STOP_GRACE_S = 20.0  # docker-compose.yml's stop_grace_period
IN_FLIGHT = 12  # x 1024 images: seconds of work, well within the teacher's 10 s grace
TRAINING_LINE = "training the default teacher"

pytestmark = pytest.mark.timeout(1800)  # a cold build, training and the demo: minutes each


def say(message: str) -> None:
    """A measured figure or a passed check, shown in `make test-container`'s output."""
    print(f"[container] {message}", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _local(url: str) -> urllib.request.OpenerDirector:
    assert urllib.parse.urlsplit(url).hostname == "127.0.0.1", url  # loopback only
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get_json(url: str, timeout: float = 10.0) -> Any:
    with _local(url).open(url, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass
class Stack:
    """One compose project of this repository's compose files."""

    project: str
    env: dict[str, str]
    prometheus_port: int

    def command(self, *args: str) -> list[str]:
        command = ["docker-compose", "--ansi", "never", "-p", self.project]
        for file in COMPOSE_FILES:
            command += ["-f", file]
        return [*command, *args]

    def compose(
        self, *args: str, timeout: float = 300.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        completed = subprocess.run(
            self.command(*args),
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and completed.returncode != 0:
            pytest.fail(
                f"docker-compose {' '.join(args)} exited {completed.returncode}:\n"
                f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}",
                pytrace=False,
            )
        return completed

    def containers(self, service: str, all_states: bool = False) -> list[str]:
        """Container ids of `service`, by replica number (1, 2, ...)."""
        filters = [
            f"label=com.docker.compose.project={self.project}",
            f"label=com.docker.compose.service={service}",
        ]
        command = ["docker", "ps", "-q", "--no-trunc"]
        if all_states:
            command.append("-a")
        for f in filters:
            command += ["--filter", f]
        ids = _docker(*command[1:]).split()
        numbered = sorted(
            (int(_inspect(c, '{{index .Config.Labels "com.docker.compose.container-number"}}')), c)
            for c in ids
        )
        return [c for _, c in numbered]

    def host_address(self, service: str, port: int, index: int = 1) -> str:
        """`127.0.0.1:PORT`: where the host reaches `port` of replica `index` of `service`."""
        out = self.compose("port", "--index", str(index), service, str(port)).stdout.strip()
        host, _, host_port = out.rpartition(":")
        assert host == "127.0.0.1", f"{service}:{port} is published on {out!r}, not loopback only"
        return f"127.0.0.1:{host_port}"

    def logs(self, container: str, since: str | None = None) -> str:
        args = ["logs"] + (["--since", since] if since else []) + [container]
        completed = subprocess.run(
            ["docker", *args], capture_output=True, text=True, timeout=60, check=False
        )
        return completed.stdout + completed.stderr

    def wait_healthy(self, container: str, timeout: float = HEALTHY_TIMEOUT_S) -> float:
        """Seconds until the image's HEALTHCHECK reports `container` healthy."""
        started = time.monotonic()
        while (status := _inspect(container, "{{.State.Health.Status}}")) != "healthy":
            if _inspect(container, "{{.State.Status}}") in ("exited", "dead"):
                pytest.fail(f"{container[:12]} exited:\n{self.logs(container)[-4000:]}")
            if time.monotonic() - started > timeout:
                pytest.fail(
                    f"{container[:12]} still {status} after {timeout:.0f} s:\n"
                    f"{self.logs(container)[-4000:]}"
                )
            time.sleep(1.0)
        return time.monotonic() - started

    def requests_served(self, index: int) -> float:
        """Replica `index`'s own count of answered soft-target requests (its /metrics)."""
        url = f"http://{self.host_address('teacher', 8000, index)}/metrics"
        with _local(url).open(url, timeout=10) as response:
            text = response.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("teacher_requests_total{")
        )


def _docker(*args: str, timeout: float = 120.0) -> str:
    completed = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert completed.returncode == 0, f"docker {' '.join(args)}: {completed.stderr[-2000:]}"
    return completed.stdout


def _inspect(container: str, template: str) -> str:
    return _docker("inspect", "-f", template, container).strip()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: run `make test-container`", pytrace=False)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith("TEACHER_")
        and key.lower() not in PROXY_VARIABLES
        and not key.startswith(("COMPOSE_", "DOCKER_BUILDKIT"))
    }
    prometheus_port = _free_port()
    env["PROMETHEUS_PORT"] = str(prometheus_port)
    stack = Stack(f"distilltest{uuid.uuid4().hex[:8]}", env, prometheus_port)
    try:
        yield stack
    finally:
        # Containers, networks and volumes of this project; `run --rm` containers are gone.
        stack.compose(
            "down", "--volumes", "--remove-orphans", "--timeout", "20", timeout=180, check=False
        )
        left = _docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={stack.project}")
        assert not left.split(), f"containers left behind: {left}"


def test_image_builds_and_runs_as_non_root(stack: Stack) -> None:
    started = time.monotonic()
    stack.compose("build", "teacher", timeout=BUILD_TIMEOUT_S)
    say(f"image built in {time.monotonic() - started:.0f} s (docker-compose build teacher)")
    assert _docker("image", "inspect", "-f", "{{.Config.User}}", IMAGE).strip() == "10001:10001"
    uid = _docker("run", "--rm", "--entrypoint", "id", IMAGE, "-u").strip()
    assert uid == "10001", f"the image runs as uid {uid}"
    size = int(_docker("image", "inspect", "-f", "{{.Size}}", IMAGE))
    say(f"image {IMAGE}: {size / 1e6:.0f} MB, runs as uid {uid}")
    config = stack.compose("config").stdout  # both files valid, merged as compose reads them
    assert "image: distill-prometheus:debian" in config, config
    assert re.search(r"PIP_OFFLINE: ['\"]?true", config), config


def test_compose_up_trains_the_teacher_and_turns_healthy(stack: Stack) -> None:
    started = time.monotonic()
    stack.compose("up", "-d", "--no-build", timeout=600)
    (teacher,) = stack.containers("teacher")
    stack.wait_healthy(teacher)
    say(f"teacher healthy {time.monotonic() - started:.0f} s after `docker-compose up -d`")
    assert TRAINING_LINE in stack.logs(teacher), "an empty volume must get the default teacher"


def test_student_distils_and_beats_hard_labels(stack: Stack) -> None:
    (student,) = stack.containers("student", all_states=True)
    started = time.monotonic()
    exit_code = int(_docker("wait", student, timeout=STUDENT_TIMEOUT_S).strip())
    log = stack.logs(student)
    assert exit_code == 0, f"the student exited {exit_code}:\n{log[-4000:]}"
    assert "Using the teacher at dns:///teacher:50051" in log, log[-4000:]
    accuracy = {}
    for row in ("student, hard labels", "student, distilled"):
        match = re.search(rf"^{re.escape(row)}\s*\|[^|]*\|\s*([\d.]+)", log, re.MULTILINE)
        assert match, f"no {row!r} row in the student's table:\n{log[-3000:]}"
        accuracy[row] = float(match.group(1))
    say(
        f"student demo exited 0 ({time.monotonic() - started:.0f} s more after healthy): digit "
        f"accuracy {accuracy['student, hard labels']} % hard labels, "
        f"{accuracy['student, distilled']} % distilled"
    )
    assert accuracy["student, distilled"] > accuracy["student, hard labels"], log[-3000:]


def test_prometheus_scrapes_the_teacher(stack: Stack) -> None:
    base = f"http://127.0.0.1:{stack.prometheus_port}"
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while True:
        with contextlib.suppress(OSError, ValueError):
            targets = _get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
            teacher = [t for t in targets if t["labels"].get("job") == "teacher"]
            query = urllib.parse.quote("sum(teacher_requests_total)")
            result = _get_json(f"{base}/api/v1/query?query={query}")["data"]["result"]
            requests = float(result[0]["value"][1]) if result else 0.0
            if teacher and all(t["health"] == "up" for t in teacher) and requests > 0:
                break
        if time.monotonic() > deadline:
            pytest.fail(f"Prometheus has no healthy teacher target with requests: {targets}")
        time.sleep(2.0)
    say(
        f"Prometheus: {len(teacher)} teacher target(s) up, "
        f"sum(teacher_requests_total) = {requests:.0f}"
    )


def test_curl_from_the_host_gets_soft_targets(stack: Stack) -> None:
    address = stack.host_address("teacher", 8000)
    body = json.dumps(
        {"inputs": [[0.5] * 784, [0.0] * 784], "shape": [2, 1, 28, 28], "temperature": 4}
    )
    completed = subprocess.run(
        [
            "curl", "-sS", "--fail-with-body", "--noproxy", "*", "-X", "POST",
            f"http://{address}/v1/models/{MODEL}/soft-targets",
            "-H", "content-type: application/json", "-d", body,
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    answer = json.loads(completed.stdout)
    assert answer["model"] == MODEL and answer["temperature"] == 4.0
    assert set(answer["outputs"]) == {"digit", "parity", "loops"}
    for task, output in answer["outputs"].items():
        values = np.array(output["values"])
        assert values.shape[0] == 2, task
        np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-5)
    say(f"curl from the host to {address}: soft targets of 2 samples at T=4 for 3 tasks")


def test_two_replicas_both_serve_the_student(stack: Stack) -> None:
    stack.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "teacher=2", "teacher")
    replicas = stack.containers("teacher")
    assert len(replicas) == 2
    for replica in replicas:
        stack.wait_healthy(replica)
    assert TRAINING_LINE not in stack.logs(replicas[1]), "replica 2 must load the trained model"
    before = [stack.requests_served(i) for i in (1, 2)]
    student = stack.compose(
        "run", "--rm", "--no-deps", "-T", "student",
        "demo", "--teacher", "dns:///teacher:50051", "--streams", "4", "--no-progress",
        "--epochs", "1", "--n-train", "1024", "--out", "/tmp/runs",
        timeout=STUDENT_TIMEOUT_S,
    )  # fmt: skip
    assert "student, distilled" in student.stdout, student.stdout[-3000:]
    after = [stack.requests_served(i) for i in (1, 2)]
    served = [a - b for a, b in zip(after, before, strict=True)]
    say(f"--scale teacher=2: requests answered per replica during one student run: {served}")
    assert all(count > 0 for count in served), served


def test_sigterm_answers_in_flight_requests_and_exits_zero(stack: Stack) -> None:
    replicas = stack.containers("teacher")
    address = stack.host_address("teacher", 50051, 1)
    inputs = np.random.default_rng(0).random((1024, 1, 28, 28), dtype=np.float32)
    stop_sent = threading.Event()
    answered_after_stop = []

    def ask(client: TeacherClient) -> int:
        targets = client.soft_targets(inputs, temperature=4.0)
        if stop_sent.is_set():
            answered_after_stop.append(time.monotonic())
        return int(targets.tensor("digit").shape[0])

    stop: subprocess.Popen[bytes] | None = None
    with TeacherClient(address, retry=NO_RETRY) as client:
        client.wait_ready(30)
        # All sent at once (a thread each): a request sent after the stop would be refused, as
        # it should be.
        try:
            with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
                futures = [pool.submit(ask, client) for _ in range(IN_FLIGHT)]
                time.sleep(0.3)  # sent: the server is working through them
                started = time.monotonic()
                stop_sent.set()
                stop = subprocess.Popen(
                    stack.command("stop", "--timeout", str(int(STOP_GRACE_S)), "teacher"),
                    cwd=REPO,
                    env=stack.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                rows = [future.result(timeout=120) for future in futures]
        finally:
            if stop is not None:
                stop.wait(timeout=120)
    assert stop is not None and stop.returncode == 0
    took = time.monotonic() - started
    assert rows == [1024] * len(futures), "every request in flight gets its whole answer"
    assert answered_after_stop, "the requests were all answered before the stop: nothing tested"
    for replica in replicas:
        assert _inspect(replica, "{{.State.ExitCode}}") == "0", stack.logs(replica)[-3000:]
        assert "teacher stopped" in stack.logs(replica)
    assert took < STOP_GRACE_S, f"stopping took {took:.1f} s, past the grace period"
    say(
        f"SIGTERM: {len(answered_after_stop)} of {len(futures)} requests answered after the stop "
        f"was sent; both replicas exited 0 in {took:.1f} s"
    )


def test_restart_reuses_the_trained_model(stack: Stack) -> None:
    since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    started = time.monotonic()
    stack.compose("up", "-d", "--no-build", "--scale", "teacher=1", "teacher")
    (teacher,) = stack.containers("teacher")
    stack.wait_healthy(teacher)
    log = stack.logs(teacher, since=since)
    assert "teacher serving" in log, log[-3000:]
    assert TRAINING_LINE not in log, f"the restarted teacher trained again:\n{log[-3000:]}"
    say(f"restarted teacher healthy in {time.monotonic() - started:.0f} s, no retraining")
