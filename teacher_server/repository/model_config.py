"""A model's `config.json`: what it is, validated field by field.

    {
      "name": "mnist-multitask",                    # must equal the model's folder name
      "description": "...",
      "architecture": "teacher_server.models.multitask_cnn:MultiTaskCNN",
      "kwargs": {"feature_dim": 256},               # passed to the class with `tasks`
      "tasks": [{"name": "digit", "class_names": ["0", ..., "9"], "test_accuracy": 0.98}, ...],
      "input": {"shape": [1, 28, 28], "dtype": "float32", "uint8_scale": 0.00392156862745098},
      "hints": ["features", "feature_map"]
    }

An ensemble names member models instead of an architecture (and has no weights file):
`"ensemble": {"members": ["model-a", "model-b"]}`; its tasks and input must equal every member's.
Token models use `"input": {"shape": [16], "dtype": "int64", "max_value": 1000}` (ids must be in
[0, max_value)). Unknown top-level fields are kept (e.g. training metadata) and ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

INPUT_DTYPES = ("float32", "int64")
KNOWN_FIELDS = frozenset(
    {"name", "description", "architecture", "kwargs", "tasks", "input", "hints", "ensemble"}
)


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
    architecture: str  # "package.module:Class"; "" for an ensemble
    kwargs: dict[str, Any]
    tasks: tuple[TaskConfig, ...]
    input_shape: tuple[int, ...]  # per sample, without the batch dimension
    input_dtype: str  # the forward's dtype: "float32" or "int64"
    uint8_scale: float  # uint8 inputs are multiplied by this (float models only)
    hints: tuple[str, ...]
    description: str = ""
    members: tuple[str, ...] = ()  # an ensemble's member model names
    max_value: int | None = None  # token models: ids must be < max_value
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)

    def to_json(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "shape": list(self.input_shape),
            "dtype": self.input_dtype,
            "uint8_scale": self.uint8_scale,
        }
        if self.max_value is not None:
            spec["max_value"] = self.max_value
        body: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.is_ensemble:
            body["ensemble"] = {"members": list(self.members)}
        else:
            body |= {"architecture": self.architecture, "kwargs": self.kwargs}
        return body | {
            "tasks": [
                {"name": t.name, "class_names": list(t.class_names)}
                | ({"test_accuracy": t.test_accuracy} if t.test_accuracy is not None else {})
                for t in self.tasks
            ],
            "input": spec,
            "hints": list(self.hints),
            **self.extra,
        }


def parse_config(raw: Any, where: str) -> ModelConfig:
    """Validate a decoded config.json; `ModelLoadError` names `where` and the bad field."""

    def fail(field_name: str, problem: str) -> ModelLoadError:
        return ModelLoadError(f"{where}: config field {field_name!r} {problem}")

    if not isinstance(raw, dict):
        raise ModelLoadError(f"{where}: config must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise fail("name", "must be a non-empty string")
    members: tuple[str, ...] = ()
    architecture = raw.get("architecture", "")
    if "ensemble" in raw:
        ensemble = raw["ensemble"]
        listed = ensemble.get("members") if isinstance(ensemble, dict) else None
        if (
            not isinstance(listed, list)
            or len(listed) < 2
            or not all(isinstance(m, str) for m in listed)
        ):
            raise fail("ensemble.members", "must list at least 2 member model names")
        if name in listed or len(set(listed)) != len(listed):
            raise fail(
                "ensemble.members", f"must be distinct models other than itself, got {listed}"
            )
        members = tuple(listed)
    elif not isinstance(architecture, str) or ":" not in architecture:
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
    max_value = spec.get("max_value")
    if max_value is not None and (not isinstance(max_value, int) or max_value < 1):
        raise fail("input.max_value", f"must be a positive integer, got {max_value!r}")
    hints = raw.get("hints", [])
    if not isinstance(hints, list) or not all(isinstance(h, str) for h in hints):
        raise fail("hints", "must be a list of names")
    if members and hints:
        raise fail("hints", "must be empty for an ensemble (members' features differ)")
    return ModelConfig(
        name=name,
        architecture=architecture if not members else "",
        kwargs=kwargs,
        tasks=tuple(tasks),
        input_shape=tuple(shape),
        input_dtype=dtype,
        uint8_scale=float(scale),
        hints=tuple(hints),
        description=str(raw.get("description", "")),
        members=members,
        max_value=max_value,
        extra={k: v for k, v in raw.items() if k not in KNOWN_FIELDS},
    )
