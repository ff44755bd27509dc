"""The issue's "light teacher": an MLP with 64 inputs, two 512-wide layers and three heads.

Data: scikit-learn's `load_digits` (1,797 real 8x8 digits, pixel values 0..16), flattened to 64
values and scaled to [0, 1]; the same three tasks as the default teacher (`digit` 10 classes,
`parity` 2, `loops` 3). `build_light_repository(root)` trains it for a few seconds and writes a
model repository folder that both our teacher server (started with
`--allowed-architectures bench.,teacher_server.models.`) and the KServe wrapper
(`bench/kserve_teacher.py`) load.

This module imports only torch at import time, so the KServe virtual environment can import the
architecture too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

LIGHT_MODEL_NAME = "light-digits"
LIGHT_ARCHITECTURE = "bench.light_teacher:LightTeacher"
LOOPS_PER_DIGIT = np.array([1, 0, 0, 0, 1, 0, 1, 0, 2, 1])
TASK_CLASSES = {
    "digit": [str(d) for d in range(10)],
    "parity": ["even", "odd"],
    "loops": ["0", "1", "2"],
}
N_TEST = 297  # the last 297 of a seeded permutation of 1,797 are held out


class LightTeacher(nn.Module):
    """Input (batch, 64) float32 in [0, 1]; backbone 64 -> 512 -> 512 (ReLU); a linear head per
    task. `forward_features` returns {"features": (batch, 512)}."""

    def __init__(self, tasks: dict[str, int], in_features: int = 64, hidden: int = 512) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in tasks.items()})

    def forward_features(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": self.backbone(inputs)}

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.forward_features(inputs)["features"]
        return {name: head(features) for name, head in self.heads.items()}


def digits_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_digits, test_x, test_digits): x (n, 64) float32 in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    return x[:-N_TEST], y[:-N_TEST], x[-N_TEST:], y[-N_TEST:]


def _labels(digits: np.ndarray) -> dict[str, torch.Tensor]:
    return {
        "digit": torch.from_numpy(digits),
        "parity": torch.from_numpy(digits % 2),
        "loops": torch.from_numpy(LOOPS_PER_DIGIT[digits]),
    }


def train_light_teacher(epochs: int = 20, seed: int = 0) -> tuple[LightTeacher, dict[str, float]]:
    """Train on the digits split (Adam, batch 64); returns the model and held-out accuracy."""
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = digits_data(seed)
    model = LightTeacher({task: len(names) for task, names in TASK_CLASSES.items()})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inputs, labels = torch.from_numpy(train_x), _labels(train_y)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(inputs), generator=generator).split(64):
            logits = model(inputs[index])
            loss = sum(
                nn.functional.cross_entropy(logits[t], labels[t][index]) for t in TASK_CLASSES
            )
            optimizer.zero_grad()
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()
    model.eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(test_x))
    truth = _labels(test_y)
    accuracy = {
        task: float((logits[task].argmax(1) == truth[task]).float().mean()) for task in TASK_CLASSES
    }
    return model, accuracy


def build_light_repository(root: Path) -> Path:
    """Train the light teacher and write it as `root/light-digits/` (config.json +
    model.safetensors). Returns `root`."""
    from teacher_server.repository.model_config import ModelConfig, TaskConfig
    from teacher_server.repository.store import save_model

    model, accuracy = train_light_teacher()
    config = ModelConfig(
        name=LIGHT_MODEL_NAME,
        architecture=LIGHT_ARCHITECTURE,
        kwargs={},
        tasks=tuple(
            TaskConfig(task, tuple(names), accuracy[task]) for task, names in TASK_CLASSES.items()
        ),
        input_shape=(64,),
        input_dtype="float32",
        uint8_scale=1.0 / 16.0,  # raw load_digits pixels are 0..16
        hints=(),
        description="Light teacher: MLP 64-512-512 with 3 heads, on scikit-learn load_digits",
    )
    save_model(root / LIGHT_MODEL_NAME, config, model)
    return root
