"""`python -m bench.sequence --quick`: the small sequence teacher trained in seconds, served by a
real teacher process; checks the JSON's structure and that every ratio is a positive finite
number (never a timing threshold: speed lives in docs/performance.md)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

# `bench` is not an installed package: import it from the repository root, whichever way pytest
# was started (`python -m pytest` puts the working directory on sys.path, `pytest` does not).
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sequence = importlib.import_module("bench.sequence")


def positive_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_merge_and_counting_follow_the_engine() -> None:
    # Arrival order, a group closes before it would pass the budget; a larger request runs alone.
    assert sequence.merge_like_batcher([10, 10, 10, 50, 5], 30) == [[0, 1, 2], [3], [4]]
    merged = [sequence.np.array([4, 4, 1, 1])]
    # One padded forward: 4 rows x 4 = 16 padded for 10 real.
    assert sequence.counted_padding(merged, 1 << 40, math.inf) == (10, 16, 1)
    # The engine's cut: no forward of several rows pads past 8%.
    real, padded, forwards = sequence.counted_padding(merged, 1 << 40, 0.08)
    assert (real, padded) == (10, 10) and forwards == 2


@pytest.mark.timeout(300)
def test_quick_run(tmp_path: Path) -> None:
    out_path = tmp_path / "sequence-quick.json"
    result = sequence.main(["--quick", "--json", str(out_path)])
    saved = json.loads(out_path.read_text())
    assert saved["quick"] is True
    assert set(saved) >= {"machine", "model", "throughput", "padding", "wire", "targets"}
    assert saved["model"]["name"] == "pydoc-causal-lm"

    rows = saved["throughput"]["rows"]
    assert [(r["length"], r["batch_size"]) for r in rows] == [
        (length, size) for length in sequence.QUICK_LENGTHS for size in sequence.QUICK_BATCH_SIZES
    ]
    for row in rows:
        assert set(row["cells"]) == {
            "in-process",
            "in-process-single",
            "grpc-stream",
            "http-protobuf",
        }
        assert positive_finite(row["in_process_limit_tokens_per_s"])
        for cell in row["cells"].values():
            assert cell["tokens"] == cell["requests"] * row["tokens_per_request"]
            assert positive_finite(cell["tokens_per_s"])
        assert positive_finite(row["ratio_grpc_stream"])
        assert positive_finite(row["ratio_http_protobuf"])
        assert row["marked"] == (row["tokens_per_request"] >= sequence.MARKED_TOKENS)

    padding = saved["padding"]["rows"]
    assert [r["label"].split(" ")[1] for r in padding] == ["on", "huge,", "off:"]
    for r in padding:
        assert r["padded_tokens"] >= r["real_tokens"] > 0
        assert r["waste"] == pytest.approx(r["padded_tokens"] / r["real_tokens"] - 1, abs=1e-6)
    # Bucketing never pads more than one forward per merged batch does.
    assert padding[0]["waste"] <= padding[2]["waste"]

    wire = saved["wire"]
    by_format = {r["format"]: r["bytes_per_token"] for r in wire["rows"]}
    assert all(positive_finite(v) for v in by_format.values())
    for encoding in ("Tensors:", "PACKED:", "PACKED_LOG_PROB_CODES:"):
        sizes = [
            r["bytes_per_token"]
            for r in wire["rows"]
            if r["format"].startswith("top-") and r["format"].split(" ")[1] == encoding
        ]
        assert sizes and sizes == sorted(sizes)  # a larger k costs more bytes
    # the same k: codes < packed < Tensors
    k = wire["k"]
    same_k = [
        by_format[name] for name in by_format if name.startswith(f"top-{k} ") and "HTTP" not in name
    ]
    assert same_k == sorted(same_k, reverse=True) and len(same_k) == 3
    assert positive_finite(wire["ours_over_dense"]) and wire["ours_over_dense"] < 1
    assert wire["trl_over_codes"] > wire["trl_over_ours"] > wire["trl_over_tensors"] > 0
    effect = wire["code_effect"]
    assert effect["max_abs_log_prob_error"] <= 1 / 32 + 1e-6  # half a step, as documented
    assert 0 <= effect["mean_kl_nats"] <= effect["max_kl_nats"]

    names = [t["name"] for t in saved["targets"]]
    assert "padding waste, budget on" in names
    assert all(isinstance(t["pass"], bool) for t in saved["targets"])
    assert result["wire"]["k"] == wire["k"]
