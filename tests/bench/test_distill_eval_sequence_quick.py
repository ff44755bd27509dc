"""`python -m bench.distill_eval --sequence --quick`: the LM rows' mechanics on the small sequence
teacher (a real teacher server process), and the offline run from an export with the teacher
stopped."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
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


def test_rows_alpha_and_kd_sweep_plan() -> None:
    assert sequence.RunConfig("forward", alpha=1.0).key == "d64/fwd-top32/T1/a1"
    assert sequence.RunConfig("hard", alpha=1.0).key == "d64/hard"  # alpha: the KD rows only
    plan = sequence.full_plan([1, 2, 3], 12, 1.0, 64, 0.8, ["hard", "top32", "dense", "top16"])
    assert [c.key for c in plan] == [
        "d64/hard",
        "d64/fwd-top32/T1/a0.8",
        "d64/fwd-dense/T1/a0.8",
        "d64/fwd-top16/T1/a0.8",
    ]
    assert {c.epochs for c in plan} == {12}
    with pytest.raises(ValueError, match=r"--rows.*'top'"):
        sequence.full_plan([0], 4, 1.0, 64, rows=["hard", "top"])
    sweep = sequence.kd_sweep_plan(8, 1.0, 0.5, 64, [1.0, 0.5], [0.5, 1.0], ["hard", "top32"])
    # T moves with alpha fixed, then alpha with T fixed; (T 1, alpha 0.5) only once.
    assert [c.key for c in sweep] == [
        "d64/hard",
        "d64/fwd-top32/T1",
        "d64/fwd-top32/T0.5",
        "d64/fwd-top32/T1/a1",
    ]
    assert sequence.floats("0.5, 1") == [0.5, 1.0]
    with pytest.raises(ValueError, match="numbers, got 'x'"):
        sequence.floats("x")


def test_checks_unpaired_and_paired() -> None:
    """Hand-computed: hard 300/310/320 (std 10), top-32 280/292/298 (std 9.165); unpaired margin
    20 < 2 x 10; per seed 20, 18, 22: mean 20 > 2 x std 2."""
    hard = {"seeds": [1, 2, 3], "perplexity": [300.0, 310.0, 320.0]}
    top32 = {"seeds": [1, 2, 3], "perplexity": [280.0, 292.0, 298.0]}
    dense = {"seeds": [1, 2, 3], "perplexity": [278.0, 290.0, 296.0]}
    runs = {}
    for config, rows in (
        (sequence.RunConfig("hard"), hard),
        (sequence.RunConfig("forward", 32, alpha=0.8), top32),
        (sequence.RunConfig("forward", 0, alpha=0.8), dense),
    ):
        for seed, value in zip(rows["seeds"], rows["perplexity"], strict=True):
            runs[f"{config.key}/s{seed}"] = {
                "config": dataclasses.asdict(config),
                "seed": seed,
                "perplexity": value,
                "parameters": 1,
                "seconds": 1.0,
            }
    result = sequence.checks(sequence.summarize(runs), 64, 1.0, 0.8)
    unpaired = result["distilled_beats_hard"]
    assert unpaired["margin"] == pytest.approx(20.0)
    assert unpaired["two_std"] == pytest.approx(20.0)
    assert unpaired["holds"] is False  # 20 is not more than 20
    paired = result["distilled_beats_hard_paired"]
    assert paired["differences"] == pytest.approx([20.0, 18.0, 22.0])
    assert paired["mean"] == pytest.approx(20.0) and paired["std"] == pytest.approx(2.0)
    assert paired["holds"] is True
    within = result["top32_within_1pct_of_dense"]
    assert within["relative"] == pytest.approx((290.0 - 288.0) / 288.0)
    assert within["holds"] is True
    table = sequence.check_lines(result)
    assert table[-2].endswith("mean 20.0, 2 std 4.0 | yes |")
    assert table[-1] == "| top-32 within 1 % of dense | 290.0 vs 288.0: +0.69 % | yes |"

    # After an earlier epoch: the curves' values; runs that did not evaluate then are left out.
    for run in runs.values():
        run["config"]["epochs"] = 4
        run["perplexity_per_epoch"] = [None, 2 * run["perplexity"], None, run["perplexity"]]
    runs["d64/hard/s9"] = dict(runs["d64/hard/s1"], seed=9, perplexity_per_epoch=[None, None])
    at_two = sequence.summarize(runs, epoch=2)
    assert at_two["d64/hard"]["perplexity"] == [600.0, 620.0, 640.0]
    assert at_two["d64/hard"]["seeds"] == [1, 2, 3] and at_two["d64/hard"]["epoch"] == 2
    assert sequence.summarize(runs, epoch=1) == {}


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


def test_target_store_top_mass() -> None:
    """Windows of 3 and 2 ids predict 2 + 1 tokens; tails 0.5, 0.25 and 0 leave top-k masses
    0.5, 0.75, 1: mean 0.75, quartiles 0.625 / 0.75 / 0.875, two of three under 0.9."""
    from student_client.training.text_data import Windows
    from student_client.types import SoftTargets, TaskTargets

    windows = Windows(np.zeros((2, 3), dtype=np.int64), np.array([3, 2]))

    def answer(tails: list[float]) -> SoftTargets:
        rows = len(tails)
        task = TaskTargets(
            "next_token",
            "log_probs",
            np.zeros((rows, 2), dtype=np.float16),
            np.zeros((rows, 2), dtype=np.int64),
            np.array(tails, dtype=np.float32),
            level="token",
        )
        return SoftTargets("m", "1", "", 1.0, {"next_token": task}, lengths=np.array([rows]))

    store = sequence.TargetStore(windows, [answer([0.5, 0.25]), answer([0.0])], 0.0)
    assert store.top_mass() == pytest.approx(
        {"mean": 0.75, "p25": 0.625, "median": 0.75, "p75": 0.875, "share_below_0.9": 2 / 3}
    )
    dense = TaskTargets("next_token", "log_probs", np.zeros((3, 4), dtype=np.float16))
    dense_answer = SoftTargets("m", "1", "", 1.0, {"next_token": dense}, lengths=np.array([2, 1]))
    assert sequence.TargetStore(windows, [dense_answer], 0.0).top_mass() is None
