"""The model repository: a folder per model holding `config.json` and `model.safetensors`.

`config.json` names the architecture by import path (`package.module:Class`) with its keyword
arguments, the tasks with their class names, the per-sample input shape and dtype, and the hints
the architecture exposes. Weights are loaded with safetensors only: nothing is unpickled, and an
architecture is imported only if its module path starts with one of the operator's allowed
prefixes (`Settings.allowed_architectures`). Requests never name files or import paths.

The model version is `sha256:` + the hex digest of the config bytes followed by the weight bytes,
so any change to either gives a new version.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INPUT_DTYPES = ("float32", "int64")


class ModelLoadError(Exception):
    """A model folder that cannot be served; the message names the folder and the fault."""


@dataclass(frozen=True)
class TaskConfig:
    name: str
    class_names: tuple[str, ...]
    test_accuracy: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    name: str
    architecture: str  # "package.module:Class"
    kwargs: dict[str, Any]
    tasks: tuple[TaskConfig, ...]
    input_shape: tuple[int, ...]  # per sample, without the batch dimension
    input_dtype: str  # the forward's dtype: "float32" or "int64"
    uint8_scale: float  # uint8 inputs are multiplied by this (float models only)
    hints: tuple[str, ...]
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "architecture": self.architecture,
            "kwargs": self.kwargs,
            "tasks": [
                {"name": t.name, "class_names": list(t.class_names)}
                | ({"test_accuracy": t.test_accuracy} if t.test_accuracy is not None else {})
                for t in self.tasks
            ],
            "input": {
                "shape": list(self.input_shape),
                "dtype": self.input_dtype,
                "uint8_scale": self.uint8_scale,
            },
            "hints": list(self.hints),
            **self.extra,
        }


def parse_config(raw: Any, where: str) -> ModelConfig:
    """Validate a decoded config.json; `ModelLoadError` names the bad field."""

    def fail(field_name: str, problem: str) -> ModelLoadError:
        return ModelLoadError(f"{where}: config field {field_name!r} {problem}")

    if not isinstance(raw, dict):
        raise ModelLoadError(f"{where}: config must be a JSON object")
    known = {"name", "description", "architecture", "kwargs", "tasks", "input", "hints"}
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise fail("name", "must be a non-empty string")
    architecture = raw.get("architecture")
    if not isinstance(architecture, str) or ":" not in architecture:
        raise fail("architecture", f"must be 'package.module:Class', got {architecture!r}")
    kwargs = raw.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise fail("kwargs", "must be an object")
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise fail("tasks", "must be a non-empty list")
    tasks = []
    for i, task in enumerate(tasks_raw):
        if not isinstance(task, dict) or not isinstance(task.get("name"), str):
            raise fail(f"tasks[{i}].name", "must be a string")
        classes = task.get("class_names")
        if not isinstance(classes, list) or len(classes) < 2:
            raise fail(f"tasks[{i}].class_names", "must list at least 2 class names")
        accuracy = task.get("test_accuracy")
        if accuracy is not None and not isinstance(accuracy, (int, float)):
            raise fail(f"tasks[{i}].test_accuracy", "must be a number")
        tasks.append(TaskConfig(task["name"], tuple(str(c) for c in classes), accuracy))
    if len({t.name for t in tasks}) != len(tasks):
        raise fail("tasks", "has duplicate task names")
    spec = raw.get("input")
    if not isinstance(spec, dict):
        raise fail("input", "must be an object with 'shape' and 'dtype'")
    shape = spec.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and d > 0 for d in shape)
    ):
        raise fail("input.shape", f"must be a list of positive integers, got {shape!r}")
    dtype = spec.get("dtype", "float32")
    if dtype not in INPUT_DTYPES:
        raise fail("input.dtype", f"must be one of {list(INPUT_DTYPES)}, got {dtype!r}")
    scale = spec.get("uint8_scale", 1.0)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise fail("input.uint8_scale", f"must be a finite number, got {scale!r}")
    hints = raw.get("hints", [])
    if not isinstance(hints, list) or not all(isinstance(h, str) for h in hints):
        raise fail("hints", "must be a list of names")
    return ModelConfig(
        name=name,
        architecture=architecture,
        kwargs=kwargs,
        tasks=tuple(tasks),
        input_shape=tuple(shape),
        input_dtype=dtype,
        uint8_scale=float(scale),
        hints=tuple(hints),
        description=str(raw.get("description", "")),
        extra={k: v for k, v in raw.items() if k not in known},
    )


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: its config, its module (eval mode, on `device`) and its version.
    `forward_features` and `heads` are the module's backbone and per-task heads, checked at load."""

    config: ModelConfig
    module: nn.Module
    forward_features: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    heads: nn.ModuleDict
    version: str
    device: torch.device


def import_architecture(path: str, allowed_prefixes: tuple[str, ...]) -> type[nn.Module]:
    module_name, _, class_name = path.partition(":")
    if not any(module_name == p.rstrip(".") or module_name.startswith(p) for p in allowed_prefixes):
        raise ModelLoadError(
            f"architecture {path!r} is not under an allowed prefix {list(allowed_prefixes)} "
            "(set TEACHER_ALLOWED_ARCHITECTURES to allow it)"
        )
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as error:
        raise ModelLoadError(f"architecture {path!r} cannot be imported: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelLoadError(f"architecture {path!r} is not an nn.Module subclass")
    return cls


def load_model(
    folder: Path, device: torch.device, allowed_prefixes: tuple[str, ...]
) -> LoadedModel:
    """Load one model folder. Raises `ModelLoadError` with a message naming the folder and fault."""
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelLoadError(f"{folder}: missing {path.name}")
    config_bytes = config_path.read_bytes()
    weights_bytes = weights_path.read_bytes()
    try:
        raw = json.loads(config_bytes)
    except ValueError as error:
        raise ModelLoadError(f"{config_path}: not valid JSON: {error}") from error
    config = parse_config(raw, str(config_path))
    cls = import_architecture(config.architecture, allowed_prefixes)
    tasks = {t.name: len(t.class_names) for t in config.tasks}
    try:
        module = cls(tasks=tasks, **config.kwargs)
    except TypeError as error:
        raise ModelLoadError(
            f"{config_path}: kwargs do not fit {config.architecture}: {error}"
        ) from error
    try:
        state = load_safetensors(weights_bytes)
        module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as error:
        raise ModelLoadError(f"{weights_path}: weights do not match the config: {error}") from error
    forward_features = getattr(module, "forward_features", None)
    if not callable(forward_features):
        raise ModelLoadError(f"{config.architecture} has no forward_features()")
    heads = getattr(module, "heads", None)
    if not isinstance(heads, nn.ModuleDict) or set(heads.keys()) != set(tasks):
        raise ModelLoadError(
            f"{config.architecture}: `heads` must be a ModuleDict of the config's tasks"
        )
    module.to(device).eval()
    version = "sha256:" + hashlib.sha256(config_bytes + weights_bytes).hexdigest()
    return LoadedModel(config, module, forward_features, heads, version, device)


def save_model(folder: Path, config: ModelConfig, module: nn.Module) -> None:
    """Write `config.json` and `model.safetensors` into `folder` (created if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")


def model_folders(root: Path) -> list[Path]:
    """The model folders directly under `root` (those holding a config.json), sorted by name."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file())
