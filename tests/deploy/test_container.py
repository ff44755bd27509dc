"""The container files, checked without a Docker engine (`make test` needs none):

- docker-compose.yml, parsed as YAML (its `${VAR:-default}` variables at their defaults), is
  checked against the teacher's settings and the Dockerfile.
- The Dockerfile's ENTRYPOINT + CMD, its HEALTHCHECK and the compose student's command run as
  plain processes from this virtual environment, with the compose teacher's environment, on
  127.0.0.1 with free ports instead of the container's fixed ones.

The image itself, `docker compose config` and `docker compose up` are tested for real by
tests/container/ (`make test-container`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from teacher_server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_FILE = REPO / "docker-compose.yml"
PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "grpc_proxy"}
START_TIMEOUT_S = 60.0
HEALTHY_TIMEOUT_S = 30.0
STUDENT_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
POLL_S = 0.1


# ---------------------------------------------------------------------------------------------
# docker-compose.yml

_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _load_yaml(text: str, documents: bool = False) -> Any:
    """Parse YAML (a list of its documents if `documents`), with `${VAR:-default}` variables at
    their defaults, as Compose reads them with no such variable set."""
    text = _VARIABLE.sub(lambda match: match.group(2) or "", text)
    return list(yaml.safe_load_all(text)) if documents else yaml.safe_load(text)


def _clean_env() -> dict[str, str]:
    """This environment without TEACHER_* settings (they would leak into the compose file's
    pass-through variables and into the processes) and without proxies (all traffic is local)."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith("TEACHER_") and key.lower() not in PROXY_VARIABLES
    }


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml, parsed."""
    config = _load_yaml(COMPOSE_FILE.read_text())
    assert isinstance(config, dict)
    return config


def _setting_variables() -> set[str]:
    return {f"TEACHER_{name.upper()}" for name in Settings.model_fields}


def _published_ports(service: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(container port, host port or None) per published port, for Compose 1.x's short strings
    (`127.0.0.1::8000/tcp`) and the long mappings of newer versions."""
    ports = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            published = entry.get("published")
            ports.append((str(entry["target"]), str(published) if published else None))
        else:
            parts = str(entry).split("/")[0].rsplit(":", 2)
            target = parts[-1]
            host = parts[-2] if len(parts) >= 2 and parts[-2] else None
            ports.append((target, host))
    return ports


def _volume_target(entry: str | dict[str, Any]) -> tuple[str, str]:
    if isinstance(entry, dict):
        return str(entry.get("source")), str(entry["target"])
    source, target = str(entry).split(":")[:2]
    return source, target


def test_compose_services_healthcheck_restart_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"teacher", "student", "prometheus"}
    teacher = services["teacher"]
    assert teacher["restart"] == "unless-stopped"
    assert ("models", "/models") in [_volume_target(v) for v in teacher["volumes"]]
    assert "models" in compose["volumes"]
    # The compose healthcheck is the image's, so both agree on what "healthy" means.
    healthcheck = teacher["healthcheck"]
    assert healthcheck["test"] == ["CMD", *dockerfile_healthcheck()[1]]
    assert healthcheck.get("start_period"), "the first start trains the default teacher (~30 s)"
    # Scalable: Docker picks the host ports, so `--scale teacher=N` cannot collide.
    ports = _published_ports(teacher)
    assert sorted(target for target, _ in ports) == ["50051", "8000"]
    assert all(host is None or "-" in host for _, host in ports), ports

    student = services["student"]
    assert student["entrypoint"] == ["student-client"]
    assert student["command"][:1] == ["demo"] and "dns:///teacher:50051" in student["command"]
    assert student["depends_on"]["teacher"]["condition"] == "service_healthy"
    assert student["restart"] == "no"
    assert student["image"] == teacher["image"]


def test_compose_teacher_environment_is_every_setting_at_its_default(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    environment: dict[str, str | None] = compose["services"]["teacher"]["environment"]
    names = {key for key in environment if key.startswith("TEACHER_")}
    expected = _setting_variables()
    assert not expected - names, f"settings missing from the compose teacher: {expected - names}"
    assert not names - expected, f"compose sets variables that are no setting: {names - expected}"
    # The values parse as settings, and are the defaults except where a container differs.
    for key in os.environ:
        if key.upper().startswith("TEACHER_"):
            monkeypatch.delenv(key)
    for key, value in environment.items():
        if value is not None:  # None: passed through from the shell, unset when not there
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.host == "0.0.0.0"
    assert settings.model_repository == Path("/models")
    for name, field in Settings.model_fields.items():
        if name not in ("host", "model_repository"):
            assert getattr(settings, name) == field.default, name


def test_compose_prometheus_scrapes_every_teacher_replica(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    assert str(prometheus["image"]).startswith("prom/prometheus")
    mounts = [_volume_target(v) for v in prometheus["volumes"]]
    sources = [source for source, target in mounts if target == "/etc/prometheus/prometheus.yml"]
    assert sources and (REPO / sources[0]).resolve() == REPO / "docker" / "prometheus.yml", mounts
    config = _load_yaml((REPO / sources[0]).read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "teacher"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    http_port = compose["services"]["teacher"]["environment"]["TEACHER_HTTP_PORT"]
    assert sd["names"] == ["teacher"] and sd["type"] == "A" and str(sd["port"]) == http_port


def test_kubernetes_example_parses() -> None:
    """docs/deploy/kubernetes.yaml: a Deployment and the two Services select the same pods and
    the probes ask the teacher's health routes."""
    manifest = (REPO / "docs" / "deploy" / "kubernetes.yaml").read_text()
    documents = _load_yaml(manifest, documents=True)
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    assert set(kinds) == {
        ("Deployment", "teacher"),
        ("Service", "teacher-grpc"),
        ("Service", "teacher-http"),
    }
    deployment = kinds["Deployment", "teacher"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert deployment["spec"]["replicas"] == 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {v["mountPath"] for v in container["volumeMounts"]} >= {"/models"}
    grpc_service, http_service = kinds["Service", "teacher-grpc"], kinds["Service", "teacher-http"]
    assert grpc_service["spec"]["clusterIP"] == "None"  # headless: one DNS record per pod
    assert "clusterIP" not in http_service["spec"]
    for service in (grpc_service, http_service):
        assert service["spec"]["selector"] == labels


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
def test_kubernetes_example_matches_the_kubernetes_schemas(version: str) -> None:
    """Strict validation (unknown fields refused) against Kubernetes' own OpenAPI schemas, bundled
    with the kubernetes-validate package (offline). A misspelt field fails, so the check bites."""
    documents = _load_yaml((REPO / "docs" / "deploy" / "kubernetes.yaml").read_text(), True)
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, version, strict=True)


# ---------------------------------------------------------------------------------------------
# The Dockerfile


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, arguments = current.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _exec_form(keyword: str) -> list[str]:
    values = [arguments for name, arguments in _final_stage() if name == keyword]
    assert values, f"the Dockerfile's final stage has no {keyword}"
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), values[-1]
    return parsed


def dockerfile_healthcheck() -> tuple[str, list[str]]:
    """The final stage's HEALTHCHECK: (its options, its CMD in exec form)."""
    values = [arguments for name, arguments in _final_stage() if name == "HEALTHCHECK"]
    assert values, "the Dockerfile's final stage has no HEALTHCHECK"
    options, separator, command = values[-1].partition(" CMD ")
    assert separator, values[-1]
    return options, json.loads(command)


def test_dockerfile_runtime_stage() -> None:
    stage = _final_stage()
    assert _exec_form("ENTRYPOINT") == ["teacher-server"]
    assert _exec_form("CMD") == ["serve"]
    env: dict[str, str] = {}
    for name, arguments in stage:
        if name == "ENV":
            env.update(part.split("=", 1) for part in shlex.split(arguments))  # type: ignore[misc]
    assert env["TEACHER_HOST"] == "0.0.0.0"
    assert env["TEACHER_MODEL_REPOSITORY"] == "/models"
    assert ("VOLUME", "/models") in stage
    assert ("USER", "10001:10001") in stage
    assert ("EXPOSE", "50051 8000") in stage
    options, command = dockerfile_healthcheck()
    start_period = re.search(r"--start-period=(\d+)s", options)
    assert start_period and int(start_period.group(1)) >= 60, options
    assert command[0] == "python" and "/readyz" in command[-1]


def test_docker_build_context_holds_every_package() -> None:
    """Each package pyproject.toml installs is copied into the builder and not docker-ignored."""
    include = re.search(r"include\s*=\s*\[([^\]]*)\]", (REPO / "pyproject.toml").read_text())
    assert include
    packages = [p.strip().strip("\"'").rstrip("*") for p in include.group(1).split(",")]
    copies = [arguments.split()[0] for name, arguments in _instructions() if name == "COPY"]
    allowed = (REPO / ".dockerignore").read_text().split()
    for package in filter(None, packages):
        assert package in copies, f"the Dockerfile does not COPY {package}"
        assert f"!{package}/" in allowed, f".dockerignore leaves {package}/ out"
    for needed in ("pyproject.toml", "README.md", "constraints.txt"):
        assert f"!{needed}" in allowed


# ---------------------------------------------------------------------------------------------
# The container's commands as processes


def _console_script(name: str) -> Path:
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{path} missing: install the project into this environment (make test)"
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_entrypoint_healthcheck_and_student_as_processes(
    compose: dict[str, Any], default_repository: Path, tmp_path: Path
) -> None:
    services = compose["services"]
    entrypoint, command = _exec_form("ENTRYPOINT"), _exec_form("CMD")
    port_file = tmp_path / "ports.json"
    teacher_env = _clean_env()
    teacher_env.update(
        {k: v for k, v in services["teacher"]["environment"].items() if v is not None}
    )
    teacher_env.update(
        TEACHER_HOST="127.0.0.1",
        TEACHER_GRPC_PORT="0",
        TEACHER_HTTP_PORT="0",
        TEACHER_PORT_FILE=str(port_file),
        TEACHER_MODEL_REPOSITORY=str(default_repository),
    )
    log_path = tmp_path / "teacher.log"
    with log_path.open("wb") as log:
        teacher = subprocess.Popen(
            [str(_console_script(entrypoint[0])), *entrypoint[1:], *command],
            env=teacher_env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def fail(why: str) -> None:
        pytest.fail(f"{why}\n--- teacher output ---\n{log_path.read_text()[-4000:]}")

    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.is_file():
            if teacher.poll() is not None:
                fail(f"teacher-server serve exited with {teacher.returncode}")
            if time.monotonic() > deadline:
                fail(f"no port file within {START_TIMEOUT_S:.0f} s")
            time.sleep(POLL_S)
        ports = json.loads(port_file.read_text())

        # The HEALTHCHECK, run as the container runs it (its `python` is the venv's).
        _, probe = dockerfile_healthcheck()
        probe = [sys.executable if probe[0] == "python" else probe[0], *probe[1:]]

        def healthcheck(http_port: int) -> subprocess.CompletedProcess[str]:
            env = {**teacher_env, "TEACHER_HTTP_PORT": str(http_port)}
            return subprocess.run(
                probe, env=env, capture_output=True, text=True, timeout=15, check=False
            )

        refused = healthcheck(_free_port())
        assert refused.returncode == 1, "the healthcheck passed with no server listening"
        deadline = time.monotonic() + HEALTHY_TIMEOUT_S
        while (result := healthcheck(ports["http_port"])).returncode != 0:
            if teacher.poll() is not None or time.monotonic() > deadline:
                fail(f"healthcheck never passed; last:\n{result.stderr}")
            time.sleep(POLL_S)

        # The compose student's command, against this teacher, shortened.
        student = services["student"]
        args = [
            f"127.0.0.1:{ports['grpc_port']}" if arg == "dns:///teacher:50051" else arg
            for arg in student["command"]
        ]
        student_entry = student["entrypoint"]
        short_run = ["--epochs", "1", "--n-train", "256", "--out", str(tmp_path / "runs")]
        completed = subprocess.run(
            [str(_console_script(student_entry[0])), *student_entry[1:], *args, *short_run],
            env=_clean_env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=STUDENT_TIMEOUT_S,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr[-4000:]
        assert f"Using the teacher at 127.0.0.1:{ports['grpc_port']}" in completed.stdout
        for row in ("teacher (remote CNN)", "student, hard labels", "student, distilled"):
            assert row in completed.stdout, completed.stdout

        # `docker stop`: SIGTERM, and a clean exit well within the compose stop_grace_period.
        teacher.send_signal(signal.SIGTERM)
        try:
            returncode = teacher.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            fail(f"teacher still running {STOP_TIMEOUT_S:.0f} s after SIGTERM")
        assert returncode == 0, log_path.read_text()[-4000:]
    finally:
        if teacher.poll() is None:
            teacher.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                teacher.wait(timeout=STOP_TIMEOUT_S)
