"""v2 server and model metadata, and the version a v2 address names, resolved on the core."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib import metadata
from typing import Any, Final

from protocol.errors import NotFound
from teacher_server.serving.core import TeacherCore
from teacher_server.serving.schema import ModelInfo, VersionSummary
from teacher_server.v2.convert import DATATYPE_OF_NUMPY, INPUT_NAME, LENGTHS_NAME, OUTPUT_DATATYPE

PLATFORM: Final = "pytorch"
SERVER_NAME: Final = "distill-teacher"
EXTENSIONS: Final = ("binary_tensor_data",)


def server_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0"


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}


def resolve_version(summaries: Iterable[VersionSummary], model: str, version: str) -> str:
    """The `model_version` (`sha256:...`) that a non-empty v2 `version` names: a served version's
    `model_version` itself, or its label (the name of its version subfolder, e.g. "2", as Triton
    numbers versions)."""
    served = [s for s in summaries if s.name == model and s.model_version]
    for summary in served:
        if version in (summary.model_version, summary.label):
            return summary.model_version
    raise NotFound(
        f"model_version: model {model!r} has no version {version!r}; it serves "
        f"{[s.label or s.model_version for s in served]} (or leave the version out)",
        "model_version",
    )


def resolve(core: TeacherCore, model: str, version: str) -> ModelInfo:
    """The info of the version of `model` that a v2 address names (empty: the default version).
    Raises the core's error for an unknown model, `NotFound` for an unknown version."""
    info = core.model_info(model)
    if not version:
        return info
    return core.model_info(model, resolve_version(core.list_models(), model, version))


def served_versions(core: TeacherCore, model: str) -> list[str]:
    return [s.model_version for s in core.list_models() if s.name == model and s.model_version]


def _inputs_metadata(info: ModelInfo) -> list[dict[str, Any]]:
    datatype = DATATYPE_OF_NUMPY[info.input_dtype]
    if info.input_kind == "tokens":  # padded ids [N, L], L up to max_length, and the lengths
        return [
            {"name": INPUT_NAME, "datatype": datatype, "shape": [-1, -1]},
            {"name": LENGTHS_NAME, "datatype": "INT64", "shape": [-1]},
        ]
    return [{"name": INPUT_NAME, "datatype": datatype, "shape": [-1, *info.input_shape]}]


def model_metadata(info: ModelInfo, versions: Sequence[str] = ()) -> dict[str, Any]:
    """The v2 model metadata of one version: its inputs (one; a sequence model's two) and outputs
    (one FP32 per task, whose first dimension counts tokens for a token-level task; hints are not
    listed), and every served version of the model (default: `info`'s only)."""
    return {
        "name": info.name,
        "versions": list(versions) or [info.model_version],
        "platform": PLATFORM,
        "inputs": _inputs_metadata(info),
        "outputs": [
            {
                "name": task.name,
                "datatype": OUTPUT_DATATYPE,
                "shape": [-1, task.num_classes or len(task.class_names)],
            }
            for task in info.tasks
        ],
    }
