"""`python -m bench.distill_eval --sequence --quick`: the LM rows' mechanics on the small sequence
teacher (a real teacher server process), and the offline run from an export with the teacher
stopped."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
distill_eval = importlib.import_module("bench.distill_eval")
sequence = importlib.import_module("bench.distill_eval.sequence")


def test_run_keys() -> None:
    config = sequence.RunConfig("forward", top_k=0, temperature=2.0, dim=32)
    assert config.key == "d32/fwd-dense/T2"
    assert sequence.RunConfig("reverse", top_k=8).key == "d64/rev-m8/T1"
    assert sequence.RunConfig("hard", source="online").key == "d64/hard/online"
    plan = sequence.full_plan([0, 1, 2], 8, 1.0, 64)
    assert [c.key for c in plan] == [
        "d64/hard",
        "d64/fwd-top32/T1",
        "d64/fwd-dense/T1",
        "d64/fwd-top8/T1",
        "d64/fwd-top128/T1",
        "d64/rev-m32/T1",
    ]


@pytest.mark.timeout(420)
def test_sequence_quick_run(sequence_repository: Path, tmp_path: Path) -> None:
    out_path = tmp_path / "sequence-quick.json"
    result = distill_eval.main(
        [
            "--sequence",
            "--quick",
            "--repository",
            str(sequence_repository),
            "--json",
            str(out_path),
        ]
    )
    saved = json.loads(out_path.read_text())
    assert saved["mode"] == result["mode"] == "sequence-quick"
    failed = {name: check for name, check in saved["checks"].items() if not check["holds"]}
    assert not failed, json.dumps(failed, indent=2)
    assert set(saved["checks"]) == {
        "loss_decreases",
        "loader_batches_once",
        "offline_equals_online",
    }

    runs = saved["runs"]
    assert set(runs) == {
        "d64/hard/s0",
        "d64/fwd-top8/T1/s0",
        "d64/fwd-top32/T1/s0",
        "d64/fwd-dense/T1/s0",
        "d64/rev-m8/T1/s0",
        "d64/fwd-top32/T1/online/s0",
    }
    assert saved["data"]["train_windows"] == sequence.QUICK_WINDOWS
    vocab = 512  # the small recipe's tokenizer
    for run in runs.values():
        assert len(run["loss_per_epoch"]) == 2
        assert 1.0 < run["perplexity"] < vocab  # better than uniform after 2 short epochs
    # Reverse KL and the online run went through TokenTargetLoader every epoch, once per batch.
    batches = math.ceil(sequence.QUICK_WINDOWS / sequence.BATCH_SIZE)
    for name in ("d64/rev-m8/T1/s0", "d64/fwd-top32/T1/online/s0"):
        assert [p["yielded"] for p in runs[name]["loader"]] == [batches, batches]

    offline = saved["offline"]
    assert offline["teacher_process_running"] is False  # trained with no teacher at all
    assert [p["yielded"] for p in offline["offline"]["loader"]] == [batches, batches]
    assert offline["export_bytes"] > 0 and offline["bytes_per_token"] > 0
    assert offline["relative_difference"] <= 1e-3
    assert math.isclose(
        offline["offline"]["perplexity"], offline["online_perplexity"], rel_tol=1e-3
    )
