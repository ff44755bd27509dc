"""Training the students for each distillation setting and collecting their accuracies.

A little over 400 lines: `Runner` (trains one setting) and the experiments that call it change
together.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.distill_eval.data import BATCH_SIZE, DEFAULT_ALPHA, LR, Dataset, Plan, say
from bench.distill_eval.fetch import (
    Fetched,
    TeacherOutputs,
    Wire,
    fetch_logits,
    fetch_setting,
    parse_setting,
    probs_at,
    softmax_check,
)
from student_client.online.client import TeacherClient
from student_client.training.feature_losses import HintLoss
from student_client.training.losses import HintonKDLoss, MultiTaskKDLoss, TopKKDLoss
from student_client.training.models import StudentMLP, parameter_count


@dataclass(frozen=True)
class RunConfig:
    """One training configuration. `targets`: `hard`, `dense-f32` (client-side softmax of the
    fetched logits) or a fetched setting (`dense-f16`, `top3-f16`, ...); `task`: a single-task
    student of that task (None: all heads); `beta`: weight of the hint loss (0: none)."""

    hidden: int
    targets: str = "hard"
    temperature: float = 0.0
    alpha: float = 0.0
    task: str | None = None
    beta: float = 0.0
    epochs: int = 0  # 0: the plan's

    @property
    def key(self) -> str:
        parts = [f"h{self.hidden}", self.targets]
        if self.targets != "hard":
            parts += [f"T{self.temperature:g}", f"a{self.alpha:g}"]
        if self.task:
            parts.append(f"only-{self.task}")
        if self.beta:
            parts.append(f"hint{self.beta:g}")
        if self.epochs:
            parts.append(f"e{self.epochs}")
        return "/".join(parts)


@dataclass
class RunSummary:
    """All seeds of one configuration. `accuracy[task]`: held-out accuracy per seed (fraction)."""

    config: RunConfig
    seeds: list[int]
    parameters: int
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    loss_per_epoch: list[list[float]] = field(default_factory=list)  # per seed
    digit_accuracy_per_epoch: list[list[float]] = field(default_factory=list)  # per seed
    kd_term: list[dict[str, dict[str, float]]] = field(default_factory=list)  # per seed

    def mean(self, task: str = "digit") -> float:
        return float(np.mean(self.accuracy[task]))

    def std(self, task: str = "digit") -> float:
        values = self.accuracy[task]
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "seeds": self.seeds,
            "parameters": self.parameters,
            "accuracy": {
                task: {"mean": self.mean(task), "std": self.std(task), "per_seed": values}
                for task, values in self.accuracy.items()
            },
            "seconds_per_seed": [round(s, 2) for s in self.seconds],
            "loss_per_epoch": self.loss_per_epoch,
            "digit_accuracy_per_epoch": self.digit_accuracy_per_epoch,
            "kd_term": self.kd_term,
        }


LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


class Runner:
    """Trains students of one dataset from the fetched teacher outputs; results are memoised by
    configuration, so experiments sharing a configuration share its runs."""

    def __init__(
        self, data: Dataset, teacher: TeacherOutputs, seeds: Sequence[int], epochs: int
    ) -> None:
        self.data = data
        self.teacher = teacher
        self.seeds = list(seeds)
        self.epochs = epochs
        self.train_x = torch.from_numpy(data.train_x)
        self.test_x = torch.from_numpy(data.test_x)
        self.train_y = {t: torch.from_numpy(v) for t, v in data.train_y.items()}
        self.features = None if teacher.features is None else torch.from_numpy(teacher.features)
        self.fetched: dict[str, Fetched] = {}
        self.runs: dict[str, RunSummary] = {}
        self._probs: dict[float, dict[str, torch.Tensor]] = {}
        self.planned = 0

    def probs(self, temperature: float) -> dict[str, torch.Tensor]:
        if temperature not in self._probs:
            self._probs[temperature] = {
                task: probs_at(values, temperature)
                for task, values in self.teacher.train_logits.items()
            }
        return self._probs[temperature]

    def loss_for(self, config: RunConfig, tasks: dict[str, int]) -> LossFn:
        labels = self.train_y
        if config.targets == "hard":

            def hard(logits: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
                return torch.stack(
                    [F.cross_entropy(logits[t], labels[t][index]) for t in logits]
                ).sum()

            return hard
        k, _ = (0, "") if config.targets == "dense-f32" else parse_setting(config.targets)
        if k == 0:
            probs = (
                self.probs(config.temperature)
                if config.targets == "dense-f32"
                else self.fetched[config.targets].values
            )
            multi = MultiTaskKDLoss(alpha=config.alpha, temperature=config.temperature)

            def dense(logits: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
                return multi(
                    logits,
                    {t: probs[t][index] for t in logits},
                    {t: labels[t][index] for t in logits},
                )

            return dense
        fetched = self.fetched[config.targets]
        topk = TopKKDLoss(alpha=config.alpha, temperature=config.temperature)

        def sparse(logits: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
            return torch.stack(
                [
                    topk(
                        logits[t],
                        fetched.values[t][index],
                        fetched.indices[t][index],
                        fetched.tail[t][index],
                        labels[t][index],
                    )
                    for t in logits
                ]
            ).sum()

        return sparse

    @torch.inference_mode()
    def accuracy(self, student: StudentMLP) -> dict[str, float]:
        student.eval()
        logits = student(self.test_x)
        student.train()
        return {
            task: float((values.argmax(1).numpy() == self.data.test_y[task]).mean())
            for task, values in logits.items()
        }

    @torch.inference_mode()
    def kd_terms(self, student: StudentMLP, config: RunConfig) -> dict[str, dict[str, float]]:
        """The pure KD term (T^2 KL, no labels) on the whole training set per task, against the
        dense float32 targets and, for a top-k configuration, against its top-k targets."""
        student.eval()
        logits = student(self.train_x)
        student.train()
        t = config.temperature
        dense_kd = HintonKDLoss(temperature=t)
        probs = self.probs(t)
        out = {"dense": {task: float(dense_kd(v, probs[task])) for task, v in logits.items()}}
        k, _ = (0, "") if config.targets == "dense-f32" else parse_setting(config.targets)
        if k:
            fetched = self.fetched[config.targets]
            topk = TopKKDLoss(temperature=t)
            out[config.targets] = {
                task: float(
                    topk(v, fetched.values[task], fetched.indices[task], fetched.tail[task])
                )
                for task, v in logits.items()
            }
        return out

    def train_one(self, config: RunConfig, seed: int) -> dict[str, Any]:
        tasks = {config.task: self.data.tasks[config.task]} if config.task else self.data.tasks
        torch.manual_seed(seed)
        student = StudentMLP(self.data.input_shape, tasks, (config.hidden,))
        hint: HintLoss | None = None
        if config.beta:
            assert self.features is not None, "the teacher serves no features hint"
            hint = HintLoss((config.hidden,), tuple(self.features.shape[1:]))
        parameters = [*student.parameters(), *(hint.parameters() if hint else [])]
        optimizer = torch.optim.Adam(parameters, lr=LR)
        loss_fn = self.loss_for(config, tasks)
        distil = config.targets != "hard"
        kd_terms = {"init": self.kd_terms(student, config)} if distil else {}
        n = len(self.train_x)
        losses, curve = [], []
        started = time.perf_counter()
        for epoch in range(1, (config.epochs or self.epochs) + 1):
            order = np.random.default_rng(seed * 1000 + epoch).permutation(n)
            total = 0.0
            for start in range(0, n, BATCH_SIZE):
                index = torch.from_numpy(order[start : start + BATCH_SIZE])
                features = student.trunk(self.train_x[index])
                logits = {task: head(features) for task, head in student.heads.items()}
                loss = loss_fn(logits, index)
                if hint is not None and self.features is not None:
                    loss = loss + config.beta * hint(features, self.features[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(index)
            losses.append(total / n)
            accuracy = self.accuracy(student)
            if "digit" in accuracy:
                curve.append(accuracy["digit"])
        seconds = time.perf_counter() - started
        if distil:
            kd_terms["final"] = self.kd_terms(student, config)
        return {
            "accuracy": accuracy,
            "losses": losses,
            "curve": curve,
            "kd_terms": kd_terms,
            "seconds": seconds,
            "parameters": parameter_count(student),
        }

    def run(self, config: RunConfig) -> RunSummary:
        if config.key in self.runs:
            return self.runs[config.key]
        summary: RunSummary | None = None
        for seed in self.seeds:
            result = self.train_one(config, seed)
            if summary is None:
                summary = RunSummary(config, self.seeds, result["parameters"])
            for task, value in result["accuracy"].items():
                summary.accuracy.setdefault(task, []).append(value)
            summary.seconds.append(result["seconds"])
            summary.loss_per_epoch.append([round(x, 6) for x in result["losses"]])
            summary.digit_accuracy_per_epoch.append(result["curve"])
            summary.kd_term.append(result["kd_terms"])
            shown = ", ".join(f"{t} {100 * a:.2f}" for t, a in result["accuracy"].items())
            say(
                f"  [{self.data.name} {len(self.runs) + 1}/{self.planned or '?'}] "
                f"{config.key} seed {seed}: {shown} ({result['seconds']:.1f} s)"
            )
        assert summary is not None
        self.runs[config.key] = summary
        return summary


def best_of(summaries: dict[float, RunSummary]) -> float:
    """The key with the highest mean digit accuracy (ties: the first, i.e. the smallest)."""
    return max(summaries, key=lambda key: (summaries[key].mean(), -key))


def pct(summary: RunSummary, task: str = "digit") -> str:
    if task not in summary.accuracy:
        return "-"
    text = f"{100 * summary.mean(task):.2f}"
    if len(summary.seeds) > 1:
        text += f" ± {100 * summary.std(task):.2f}"
    return text


def planned_runs(plan: Plan, has_features: bool) -> int:
    """Configurations the plan trains (for the progress counter)."""
    count = len(plan.sizes) * (1 + len(plan.temperatures))
    count += max(len(plan.alphas) - 1, 0)
    count += max(len(plan.compression) - 1, 0)
    count += 6 if plan.multitask else 0
    count += len(plan.betas) if has_features else 0
    count += len(plan.sizes) * (1 + len(plan.temperatures)) if plan.long_epochs else 0
    return count


def evaluate_dataset(
    plan: Plan, data: Dataset, address: str, seeds: Sequence[int]
) -> dict[str, Any]:
    """Every experiment of `plan` on `data`, against the teacher at `address`."""
    result: dict[str, Any] = {"plan": asdict(plan), "train_samples": len(data.train_x)}
    result["test_samples"] = len(data.test_x)
    with TeacherClient(address) as client:
        info = client.wait_ready(120)
        hints = ("features",) if "features" in info.hints else ()
        started = time.perf_counter()
        train_logits, features = fetch_logits(client, data.train_x, hints)
        test_logits, _ = fetch_logits(client, data.test_x)
        teacher = TeacherOutputs(
            info.name, info.model_version, info.parameter_count, train_logits, test_logits, features
        )
        result["fetch_logits_seconds"] = round(time.perf_counter() - started, 2)
        result["teacher"] = {
            "model": info.name,
            "model_version": info.model_version,
            "parameters": info.parameter_count,
            "accuracy": teacher.accuracy(data),
            "hints": list(hints),
        }
        result["softmax_check"] = softmax_check(client, data.train_x, train_logits, 4.0)
        say(
            f"[{data.name}] teacher {info.name} ({info.parameter_count:,} parameters), held-out "
            + ", ".join(f"{t} {100 * a:.2f}%" for t, a in result["teacher"]["accuracy"].items())
            + f"; client softmax vs server probs at T=4: max |diff| "
            f"{result['softmax_check']['max_abs_diff']:.2e}"
        )
        wire = Wire(address, info.name)
        try:
            runner = Runner(data, teacher, seeds, plan.epochs)
            runner.planned = planned_runs(plan, features is not None)
            result["experiments"] = run_experiments(plan, runner, wire)
        finally:
            wire.close()
    result["runs"] = {key: summary.to_json() for key, summary in runner.runs.items()}
    return result


def temperature_sweep(plan: Plan, runner: Runner, epochs: int = 0) -> dict[str, Any]:
    """Hard labels and KD at each T (alpha 0.9) for every student size (main size first)."""
    sizes = sorted(plan.sizes, key=lambda h: h != plan.main_hidden)
    by_size: dict[int, dict[str, Any]] = {}
    for hidden in sizes:
        hard = runner.run(RunConfig(hidden, epochs=epochs))
        kd = {
            t: runner.run(RunConfig(hidden, "dense-f32", t, DEFAULT_ALPHA, epochs=epochs))
            for t in plan.temperatures
        }
        best_t = best_of(kd)
        by_size[hidden] = {
            "hard": hard.config.key,
            "kd": {f"{t:g}": s.config.key for t, s in kd.items()},
            "best_T": best_t,
            "best_gain_points": 100 * (kd[best_t].mean() - hard.mean()),
        }
    best_t = by_size[plan.main_hidden]["best_T"]
    say(
        f"[{runner.data.name}] best T per size (alpha {DEFAULT_ALPHA:g}, "
        f"{epochs or runner.epochs} epochs): "
        + ", ".join(f"{h}: T={v['best_T']:g}" for h, v in by_size.items())
    )
    return {
        "alpha": DEFAULT_ALPHA,
        "epochs": epochs or runner.epochs,
        "by_size": by_size,
        "best_T": best_t,
    }


def run_experiments(plan: Plan, runner: Runner, wire: Wire) -> dict[str, Any]:
    data = runner.data
    experiments: dict[str, Any] = {}

    # 1. Temperature sweep per student size.
    experiments["temperature"] = temperature_sweep(plan, runner)
    best_t = experiments["temperature"]["best_T"]

    # 2. Alpha at the best T.
    best_alpha = DEFAULT_ALPHA
    if plan.alphas:
        by_alpha = {
            a: runner.run(RunConfig(plan.main_hidden, "dense-f32", best_t, a)) for a in plan.alphas
        }
        best_alpha = best_of(by_alpha)
        experiments["alpha"] = {
            "temperature": best_t,
            "runs": {f"{a:g}": s.config.key for a, s in by_alpha.items()},
            "best_alpha": best_alpha,
        }
        say(f"[{data.name}] best alpha at T={best_t:g}: {best_alpha:g}")

    # 3.-5. run at the best T with alpha 0.9, where the soft targets carry most of the loss (an
    # alpha near 0 would make every kind of target look alike); on MNIST that is the best alpha.
    alpha = DEFAULT_ALPHA

    # 3. Compression at the best T (quick: at T = 4).
    t_comp = plan.compression_temperature or best_t
    compression: dict[str, Any] = {"temperature": t_comp, "alpha": alpha, "settings": {}}
    server_dense = fetch_setting(wire, data, "dense-f32", t_comp)
    client_dense = runner.probs(t_comp)
    compression["server_vs_client_dense_max_abs_diff"] = max(
        float((server_dense.values[task] - client_dense[task]).abs().max()) for task in data.tasks
    )
    for setting in plan.compression:
        fetched = (
            server_dense if setting == "dense-f32" else fetch_setting(wire, data, setting, t_comp)
        )
        if setting != "dense-f32":
            runner.fetched[setting] = fetched
        summary = runner.run(RunConfig(plan.main_hidden, setting, t_comp, alpha))
        compression["settings"][setting] = {
            "run": summary.config.key,
            "bytes": fetched.bytes,
            "tail_zeroed_max": fetched.tail_zeroed_max,
        }
    experiments["compression"] = compression

    # 4. One multi-task student vs one student per task.
    if plan.multitask:
        multitask: dict[str, Any] = {"temperature": best_t, "alpha": alpha, "tasks": {}}
        multi_kd = runner.run(RunConfig(plan.main_hidden, "dense-f32", best_t, alpha))
        multi_hard = runner.run(RunConfig(plan.main_hidden))
        for task in data.tasks:
            single_hard = runner.run(RunConfig(plan.main_hidden, task=task))
            single_kd = runner.run(
                RunConfig(plan.main_hidden, "dense-f32", best_t, alpha, task=task)
            )
            multitask["tasks"][task] = {
                "multi_hard": multi_hard.config.key,
                "multi_kd": multi_kd.config.key,
                "single_hard": single_hard.config.key,
                "single_kd": single_kd.config.key,
            }
        experiments["multitask"] = multitask

    # 5. KD + hint.
    if plan.betas and runner.features is not None:
        experiments["hint"] = {
            "temperature": best_t,
            "alpha": alpha,
            "hint_dim": int(runner.features.shape[1]),
            "runs": {
                "0": runner.run(RunConfig(plan.main_hidden, "dense-f32", best_t, alpha)).config.key,
                **{
                    f"{b:g}": runner.run(
                        RunConfig(plan.main_hidden, "dense-f32", best_t, alpha, beta=b)
                    ).config.key
                    for b in plan.betas
                },
            },
        }

    # 6. The sweep of 1. again with longer training: does the best T depend on the budget?
    if plan.long_epochs:
        experiments["temperature_long"] = temperature_sweep(plan, runner, plan.long_epochs)
    return experiments
