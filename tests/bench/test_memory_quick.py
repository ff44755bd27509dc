"""`python -m bench.memory` on a real teacher server for a few seconds: the mix, the sampling and
the numbers of its report."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

# `bench` is not an installed package: import it from the repository root, whichever way pytest
# was started (`python -m pytest` puts the working directory on sys.path, `pytest` does not).
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
memory = importlib.import_module("bench.memory")


def test_mix_covers_every_setting_and_refusal() -> None:
    mix = memory.build_mix(0)
    assert mix == memory.build_mix(0)  # deterministic
    valid = [spec for spec in mix if not spec.refusal]
    assert {s.kind for s in valid} == set(memory.KINDS)
    assert {s.batch_size for s in valid} == set(memory.BATCH_SIZES)
    assert {s.input_dtype for s in valid} == set(memory.INPUT_DTYPES)
    assert {s.options.temperature for s in valid} == set(memory.TEMPERATURES)
    assert {s.options.output for s in valid} == set(memory.OUTPUTS)
    assert {s.options.top_k for s in valid} == set(memory.TOP_KS)
    assert {s.options.output_dtype for s in valid} == set(memory.OUTPUT_DTYPES)
    assert max(s.batch_size for s in valid if s.kind == "http-json") <= 8
    refused = [spec for spec in mix if spec.refusal]
    assert len(refused) == len(mix) // memory.REFUSAL_EVERY
    pairs = {(s.kind, s.refusal) for s in refused}
    assert {r for _, r in pairs} == set(memory.REFUSALS)
    assert {k for k, _ in pairs} == set(memory.KINDS)
    assert ("http-json", "nan-input") not in pairs  # JSON cannot carry a NaN


@pytest.mark.timeout(120)
def test_quick_run(default_repository: Path, tmp_path: Path) -> None:
    out_path = tmp_path / "memory.json"
    result = memory.main(
        [
            "--duration",
            "6",
            "--warmup",
            "2",
            "--repository",
            str(default_repository),
            "--json",
            str(out_path),
        ]
    )
    saved = json.loads(out_path.read_text())
    assert saved["max_ratio"] == result["max_ratio"]
    assert saved["command"].startswith("python -m bench.memory --duration 6")
    assert saved["machine"]["cpu_count"] >= 1

    samples = saved["samples"]
    assert len(samples) > 3
    assert all(s["rss_kib"] > 10_000 for s in samples)  # a torch process: tens of MiB at least
    times = [s["t_s"] for s in samples]
    assert times == sorted(times) and times[-1] <= saved["load_s"] + 1.0

    # Every kind ran, refusals were refused with the expected class, nothing else failed.
    requests = saved["requests"]
    assert saved["unexpected_failures"] == requests["unexpected_failures"] == 0, requests[
        "failures"
    ]
    for kind, counts in requests["by_kind"].items():
        assert counts["ok"] >= 1, kind
        assert counts["failed_unexpected"] == 0, kind
        assert counts["samples"] >= counts["ok"], kind
    assert sum(requests["refusals_by_reason"].values()) >= 1
    assert sum(c["refused_expected"] for c in requests["by_kind"].values()) == sum(
        requests["refusals_by_reason"].values()
    )
    assert samples[-1]["requests"] <= requests["total"]

    # The ratios are those of the samples: baseline = the first at or after the warm-up.
    warmup = saved["plan"]["warmup_s"]
    after = [s["rss_kib"] for s in samples if s["t_s"] >= warmup]
    assert saved["samples_after_warmup"] == len(after) >= 2
    assert saved["baseline_kib"] == after[0]
    assert saved["max_after_warmup_kib"] == max(after)
    assert saved["last_kib"] == after[-1]
    assert saved["max_ratio"] == pytest.approx(max(after) / after[0], abs=1e-4)
    assert saved["last_ratio"] == pytest.approx(after[-1] / after[0], abs=1e-4)
    assert saved["within_target"] == (max(after) / after[0] <= 1.10)
    assert saved["verdict"] == ("within 10%" if saved["within_target"] else "NOT within 10%")
    assert len(saved["series"]) == memory.SERIES_POINTS + 1
    assert saved["teacher_forward"]  # e.g. "64": how the teacher ran merged batches
