"""Tables, checks, recommendations and plots from the experiments' results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.common import (
    format_table,
)
from bench.distill_eval.data import DEFAULT_ALPHA, TOP3_ACCURACY_TOLERANCE, TOP3_BYTES_FRACTION, say
from bench.distill_eval.experiments import RunConfig, RunSummary, pct


def summaries(result: dict[str, Any]) -> dict[str, RunSummary]:
    """The dataset's runs as `RunSummary` objects again (from the JSON-ready dict)."""
    out = {}
    for key, run in result["runs"].items():
        summary = RunSummary(RunConfig(**run["config"]), run["seeds"], run["parameters"])
        summary.accuracy = {t: v["per_seed"] for t, v in run["accuracy"].items()}
        out[key] = summary
    return out


def temperature_table(
    name: str, sweep: dict[str, Any], runs: dict[str, RunSummary]
) -> tuple[str, list[str], list[list[str]]]:
    by_size = {int(hidden): entry for hidden, entry in sweep["by_size"].items()}
    t_values = list(next(iter(by_size.values()))["kd"])
    rows = []
    for hidden in sorted(by_size):
        entry = by_size[hidden]
        hard = runs[entry["hard"]]
        row = [str(hidden), f"{hard.parameters:,}", pct(hard)]
        for t in t_values:
            cell = pct(runs[entry["kd"][t]])
            row.append(f"**{cell}**" if float(t) == entry["best_T"] else cell)
        rows.append(row)
    return (
        f"{name}: held-out digit accuracy %, hard labels vs KD at T (alpha {sweep['alpha']:g}, "
        f"{sweep['epochs']} epochs); best T per size in bold",
        ["hidden", "params", "hard", *[f"T={t}" for t in t_values]],
        rows,
    )


def tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) of every experiment of one dataset."""
    runs = summaries(result)
    ex = result["experiments"]
    name = result["plan"]["dataset"]
    out = []
    by_size = {int(hidden): entry for hidden, entry in ex["temperature"]["by_size"].items()}
    out.append(temperature_table(name, ex["temperature"], runs))
    tasks = list(result["teacher"]["accuracy"])
    if "alpha" in ex:
        rows = [
            [f"{float(a):g}", *[pct(runs[key], t) for t in tasks]]
            for a, key in ex["alpha"]["runs"].items()
        ]
        main = result["plan"]["main_hidden"]
        hard = runs[by_size[main]["hard"]]
        rows.insert(0, ["hard labels", *[pct(hard, t) for t in tasks]])
        out.append(
            (
                f"{name}: alpha at T={ex['alpha']['temperature']:g} (hidden {main}); held-out "
                "accuracy %",
                ["alpha", *[f"{t} %" for t in tasks]],
                rows,
            )
        )
    comp = ex["compression"]
    rows = []
    dense_bytes = comp["settings"]["dense-f32"]["bytes"]
    for setting, entry in comp["settings"].items():
        b = entry["bytes"]
        rows.append(
            [
                setting,
                pct(runs[entry["run"]]),
                pct(runs[entry["run"]], "parity"),
                pct(runs[entry["run"]], "loops"),
                f"{b['digit_payload']:.0f}",
                f"{b['digit_b64']:.1f}",
                f"{b['digit_b500']:.1f}",
                f"{100 * b['digit_b500'] / dense_bytes['digit_b500']:.0f}%",
                f"{b['all_b64']:.1f}",
                f"{b['all_b500']:.1f}",
            ]
        )
    out.append(
        (
            f"{name}: compressed soft targets at T={comp['temperature']:g}, alpha "
            f"{comp['alpha']:g}; accuracy % and bytes per sample (payload = values + indices + "
            "tail; b64 / b500 = whole SoftTargetsResponse at batch 64 / 500)",
            [
                "setting",
                "digit %",
                "parity %",
                "loops %",
                "digit payload B",
                "digit b64 B",
                "digit b500 B",
                "vs dense f32",
                "all tasks b64 B",
                "all tasks b500 B",
            ],
            rows,
        )
    )
    if "multitask" in ex:
        rows = []
        for task, entry in ex["multitask"]["tasks"].items():
            rows.append(
                [
                    task,
                    pct(runs[entry["multi_hard"]], task),
                    pct(runs[entry["single_hard"]], task),
                    pct(runs[entry["multi_kd"]], task),
                    pct(runs[entry["single_kd"]], task),
                ]
            )
        first = next(iter(ex["multitask"]["tasks"].values()))
        multi_params = runs[first["multi_kd"]].parameters
        single_params = sum(
            runs[e["single_kd"]].parameters for e in ex["multitask"]["tasks"].values()
        )
        out.append(
            (
                f"{name}: one multi-task student ({multi_params:,} params) vs one student per task "
                f"({single_params:,} params together); KD at T={ex['multitask']['temperature']:g}, "
                f"alpha {ex['multitask']['alpha']:g}; held-out accuracy %",
                ["task", "multi hard", "per-task hard", "multi KD", "per-task KD"],
                rows,
            )
        )
    if "hint" in ex:
        rows = [
            [
                "KD only" if beta == "0" else f"KD + hint, beta {beta}",
                *[pct(runs[key], t) for t in tasks],
            ]
            for beta, key in ex["hint"]["runs"].items()
        ]
        out.append(
            (
                f"{name}: KD + FitNets hint on the teacher's {ex['hint']['hint_dim']}-value "
                f"`features` (T={ex['hint']['temperature']:g}, alpha {ex['hint']['alpha']:g}); "
                "held-out accuracy %",
                ["student", *[f"{t} %" for t in tasks]],
                rows,
            )
        )
    if "temperature_long" in ex:
        out.append(temperature_table(name, ex["temperature_long"], runs))
    return out


def recommend(result: dict[str, Any]) -> dict[str, Any]:
    """T and alpha: the best of the sweeps; compression: the fewest all-task bytes per sample at
    batch 64 among the settings whose digit accuracy is within 0.3 points of dense float32."""
    runs = summaries(result)
    ex = result["experiments"]
    comp = ex["compression"]["settings"]
    dense = runs[comp["dense-f32"]["run"]].mean()
    eligible = [
        s for s, e in comp.items() if runs[e["run"]].mean() >= dense - TOP3_ACCURACY_TOLERANCE
    ]
    compression = min(eligible, key=lambda s: comp[s]["bytes"]["all_b64"])
    return {
        "temperature": ex["temperature"]["best_T"],
        "alpha": ex.get("alpha", {}).get("best_alpha", DEFAULT_ALPHA),
        "compression": compression,
        "compression_bytes_all_b64": comp[compression]["bytes"]["all_b64"],
        "dense_f32_bytes_all_b64": comp["dense-f32"]["bytes"]["all_b64"],
        "best_T_by_size": {h: v["best_T"] for h, v in ex["temperature"]["by_size"].items()},
    }


def check_kd_beats_hard(result: dict[str, Any]) -> dict[str, Any]:
    """Check (1): KD at the recommended T and alpha (dense float32) beats hard labels on `digit`
    for the main student size by more than two standard deviations of either run."""
    runs = summaries(result)
    ex = result["experiments"]
    main = result["plan"]["main_hidden"]
    rec = result["recommended"]
    hard = runs[RunConfig(main).key]
    kd = runs[RunConfig(main, "dense-f32", rec["temperature"], rec["alpha"]).key]
    margin = kd.mean() - hard.mean()
    threshold = 2 * max(kd.std(), hard.std())
    return {
        "student_hidden": main,
        "temperature": rec["temperature"],
        "alpha": rec["alpha"],
        "hard": {"mean": hard.mean(), "std": hard.std()},
        "kd": {"mean": kd.mean(), "std": kd.std()},
        "margin": margin,
        "two_std": threshold,
        "seeds": len(kd.seeds),
        "holds": bool(margin > threshold and len(kd.seeds) >= 2),
        "note": "" if len(kd.seeds) >= 2 else "one seed: no standard deviation",
        "compression_temperature": ex["compression"]["temperature"],
    }


def check_top3(result: dict[str, Any]) -> dict[str, Any]:
    """Check (2): top-3 float16 within 0.3 points of dense float32 (digit) while sending at most
    5 % of its bytes per sample for the digit task."""
    runs = summaries(result)
    comp = result["experiments"]["compression"]["settings"]
    dense, top3 = runs[comp["dense-f32"]["run"]], runs[comp["top3-f16"]["run"]]
    dense_b, top3_b = comp["dense-f32"]["bytes"], comp["top3-f16"]["bytes"]
    accuracy_gap = dense.mean() - top3.mean()
    ratios = {
        key: top3_b[key] / dense_b[key] for key in ("digit_payload", "digit_b64", "digit_b500")
    }
    # The least any top-3 float16 encoding can send per digit sample: 3 float16 values (the tail
    # is 1 minus their sum) and which 3 classes in which order, log2(C (C-1) (C-2)) bits.
    classes = int(dense_b["digit_payload"]) // 4  # dense float32: 4 bytes per class
    least_bits = 3 * 16 + math.log2(classes * (classes - 1) * (classes - 2))
    budget = TOP3_BYTES_FRACTION * dense_b["digit_payload"]
    return {
        "dense_f32": {"mean": dense.mean(), "std": dense.std()},
        "top3_f16": {"mean": top3.mean(), "std": top3.std()},
        "accuracy_gap_points": 100 * accuracy_gap,
        "accuracy_holds": bool(accuracy_gap <= TOP3_ACCURACY_TOLERANCE),
        "bytes_dense_f32": dense_b,
        "bytes_top3_f16": top3_b,
        "bytes_ratio": ratios,
        "bytes_budget_per_sample": budget,
        "bytes_holds": bool(ratios["digit_b500"] <= TOP3_BYTES_FRACTION),
        "least_bits_any_top3_f16_encoding": least_bits,
        "physically_possible": bool(least_bits <= 8 * budget),
        "why": (
            f"5% of {classes} x 4 B is {budget:g} B = {8 * budget:g} bits per sample; any top-3 "
            f"float16 encoding needs at least 3 x 16 bits of values + log2({classes}*"
            f"{classes - 1}*{classes - 2}) = {least_bits - 48:.1f} bits of indices = "
            f"{least_bits:.1f} bits; this protocol sends 3 x 2 B values + 3 x 1 B uint8 indices "
            "+ a 4 B float32 tail = 13 B per sample before the per-response framing"
        ),
        "holds": bool(
            accuracy_gap <= TOP3_ACCURACY_TOLERANCE and ratios["digit_b500"] <= TOP3_BYTES_FRACTION
        ),
    }


def print_tables(result: dict[str, Any]) -> None:
    for title, headers, rows in tables(result):
        plain = [[cell.replace("**", "") for cell in row] for row in rows]
        say(f"\n{title}\n")
        say(format_table(headers, plain))


def markdown(result: dict[str, Any]) -> str:
    parts = []
    for title, headers, rows in tables(result):
        parts.append(f"{title}:\n")
        parts.append("| " + " | ".join(headers) + " |")
        parts.append("|" + "---|" * len(headers))
        parts.extend("| " + " | ".join(row) + " |" for row in rows)
        parts.append("")
    return "\n".join(parts)


def plot_temperature(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Digit accuracy against T per student size, one column per dataset; a second row for the
    longer training of the `temperature_long` sweep when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = ["temperature"]
    if all("temperature_long" in r["experiments"] for r in results.values()):
        sweeps.append("temperature_long")
    figure, axes = plt.subplots(
        len(sweeps), len(results), figsize=(6.5 * len(results), 4.6 * len(sweeps)), squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, sweep_name in enumerate(sweeps):
        for axis, (name, result) in zip(axes[row], results.items(), strict=True):
            runs = summaries(result)
            sweep = result["experiments"][sweep_name]
            by_size = {int(h): entry for h, entry in sweep["by_size"].items()}
            ts: list[float] = []
            for color, hidden in zip(colors, sorted(by_size), strict=False):
                entry = by_size[hidden]
                ts = [float(t) for t in entry["kd"]]
                kd = [runs[key] for key in entry["kd"].values()]
                mean = [100 * s.mean() for s in kd]
                std = [100 * s.std() for s in kd]
                axis.errorbar(
                    ts,
                    mean,
                    yerr=std,
                    color=color,
                    marker="o",
                    capsize=3,
                    label=f"hidden {hidden}: KD (best T={entry['best_T']:g})",
                )
                axis.axhline(
                    100 * runs[entry["hard"]].mean(),
                    color=color,
                    linestyle="--",
                    alpha=0.7,
                    label=f"hidden {hidden}: hard labels",
                )
                best = ts.index(entry["best_T"])
                axis.plot([ts[best]], [mean[best]], marker="*", markersize=15, color=color)
            teacher = 100 * result["teacher"]["accuracy"]["digit"]
            axis.axhline(teacher, color="gray", linestyle=":", label="teacher")
            axis.set_xscale("log")
            axis.set_xticks(ts)
            axis.set_xticklabels([f"{t:g}" for t in ts])
            axis.set_xlabel(f"temperature T (alpha {sweep['alpha']:g})")
            axis.set_ylabel("held-out digit accuracy (%)")
            seeds = len(next(iter(runs.values())).seeds)
            axis.set_title(
                f"{name}: KD vs hard labels by student size\n"
                f"({seeds} seed(s), {sweep['epochs']} epochs; star: best T)",
                fontsize=10,
            )
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7, loc="lower left", ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_bytes(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5.6), squeeze=False)
    for axis, (name, result) in zip(axes[0], results.items(), strict=True):
        runs = summaries(result)
        comp = result["experiments"]["compression"]
        markers = "osD^vP*X"
        for number, (setting, entry) in enumerate(comp["settings"].items()):
            run = runs[entry["run"]]
            x = entry["bytes"]["digit_b64"]
            axis.errorbar(
                [x],
                [100 * run.mean()],
                yerr=[100 * run.std()],
                marker=markers[number % len(markers)],
                markersize=7,
                capsize=3,
                linestyle="none",
                label=f"{setting} ({x:.1f} B)",
            )
        main = result["plan"]["main_hidden"]
        hard = runs[RunConfig(main).key]
        axis.axhline(100 * hard.mean(), color="tab:orange", linestyle="--", label="hard labels")
        axis.axhline(
            100 * result["teacher"]["accuracy"]["digit"],
            color="gray",
            linestyle=":",
            label="teacher",
        )
        dense = comp["settings"]["dense-f32"]["bytes"]["digit_b64"]
        axis.axvline(
            TOP3_BYTES_FRACTION * dense, color="tab:red", linestyle=":", label="5% of dense float32"
        )
        axis.set_xlim(0, 1.12 * dense)
        axis.set_xlabel("digit-task bytes per sample on the wire (SoftTargetsResponse, batch 64)")
        axis.set_ylabel("held-out digit accuracy (%)")
        axis.set_title(
            f"{name}: compressed soft targets (T={comp['temperature']:g}, alpha "
            f"{comp['alpha']:g}, hidden {main})",
            fontsize=10,
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
