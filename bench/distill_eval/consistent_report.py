"""Tables and the issue's checks for the consistent-augmentation rows (`consistent.py`)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from bench.distill_eval.consistent import Check, ConsistentPlan


def by_key(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        out.setdefault(record["key"], []).append(record)
    return out


def stats(values: Sequence[float]) -> dict[str, float]:
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def digit(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    return stats([r["accuracy"]["digit"] for r in runs])


def checks(
    plan: ConsistentPlan, records: Sequence[dict[str, Any]], teacher_digit: float
) -> dict[str, Any]:
    """The issue's checks per `plan.checks` entry with records (the first: the recommended
    setting), on digit accuracy; "2 std" is twice the larger sample std of the two runs compared,
    as in check (1) of the suite."""
    runs = by_key(records)
    out: dict[str, Any] = {}
    for check in plan.checks:
        if not all(row.key in runs for row in check.rows):
            continue
        out[check.distilled.key] = compare(runs, check, teacher_digit)
    return out


def compare(
    runs: dict[str, list[dict[str, Any]]], check: Check, teacher_digit: float
) -> dict[str, Any]:
    rec = digit(runs[check.distilled.key])
    hard = digit(runs[check.hard.key])
    out: dict[str, Any] = {"seeds": rec["n"]}
    gap = teacher_digit - hard["mean"]
    closed = (rec["mean"] - hard["mean"]) / gap if gap > 0 else float("nan")
    margin = rec["mean"] - hard["mean"]
    two_std = 2 * max(rec["std"], hard["std"])
    out["gap_closed"] = {
        "distilled_row": check.distilled.key,
        "hard_row": check.hard.key,
        "teacher": teacher_digit,
        "distilled": rec,
        "hard_labels": hard,
        "fraction_closed": closed,
        "margin": margin,
        "two_std": two_std,
        "holds": bool(closed >= 0.6 and margin > two_std and rec["n"] >= 2 and hard["n"] >= 2),
    }
    if check.cached is not None:
        fixed = digit(runs[check.cached.key])
        margin = rec["mean"] - fixed["mean"]
        two_std = 2 * max(rec["std"], fixed["std"])
        out["online_beats_cached"] = {
            "cached_row": check.cached.key,
            "online": rec,
            "cached": fixed,
            "margin": margin,
            "two_std": two_std,
            "holds": bool(margin > two_std and rec["n"] >= 2 and fixed["n"] >= 2),
        }
    int8 = [r for r in runs[check.distilled.key] if "int8" in r]
    if int8:
        gaps = [
            r["int8"]["float_accuracy"]["digit"] - r["int8"]["int8_accuracy"]["digit"] for r in int8
        ]
        ratios = [r["int8"]["int8_bytes"] / r["int8"]["float_bytes"] for r in int8]
        out["int8"] = {
            "accuracy_drop_points": [100 * g for g in gaps],
            "size_ratio": ratios,
            "holds": bool(max(gaps) <= 0.005 and max(ratios) < 1 / 3),
        }
    return out


def table(keys: Sequence[str], records: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Rows of (configuration, seeds, digit, parity, loops) mean ± std in %, in `keys` order
    (configurations without a record left out)."""
    runs = by_key(records)
    out = []
    for key in keys:
        if key not in runs:
            continue
        cells = [key, str(len(runs[key]))]
        for task in ("digit", "parity", "loops"):
            s = stats([r["accuracy"][task] for r in runs[key]])
            cells.append(f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}")
        out.append(cells)
    return out


def read_log(path: Path) -> Iterator[dict[str, Any]]:
    for line in path.read_text().splitlines():
        if line.strip():
            yield json.loads(line)


def int8_summary(records: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Per configuration with an int8 copy: float and int8 digit accuracy, sizes, latencies."""
    out = []
    for key, runs in by_key(records).items():
        with_int8 = [r["int8"] for r in runs if "int8" in r]
        if not with_int8:
            continue

        def mean(name: str, runs: list[dict[str, Any]] = with_int8) -> float:
            return float(np.mean([float(r[name]) for r in runs]))

        fl = stats([r["float_accuracy"]["digit"] for r in with_int8])
        q = stats([r["int8_accuracy"]["digit"] for r in with_int8])
        out.append(
            [
                key,
                str(len(with_int8)),
                f"{100 * fl['mean']:.2f} ± {100 * fl['std']:.2f}",
                f"{100 * q['mean']:.2f} ± {100 * q['std']:.2f}",
                f"{mean('float_bytes') / 1e6:.3f}",
                f"{mean('int8_bytes') / 1e6:.3f}",
                f"{mean('int8_bytes') / mean('float_bytes'):.3f}",
                f"{mean('float_latency_ms'):.3f}",
                f"{mean('int8_latency_ms'):.3f}",
            ]
        )
    return out


TABLE_HEADERS = ["configuration", "seeds", "digit %", "parity %", "loops %"]
INT8_HEADERS = [
    "student",
    "seeds",
    "float digit %",
    "int8 digit %",
    "float MB",
    "int8 MB",
    "size ratio",
    "float ms / 64",
    "int8 ms / 64",
]


def describe_checks(found: dict[str, Any]) -> list[str]:
    """One line per check, with its figures."""
    lines = []
    for key, entry in found.items():
        gap = entry["gap_closed"]
        lines.append(
            f"{key}: gap closed (>= 60% and margin > 2 std): {gap['holds']}: "
            f"{100 * gap['distilled']['mean']:.2f} ± {100 * gap['distilled']['std']:.2f} vs "
            f"{gap['hard_row']} {100 * gap['hard_labels']['mean']:.2f} ± "
            f"{100 * gap['hard_labels']['std']:.2f}, teacher {100 * gap['teacher']:.2f}: "
            + (
                f"{100 * gap['fraction_closed']:.0f}% closed"
                if gap["fraction_closed"] == gap["fraction_closed"]  # not NaN
                else "hard labels at or above the teacher, no gap to close"
            )
            + f", margin {100 * gap['margin']:.2f} "
            f"points, 2 std {100 * gap['two_std']:.2f} ({entry['seeds']} seeds)"
        )
        online = entry.get("online_beats_cached")
        if online:
            lines.append(
                f"{key}: online beats cached views by > 2 std: {online['holds']}: "
                f"{100 * online['online']['mean']:.2f} ± {100 * online['online']['std']:.2f} vs "
                f"{online['cached_row']} {100 * online['cached']['mean']:.2f} ± "
                f"{100 * online['cached']['std']:.2f}, margin {100 * online['margin']:.2f} "
                f"points, 2 std {100 * online['two_std']:.2f}"
            )
        int8 = entry.get("int8")
        if int8:
            lines.append(
                f"{key}: int8 within 0.5 points at < 1/3 of the size: {int8['holds']}: drop "
                + ", ".join(f"{d:.2f}" for d in int8["accuracy_drop_points"])
                + " points, size ratio "
                + ", ".join(f"{r:.3f}" for r in int8["size_ratio"])
            )
    return lines


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
