"""The command line: run the full evaluation or the quick CI run, and report."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import (
    DEFAULT_MODEL,
    DEFAULT_REPOSITORY,
    REPO_ROOT,
    ensure_repository,
    format_table,
    machine_summary,
    teacher_process,
    write_json,
)
from bench.distill_eval import sequence
from bench.distill_eval.consistent import (
    Row,
    evaluate_consistent,
    plan_from_spec,
    quick_plan,
)
from bench.distill_eval.consistent_report import (
    INT8_HEADERS,
    TABLE_HEADERS,
    int8_summary,
    markdown_table,
    read_log,
    table,
)
from bench.distill_eval.consistent_report import checks as consistent_checks
from bench.distill_eval.consistent_report import describe_checks as consistent_check_lines
from bench.distill_eval.data import (
    BATCH_SIZE,
    CONSISTENT_QUICK_SMOKE_ACCURACY,
    CONSISTENT_QUICK_TRAIN,
    DIGITS_PLAN,
    LR,
    MNIST_PLAN,
    QUICK_ACCURACY_TOLERANCE,
    QUICK_KD_RELATIVE_TOLERANCE,
    QUICK_PLAN,
    Dataset,
    Plan,
    build_digits_repository,
    digits_dataset,
    mnist_dataset,
    say,
    torch_threads,
)
from bench.distill_eval.experiments import evaluate_dataset
from bench.distill_eval.report import (
    check_kd_beats_hard,
    check_top3,
    markdown,
    plot_bytes,
    plot_temperature,
    print_tables,
    recommend,
)
from student_client.training.models import StudentMLP


def measure_threads(data: Dataset, batches: int = 20) -> dict[str, float]:
    """Seconds for `batches` training steps of the 512-unit MNIST student at 1 thread and at
    torch's default (one per core)."""
    x = torch.from_numpy(data.train_x[: batches * BATCH_SIZE])
    labels = {t: torch.from_numpy(v[: batches * BATCH_SIZE]) for t, v in data.train_y.items()}
    out = {}
    default = torch.get_num_threads()
    for threads in sorted({1, default}):
        with torch_threads(threads):
            torch.manual_seed(0)
            student = StudentMLP(data.input_shape, data.tasks, (512,))
            optimizer = torch.optim.Adam(student.parameters(), lr=LR)
            started = time.perf_counter()
            for start in range(0, len(x), BATCH_SIZE):
                logits = student(x[start : start + BATCH_SIZE])
                loss = torch.stack(
                    [
                        F.cross_entropy(v, labels[t][start : start + BATCH_SIZE])
                        for t, v in logits.items()
                    ]
                ).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            out[f"{threads}_threads_s"] = round(time.perf_counter() - started, 3)
    return out


def serve_args(extra: Sequence[str] = ()) -> list[str]:
    return ["--torch-threads", "1", "--device", "cpu", *extra]


def run_dataset(
    plan: Plan, data: Dataset, repository: Path, seeds: Sequence[int], extra: Sequence[str] = ()
) -> dict[str, Any]:
    with teacher_process(repository, serve_args(extra)) as teacher, torch_threads(1):
        say(f"[{data.name}] teacher up at {teacher.grpc_address}")
        result = evaluate_dataset(plan, data, teacher.grpc_address, seeds)
    result["recommended"] = recommend(result)
    result["check_kd_beats_hard"] = check_kd_beats_hard(result)
    if "top3-f16" in result["experiments"]["compression"]["settings"]:
        result["check_top3"] = check_top3(result)
    print_tables(result)
    describe_checks(data.name, result)
    return result


def run_full(
    repository: Path, seeds: Sequence[int], datasets: Sequence[str], checkpoint: Path | None = None
) -> dict[str, Any]:
    """Every experiment on each dataset; the JSON so far is written to `checkpoint` after each."""
    out: dict[str, Any] = {"mode": "full", "seeds": list(seeds), "datasets": {}}
    if "mnist" in datasets:
        data = mnist_dataset()
        out["threads"] = measure_threads(data)
        say(f"training-step time, 20 steps of the 512-unit student: {out['threads']}")
        out["datasets"]["mnist"] = run_dataset(
            MNIST_PLAN, data, ensure_repository(repository), seeds
        )
        if checkpoint:
            write_json(checkpoint, out)
    if "digits" in datasets:
        data = digits_dataset()
        with tempfile.TemporaryDirectory(prefix="distill-digits-") as folder:
            started = time.perf_counter()
            root, accuracy = build_digits_repository(Path(folder), data)
            say(
                f"[digits] teacher trained in {time.perf_counter() - started:.0f} s, held-out "
                + ", ".join(f"{t} {100 * a:.2f}%" for t, a in accuracy.items())
            )
            out["datasets"]["digits"] = run_dataset(
                DIGITS_PLAN,
                data,
                root,
                seeds,
                ("--allowed-architectures", "teacher_server.models.,bench."),
            )
    return out


def run_quick(repository: Path) -> dict[str, Any]:
    """The CI subset: MNIST, 800 training images, 3 epochs, seed 0, T in {1, 4}, dense float32 vs
    top-3 float16 at T = 4, 512-unit student. Returns the result with its `checks`."""
    data = mnist_dataset(800)
    result = run_dataset(QUICK_PLAN, data, ensure_repository(repository), [0])
    runs = result["runs"]
    comp = result["experiments"]["compression"]
    dense_key = comp["settings"]["dense-f32"]["run"]
    top3_key = comp["settings"]["top3-f16"]["run"]
    checks: dict[str, Any] = {}
    checks["softmax_matches_server"] = result["softmax_check"]
    # The training loss (alpha T^2 KL + (1 - alpha) CE) falls from the first epoch to the last,
    # and so does the pure KD term on the training set from initialisation to the end.
    decreasing = {}
    for key, run in runs.items():
        if run["config"]["targets"] == "hard":
            continue
        losses = run["loss_per_epoch"][0]
        kd = run["kd_term"][0]
        kd_init = sum(kd["init"]["dense"].values())
        kd_final = sum(kd["final"]["dense"].values())
        decreasing[key] = {
            "loss_per_epoch": losses,
            "kd_term_init": kd_init,
            "kd_term_final": kd_final,
            "holds": bool(losses[-1] < losses[0] and kd_final < kd_init),
        }
    checks["kd_loss_decreases"] = {
        "runs": decreasing,
        "holds": all(v["holds"] for v in decreasing.values()),
    }
    # Top-3 + tail vs dense: the KD term of the same (dense-trained) student against both targets
    # (the top-3 KL over 4 buckets can only be smaller: merging classes never increases a KL),
    # and the held-out accuracy of the students trained on each.
    final = runs[dense_key]["kd_term"][0]["final"]
    top3_student = runs[top3_key]["kd_term"][0]["final"]
    kd_dense = sum(final["dense"].values())
    kd_top3 = sum(top3_student["top3-f16"].values())
    kd_dense_of_top3 = sum(top3_student["dense"].values())
    relative = abs(kd_dense_of_top3 - kd_top3) / kd_dense_of_top3
    acc_dense = runs[dense_key]["accuracy"]["digit"]["mean"]
    acc_top3 = runs[top3_key]["accuracy"]["digit"]["mean"]
    checks["compressed_agrees_with_dense"] = {
        "temperature": comp["temperature"],
        "kd_term_dense_trained_student_dense_targets": kd_dense,
        "kd_term_top3_trained_student_dense_targets": kd_dense_of_top3,
        "kd_term_top3_trained_student_top3_targets": kd_top3,
        "kd_relative_difference": relative,
        "kd_tolerance": QUICK_KD_RELATIVE_TOLERANCE,
        "digit_accuracy_dense": acc_dense,
        "digit_accuracy_top3_f16": acc_top3,
        "accuracy_tolerance": QUICK_ACCURACY_TOLERANCE,
        "holds": bool(
            relative <= QUICK_KD_RELATIVE_TOLERANCE
            and abs(acc_dense - acc_top3) <= QUICK_ACCURACY_TOLERANCE
        ),
    }
    dense_b = comp["settings"]["dense-f32"]["bytes"]
    top3_b = comp["settings"]["top3-f16"]["bytes"]
    checks["top3_f16_smaller_than_dense_f32"] = {
        "dense_f32": dense_b,
        "top3_f16": top3_b,
        "holds": all(top3_b[key] < dense_b[key] for key in dense_b),
    }
    consistent = run_consistent(repository, [0], CONSISTENT_QUICK_TRAIN, None)
    checks.update(consistent_quick_checks(consistent))
    result["checks"] = checks
    return {
        "mode": "quick",
        "datasets": {"mnist": result},
        "consistent": consistent,
        "checks": checks,
    }


def run_consistent(
    repository: Path,
    seeds: Sequence[int],
    n_train: int | None,
    log: Path | None,
    epochs: int = 20,
    long_epochs: int = 100,
    resume: bool = False,
    spec: dict[str, Any] | None = None,
    teacher_epochs: int | None = None,
    teacher_seeds: Sequence[int] = (0,),
) -> dict[str, Any]:
    """The consistent-augmentation rows (`bench.distill_eval.consistent`) on MNIST: the plan of
    `spec` (`plan_from_spec`; default the full plan), or with `n_train` the quick one (2 epochs).
    `resume`: keep the runs already in `log`. `teacher_epochs`: the teacher is the default
    teacher's recipe trained that long (`ensure_long_teacher`) in `repository`; with several
    `teacher_seeds`, the ensemble of that recipe trained once per seed (`ensure_teacher_ensemble`)."""
    data = mnist_dataset(n_train)
    if n_train is not None:
        spec = {"kind": "quick", "epochs": 2}
    spec = spec or {"kind": "full", "epochs": epochs, "long_epochs": long_epochs}
    plan = plan_from_spec(spec)
    done = []
    if resume and log is not None and log.exists():
        done = [line for line in read_log(log) if "key" in line]
        say(f"[consistent] resuming: {len(done)} runs already in {log}")
    model = None
    if teacher_epochs is not None and len(teacher_seeds) > 1:
        model = ensure_teacher_ensemble(repository, teacher_epochs, teacher_seeds)
    elif teacher_epochs is not None:
        repository = ensure_long_teacher(repository, teacher_epochs)
    else:
        repository = ensure_repository(repository)
    with (
        teacher_process(repository, serve_args()) as teacher,
        torch_threads(1),
        tempfile.TemporaryDirectory(prefix="distill-int8-") as int8_dir,
    ):
        result = evaluate_consistent(
            plan, data, teacher.grpc_address, seeds, log, Path(int8_dir), done, spec, model
        )
    describe_consistent(result)
    return result


def long_teacher_name(epochs: int) -> str:
    return f"{DEFAULT_MODEL}-e{epochs}"


def ensure_long_teacher(repository: Path, epochs: int) -> Path:
    """`repository` holding the default teacher's recipe (architecture, 4,000 images, shifts of up
    to 2 pixels, Adam, cosine schedule, seed 0) trained for `epochs` epochs as the model
    `mnist-multitask-e<epochs>`, trained first (once) if the folder holds no model; a folder
    holding another model is refused (the bench talks to the repository's only model)."""
    name = long_teacher_name(epochs)
    models = sorted(p.parent.name for p in repository.glob("*/config.json"))
    if models and models != [name]:
        raise SystemExit(
            f"--teacher-epochs {epochs}: {repository} holds {models}, not only {name}: give "
            f"--repository a folder of its own (e.g. runs/teachers/e{epochs})"
        )
    if not models:
        train_recipe(repository, name, epochs, seed=0)
    return repository


def train_recipe(repository: Path, name: str, epochs: int, seed: int) -> None:
    """The default teacher's recipe trained `epochs` epochs with `seed`, saved as model `name`."""
    from teacher_server.repository.default_teacher import train_default_teacher

    started = time.perf_counter()
    say(f"training {name} into {repository} ({epochs} epochs, seed {seed}, 5-8 s each on one core)")
    with torch_threads(1):
        accuracy = train_default_teacher(repository / name, epochs=epochs, seed=seed, name=name)
    say(
        f"{name} trained in {time.perf_counter() - started:.0f} s, held-out "
        + ", ".join(f"{t} {100 * a:.2f}%" for t, a in accuracy.items())
    )


def ensemble_names(epochs: int, seeds: Sequence[int]) -> tuple[list[str], str]:
    """The member models (`mnist-multitask-e<N>-s<seed>`) and the ensemble model
    (`mnist-multitask-e<N>x<k>`) of `ensure_teacher_ensemble`."""
    base = long_teacher_name(epochs)
    return [f"{base}-s{seed}" for seed in seeds], f"{base}x{len(seeds)}"


def ensure_teacher_ensemble(repository: Path, epochs: int, seeds: Sequence[int]) -> str:
    """`repository` holding the default teacher's recipe trained for `epochs` epochs once per seed
    of `seeds` (models `mnist-multitask-e<N>-s<seed>`, each trained here if absent) and their
    ensemble `mnist-multitask-e<N>x<k>` (the server's ensemble: one forward per member on the
    same batch; its `logits` answer is the mean of the members' logits / T). Returns the
    ensemble's name. A folder holding other models is refused."""
    members, name = ensemble_names(epochs, seeds)
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise SystemExit(f"--teacher-seeds: give at least 2 distinct seeds, got {list(seeds)}")
    models = sorted(p.parent.name for p in repository.glob("*/config.json"))
    if not set(models) <= {*members, name}:
        raise SystemExit(
            f"--teacher-seeds: {repository} holds {models}, not only {[*members, name]}: give "
            f"--repository a folder of its own (e.g. runs/teachers/e{epochs}x{len(seeds)})"
        )
    for seed, member in zip(seeds, members, strict=True):
        if member not in models:
            train_recipe(repository, member, epochs, seed)
    if name not in models:
        first = json.loads((repository / members[0] / "config.json").read_text())
        config = {
            "name": name,
            "description": f"Ensemble of {len(members)} teachers of the default recipe trained "
            f"{epochs} epochs with seeds {list(seeds)}",
            "ensemble": {"members": members},
            "tasks": [{"name": t["name"], "class_names": t["class_names"]} for t in first["tasks"]],
            "input": first["input"],
        }
        (repository / name).mkdir(parents=True, exist_ok=True)
        (repository / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return name


def describe_consistent(result: dict[str, Any]) -> None:
    records = result["records"]
    say(f"\n[consistent] teacher held-out {result['teacher']['accuracy']}")
    say(format_table(TABLE_HEADERS, table(result["plan"]["rows"], records)))
    int8 = int8_summary(records)
    if int8:
        say(format_table(INT8_HEADERS, int8))
    for line in consistent_check_lines(result["checks"]):
        say(f"[consistent] {line}")


def consistent_quick_checks(result: dict[str, Any]) -> dict[str, Any]:
    """What 2 epochs on 800 images support: the teacher was asked about every fresh view once
    (online rows reuse one answer per view; cached views are the epoch-1 answers), the online
    KD loss falls, DKD + uncertainty weighting + mixup leaves chance, the int8 copy is under a
    third of the float student's size."""
    by_row = {r["key"]: r for r in result["records"]}
    plan = quick_plan()
    n, epochs = result["plan"]["train_samples"], plan.epochs
    augmented = {r.augment for r in plan.rows if r.targets != "hard"}
    expected = n * epochs * len(augmented)
    online = by_row[plan.checks[0].distilled.key]
    smoke = by_row[Row("online", "shift+mixup", epochs, "dkd", "uncertainty").key]
    int8 = online["int8"]
    return {
        "consistent_teacher_asked_once_per_view": {
            "teacher_samples": result["teacher_samples"],
            "expected": expected,
            "holds": result["teacher_samples"] == expected,
        },
        "consistent_online_kd_loss_decreases": {
            "loss_per_epoch": online["loss_per_epoch"],
            "holds": online["loss_per_epoch"][-1] < online["loss_per_epoch"][0],
        },
        "dkd_uncertainty_mixup_leaves_chance": {
            "digit_accuracy": smoke["accuracy"]["digit"],
            "chance": 0.1,
            "holds": smoke["accuracy"]["digit"] > CONSISTENT_QUICK_SMOKE_ACCURACY,
        },
        "int8_under_a_third": {
            "float_bytes": int8["float_bytes"],
            "int8_bytes": int8["int8_bytes"],
            "holds": int8["int8_bytes"] < int8["float_bytes"] / 3,
        },
    }


def int_list(text: str) -> list[int]:
    """A comma-separated list of integers ("800,800")."""
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.distill_eval", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="the CI subset (about a minute)")
    parser.add_argument("--json", type=Path, help="write every number to this JSON file")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument(
        "--repository", type=Path, help="the MNIST teacher's repository (default model_repository)"
    )
    parser.add_argument(
        "--datasets", default="mnist,digits", help="comma-separated: mnist, digits (full mode)"
    )
    parser.add_argument(
        "--img-dir",
        type=Path,
        default=REPO_ROOT / "docs" / "img",
        help="where the two plots go (full mode)",
    )
    parser.add_argument("--markdown", type=Path, help="write the tables as Markdown here")
    parser.add_argument(
        "--from-json",
        type=Path,
        help="no training: print the tables and draw the plots of a saved full run's JSON",
    )
    parser.add_argument(
        "--consistent",
        action="store_true",
        help="only the consistent-augmentation rows of issue 21 (MNIST; see consistent.py)",
    )
    parser.add_argument(
        "--long-epochs", type=int, default=100, help="the long schedule of --consistent"
    )
    parser.add_argument(
        "--log", type=Path, help="--consistent: append each run's record here (JSON lines)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="--consistent: keep the runs already in --log"
    )
    parser.add_argument(
        "--from-log",
        type=Path,
        help="no training: the --consistent tables and checks of a (maybe partial) --log file",
    )
    parser.add_argument(
        "--consistent-plan",
        choices=("full", "checks", "sweep"),
        default="full",
        help="--consistent: every row (full), only the issue's checks at one KD setting "
        "(checks: --kd-temperature/--kd-alpha, --augments at --short-epochs, --long-augments "
        "at --long-epochs), or KD settings to choose from (sweep: --kd-settings; one seed)",
    )
    parser.add_argument(
        "--short-epochs", type=int, default=20, help="--consistent: the short schedule (20)"
    )
    parser.add_argument(
        "--kd-temperature", type=float, default=4.0, help="--consistent-plan checks: KD's T"
    )
    parser.add_argument(
        "--kd-alpha", type=float, default=0.9, help="--consistent-plan checks: KD's alpha"
    )
    parser.add_argument(
        "--augments",
        default="shift,shift+mixup",
        help="--consistent-plan checks/sweep: augmentations at --epochs (comma-separated)",
    )
    parser.add_argument(
        "--long-augments",
        default="shift",
        help="--consistent-plan checks: augmentations at --long-epochs (comma-separated; '' for none)",
    )
    parser.add_argument(
        "--kd-settings",
        default="1:0.5,2:0.5,4:0.5,1:0.9,2:0.9,4:0.9",
        help="--consistent-plan sweep: KD settings T:alpha, comma-separated; T:alpha:mixce "
        "adds mixup's CE on mixed batches (see --mix-ce)",
    )
    parser.add_argument(
        "--mix-ce",
        action="store_true",
        help="--consistent-plan checks: online KD also trains mixed batches on mixup's CE "
        "(alpha KD + (1 - alpha) mixed CE, as un-mixed batches with their labels)",
    )
    parser.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="--consistent-plan checks/sweep: the students' learning rate, hard-label and KD "
        "rows alike (constant: the quickstart's Adam 1e-3; cosine: decayed to 0 over the epochs)",
    )
    parser.add_argument(
        "--no-cached",
        action="store_true",
        help="--consistent-plan checks: leave out the cached-views rows (and that check)",
    )
    parser.add_argument(
        "--teacher-epochs",
        type=int,
        help="--consistent: a teacher of the default recipe trained this many epochs, saved "
        "as mnist-multitask-e<N> in --repository (default runs/teachers/e<N>) if absent",
    )
    parser.add_argument(
        "--student-hidden",
        type=int_list,
        default=[512],
        help="--consistent-plan checks/sweep: the student MLP's hidden widths, comma-separated "
        "(default 512, the quickstart's; 800,800 is Hinton et al.'s small net), hard-label and "
        "KD rows alike",
    )
    parser.add_argument(
        "--average-epochs",
        type=int,
        default=0,
        help="--consistent-plan checks: report (and quantise) each student's weights averaged "
        "over its last N epochs (SWA), hard-label and KD rows alike; -1: the last quarter of "
        "each row's epochs; default 0: the last weights",
    )
    parser.add_argument(
        "--teacher-seeds",
        type=int_list,
        default=[0],
        help="--teacher-epochs: the recipe's seeds, comma-separated (default 0); several: the "
        "teacher is their ensemble, served as mnist-multitask-e<N>x<k> from --repository "
        "(default runs/teachers/e<N>x<k>), each member trained there if absent",
    )
    sequence.add_arguments(parser)  # the LM rows: bench/distill_eval/sequence.py
    args = parser.parse_args(argv)
    if args.repository is None:
        ensemble = f"x{len(args.teacher_seeds)}" if len(args.teacher_seeds) > 1 else ""
        args.repository = (
            REPO_ROOT / "runs" / "teachers" / f"e{args.teacher_epochs}{ensemble}"
            if args.teacher_epochs is not None
            else DEFAULT_REPOSITORY
        )
    return args


def plan_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The `--consistent` plan the arguments ask for (see `consistent.plan_from_spec`)."""

    def names(text: str) -> list[str]:
        return [part.strip() for part in text.split(",") if part.strip()]

    if args.consistent_plan == "checks":
        return {
            "kind": "checks",
            "epochs": args.short_epochs,
            "long_epochs": args.long_epochs,
            "temperature": args.kd_temperature,
            "alpha": args.kd_alpha,
            "augments": names(args.augments),
            "long_augments": names(args.long_augments),
            "mix_ce": args.mix_ce,
            "lr_schedule": args.lr_schedule,
            "cached": not args.no_cached,
            "hidden": args.student_hidden,
            "average_epochs": args.average_epochs,
        }
    if args.consistent_plan == "sweep":
        settings = []
        for item in names(args.kd_settings):
            parts = item.split(":")
            try:
                if len(parts) not in (2, 3) or parts[2:] not in ([], ["mixce"]):
                    raise ValueError(item)
                settings.append([float(parts[0]), float(parts[1]), parts[2:] == ["mixce"]])
            except ValueError:
                raise SystemExit(
                    f"--kd-settings: expected T:alpha or T:alpha:mixce items, got {item!r}"
                ) from None
        return {
            "kind": "sweep",
            "epochs": args.short_epochs,
            "settings": settings,
            "augments": names(args.augments),
            "lr_schedule": args.lr_schedule,
            "hidden": args.student_hidden,
        }
    return {"kind": "full", "epochs": args.short_epochs, "long_epochs": args.long_epochs}


def consistent_from_log(path: Path, long_epochs: int) -> dict[str, Any]:
    """The tables and checks of a --consistent run's log (the runs that finished), for the plan
    its first line names (logs without one: the full plan with `long_epochs`)."""
    lines = list(read_log(path))
    header = [line for line in lines if "teacher" in line][-1]  # --resume appends one
    teacher = header["teacher"]
    records = [line for line in lines if "key" in line]
    spec = header.get("plan_spec") or {"kind": "full", "long_epochs": long_epochs}
    plan = plan_from_spec(spec)
    result = {
        "records": records,
        "teacher": teacher,
        "plan": {"rows": [row.key for row in plan.rows]},
        "checks": consistent_checks(plan, records, teacher["accuracy"]["digit"]),
    }
    describe_consistent(result)
    return result


def consistent_markdown(result: dict[str, Any]) -> str:
    parts = [markdown_table(TABLE_HEADERS, table(result["plan"]["rows"], result["records"]))]
    int8 = int8_summary(result["records"])
    if int8:
        parts.append(markdown_table(INT8_HEADERS, int8))
    parts.append("\n".join(f"- {line}" for line in consistent_check_lines(result["checks"])))
    return "\n\n".join(parts) + "\n"


def describe_checks(name: str, result: dict[str, Any]) -> None:
    rec = result["recommended"]
    say(
        f"\n[{name}] recommended: T={rec['temperature']:g}, alpha={rec['alpha']:g}, "
        f"{rec['compression']} ({rec['compression_bytes_all_b64']:.1f} B/sample for all tasks "
        f"at batch 64, dense float32 {rec['dense_f32_bytes_all_b64']:.1f}); best T by size "
        f"{rec['best_T_by_size']}"
    )
    one = result["check_kd_beats_hard"]
    say(
        f"[{name}] check (1) KD beats hard labels on digit by > 2 std (hidden "
        f"{one['student_hidden']}): {one['holds']}: KD {100 * one['kd']['mean']:.2f} ± "
        f"{100 * one['kd']['std']:.2f} vs hard {100 * one['hard']['mean']:.2f} ± "
        f"{100 * one['hard']['std']:.2f}, margin {100 * one['margin']:.2f} points, 2 std "
        f"{100 * one['two_std']:.2f}"
    )
    if "check_top3" in result:
        two = result["check_top3"]
        say(
            f"[{name}] check (2) top-3 float16 within 0.3 points and <= 5% of dense float32 "
            f"bytes: {two['holds']}: accuracy gap {two['accuracy_gap_points']:.2f} points "
            f"({two['accuracy_holds']}), bytes ratio {two['bytes_ratio']['digit_b500']:.3f} at "
            f"batch 500, {two['bytes_ratio']['digit_b64']:.3f} at batch 64, payload "
            f"{two['bytes_ratio']['digit_payload']:.3f} ({two['bytes_holds']}; physically "
            f"possible: {two['physically_possible']}: {two['why']})"
        )


def report(
    out: dict[str, Any], img_dir: Path | None, markdown_path: Path | None, tables: bool = False
) -> None:
    """Plots and Markdown of a full run's result (and its tables and checks when `tables`: the
    run itself printed them per dataset)."""
    results = out["datasets"]
    for name, result in results.items():
        if tables:
            print_tables(result)
            describe_checks(name, result)
    if img_dir is not None and results:
        plot_temperature(results, img_dir / "distill-accuracy-vs-T.png")
        plot_bytes(results, img_dir / "distill-accuracy-vs-bytes.png")
        say(f"plots in {img_dir}")
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text("\n".join(markdown(r) for r in results.values()))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.sequence:
        return sequence.run(args)
    if args.from_log:
        found = consistent_from_log(args.from_log, args.long_epochs)
        if args.markdown:
            args.markdown.write_text(consistent_markdown(found))
        return found
    if args.from_json:
        import json

        out = json.loads(args.from_json.read_text())
        report(out, args.img_dir, args.markdown, tables=True)
        return dict(out)
    started = time.perf_counter()
    machine = machine_summary()
    say(f"machine: {machine}")
    command = " ".join(["python -m bench.distill_eval", *(sys.argv[1:] if argv is None else argv)])
    if args.quick:
        out = run_quick(args.repository.resolve())
    elif args.consistent:
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        consistent = run_consistent(
            args.repository.resolve(),
            seeds,
            None,
            args.log,
            resume=args.resume,
            spec=plan_spec(args),
            teacher_epochs=args.teacher_epochs,
            teacher_seeds=args.teacher_seeds,
        )
        out = {"mode": "consistent", "seeds": list(seeds), "consistent": consistent}
        if args.markdown:
            args.markdown.write_text(consistent_markdown(consistent))
    else:
        datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
        out = run_full(args.repository.resolve(), range(args.seeds), datasets, args.json)
    out["machine"] = machine
    out["machine_after"] = machine_summary()
    out["command"] = command
    out["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        write_json(args.json, out)
    if args.quick:
        say("\nquick checks: " + ", ".join(f"{k} {v['holds']}" for k, v in out["checks"].items()))
    elif not args.consistent:
        report(out, args.img_dir, args.markdown)
    say(f"total {out['seconds']:.0f} s")
    return out
