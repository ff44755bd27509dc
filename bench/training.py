"""Student epoch time: what a remote teacher costs a training loop.

    python -m bench.training [--json out.json] [--epochs N] [--quick] [--repository PATH]

The demo's student (`StudentMLP`, hidden (512,), Adam lr 1e-3, batch 64, the 4,000-image MNIST
training split, `MultiTaskKDLoss(alpha=0.9, T=4)`) is trained with `student_client.training.trainer.fit`
for one untimed warm-up epoch plus N timed epochs, in these modes:

- hard: hard labels only (no teacher at all);
- in-process: the same teacher model loaded in this process (`Engine.run`, the server's own
  forward + softmax), soft targets computed per batch inside the training loop;
- remote depth D: the teacher server as a separate process on loopback, soft targets through
  `SoftTargetLoader` over one gRPC stream with D batches in flight, for D in 1, 2, 4, 8, 16, 32.

Reported: mean seconds per timed epoch (training only; `fit` excludes evaluation) and the ratios
remote / in-process and remote / hard. Then thread configurations, since teacher and student
share the cores: the teacher process and the student process each default to one torch thread
per core; the same modes are timed with the teacher started with `OMP_NUM_THREADS=1`, or with
one forward worker per core (`TEACHER_FORWARD_WORKERS`, each worker on one torch thread), and/or
the student at `torch.set_num_threads(1)`, the remote ones at the loader's default depth and at
32. Last, the issue's target: the best remote configuration against the best in-process one
(each as a user on this machine would run it), remote / in-process <= 1.10.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from bench.common import (
    DEFAULT_MODEL,
    DEFAULT_REPOSITORY,
    ensure_repository,
    machine_summary,
    print_table,
    ratio,
    teacher_process,
    write_json,
)
from student_client.online.client import TeacherClient
from student_client.online.loader import SoftTargetLoader
from student_client.training.datasets import MultiTaskSplit, mnist_multitask, shuffled_batches
from student_client.training.losses import MultiTaskKDLoss
from student_client.training.models import StudentMLP
from student_client.training.trainer import Batch, distillation_loss, fit, hard_label_loss
from student_client.types import SoftTargets, TargetOptions
from teacher_server.repository.store import load_model
from teacher_server.serving.engine import Engine
from teacher_server.serving.schema import SoftTargetsRequest, ValidatedRequest

HIDDEN = (512,)
BATCH_SIZE = 64
TEMPERATURE = 4.0
ALPHA = 0.9
DEFAULT_DEPTH: int = inspect.signature(SoftTargetLoader).parameters["depth"].default
DEPTHS = (1, 2, 4, 8, 16, 32)
QUICK_DEPTHS = (1, DEFAULT_DEPTH)
THREAD_DEPTHS = (DEFAULT_DEPTH, 32)  # the remote depths of every thread configuration
TARGET_RATIO = 1.10
CORES = os.cpu_count() or 1


@dataclass
class ModeResult:
    """Seconds per epoch of one mode: `warmup_s` (first epoch, not averaged) and `epochs_s`."""

    mode: str
    warmup_s: float
    epochs_s: list[float] = field(default_factory=list)

    @property
    def mean_s(self) -> float:
        return float(np.mean(self.epochs_s)) if self.epochs_s else float("nan")

    @property
    def spread_s(self) -> float:
        """Half the range of the timed epochs (a rough noise bar)."""
        return (max(self.epochs_s) - min(self.epochs_s)) / 2 if len(self.epochs_s) > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "mean_s": round(self.mean_s, 4)}


class LocalTargets:
    """Soft targets computed in this process, with the `tensor(task)` of `SoftTargets` (including
    its copy, so both modes pay the same)."""

    def __init__(self, values: dict[str, np.ndarray]) -> None:
        self.values = values

    def tensor(self, task: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self.values[task], dtype=np.float32))


def epoch_data(split: MultiTaskSplit, epoch: int) -> list[tuple[torch.Tensor, Any]]:
    """The epoch's batches (seeded shuffle, the same for every mode)."""
    return list(shuffled_batches(split.train_x, split.train_y, BATCH_SIZE, seed=epoch))


def time_mode(
    mode: str,
    split: MultiTaskSplit,
    batches_for: Callable[[int], Iterable[Batch]],
    distil: bool,
    epochs: int,
) -> ModeResult:
    """Train a fresh student (seed 0) for 1 + `epochs` epochs; the first is the warm-up."""
    torch.manual_seed(0)
    student = StudentMLP((1, 28, 28), split.tasks, HIDDEN)
    kd = MultiTaskKDLoss(alpha=ALPHA, temperature=TEMPERATURE)
    loss_fn = distillation_loss(kd) if distil else hard_label_loss
    history = fit(student, batches_for, loss_fn, 1 + epochs, lambda _: {}, progress=False)
    result = ModeResult(mode, history[0].seconds, [record.seconds for record in history[1:]])
    print(f"  {mode:<28} {result.mean_s:.3f} s/epoch (warm-up {result.warmup_s:.3f} s)")
    return result


def hard_batches(split: MultiTaskSplit) -> Callable[[int], Iterable[Batch]]:
    def batches(epoch: int) -> Iterator[Batch]:
        for inputs, labels in epoch_data(split, epoch):
            yield inputs, labels, None

    return batches


def in_process_batches(split: MultiTaskSplit, engine: Engine) -> Callable[[int], Iterable[Batch]]:
    """Each batch's soft targets from `Engine.run` in the training loop (no overlap)."""
    tasks = engine.config.task_names

    def batches(epoch: int) -> Iterator[Batch]:
        for inputs, labels in epoch_data(split, epoch):
            array = inputs.numpy()
            request = SoftTargetsRequest(
                model=engine.config.name, inputs=array, tasks=tasks, temperature=TEMPERATURE
            )
            (result,) = engine.run([ValidatedRequest(request, tasks, array)])
            targets = LocalTargets({output.task: output.values for output in result.outputs})
            yield inputs, labels, cast(SoftTargets, targets)

    return batches


def remote_batches(
    split: MultiTaskSplit, client: TeacherClient, depth: int
) -> Callable[[int], Iterable[Batch]]:
    """The epoch through `SoftTargetLoader` over gRPC with `depth` batches in flight, the
    pixels sent as their exact uint8 codes (as the demo does)."""
    options = TargetOptions(temperature=TEMPERATURE, output="probs")

    def batches(epoch: int) -> Iterable[Batch]:
        return SoftTargetLoader(
            epoch_data(split, epoch), client, options, depth=depth, input_dtype="uint8"
        )

    return batches


@contextlib.contextmanager
def student_threads(threads: int | None) -> Iterator[None]:
    """Run with `torch.set_num_threads(threads)` (None: leave the default), then restore."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class ThreadConfig:
    name: str
    teacher_env: dict[str, str]
    student_threads: int | None


THREAD_CONFIGS = (
    ThreadConfig("teacher default, student default", {}, None),
    ThreadConfig("teacher OMP_NUM_THREADS=1, student default", {"OMP_NUM_THREADS": "1"}, None),
    ThreadConfig("teacher default, student 1 thread", {}, 1),
    ThreadConfig("teacher OMP_NUM_THREADS=1, student 1 thread", {"OMP_NUM_THREADS": "1"}, 1),
    ThreadConfig(
        f"teacher {CORES} forward workers, student 1 thread",
        {"TEACHER_FORWARD_WORKERS": str(CORES)},
        1,
    ),
)


def run_config(
    config: ThreadConfig,
    repository: Path,
    split: MultiTaskSplit,
    engine: Engine,
    depths: Sequence[int],
    epochs: int,
) -> dict[str, ModeResult]:
    """Hard, in-process and remote (each depth) under one thread configuration."""
    print(f"\n[{config.name}]")
    results: dict[str, ModeResult] = {}
    with student_threads(config.student_threads):
        results["hard"] = time_mode("hard labels", split, hard_batches(split), False, epochs)
        results["in-process"] = time_mode(
            "in-process teacher", split, in_process_batches(split, engine), True, epochs
        )
        with (
            teacher_process(repository, ("--device", "cpu"), config.teacher_env) as teacher,
            TeacherClient(teacher.grpc_address) as client,
        ):
            client.wait_ready(60)
            for depth in depths:
                results[f"remote depth {depth}"] = time_mode(
                    f"remote gRPC, depth {depth}",
                    split,
                    remote_batches(split, client, depth),
                    True,
                    epochs,
                )
    return results


def print_modes(title: str, results: dict[str, ModeResult]) -> None:
    hard = results["hard"].mean_s
    local = results["in-process"].mean_s
    rows = [
        [
            name,
            r.mean_s,
            r.spread_s,
            len(r.epochs_s),
            ratio(r.mean_s, local) if name.startswith("remote") else float("nan"),
            ratio(r.mean_s, hard),
        ]
        for name, r in results.items()
    ]
    print_table(title, ["mode", "s/epoch", "+/- s", "epochs", "remote/in-proc", "x hard"], rows)


def best_depth(results: dict[str, ModeResult]) -> tuple[int, str]:
    """The depth with the lowest mean epoch time, and a sentence on whether that beats the
    loader's default depth by more than the noise of this run."""
    remote = {int(name.rsplit(" ", 1)[1]): r for name, r in results.items() if "depth" in name}
    best = min(remote, key=lambda depth: remote[depth].mean_s)
    default = DEFAULT_DEPTH
    if default not in remote:
        return best, f"depth {default} (the default) was not measured"
    if best == default:
        return best, f"the measurement supports the default depth of {default}"
    gap = remote[default].mean_s - remote[best].mean_s
    if min(len(remote[default].epochs_s), len(remote[best].epochs_s)) < 2:
        return best, (
            f"depth {best} was fastest, but one timed epoch per mode gives no noise estimate "
            f"(run with --epochs 3 or more before changing the default of {default})"
        )
    noise = remote[default].spread_s + remote[best].spread_s
    if gap <= max(noise, 0.05 * remote[default].mean_s):
        return best, (
            f"depth {best} is fastest but within noise of depth {default} ({gap:.3f} s/epoch): "
            f"keep the default of {default}"
        )
    return best, f"depth {best} beats depth {default} by {gap:.3f} s/epoch, beyond this run's noise"


def print_threads(table: dict[str, dict[str, ModeResult]]) -> None:
    depths = sorted({d for r in table.values() for d in THREAD_DEPTHS if f"remote depth {d}" in r})
    rows = [
        [name, r["hard"].mean_s, r["in-process"].mean_s]
        + [r[f"remote depth {d}"].mean_s for d in depths]
        + [ratio(min(r[f"remote depth {d}"].mean_s for d in depths), r["in-process"].mean_s)]
        for name, r in table.items()
    ]
    print_table(
        "Thread configurations (s/epoch)",
        ["threads", "hard", "in-process"]
        + [f"remote depth {d}" for d in depths]
        + ["best remote/in-proc"],
        rows,
    )


def target(table: dict[str, dict[str, ModeResult]]) -> dict[str, Any]:
    """The best in-process configuration against the best remote one (configuration and depth)."""
    local = min(
        ((name, r["in-process"].mean_s) for name, r in table.items()), key=lambda item: item[1]
    )
    remote = min(
        (
            (f"{name}, depth {mode.rsplit(' ', 1)[1]}", result.mean_s)
            for name, r in table.items()
            for mode, result in r.items()
            if mode.startswith("remote")
        ),
        key=lambda item: item[1],
    )
    value = ratio(remote[1], local[1])
    return {
        "in_process": {"config": local[0], "s_per_epoch": round(local[1], 4)},
        "remote": {"config": remote[0], "s_per_epoch": round(remote[1], 4)},
        "ratio": round(value, 3),
        "target": TARGET_RATIO,
        "met": value <= TARGET_RATIO,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.training", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, help="write every number to this JSON file")
    parser.add_argument("--epochs", type=int, help="timed epochs per mode (default 3; quick 1)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"depths 1 and {DEFAULT_DEPTH}, 2 thread configurations",
    )
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    epochs = args.epochs or (1 if args.quick else 3)
    depths = QUICK_DEPTHS if args.quick else DEPTHS
    configs = (THREAD_CONFIGS[0], THREAD_CONFIGS[4]) if args.quick else THREAD_CONFIGS
    started = time.perf_counter()
    repository = ensure_repository(args.repository.resolve())
    machine = machine_summary()
    print(f"machine: {machine}")
    split = mnist_multitask()
    engine = Engine(
        load_model(repository / DEFAULT_MODEL, torch.device("cpu"), ("teacher_server.models.",))
    )
    by_config: dict[str, dict[str, ModeResult]] = {}
    for index, config in enumerate(configs):
        config_depths = depths if index == 0 else THREAD_DEPTHS
        by_config[config.name] = run_config(
            config, repository, split, engine, config_depths, epochs
        )
    main_results = by_config[configs[0].name]
    print_modes(
        f"Student epoch time ({len(split.train_x)} images, batch {BATCH_SIZE}, StudentMLP "
        f"{HIDDEN}; mean of {epochs} epoch(s) after 1 warm-up; default threads)",
        main_results,
    )
    depth, verdict = best_depth(main_results)
    print(f"\nbest loader depth this run: {depth}; {verdict}")
    print_threads(by_config)
    verdict_target = target(by_config)
    print(
        f"\nbest remote ({verdict_target['remote']['config']}: "
        f"{verdict_target['remote']['s_per_epoch']:.3f} s/epoch) / best in-process "
        f"({verdict_target['in_process']['config']}: "
        f"{verdict_target['in_process']['s_per_epoch']:.3f} s/epoch) = "
        f"{verdict_target['ratio']:.3f}x ("
        + ("within" if verdict_target["met"] else "NOT within")
        + f" the {TARGET_RATIO:.2f}x target)"
    )
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine,
                "epochs": epochs,
                "batch_size": BATCH_SIZE,
                "hidden": list(HIDDEN),
                "results": {
                    name: {mode: r.to_json() for mode, r in modes.items()}
                    for name, modes in by_config.items()
                },
                "best_depth": depth,
                "verdict": verdict,
                "target": verdict_target,
            },
        )


if __name__ == "__main__":
    main()
