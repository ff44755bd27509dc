"""End to end: `student-client demo-lm`, shortened (1 epoch, a few windows), through a real
sequence teacher (the small recipe of the session's `sequence_repository`)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path


def test_shortened_lm_quickstart(sequence_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "quickstart-lm"
    windows, batch_size = 48, 16
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "student_client.cli",
            "demo-lm",
            "--epochs",
            "1",
            "--max-train-windows",
            str(windows),
            "--batch-size",
            str(batch_size),
            "--dim",
            "32",
            "--top-k",
            "8",
            "--repository",
            str(sequence_repository),
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    stdout = completed.stdout
    for row in ("teacher (remote causal LM)", "student, hard labels", "student, distilled"):
        assert row in stdout, stdout
    assert "held-out perplexity" in stdout and "parameters" in stdout
    assert (out / "perplexity.png").stat().st_size > 10_000
    result = json.loads((out / "result.json").read_text())
    vocab = 512  # the small recipe's tokenizer
    stored = result["teacher"]["stored_held_out_metrics"]["perplexity"]
    # Measured over gRPC from scored ids: the teacher's own held-out figure.
    assert math.isclose(result["teacher"]["perplexity"], stored, rel_tol=1e-3)
    assert result["data"]["train_windows"] == windows
    expected_batches = windows // batch_size
    assert result["loader_batches"] == [
        {**result["loader_batches"][0], "sent": expected_batches, "received": expected_batches}
    ]
    assert result["loader_batches"][0]["yielded"] == expected_batches
    for history in (result["hard"], result["distilled"]):
        assert len(history) == 1
        assert 1.0 < history[0]["perplexity"] < 2 * vocab  # a real, finite figure


def test_teacher_trained_on_first_use(tmp_path: Path) -> None:
    """An empty repository: the demo trains the teacher (small recipe) under its own name, with
    no scratch folder left beside it, then serves it."""
    repository = tmp_path / "repository"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "student_client.cli",
            "demo-lm",
            "--small-teacher",
            "--epochs",
            "1",
            "--max-train-windows",
            "16",
            "--dim",
            "32",
            "--repository",
            str(repository),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert sorted(path.name for path in repository.iterdir()) == ["pydoc-causal-lm"]
    config = json.loads((repository / "pydoc-causal-lm" / "config.json").read_text())
    assert config["name"] == "pydoc-causal-lm"
    assert "student, distilled" in completed.stdout
