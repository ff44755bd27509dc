"""A short CUDA check of the engine: the same requests on CPU and on CUDA must agree.

    python scripts/check_cuda_engine.py MODEL_FOLDER IMAGES.npy

Loads the model folder on both devices, runs the engine on the images (probs at T=1 and T=4,
log_probs, top-3, float16 output, hints) and prints the largest difference per output, then times
a batch-256 forward on each device. Exits 1 if a float32 output differs by more than 1e-5 with TF32 off,
or 2e-3 with cuDNN's default TF32 convolutions.
Needs torch, numpy, safetensors and protobuf only (no server, no data download).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from teacher_server.repository.store import load_model
from teacher_server.serving.engine import Engine
from teacher_server.serving.schema import SoftTargetsRequest, ValidatedRequest


def requests(images: np.ndarray) -> list[ValidatedRequest]:
    tasks = ("digit", "parity", "loops")
    variants = [
        {"temperature": 1.0},
        {"temperature": 4.0},
        {"temperature": 2.0, "output": "log_probs"},
        {"temperature": 4.0, "top_k": 2},
        {"temperature": 4.0, "output_dtype": "float16"},
        {"temperature": 1.0, "hints": ("features", "feature_map")},
    ]
    out = []
    for i, variant in enumerate(variants):
        chunk = images[i * 64 : (i + 1) * 64]
        request = SoftTargetsRequest(
            model="m", inputs=chunk, tasks=tasks, batch_id=str(i), **variant
        )  # type: ignore[arg-type]
        out.append(ValidatedRequest(request, tasks, chunk))
    return out


def max_difference(cpu: list, cuda: list, report: bool) -> float:  # type: ignore[type-arg]
    worst = 0.0
    for a, b in zip(cpu, cuda, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            diff = float(np.abs(x.values.astype(np.float64) - y.values.astype(np.float64)).max())
            if report:
                print(
                    f"batch {a.batch_id} {x.task} {x.kind} {x.values.dtype} top_k={x.indices is not None}: max |cpu - cuda| = {diff:.2e}"
                )
            if x.values.dtype != np.float16:
                worst = max(worst, diff)
        for name in a.hints:
            diff = float(np.abs(a.hints[name] - b.hints[name]).max())
            if report:
                print(
                    f"batch {a.batch_id} hint {name} {a.hints[name].shape}: max |cpu - cuda| = {diff:.2e}"
                )
    return worst


def main() -> int:
    folder, images_path = Path(sys.argv[1]), Path(sys.argv[2])
    images = np.load(images_path).astype(np.float32)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    engines = {
        name: Engine(load_model(folder, torch.device(name), ("teacher_server.models.",)))
        for name in ("cpu", "cuda")
    }
    batch = requests(images)
    torch.backends.cudnn.allow_tf32 = False  # exact float32 convolutions first
    worst_exact = max_difference(
        engines["cpu"].run(batch), engines["cuda"].run(batch), report=False
    )
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for cuDNN convolutions
    print(f"TF32 off: worst |cpu - cuda| over float32 outputs = {worst_exact:.2e}")
    cpu, cuda = engines["cpu"].run(batch), engines["cuda"].run(batch)
    worst = max_difference(cpu, cuda, report=True)
    print(f"TF32 on (default): worst |cpu - cuda| over float32 outputs = {worst:.2e}")
    if worst_exact > 1e-5 or worst > 2e-3:
        print("ABOVE TOLERANCE (1e-5 exact, 2e-3 with TF32)")
        return 1
    tasks = ("digit", "parity", "loops")
    big = np.concatenate([images] * 3)[:256]
    for name, engine in engines.items():
        request = [
            ValidatedRequest(SoftTargetsRequest(model="m", inputs=big, tasks=tasks), tasks, big)
        ]
        for _ in range(3):
            engine.run(request)
        start = time.perf_counter()
        for _ in range(20):
            engine.run(request)
        seconds = (time.perf_counter() - start) / 20
        print(
            f"{name}: batch 256, engine.run (forward + softmax + to numpy): {1000 * seconds:.2f} ms, {256 / seconds:,.0f} samples/s"
        )
    print("OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
