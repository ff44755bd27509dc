"""A small local training loop for students, with a progress bar and per-task evaluation.

Two modes share one loop: hard labels (sum of per-task cross-entropies) and distillation (the
`MultiTaskKDLoss` over the teacher's soft targets, which arrive beside each batch from a
`SoftTargetLoader`). The loop only sees `(inputs, labels, soft_targets_or_None)` batches.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from student_client.types import SoftTargets

Batch = tuple[torch.Tensor, Mapping[str, torch.Tensor], SoftTargets | None]
LossFn = Callable[
    [Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], SoftTargets | None], torch.Tensor
]


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    loss: float  # mean training loss over the epoch's batches
    seconds: float  # wall time of the epoch's training (not evaluation)
    samples_per_second: float
    accuracy: dict[str, float]  # task -> held-out accuracy after the epoch


def hard_label_loss(
    logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor], _: SoftTargets | None
) -> torch.Tensor:
    """Sum over tasks of the cross-entropy with the hard labels."""
    return torch.stack([F.cross_entropy(logits[task], labels[task]) for task in logits]).sum()


def distillation_loss(kd: nn.Module) -> LossFn:
    """Wrap a `MultiTaskKDLoss` so it takes the teacher's probabilities from the batch's targets."""

    def loss(
        logits: Mapping[str, torch.Tensor],
        labels: Mapping[str, torch.Tensor],
        targets: SoftTargets | None,
    ) -> torch.Tensor:
        if targets is None:
            raise ValueError("distillation needs soft targets beside each batch")
        teacher = {task: targets.tensor(task) for task in logits}
        return kd(logits, teacher, labels)

    return loss


@torch.inference_mode()
def evaluate(
    model: nn.Module, images: np.ndarray, labels: Mapping[str, np.ndarray], batch_size: int = 1000
) -> dict[str, float]:
    """Accuracy per task of `model` on held-out `images`."""
    was_training = model.training
    model.eval()
    correct = {task: 0 for task in labels}
    for start in range(0, len(images), batch_size):
        logits = model(torch.from_numpy(images[start : start + batch_size]))
        for task in labels:
            predicted = logits[task].argmax(1).numpy()
            correct[task] += int((predicted == labels[task][start : start + batch_size]).sum())
    model.train(was_training)
    return {task: correct[task] / len(images) for task in labels}


def fit(
    model: nn.Module,
    epoch_batches: Callable[[int], Iterable[Batch]],
    loss_fn: LossFn,
    epochs: int,
    evaluate_fn: Callable[[nn.Module], dict[str, float]],
    lr: float = 1e-3,
    description: str = "train",
    progress: bool = True,
    extra_parameters: Iterable[nn.Parameter] = (),
) -> list[EpochRecord]:
    """Train `model` for `epochs` with Adam; `epoch_batches(epoch)` gives that epoch's batches.
    `extra_parameters` are trained beside the model's (a loss's own parameters, e.g. the
    log-variances of `MultiTaskKDLoss(task_weighting="uncertainty")`).
    Returns one record per epoch (loss, time, throughput, held-out accuracy)."""
    optimizer = torch.optim.Adam([*model.parameters(), *extra_parameters], lr=lr)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        losses, samples = [], 0
        start = time.perf_counter()
        bar = tqdm(
            epoch_batches(epoch),
            desc=f"{description} epoch {epoch}/{epochs}",
            unit="batch",
            leave=False,
            # In a log (not a terminal) every refresh would be written out: there, the line per
            # epoch below is the progress.
            disable=not progress or not _is_terminal(sys.stderr),
            dynamic_ncols=True,
        )
        for inputs, labels, targets in bar:
            loss = loss_fn(model(inputs), labels, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            samples += len(inputs)
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{losses[-1]:.4f}", samples_per_s=f"{samples / max(elapsed, 1e-9):.0f}"
            )
        seconds = time.perf_counter() - start
        accuracy = evaluate_fn(model)
        history.append(
            EpochRecord(
                epoch, float(np.mean(losses)), seconds, samples / max(seconds, 1e-9), accuracy
            )
        )
        if progress:
            tqdm.write(
                f"{description} epoch {epoch}/{epochs}: loss {history[-1].loss:.4f}, "
                f"{history[-1].samples_per_second:.0f} samples/s, "
                + ", ".join(f"{task} {value:.4f}" for task, value in accuracy.items())
            )
    return history


def _is_terminal(stream: IO[str] | None) -> bool:
    return stream is not None and stream.isatty()
