"""The examples run end to end against a real teacher (shortened)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_hint_distillation_example(teacher) -> None:  # type: ignore[no-untyped-def]
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "hint_distillation.py"),
            "--teacher",
            teacher.grpc_address,
            "--epochs",
            "1",
            "--seeds",
            "1",
            "--n-train",
            "256",
            "--hidden",
            "64",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "KD only" in completed.stdout and "KD + hint" in completed.stdout
    assert "digit" in completed.stdout
