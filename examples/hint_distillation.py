"""KD + a FitNets hint from a remote teacher, against KD alone, on the same student.

    python examples/hint_distillation.py [--teacher HOST:PORT] [--epochs 20] [--seeds 3]

Without --teacher it starts a local teacher (training the default one on first start). The student
is the quickstart's MLP; the hint is the teacher's shared `features` (256 values per image),
streamed beside the soft targets; the student's hidden layer regresses it through a learnable
linear adapter (`HintLoss`, Romero et al. 2015). Loss = MultiTaskKD(alpha, T) + beta * hint MSE.
Prints held-out accuracy per task, mean ± std over seeds, for both.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from student_client import SoftTargetLoader, TargetOptions, TeacherClient
from student_client.teacher_process import TeacherProcess
from student_client.training.datasets import mnist_multitask, shuffled_batches
from student_client.training.feature_losses import HintLoss
from student_client.training.losses import MultiTaskKDLoss
from student_client.training.models import StudentMLP
from student_client.training.trainer import evaluate, fit


class StudentWithHint(nn.Module):
    """The student plus its hint adapter, so one optimizer trains both; `forward` returns the
    task logits and keeps the hidden features of the last batch for the hint loss."""

    def __init__(self, student: StudentMLP, hint: HintLoss) -> None:
        super().__init__()
        self.student, self.hint = student, hint
        self.features = torch.empty(0)

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        self.features = self.student.trunk(inputs)  # (batch, hidden)
        return {name: head(self.features) for name, head in self.student.heads.items()}


def train(
    client: TeacherClient, seed: int, epochs: int, beta: float | None, args: argparse.Namespace
) -> dict[str, float]:
    data = mnist_multitask(args.n_train)
    torch.manual_seed(seed)
    student = StudentMLP((1, 28, 28), data.tasks, (args.hidden,))
    hint_shape = client.model_info().hints["features"]
    model = StudentWithHint(student, HintLoss((args.hidden,), hint_shape))
    kd = MultiTaskKDLoss(alpha=args.alpha, temperature=args.temperature)
    options = TargetOptions(
        temperature=args.temperature, hints=("features",) if beta is not None else ()
    )

    def batches(epoch: int) -> SoftTargetLoader:
        source = shuffled_batches(data.train_x, data.train_y, 64, seed * 1000 + epoch)
        return SoftTargetLoader(list(source), client, options)

    def loss(logits, labels, targets):  # type: ignore[no-untyped-def]
        total = kd(logits, {task: targets.tensor(task) for task in logits}, labels)
        if beta is not None:
            teacher_features = torch.from_numpy(np.array(targets.hints["features"]))
            total = total + beta * model.hint(model.features, teacher_features)
        return total

    name = "KD + hint" if beta is not None else "KD only"
    history = fit(
        model,
        batches,
        loss,
        epochs,
        lambda m: evaluate(m, data.test_x, data.test_y),
        description=f"{name} seed {seed}",
        progress=not args.no_progress,
    )
    return history[-1].accuracy


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", default=None, help="a running teacher's gRPC address")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--beta", type=float, default=1.0, help="weight of the hint loss")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, float]]] = {"KD only": [], "KD + hint": []}
    with contextlib.ExitStack() as stack:
        address = args.teacher
        if address is None:
            address = stack.enter_context(
                TeacherProcess(args.repository, ["--default-sequence-teacher", "false"])
            ).grpc_address
        client = stack.enter_context(TeacherClient(address))
        for seed in range(args.seeds):
            results["KD only"].append(train(client, seed, args.epochs, None, args))
            results["KD + hint"].append(train(client, seed, args.epochs, args.beta, args))
    print(
        f"\nheld-out accuracy %, {args.seeds} seed(s), {args.epochs} epochs, student ({args.hidden},), "
        f"T={args.temperature:g}, alpha={args.alpha:g}, beta={args.beta:g}"
    )
    for name, runs in results.items():
        cells = []
        for task in runs[0]:
            values = 100 * np.array([run[task] for run in runs])
            spread = f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else ""
            cells.append(f"{task} {values.mean():.2f}{spread}")
        print(f"  {name:<10} " + ", ".join(cells))
    return results


if __name__ == "__main__":
    main()
