"""`CachePass`: what one `SoftTargetLoader` pass does with its `SoftTargetCache`."""

from __future__ import annotations

import dataclasses

from student_client.digests import sample_digests, sequence_digests
from student_client.offline.cache import SoftTargetCache
from student_client.offline.scope import CachedRows, CacheScope
from student_client.online.client import TeacherClient
from student_client.types import ModelInfo, SoftTargets, TargetOptions, TeacherInputs, TokenBatch


class CachePass:
    """What one `SoftTargetLoader` pass does with its cache: learn the version and tasks to look
    up, look each batch up, and complete partial batches with the teacher's answer.

    The version is `options.model_version` when the caller pinned one, else the version the
    teacher serves when the pass starts (one `ModelInfo` call, not a soft-target request); the
    loader pins the pass's requests to it, so a teacher that changes mid-pass fails the pass
    instead of mixing versions, and the next pass looks up the new version.

    Token batches (a sequence model, `options.tokenizer_hash` set): a sequence's key is the digest
    of its tokenizer hash and its real ids (`sequence_digests`), and the pass always asks
    `ModelInfo` once, to learn which tasks are token-level (an entry of those holds one row per
    real token of its sequence)."""

    def __init__(
        self, cache: SoftTargetCache, client: TeacherClient, options: TargetOptions
    ) -> None:
        if options.hints:
            raise ValueError("cache: hints are not cached; use a loader without a cache for them")
        version, tasks = options.model_version, tuple(options.tasks)
        self.info: ModelInfo | None = None  # what the teacher said, when it was asked
        token_tasks: tuple[str, ...] = ()
        if not version or not tasks or options.tokenizer_hash:
            self.info = client.model_info(options.model, options.model_version)
            version = version or self.info.model_version
            tasks = tasks or tuple(task.name for task in self.info.tasks)
            levels = {task.name: task.level for task in self.info.tasks}
            token_tasks = tuple(task for task in tasks if levels.get(task) == "token")
        self.cache = cache
        self.tokenizer_hash = options.tokenizer_hash
        sequence = self.info is not None and self.info.input_kind == "tokens"
        self.scope = CacheScope.from_options(options, version, tasks, token_tasks, sequence)
        self.options = dataclasses.replace(options, model_version=version, tasks=tasks)

    @property
    def version(self) -> str:
        return self.scope.model_version

    def lookup(self, inputs: TeacherInputs) -> CachedRows:
        if isinstance(inputs, TokenBatch):
            if inputs.scored_ids is not None:
                raise ValueError("cache: scored ids are the student's choice, not cached")
            if not self.tokenizer_hash:
                raise ValueError("cache: token batches need options.tokenizer_hash (their key)")
            digests = sequence_digests(inputs.ids, inputs.lengths, self.tokenizer_hash)
            return self.cache.lookup(self.scope, digests, inputs.lengths)
        return self.cache.lookup(self.scope, sample_digests(inputs))

    def answer(self, cached: CachedRows, batch_id: str) -> SoftTargets:
        """A batch found whole in the cache."""
        return self.cache.assemble(cached, None, batch_id)

    def complete(self, cached: CachedRows, fresh: SoftTargets) -> SoftTargets:
        """Store the teacher's answer for the missing samples and return the whole batch."""
        if fresh.model_version == self.version:
            self.cache.store(self.scope, [cached.digests[i] for i in cached.missing], fresh)
        return self.cache.assemble(cached, fresh)
