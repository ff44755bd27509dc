"""`scripts/gpu_check.sh` on a machine without CUDA: the plan of --dry-run, and a real run that
does every step needing no CUDA, then stops with exit code 3 and says why in summary.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "gpu_check.sh"
VENV = Path(sys.executable).parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        check=False,
    )


def test_dry_run_prints_the_plan(tmp_path: Path) -> None:
    done = run("--dry-run", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "index-url https://download.pytorch.org/whl/cu" in done.stdout
    for step in ("check_cuda_engine.py", "bench.throughput --device cuda", "bench.sequence",
                 "bench.request_cost --device cuda"):  # fmt: skip
        assert step in done.stdout
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the stop on a machine without CUDA")
def test_stops_after_the_steps_without_cuda(tmp_path: Path, default_repository: Path) -> None:
    out = tmp_path / "out"
    done = run(
        "--venv", str(VENV), "--skip-install", "--repository", str(default_repository),
        "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    summary = (out / "summary.md").read_text()
    assert "STOPPED" in summary and "sees no CUDA device" in summary
    assert "cuda available False" in summary
    images = np.load(out / "images.npy")
    assert images.shape == (256, 1, 28, 28) and images.dtype == np.float32
    assert not (out / "throughput.json").exists()  # the CUDA steps did not run
