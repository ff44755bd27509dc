"""`CachePass`: what one `SoftTargetLoader` pass does with its `SoftTargetCache`."""

from __future__ import annotations

import dataclasses

import numpy as np

from student_client.digests import sample_digests
from student_client.offline.cache import SoftTargetCache
from student_client.offline.scope import CachedRows, CacheScope
from student_client.online.client import TeacherClient
from student_client.types import ModelInfo, SoftTargets, TargetOptions


class CachePass:
    """What one `SoftTargetLoader` pass does with its cache: learn the version and tasks to look
    up, look each batch up, and complete partial batches with the teacher's answer.

    The version is `options.model_version` when the caller pinned one, else the version the
    teacher serves when the pass starts (one `ModelInfo` call, not a soft-target request); the
    loader pins the pass's requests to it, so a teacher that changes mid-pass fails the pass
    instead of mixing versions, and the next pass looks up the new version."""

    def __init__(
        self, cache: SoftTargetCache, client: TeacherClient, options: TargetOptions
    ) -> None:
        if options.hints:
            raise ValueError("cache: hints are not cached; use a loader without a cache for them")
        version, tasks = options.model_version, tuple(options.tasks)
        self.info: ModelInfo | None = None  # what the teacher said, when it was asked
        if not version or not tasks:
            self.info = client.model_info(options.model, options.model_version)
            version = version or self.info.model_version
            tasks = tasks or tuple(task.name for task in self.info.tasks)
        self.cache = cache
        self.scope = CacheScope.from_options(options, version, tasks)
        self.options = dataclasses.replace(options, model_version=version, tasks=tasks)

    @property
    def version(self) -> str:
        return self.scope.model_version

    def lookup(self, inputs: np.ndarray) -> CachedRows:
        return self.cache.lookup(self.scope, sample_digests(inputs))

    def answer(self, cached: CachedRows, batch_id: str) -> SoftTargets:
        """A batch found whole in the cache."""
        return self.cache.assemble(cached, None, batch_id)

    def complete(self, cached: CachedRows, fresh: SoftTargets) -> SoftTargets:
        """Store the teacher's answer for the missing samples and return the whole batch."""
        if fresh.model_version == self.version:
            self.cache.store(self.scope, [cached.digests[i] for i in cached.missing], fresh)
        return self.cache.assemble(cached, fresh)
