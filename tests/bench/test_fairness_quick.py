"""`python -m bench.fairness --quick` on the session's default teacher: the light client alone and
beside one heavy student, on a FIFO teacher and a fair one; every figure is there, every client
was answered without an error. No timing is asserted (that is the benchmark's job)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
fairness = importlib.import_module("bench.fairness")


def test_quick_fairness_run_reports_every_cell(default_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "fairness.json"
    fairness.main(["--quick", "--repository", str(default_repository), "--json", str(out)])
    report = json.loads(out.read_text())
    assert set(report["alone"]) == {"fifo", "fair"}
    for alone in report["alone"].values():
        assert alone["light_requests"] >= 3 and alone["error_count"] == 0
    cells = report["cells"]
    assert [(c["mode"], c["heavy"], c["depth"]) for c in cells] == [
        ("fifo", 1, 16),
        ("fair", 1, 16),
    ]
    for cell in cells:
        assert cell["error_count"] == 0, cell["errors"]
        assert cell["light_requests"] >= 3 and cell["light_censored"] == 0
        assert cell["heavy_rows"] > 0 and cell["samples_per_s"] > 0
        for key in ("light_p50_ms", "light_p99_ms", "full_forward_ms", "throughput_over_fifo"):
            assert math.isfinite(cell[key]) and cell[key] > 0, (key, cell)
