"""The command lines: every subcommand's --help, and the student's inspection commands against a
real teacher."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("module", "command", "expected"),
    [
        ("teacher_server.cli", "serve", ["--max-batch-size", "--auth-token", "--tls-cert-file"]),
        ("teacher_server.cli", "train-default", ["--out", "--epochs"]),
        ("teacher_server.cli", "package", ["--architecture", "--weights", "--out"]),
        ("student_client.cli", "demo", ["--teacher", "--temperature", "--alpha", "--seeds"]),
        ("student_client.cli", "info", ["--teacher", "--transport", "--token"]),
        ("student_client.cli", "soft-targets", ["--temperature", "--top", "--npy"]),
    ],
)
def test_help_explains_every_option(module: str, command: str, expected: list[str]) -> None:
    completed = _run(module, command, "--help")
    assert completed.returncode == 0, completed.stderr
    for option in expected:
        assert option in completed.stdout


def test_info_and_soft_targets_against_a_teacher(teacher) -> None:  # type: ignore[no-untyped-def]
    info = _run("student_client.cli", "info", "--teacher", teacher.grpc_address)
    assert info.returncode == 0, info.stderr
    assert "task digit: 10 classes" in info.stdout and "hint feature_map" in info.stdout
    for address in (teacher.grpc_address, teacher.http_url):
        shown = _run(
            "student_client.cli",
            "soft-targets",
            "--teacher",
            address,
            "--mnist",
            "2",
            "--temperature",
            "4",
            "--task",
            "digit",
        )
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.count("input ") == 2 and "digit" in shown.stdout
        assert "parity" not in shown.stdout.split("top 3:")[1]
