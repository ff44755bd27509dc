"""The student side: get a remote teacher's soft targets and distil from them.

    from student_client import SoftTargetLoader, TargetOptions, TeacherClient
    from student_client.training.losses import MultiTaskKDLoss

Floors, each importing only those below it: `types` and `digests` (bottom); `offline/` (the
soft-target cache, the export format and its reader; no network code); `online/` (the client, its
transports, the loader, the export writer); `training/` (losses, models, trainer, demo); `cli`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from student_client.types import ModelInfo, SoftTargets, TargetOptions, TaskTargets, TokenBatch

if TYPE_CHECKING:
    from student_client.offline.cache import SoftTargetCache
    from student_client.online.client import TeacherClient
    from student_client.online.loader import SoftTargetLoader
    from student_client.online.token_loader import TokenTargetLoader

# Imported on first use, so that `import student_client.offline.reader` (training from an export)
# does not load grpc and httpx through this package's own import.
_LAZY = {
    "SoftTargetCache": "student_client.offline.cache",
    "SoftTargetLoader": "student_client.online.loader",
    "TeacherClient": "student_client.online.client",
    "TokenTargetLoader": "student_client.online.token_loader",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'student_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ModelInfo",
    "SoftTargetCache",
    "SoftTargetLoader",
    "SoftTargets",
    "TargetOptions",
    "TaskTargets",
    "TeacherClient",
    "TokenBatch",
    "TokenTargetLoader",
]
