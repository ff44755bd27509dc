"""The int8 student: accuracy within a few points of the float one, under half its size on disk,
and a file that loads back into a quantised model."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from student_client.training.datasets import mnist_multitask
from student_client.training.models import StudentMLP
from student_client.training.quantize import compare_int8, quantize_int8


def test_int8_student_keeps_accuracy_and_halves_the_file(tmp_path: Path) -> None:
    split = mnist_multitask(n_train=2000)
    torch.manual_seed(0)
    student = StudentMLP((1, 28, 28), split.tasks, hidden=(128,))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    images = torch.from_numpy(split.train_x)
    labels = {task: torch.from_numpy(values) for task, values in split.train_y.items()}
    for _ in range(3):  # a few epochs on hard labels: a student worth quantising
        for start in range(0, len(images), 64):
            logits = student(images[start : start + 64])
            loss = sum(
                F.cross_entropy(logits[task], labels[task][start : start + 64]) for task in logits
            )
            optimizer.zero_grad()
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()
    test_x, test_y = split.test_x[:500], {t: v[:500] for t, v in split.test_y.items()}
    result = compare_int8(student, test_x, test_y, tmp_path, latency_batch=32, repeats=5)

    assert result.float_accuracy["digit"] > 0.85  # the float student learnt something
    for task, accuracy in result.float_accuracy.items():
        assert abs(result.int8_accuracy[task] - accuracy) <= 0.03, task
    assert result.int8_bytes < result.float_bytes / 2
    assert result.float_latency_ms > 0 and result.int8_latency_ms > 0
    # The saved int8 state dict loads into a freshly quantised copy and gives the same logits.
    fresh = quantize_int8(StudentMLP((1, 28, 28), split.tasks, hidden=(128,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.load_state_dict(torch.load(result.int8_path, weights_only=True))
        reference = quantize_int8(student)
    batch = torch.from_numpy(test_x[:16])
    for task, logits in fresh(batch).items():
        torch.testing.assert_close(logits, reference(batch)[task])
    # The float student is left as it was (a copy was quantised).
    assert isinstance(student.trunk[1], torch.nn.Linear)
