"""`TokenTargetLoader`: a `SoftTargetLoader` for sequence models (token-id batches).

    loader = TokenTargetLoader(
        batches,                      # (ids, lengths[, labels]) or (TokenBatch, labels) or TokenBatch
        teacher,                      # a TeacherClient on a sequence model
        TargetOptions(tasks=("next_token",), top_k=32, temperature=2.0),
        tokenizer_file="tokenizer.json",   # the student's own tokenizer (or tokenizer_hash=...)
        scored_ids=lambda batch: top_m_ids(student, batch),   # optional, for reverse KL
    )
    for batch, labels, targets in loader:     # batch: the TokenBatch sent; targets: its answer
        rows = targets.outputs["next_token"]  # (sum(lengths), k), rows of real tokens in order

Everything `SoftTargetLoader` guarantees holds (it does the sending): up to `depth` batches in
flight, order kept, each batch labelled exactly once across retries, reconnects and replicas, the
model version pinned for the pass.

The tokenizer handshake, once per pass and before any batch is sent: the teacher's
`ModelInfo.tokenizer.sha256` must equal the student's (the SHA-256 of `tokenizer_file`, or
`tokenizer_hash`), else `FailedPrecondition` (field `tokenizer_hash`) naming both. Every request
then carries that hash, so a teacher swapped for one with another tokenizer refuses the batch
instead of answering for ids it reads differently. The pass is pinned to the model version whose
tokenizer was checked.

Cache (`cache=SoftTargetCache(path)`): one entry per sequence, keyed by the digest of the
tokenizer hash and its real ids (never the padding), holding its token-level rows and its
sequence-level rows. A batch found whole is answered locally; a batch partly cached sends only its
uncached sequences and is merged back in order (docs/cache-and-export.md, "Token batches").

Scored ids (on-policy distillation, reverse KL): `scored_ids(batch)` returns (sum(lengths), m)
ids for a batch, typically the student's own top-m ids at each real position. It is called when
the batch is read from `batches`, just before it is sent, which is up to `depth - 1` training
steps before the student trains on it: with `depth=1` the ids come from the student as it is at
that step (strictly on-policy); a larger depth trades that freshness for overlap with the teacher.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from protocol.errors import FailedPrecondition
from student_client.offline.cache import SoftTargetCache
from student_client.online.client import TeacherClient, file_sha256
from student_client.online.loader import LoaderStats, SoftTargetLoader
from student_client.types import (
    ModelInfo,
    SoftTargets,
    TargetOptions,
    TokenBatch,
    as_token_batch,
)

ScoredIds = Callable[[TokenBatch], np.ndarray]
"""Given a batch, its (sum(lengths), m) ids to score, in token-row order (int64 or int32)."""


class TokenTargetLoader:
    def __init__(
        self,
        batches: Iterable[Any],
        client: TeacherClient,
        options: TargetOptions | None = None,
        *,
        tokenizer_file: str | Path | None = None,
        tokenizer_hash: str | None = None,
        scored_ids: ScoredIds | None = None,
        depth: int = 16,
        streams: int | None = None,
        pin_version: bool = True,
        ids_dtype: str | None = None,
        cache: SoftTargetCache | None = None,
    ) -> None:
        """`batches` yields a `TokenBatch`, `(TokenBatch, labels)`, `(ids, lengths)` or
        `(ids, lengths, labels)` (ids padded (batch, L) or packed (sum(lengths),); numpy or
        torch). Give exactly one of `tokenizer_file` (the student's `tokenizer.json`, hashed) or
        `tokenizer_hash` (`"sha256:<hex>"`). `ids_dtype` (e.g. `"int32"`) converts the ids before
        sending (half the bytes of int64). `cache`: answer the sequences it holds locally
        (keyed by their real ids and the tokenizer hash) and send only the others; not with
        `scored_ids` (the student's choice). The rest as `SoftTargetLoader`."""
        if cache is not None and scored_ids is not None:
            raise ValueError("cache: scored ids are the student's choice, not cached; drop one")
        if (tokenizer_file is None) == (tokenizer_hash is None):
            raise ValueError(
                "give exactly one of tokenizer_file (the student's tokenizer.json) or "
                "tokenizer_hash ('sha256:<hex>'): the teacher's ids must be the student's"
            )
        if tokenizer_file is not None:
            tokenizer_hash = file_sha256(Path(tokenizer_file).read_bytes())
        assert tokenizer_hash is not None
        self.tokenizer_hash = tokenizer_hash
        self.batches = batches
        self.client = client
        self.options = dataclasses.replace(
            client.with_model(options or TargetOptions()), tokenizer_hash=tokenizer_hash
        )
        self.scored_ids = scored_ids
        self.depth = depth
        self.streams = streams
        self.pin_version = pin_version
        self.ids_dtype = ids_dtype
        self.cache = cache
        self._inner: SoftTargetLoader | None = None
        self.info: ModelInfo | None = None  # the teacher's, as checked by the last pass

    @property
    def stats(self) -> LoaderStats:
        """The counters of the current (or last) pass, as `SoftTargetLoader.stats`."""
        return self._inner.stats if self._inner is not None else LoaderStats()

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def check_tokenizer(self) -> ModelInfo:
        """The teacher's model info, after checking that it reads the student's tokenizer;
        raises `FailedPrecondition` (field `tokenizer_hash`) otherwise. No batch is sent."""
        model = str(self.options.model)
        info = self.client.model_info(model, self.options.model_version)
        if info.input_kind != "tokens" or info.tokenizer is None:
            raise FailedPrecondition(
                f"model: {model!r} reads {info.input_kind!r} inputs and has no tokenizer; "
                "TokenTargetLoader needs a sequence model",
                "model",
            )
        if info.tokenizer.sha256 != self.tokenizer_hash:
            raise FailedPrecondition(
                f"tokenizer_hash: the student's ids come from tokenizer {self.tokenizer_hash!r} "
                f"but model {model!r} (version {info.model_version!r}) reads tokenizer "
                f"{info.tokenizer.sha256!r}; use the teacher's tokenizer "
                "(TeacherClient.tokenizer()) or a teacher of the student's",
                "tokenizer_hash",
            )
        return info

    def __iter__(self) -> Iterator[tuple[TokenBatch, Any, SoftTargets]]:
        info = self.info = self.check_tokenizer()
        options = self.options
        if self.pin_version and not options.model_version:
            # The version whose tokenizer was checked, not whichever answers first.
            options = dataclasses.replace(options, model_version=info.model_version)
        inner = self._inner = SoftTargetLoader(
            self._token_batches(),
            self.client,
            options,
            depth=self.depth,
            input_dtype=self.ids_dtype,
            streams=self.streams,
            pin_version=self.pin_version,
            cache=self.cache,
        )
        return iter(inner)

    def _token_batches(self) -> Iterator[tuple[TokenBatch, Any]]:
        for item in self.batches:
            batch, labels = as_token_batch(item)
            if self.scored_ids is not None:
                chosen = np.asarray(self.scored_ids(batch))
                batch = dataclasses.replace(batch, scored_ids=chosen)
            yield batch, labels


__all__ = ["ScoredIds", "TokenTargetLoader", "as_token_batch"]
