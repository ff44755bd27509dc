"""The student side: get a remote teacher's soft targets and distil from them.

from student_client import SoftTargetLoader, TargetOptions, TeacherClient
from student_client.losses import MultiTaskKDLoss
"""

from student_client.cache import SoftTargetCache
from student_client.client import TeacherClient
from student_client.loader import SoftTargetLoader
from student_client.types import ModelInfo, SoftTargets, TargetOptions, TaskTargets

__all__ = [
    "ModelInfo",
    "SoftTargetCache",
    "SoftTargetLoader",
    "SoftTargets",
    "TargetOptions",
    "TaskTargets",
    "TeacherClient",
]
