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

A sequence model (served once the sequence engine lands; see docs/model-repository.md) declares
token sequences as its input, its tokenizer, and each task's level:

    "input": {"kind": "tokens", "vocab_size": 4096, "max_length": 128},
    "tokenizer": {"file": "tokenizer.json", "sha256": "sha256:<hex of the file's bytes>",
                  "vocab_size": 4096, "special_ids": {"pad": 0, "bos": 1, "eos": 2}},
    "tasks": [{"name": "next_token", "level": "token", "num_classes": 4096},
              {"name": "topic_group", "class_names": ["a", "b", "c"], "test_accuracy": 0.8}],
    "held_out_metrics": {"perplexity": 41.5}

`level` is `"sequence"` (one distribution per input, today's behaviour and the default) or
`"token"` (one per position). A token-level task may give `num_classes` instead of `class_names`:
a language-model head's classes are the tokenizer's tokens, named by the tokenizer file, not
listed again. `input.vocab_size` is the head's width, at least the tokenizer's `vocab_size` (some
models pad it). Token ids are then in [0, input.vocab_size), sequences at most `max_length` long.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

INPUT_DTYPES = ("float32", "int64")
INPUT_KINDS = ("tensor", "tokens")
TASK_LEVELS = ("sequence", "token")
KNOWN_FIELDS = frozenset(
    {
        "name",
        "description",
        "architecture",
        "kwargs",
        "tasks",
        "input",
        "hints",
        "ensemble",
        "tokenizer",
        "held_out_metrics",
    }
)
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


class ModelLoadError(Exception):
    """A model folder that cannot be served; the message names the folder and the fault."""


def file_sha256(data: bytes) -> str:
    """A file's content hash as config.json writes it: `sha256:` + hex digest of its bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TaskConfig:
    """One task. `num_classes` is `len(class_names)` unless a token-level task omits its names."""

    name: str
    class_names: tuple[str, ...]
    test_accuracy: float | None = None
    level: str = "sequence"  # "sequence": one distribution per input; "token": one per position
    num_classes: int = 0  # 0: len(class_names)

    def __post_init__(self) -> None:
        if not self.num_classes:
            object.__setattr__(self, "num_classes", len(self.class_names))

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name}
        if self.level != "sequence":
            body["level"] = self.level
        if self.class_names:
            body["class_names"] = list(self.class_names)
        else:
            body["num_classes"] = self.num_classes
        if self.test_accuracy is not None:
            body["test_accuracy"] = self.test_accuracy
        return body


@dataclass(frozen=True)
class TokenizerConfig:
    """A sequence model's tokenizer: its file in the model folder, that file's `file_sha256`, the
    vocabulary size it defines and its special token ids by role (e.g. `pad`, `bos`, `eos`)."""

    file: str
    sha256: str
    vocab_size: int
    special_ids: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "special_ids": dict(self.special_ids),
        }


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
    # Sequence models (input kind "tokens"): input_shape is (max_length,), input_dtype "int64",
    # max_value the head's vocabulary size.
    input_kind: str = "tensor"
    tokenizer: TokenizerConfig | None = None
    held_out_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)

    @property
    def is_sequence_model(self) -> bool:
        return self.input_kind == "tokens"

    def to_json(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "shape": list(self.input_shape),
            "dtype": self.input_dtype,
            "uint8_scale": self.uint8_scale,
        }
        if self.max_value is not None:
            spec["max_value"] = self.max_value
        sequence: dict[str, Any] = {}
        if self.is_sequence_model:
            spec = {
                "kind": "tokens",
                "vocab_size": self.max_value,
                "max_length": self.input_shape[0],
            }
            if self.tokenizer is not None:
                sequence["tokenizer"] = self.tokenizer.to_json()
        if self.held_out_metrics:
            sequence["held_out_metrics"] = dict(self.held_out_metrics)
        body: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.is_ensemble:
            body["ensemble"] = {"members": list(self.members)}
        else:
            body |= {"architecture": self.architecture, "kwargs": self.kwargs}
        return body | {
            "tasks": [t.to_json() for t in self.tasks],
            "input": spec,
            "hints": list(self.hints),
            **sequence,
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
        level = task.get("level", "sequence")
        if level not in TASK_LEVELS:
            raise fail(f"tasks[{i}].level", f"must be one of {list(TASK_LEVELS)}, got {level!r}")
        classes = task.get("class_names")
        num_classes = task.get("num_classes", 0)
        if level == "token" and classes is None:
            if not _is_int(num_classes) or num_classes < 2:
                raise fail(
                    f"tasks[{i}].num_classes",
                    f"must be an integer >= 2 when class_names is omitted, got {num_classes!r}",
                )
            classes = []
        elif not isinstance(classes, list) or len(classes) < 2:
            raise fail(f"tasks[{i}].class_names", "must list at least 2 class names")
        elif level == "token" and num_classes not in (0, len(classes)):
            raise fail(
                f"tasks[{i}].num_classes",
                f"must equal the {len(classes)} class names, got {num_classes!r}",
            )
        accuracy = task.get("test_accuracy")
        if accuracy is not None and not isinstance(accuracy, (int, float)):
            raise fail(f"tasks[{i}].test_accuracy", "must be a number")
        tasks.append(
            TaskConfig(
                task["name"],
                tuple(str(c) for c in classes),
                accuracy,
                level,
                0 if classes else num_classes,
            )
        )
    if len({t.name for t in tasks}) != len(tasks):
        raise fail("tasks", "has duplicate task names")
    spec = raw.get("input")
    if not isinstance(spec, dict):
        raise fail("input", "must be an object with 'shape' and 'dtype'")
    kind = spec.get("kind", "tensor")
    if kind not in INPUT_KINDS:
        raise fail("input.kind", f"must be one of {list(INPUT_KINDS)}, got {kind!r}")
    held_out = _parse_metrics(raw.get("held_out_metrics", {}), fail)
    if kind == "tokens":
        if members:
            raise fail("input.kind", "'tokens' is not supported for an ensemble yet")
        return _parse_sequence_model(raw, spec, name, architecture, kwargs, tasks, held_out, fail)
    for i, task in enumerate(tasks):
        if task.level == "token":
            raise fail(f"tasks[{i}].level", "'token' needs input kind 'tokens'")
    if "tokenizer" in raw:
        raise fail("tokenizer", "is only for input kind 'tokens'")
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
        held_out_metrics=held_out,
    )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_metrics(raw: Any, fail: Callable[[str, str], ModelLoadError]) -> dict[str, float]:
    if not isinstance(raw, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw.values()
    ):
        raise fail("held_out_metrics", f"must map metric names to numbers, got {raw!r}")
    return {str(k): float(v) for k, v in raw.items()}


def _parse_sequence_model(
    raw: dict[str, Any],
    spec: dict[str, Any],
    name: str,
    architecture: str,
    kwargs: dict[str, Any],
    tasks: list[TaskConfig],
    held_out: dict[str, float],
    fail: Callable[[str, str], ModelLoadError],
) -> ModelConfig:
    """The rest of a config whose input kind is `tokens` (see the module docstring)."""
    vocab_size, max_length = spec.get("vocab_size"), spec.get("max_length")
    if not _is_int(vocab_size) or vocab_size < 2:
        raise fail("input.vocab_size", f"must be an integer >= 2, got {vocab_size!r}")
    if not _is_int(max_length) or max_length < 1:
        raise fail("input.max_length", f"must be a positive integer, got {max_length!r}")
    tokenizer = raw.get("tokenizer")
    if not isinstance(tokenizer, dict):
        raise fail("tokenizer", "must be an object with file, sha256, vocab_size and special_ids")
    file = tokenizer.get("file")
    if not isinstance(file, str) or not file or "/" in file or "\\" in file or file[0] == ".":
        raise fail("tokenizer.file", f"must be a file name in the model folder, got {file!r}")
    digest = tokenizer.get("sha256")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise fail("tokenizer.sha256", f"must be 'sha256:' + 64 hex digits, got {digest!r}")
    tokens = tokenizer.get("vocab_size")
    if not _is_int(tokens) or not 2 <= tokens <= vocab_size:
        raise fail(
            "tokenizer.vocab_size",
            f"must be an integer in [2, input.vocab_size={vocab_size}], got {tokens!r}",
        )
    special = tokenizer.get("special_ids", {})
    if not isinstance(special, dict):
        raise fail("tokenizer.special_ids", f"must map roles to token ids, got {special!r}")
    for role, token_id in special.items():
        if not _is_int(token_id) or not 0 <= token_id < tokens:
            raise fail(
                f"tokenizer.special_ids.{role}", f"must be an id in [0, {tokens}), got {token_id!r}"
            )
    hints = raw.get("hints", [])
    if not isinstance(hints, list) or not all(isinstance(h, str) for h in hints):
        raise fail("hints", "must be a list of names")
    return ModelConfig(
        name=name,
        architecture=architecture,
        kwargs=kwargs,
        tasks=tuple(tasks),
        input_shape=(max_length,),
        input_dtype="int64",
        uint8_scale=1.0,
        hints=tuple(hints),
        description=str(raw.get("description", "")),
        max_value=vocab_size,
        extra={k: v for k, v in raw.items() if k not in KNOWN_FIELDS},
        input_kind="tokens",
        tokenizer=TokenizerConfig(file, digest, tokens, dict(special)),
        held_out_metrics=held_out,
    )
