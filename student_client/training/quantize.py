"""An int8 copy of a distilled student (post-training dynamic quantisation) and how it compares
with the float student: held-out accuracy, size on disk, CPU latency.

Dynamic quantisation (`torch.ao.quantization.quantize_dynamic`) stores each `nn.Linear`'s weights
as int8 (one scale per tensor) and quantises the activations on the fly, per batch. It fits the
MLP students here: they are all Linear layers (no convolutions, whose static quantisation would
need observers and a calibration pass), it needs no calibration data and no retraining, and on a
CPU the int8 matmuls (fbgemm on x86, qnnpack on ARM) are what a deployed student runs. Torch marks
its eager-mode quantisation as deprecated in favour of the separate `torchao` package; it still
ships and works, and it is what is used until `torchao` is a dependency.

Size on disk: `torch.save` of the quantised model's `state_dict` (packed int8 weights with their
scales and zero points). safetensors stores plain tensors only and has no quantised dtypes, so it
cannot hold the packed parameters; the float student is saved the same way, so the ratio compares
like with like.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from student_client.training.trainer import evaluate


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` (on the CPU, in eval mode) whose `nn.Linear` layers are dynamically
    quantised to int8; `model` itself is not changed. Runs on the CPU only."""
    float_model = copy.deepcopy(model).to("cpu").eval()
    with warnings.catch_warnings():
        # torch's notices that eager-mode quantisation moves to torchao (see the module docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8)


def saved_bytes(model: nn.Module, path: Path) -> int:
    """Write `model.state_dict()` to `path` with `torch.save` and return the file's size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path.stat().st_size


@torch.inference_mode()
def cpu_latency_ms(model: nn.Module, inputs: torch.Tensor, repeats: int = 50) -> float:
    """Median wall time of one forward of `inputs` on the CPU, in milliseconds (after 5 warm-up
    runs, with the current torch thread setting)."""
    model = model.to("cpu").eval()
    for _ in range(5):
        model(inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(inputs)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


@dataclass(frozen=True)
class Int8Comparison:
    """The float student and its int8 copy side by side. Latency: median ms per forward of a
    batch of `latency_batch` images on the CPU."""

    float_accuracy: dict[str, float]
    int8_accuracy: dict[str, float]
    float_bytes: int
    int8_bytes: int
    float_latency_ms: float
    int8_latency_ms: float
    latency_batch: int
    int8_path: Path


def compare_int8(
    model: nn.Module,
    images: np.ndarray,
    labels: dict[str, np.ndarray],
    folder: Path,
    latency_batch: int = 64,
    repeats: int = 50,
) -> Int8Comparison:
    """Quantise `model` (see `quantize_int8`), evaluate both on `images` / `labels` (held out),
    save both state dicts into `folder` (`student_float.pt`, `student_int8.pt`; tensors only, so
    `torch.load(path, weights_only=True)` reads them back into a `quantize_int8` copy) and time
    both on the first `latency_batch` images."""
    float_model = copy.deepcopy(model).to("cpu").eval()
    int8_model = quantize_int8(float_model)
    batch = torch.from_numpy(images[:latency_batch])
    int8_path = folder / "student_int8.pt"
    return Int8Comparison(
        float_accuracy=evaluate(float_model, images, labels),
        int8_accuracy=evaluate(int8_model, images, labels),
        float_bytes=saved_bytes(float_model, folder / "student_float.pt"),
        int8_bytes=saved_bytes(int8_model, int8_path),
        float_latency_ms=cpu_latency_ms(float_model, batch, repeats),
        int8_latency_ms=cpu_latency_ms(int8_model, batch, repeats),
        latency_batch=len(batch),
        int8_path=int8_path,
    )
