"""What the soft-target cache keys its entries by and hands back: scopes, found rows, counters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from student_client.types import TargetOptions, TaskTargets


class CacheError(RuntimeError):
    """The cache file cannot be used (not a cache, another format, a damaged entry); the message
    names the file."""


@dataclass(frozen=True)
class CacheScope:
    """Everything but the sample that a cached value depends on: the teacher version and the
    request's settings. `tasks` is the resolved task list (the loader asks the teacher for it when
    the options leave it empty), in the order the teacher answers them."""

    model: str
    model_version: str
    tasks: tuple[str, ...]
    output: str = "probs"
    temperature: float = 1.0
    top_k: int = 0
    output_dtype: str = "float32"
    # Sequence models: the tasks with one row per real token (`TaskTargets.level == "token"`); an
    # entry of such a task holds all its sequence's rows. Not part of the stored key: a task's
    # level is fixed by the model version.
    token_tasks: tuple[str, ...] = ()
    # The wire encoding of a sequence model's top-k answer (`TargetOptions.top_k_encoding`; always
    # "tensors" otherwise). Part of the key: "packed" rounds the tail mass to `output_dtype` where
    # "tensors" sends it in float32, and "log_prob_codes" values are lossy, so one encoding's
    # entries are never handed to a request for another.
    top_k_encoding: str = "tensors"

    @property
    def stored_dtype(self) -> str:
        """`output_dtype` as the cache file keys it: with the encoding appended unless "tensors"
        (so files written before the encoding was keyed keep their entries)."""
        if self.top_k_encoding == "tensors":
            return self.output_dtype
        return f"{self.output_dtype}+{self.top_k_encoding}"

    @classmethod
    def from_options(
        cls,
        options: TargetOptions,
        model_version: str,
        tasks: Sequence[str],
        token_tasks: Sequence[str] = (),
        sequence_model: bool | None = None,
    ) -> CacheScope:
        """`sequence_model`: whether the model takes token batches (default: it has token-level
        tasks), whose top-k answers come in `options.top_k_encoding`."""
        if options.model is None:
            raise ValueError("options.model: resolve the model name first")
        sequence = bool(token_tasks) if sequence_model is None else sequence_model
        return cls(
            str(options.model),
            model_version,
            tuple(tasks),
            options.output,
            float(options.temperature),
            int(options.top_k),
            options.output_dtype,
            tuple(token_tasks),
            # the encoding a request of these options asks for (student_client.online.messages)
            options.top_k_encoding if sequence and options.top_k > 0 else "tensors",
        )


@dataclass
class CacheStats:
    """Counters of this `SoftTargetCache` object (this process): `hits`/`misses` count samples
    looked up (a sample hits when every task of the scope is cached), `stored` and `evicted`
    count entries (one per sample and task)."""

    hits: int = 0
    misses: int = 0
    memory_hits: int = 0  # samples of `hits` found in the in-process layer
    stored: int = 0
    evicted: int = 0  # entries evicted from the file by the size bound


@dataclass
class CachedRows:
    """What the cache holds for one batch: the samples found (`hit`, positions in the batch) with
    their soft targets per task (`found`, rows in `hit` order), and the others (`missing`)."""

    scope: CacheScope
    digests: list[bytes]
    hit: np.ndarray  # int64 positions, ascending
    missing: list[int]  # positions of samples with any task not cached, ascending
    found: dict[str, TaskTargets]  # empty when nothing was found
    lengths: np.ndarray | None = None  # token batches: (batch,) real tokens per sequence

    @property
    def complete(self) -> bool:
        return not self.missing
