"""`python -m bench.request_cost` for a few calls: every door's requests are stamped at every
stage and matched with the client's calls."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
request_cost = importlib.import_module("bench.request_cost")


def test_every_door_is_broken_down(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    request_cost.main(["--calls", "6", "--warmup", "2", "--batch-sizes", "1,4", "--json", str(out)])
    stages = json.loads(out.read_text())["stages_us"]
    assert set(stages) == set(request_cost.DOORS)
    for door, by_size in stages.items():
        assert set(by_size) == {"1", "4"}
        for cells in by_size.values():
            assert cells["requests"] == 6, door  # each call matched its server record
            assert cells["forward"] > 0 and cells["decode"] > 0 and cells["encode"] > 0, door
            assert cells["receive"] > 0 and cells["send"] > 0, door
            assert 0 < cells["server"] < cells["total"], door
            assert all(math.isfinite(v) and v >= 0 for v in cells.values()), (door, cells)
