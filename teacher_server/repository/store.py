"""The model repository: a folder per model, holding one version or a subfolder per version.

    model_repository/
      mnist-multitask/                 one current version
        config.json
        model.safetensors
      text-topics/                     several versions, served side by side
        1/config.json, 1/model.safetensors
        2/config.json, 2/model.safetensors    <- the default version: the last label in order
      mnist-ensemble/config.json       an ensemble: members named in the config, no weights

`config.json` is described in `teacher_server.repository.model_config`; a Hugging Face
`save_pretrained` folder is recognised by its own config.json and loaded through
`teacher_server.repository.huggingface_config`. Weights are loaded with safetensors
only: nothing is unpickled, and an architecture is imported only if its module path starts with
one of the operator's allowed prefixes (`Settings.allowed_architectures`). Requests never name
files or import paths.

The model version is `sha256:` + the hex digest of the config bytes followed by the weight bytes
(for an ensemble: followed by its members' versions), so any change to either gives a new version.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from teacher_server.repository.huggingface_config import (
    huggingface_model_config,
    is_huggingface,
    is_huggingface_config,
    load_huggingface,
)
from teacher_server.repository.model_config import (
    ModelConfig,
    ModelLoadError,
    TaskConfig,
    parse_config,
)

__all__ = ["LoadedModel", "ModelConfig", "ModelLoadError", "TaskConfig", "VersionFolder"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class VersionFolder:
    """Where one version of a model lives. `label` is the subfolder name, "" for a single-version
    model folder."""

    model: str
    label: str
    path: Path


@dataclass(frozen=True)
class LoadedModel:
    """A model version ready to run (eval mode, on `device`). A plain model has `module`,
    `forward_features` (the backbone) and `heads` (checked at load); an ensemble has `members`."""

    config: ModelConfig
    label: str
    version: str
    device: torch.device
    module: nn.Module | None = None
    forward_features: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None
    heads: nn.ModuleDict | None = None
    members: tuple[LoadedModel, ...] = ()


def _label_key(label: str) -> tuple[int, int | str]:
    return (0, int(label)) if label.isdigit() else (1, label)


def scan_repository(root: Path) -> dict[str, list[VersionFolder]]:
    """Model name -> its version folders, oldest first (numeric labels in numeric order). A folder
    that holds neither a config.json nor versions with one is skipped."""
    models: dict[str, list[VersionFolder]] = {}
    if not root.is_dir():
        return models
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (folder / CONFIG_FILE).is_file():
            models[folder.name] = [VersionFolder(folder.name, "", folder)]
            continue
        versions = [
            VersionFolder(folder.name, sub.name, sub)
            for sub in folder.iterdir()
            if sub.is_dir() and (sub / CONFIG_FILE).is_file()
        ]
        if versions:
            models[folder.name] = sorted(versions, key=lambda v: _label_key(v.label))
    return models


Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(folders: list[VersionFolder]) -> Fingerprint:
    """(path, size, mtime_ns) of every file directly in the model's version folders, sorted: a
    cheap stand-in for the content, read without opening a file. Any write, rename or
    replacement of a file changes it (its mtime); it is what lets a reload of unchanged files
    skip re-reading and re-hashing them, and what repository polling watches."""
    entries = []
    for folder in folders:
        for path in folder.path.iterdir():
            if path.is_file():
                stat = path.stat()
                entries.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


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


def read_config(folder: VersionFolder) -> tuple[ModelConfig, bytes]:
    config_path = folder.path / CONFIG_FILE
    config_bytes = config_path.read_bytes()
    try:
        raw = json.loads(config_bytes)
    except ValueError as error:
        raise ModelLoadError(f"{config_path}: not valid JSON: {error}") from error
    if is_huggingface_config(raw):  # a `save_pretrained` folder: its config is derived
        config = huggingface_model_config(folder.path, folder.model, raw)
    else:
        config = parse_config(raw, str(config_path))
    if config.name != folder.model:
        raise ModelLoadError(
            f"{config_path}: config name {config.name!r} does not match its folder {folder.model!r}"
        )
    return config, config_bytes


def load_version(
    folder: VersionFolder,
    device: torch.device,
    allowed_prefixes: tuple[str, ...],
    member: Callable[[str], LoadedModel] | None = None,
) -> LoadedModel:
    """Load one version folder. `member(name)` gives an ensemble's loaded members. Raises
    `ModelLoadError` with a message naming the folder and the fault."""
    config, config_bytes = read_config(folder)
    if config.is_ensemble:
        return _load_ensemble(folder, config, config_bytes, device, member)
    if is_huggingface(config):
        return _load_huggingface(folder, config, config_bytes, device, allowed_prefixes)
    weights_path = folder.path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelLoadError(f"{folder.path}: missing {WEIGHTS_FILE}")
    weights_bytes = weights_path.read_bytes()
    try:
        cls = import_architecture(config.architecture, allowed_prefixes)
    except ModelLoadError as error:
        raise ModelLoadError(f"{folder.path / CONFIG_FILE}: {error}") from error
    tasks = {t.name: t.num_classes for t in config.tasks}
    try:
        module = cls(tasks=tasks, **config.kwargs)
    except TypeError as error:
        raise ModelLoadError(
            f"{folder.path / CONFIG_FILE}: kwargs do not fit {config.architecture}: {error}"
        ) from error
    try:
        state = load_safetensors(weights_bytes)
    except SafetensorError as error:
        raise ModelLoadError(f"{weights_path}: not a safetensors file: {error}") from error
    try:
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
    return LoadedModel(config, folder.label, version, device, module, forward_features, heads)


def _load_huggingface(
    folder: VersionFolder,
    config: ModelConfig,
    config_bytes: bytes,
    device: torch.device,
    allowed_prefixes: tuple[str, ...],
) -> LoadedModel:
    """A Hugging Face folder through its adapter; the version hashes config.json, the image
    processor config and the weights."""
    try:
        import_architecture(config.architecture, allowed_prefixes)
    except ModelLoadError as error:
        raise ModelLoadError(f"{folder.path / CONFIG_FILE}: {error}") from error
    module, content = load_huggingface(folder.path, config)
    forward_features = getattr(module, "forward_features", None)
    heads = getattr(module, "heads", None)
    if not callable(forward_features) or not isinstance(heads, nn.ModuleDict):
        raise ModelLoadError(f"{folder.path}: the adapter has no forward_features() or heads")
    module.to(device).eval()
    version = "sha256:" + hashlib.sha256(config_bytes + content).hexdigest()
    return LoadedModel(config, folder.label, version, device, module, forward_features, heads)


def _load_ensemble(
    folder: VersionFolder,
    config: ModelConfig,
    config_bytes: bytes,
    device: torch.device,
    member: Callable[[str], LoadedModel] | None,
) -> LoadedModel:
    if member is None:
        raise ModelLoadError(f"{folder.path}: an ensemble needs its members loaded first")
    members = []
    for name in config.members:
        try:
            loaded = member(name)
        except KeyError:
            raise ModelLoadError(
                f"{folder.path}: ensemble member {name!r} is not a served model"
            ) from None
        if loaded.members:  # the engine averages plain members' outputs only
            raise ModelLoadError(
                f"{folder.path}: ensemble member {name!r} is itself an ensemble; list its "
                "members instead"
            )
        if _signature(loaded.config) != _signature(config):
            raise ModelLoadError(
                f"{folder.path}: ensemble tasks and input {_signature(config)} differ from member "
                f"{name!r}'s {_signature(loaded.config)}"
            )
        members.append(loaded)
    digest = hashlib.sha256(config_bytes + "".join(m.version for m in members).encode())
    return LoadedModel(
        config, folder.label, "sha256:" + digest.hexdigest(), device, members=tuple(members)
    )


def _signature(config: ModelConfig) -> tuple[object, ...]:
    """What an ensemble and its members must share: tasks with class names, and the input (shape,
    dtype, uint8 scale, max value): the ensemble's input is what each member gets."""
    tasks = tuple((t.name, t.class_names) for t in config.tasks)
    return tasks, config.input_shape, config.input_dtype, config.uint8_scale, config.max_value


def save_model(folder: Path, config: ModelConfig, module: nn.Module) -> None:
    """Write `config.json` and `model.safetensors` into `folder` (created if needed): a model
    version the repository can load."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")


def load_model(
    folder: Path, device: torch.device, allowed_prefixes: tuple[str, ...]
) -> LoadedModel:
    """Load a single plain model version folder (tests, benchmarks, tools)."""
    return load_version(VersionFolder(folder.name, "", folder), device, allowed_prefixes)
