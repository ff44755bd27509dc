"""End to end: the README's main job, shortened (2 epochs, a subset), through a real teacher."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_shortened_quickstart(default_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "quickstart"
    n_train, batch_size = 640, 64
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "student_client.cli",
            "demo",
            "--epochs",
            "2",
            "--n-train",
            str(n_train),
            "--batch-size",
            str(batch_size),
            "--repository",
            str(default_repository),
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
    for row in ("teacher (remote CNN)", "student, hard labels", "student, distilled"):
        assert row in stdout, stdout
    assert "digit acc %" in stdout and "parameters" in stdout
    assert "soft targets at T=4" in stdout
    assert (out / "accuracy.png").stat().st_size > 10_000
    result = json.loads((out / "result.json").read_text())
    expected_batches = -(-n_train // batch_size)
    every_batch_once = {
        "sent": expected_batches,
        "received": expected_batches,
        "yielded": expected_batches,
        "samples": n_train,
        "resent": 0,
        "reconnects": 0,
    }
    assert len(result["loader_batches"]) == 2  # one loader per distilled epoch
    for stats in result["loader_batches"]:
        assert {key: stats[key] for key in every_batch_once} == every_batch_once
    assert result["teacher"]["accuracy"]["digit"] >= 0.95
    for runs in (result["hard"], result["distilled"]):
        assert len(runs) == 1 and len(runs[0]) == 2
        assert 0.25 < runs[0][-1]["accuracy"]["digit"] <= 1.0  # chance is 0.1
