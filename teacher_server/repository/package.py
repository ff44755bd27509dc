"""Package a trained `nn.Module` as a model version the teacher serves.

    from teacher_server.repository.package import package_model

    version = package_model(
        Path("model_repository/my-teacher/1"), model,
        name="my-teacher",
        architecture="teacher_server.models.multitask_cnn:MultiTaskCNN",
        kwargs={"feature_dim": 64},
        tasks={"digit": [str(d) for d in range(10)], "parity": ["even", "odd"]},
        input_shape=(1, 28, 28), uint8_scale=1 / 255, hints=["features"],
    )

`package_model` checks the module against what it is told (the class's import path, the heads, one
forward, the hints), writes `config.json` and `model.safetensors` into a hidden folder of the
repository, loads that folder back exactly as the server would (and checks that the rebuilt module
gives the same outputs), and only then renames it into place, so a server polling the repository
never sees half a version. `teacher-server package` does the same from the command line, from a
weights file (see `package_command`).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from teacher_server.repository.model_config import (
    ModelConfig,
    ModelLoadError,
    TaskConfig,
    parse_config,
)
from teacher_server.repository.store import (
    CONFIG_FILE,
    VersionFolder,
    import_architecture,
    load_version,
    save_model,
)

log = logging.getLogger(__name__)

DEFAULT_ALLOWED_PREFIXES = ("teacher_server.models.",)


def _split_out(out: Path, name: str) -> tuple[Path, str]:
    """(repository root, version label) for `out`: `root/NAME` (label "") or `root/NAME/LABEL`."""
    if out.name == name:
        if out.is_dir() and any((sub / CONFIG_FILE).is_file() for sub in out.iterdir()):
            raise ValueError(
                f"out: {out} holds version subfolders; package into {out}/<version> instead"
            )
        return out.parent, ""
    if out.parent.name == name:
        if (out.parent / CONFIG_FILE).is_file():
            raise ValueError(
                f"out: {out.parent} is a single-version model folder (it has {CONFIG_FILE}); "
                "the server would ignore a version subfolder in it"
            )
        return out.parent.parent, out.name
    raise ValueError(
        f"out: the model folder must be named after the model: expected .../{name} or "
        f".../{name}/<version>, got {out}"
    )


def _check_architecture(module: nn.Module, architecture: str) -> None:
    module_name, _, class_name = architecture.partition(":")
    cls = type(module)
    actual = f"{cls.__module__}:{cls.__qualname__}"
    if actual != architecture:
        raise ValueError(f"architecture: {architecture!r} but the module is a {actual!r}")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"architecture: {architecture!r} cannot be imported ({error}); define the class in "
            "an importable module, not in a script or a function"
        ) from error
    if found is not cls:
        raise ValueError(f"architecture: {architecture!r} imports another class than the module's")


def _sample(
    input_shape: Sequence[int], input_dtype: str, max_value: int | None, device: torch.device
) -> torch.Tensor:
    """A small fixed batch of inputs for checking forwards."""
    generator = torch.Generator().manual_seed(0)
    shape = (2, *input_shape)
    if input_dtype == "int64":
        return torch.randint(0, max_value or 1, shape, generator=generator).to(device)
    return torch.rand(shape, generator=generator).to(device)


class _NotTheContract(ValueError):
    """The module does not have the architecture contract's shape (not an error of its forward)."""


def _forward(
    module: nn.Module, inputs: torch.Tensor, tasks: Mapping[str, Sequence[str]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(task logits, named features) of one eval-mode forward; the module's mode is restored."""
    forward_features = getattr(module, "forward_features", None)
    if not callable(forward_features):
        raise _NotTheContract(f"module: {type(module).__qualname__} has no forward_features()")
    heads: nn.ModuleDict = getattr(module, "heads")  # noqa: B009 (checked by the caller)
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            features = forward_features(inputs)
            if not isinstance(features, dict) or "features" not in features:
                raise _NotTheContract(
                    "module: forward_features() must return a dict with a 'features' entry"
                )
            logits = {task: heads[task](features["features"]) for task in tasks}
    finally:
        module.train(was_training)
    return logits, features


def package_model(
    out: Path | str,
    module: nn.Module,
    *,
    name: str,
    architecture: str,
    kwargs: Mapping[str, Any],
    tasks: Mapping[str, Sequence[str]],
    input_shape: Sequence[int],
    input_dtype: str = "float32",
    uint8_scale: float = 1.0,
    hints: Sequence[str] = (),
    description: str = "",
    max_value: int | None = None,
    allowed_prefixes: Sequence[str] | None = None,
    overwrite: bool = False,
) -> str:
    """Write `module` as model `name` into `out` (`repository/NAME` for a single-version model,
    `repository/NAME/VERSION` for one of several versions) and return its model version
    (`sha256:...`, what ListModels will show).

    `architecture` ("package.module:Class") must be the module's class; the server rebuilds it as
    `Class(tasks={task: n_classes}, **kwargs)` and loads the weights. `tasks` maps each task (a key
    of `module.heads`) to its class names. `hints` are entries of `forward_features()` to serve.
    `allowed_prefixes`: checked like the server's `TEACHER_ALLOWED_ARCHITECTURES` when loading the
    written folder back (None: the architecture's own module; a warning is logged if the server's
    default prefixes would refuse it).
    `overwrite`: replace an existing folder at `out`. Raises `ValueError` when the module does not
    fit what is declared, `ModelLoadError` when the written folder does not load back."""
    out = Path(out)
    root, label = _split_out(out, name)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out: {out} already exists and is not empty (pass overwrite=True)")
    if input_dtype != "int64" and max_value is not None:
        raise ValueError("max_value: only token models (input_dtype 'int64') have a max_value")
    try:
        json.dumps(dict(kwargs))
    except (TypeError, ValueError) as error:
        raise ValueError(f"kwargs: must be JSON values ({error})") from error
    config = ModelConfig(
        name=name,
        architecture=architecture,
        kwargs=dict(kwargs),
        tasks=tuple(TaskConfig(task, tuple(classes)) for task, classes in tasks.items()),
        input_shape=tuple(int(d) for d in input_shape),
        input_dtype=input_dtype,
        uint8_scale=float(uint8_scale),
        hints=tuple(hints),
        description=description,
        max_value=max_value,
    )
    try:  # the same checks the server makes, on the config as it will be written
        config = parse_config(json.loads(json.dumps(config.to_json())), f"model {name!r}")
    except ModelLoadError as error:
        raise ValueError(str(error)) from error

    _check_architecture(module, architecture)
    module_name = architecture.partition(":")[0]
    if not any(module_name.startswith(p) for p in DEFAULT_ALLOWED_PREFIXES):
        log.warning(
            "architecture %s is not under the server's default prefixes %s: set "
            "TEACHER_ALLOWED_ARCHITECTURES on the server to allow it",
            architecture,
            list(DEFAULT_ALLOWED_PREFIXES),
        )
    heads = getattr(module, "heads", None)
    if not isinstance(heads, nn.ModuleDict) or set(heads.keys()) != set(tasks):
        found = sorted(heads.keys()) if isinstance(heads, nn.ModuleDict) else type(heads).__name__
        raise ValueError(
            f"module: `heads` must be a ModuleDict of the tasks {sorted(tasks)}, got {found}"
        )
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    sample = _sample(config.input_shape, input_dtype, max_value, device)
    try:
        logits, features = _forward(module, sample, tasks)
    except _NotTheContract:
        raise
    except Exception as error:
        raise ValueError(
            f"module: a forward of a batch of shape {list(sample.shape)} {input_dtype} failed: "
            f"{error!r}"
        ) from error
    for task, classes in tasks.items():
        if tuple(logits[task].shape) != (len(sample), len(classes)):
            raise ValueError(
                f"tasks: head {task!r} gives logits of shape {list(logits[task].shape[1:])} "
                f"per sample, but {len(classes)} class names are declared"
            )
    missing = [hint for hint in config.hints if hint not in features]
    if missing:
        raise ValueError(
            f"hints: {missing} are not returned by forward_features() (it returns "
            f"{sorted(features)})"
        )

    root.mkdir(parents=True, exist_ok=True)
    # Hidden and at the repository's top level: a polling server never scans it.
    staging = Path(tempfile.mkdtemp(prefix=f".package-{name}-", dir=root))
    try:
        save_model(staging, config, module)
        prefixes = tuple(allowed_prefixes) if allowed_prefixes is not None else (module_name,)
        try:
            loaded = load_version(
                VersionFolder(name, label, staging), torch.device("cpu"), prefixes
            )
        except ModelLoadError as error:  # name the folder the caller asked for
            raise ModelLoadError(str(error).replace(str(staging), str(out))) from error
        assert loaded.module is not None
        reloaded, _ = _forward(loaded.module, sample.cpu(), tasks)
        for task in tasks:
            if not torch.allclose(reloaded[task], logits[task].cpu(), rtol=1e-3, atol=1e-4):
                raise ModelLoadError(
                    f"{architecture}(tasks=..., **{dict(kwargs)}) with the saved weights gives "
                    f"other outputs than the module for task {task!r}: do the kwargs rebuild it?"
                )
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".replaced-{name}-", dir=root))
            os.replace(out, old / "old")
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "packaged model %s%s into %s: %s",
        name,
        f" version {label}" if label else "",
        out,
        loaded.version,
    )
    return loaded.version


# ---- the command line: `teacher-server package` -----------------------------------------------


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors`, or from `.pt` / `.pth` with `torch.load(weights_only=True)`
    (no arbitrary unpickling)."""
    if path.suffix not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"weights: {path} must be .safetensors, .pt or .pth")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # not safetensors, or a pickle holding more than tensors
        raise ValueError(f"weights: cannot read {path}: {error}") from error
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"weights: {path} does not hold a state dict (name -> tensor)")
    return state


def parse_task(text: str) -> tuple[str, list[str]]:
    """`digit=0,1,2` -> ("digit", ["0", "1", "2"])."""
    task, sep, classes = text.partition("=")
    if not sep or not task or not classes:
        raise ValueError(f"--task: expected NAME=class,class,..., got {text!r}")
    return task, classes.split(",")


def model_name_for(out: Path) -> str:
    """The model name `out` implies: `repository/NAME/<digits>` is a version of NAME, anything
    else is the model folder itself."""
    return out.parent.name if out.name.isdigit() else out.name


def package_command(
    *,
    architecture: str,
    kwargs_json: str,
    weights: Path,
    tasks: Sequence[str],
    input_shape: str,
    out: Path,
    input_dtype: str = "float32",
    uint8_scale: float = 1.0,
    hints: Sequence[str] = (),
    max_value: int | None = None,
    description: str = "",
    name: str | None = None,
    server_prefixes: Sequence[str] = ("teacher_server.models.",),
    allow_architecture_prefixes: Sequence[str] = (),
    overwrite: bool = False,
) -> str:
    """Build `architecture` (allowed by the server's prefix rule, `server_prefixes`: the
    `allowed_architectures` setting, plus `allow_architecture_prefixes`), load `weights` into it,
    and package it into `out`. Returns the model version."""
    kwargs = json.loads(kwargs_json)
    if not isinstance(kwargs, dict):
        raise ValueError(f"--kwargs: must be a JSON object, got {kwargs_json!r}")
    task_classes = dict(parse_task(task) for task in tasks)
    if len(task_classes) != len(tasks):
        raise ValueError("--task: a task is given twice")
    try:
        shape = [int(d) for d in input_shape.split(",")]
    except ValueError:
        raise ValueError(f"--input-shape: expected e.g. 1,28,28, got {input_shape!r}") from None
    prefixes = (*server_prefixes, *allow_architecture_prefixes)
    cls = import_architecture(architecture, prefixes)
    try:
        module = cls(tasks={t: len(c) for t, c in task_classes.items()}, **kwargs)
    except TypeError as error:
        raise ValueError(f"--kwargs: do not fit {architecture}: {error}") from error
    try:
        module.load_state_dict(load_weights(weights), strict=True)
    except RuntimeError as error:
        raise ValueError(f"--weights: {weights} does not fit {architecture}: {error}") from error
    return package_model(
        out,
        module,
        name=name or model_name_for(out),
        architecture=architecture,
        kwargs=kwargs,
        tasks=task_classes,
        input_shape=shape,
        input_dtype=input_dtype,
        uint8_scale=uint8_scale,
        hints=hints,
        description=description,
        max_value=max_value,
        allowed_prefixes=prefixes,
        overwrite=overwrite,
    )
