"""Reading a token export (`student-client export --tokens`): train a sequence student from it
with no teacher running.

    from student_client.offline.token_reader import OfflineTokenTargetLoader

    for batch, labels, targets in OfflineTokenTargetLoader(batches, "runs/lm-top32"):
        rows = targets.outputs["next_token"]   # (sum(lengths), k), rows of real tokens in order

`OfflineTokenTargetLoader` takes the batches `TokenTargetLoader` takes (a `TokenBatch`,
`(TokenBatch, labels)`, `(ids, lengths)` or `(ids, lengths, labels)`, padded or packed) and yields
the same `(TokenBatch, labels, SoftTargets)` triples, with `SoftTargets.lengths` set. Sequences
are found by content: the sha256 of the export's tokenizer hash and each sequence's real ids
(`student_client.digests.sequence_digests`, the cache's key too), so any order and any batch
composition work, and a sequence the export does not hold is an error, never a wrong answer.

Shard layout (per shard of `shard_size` sequences, `start..stop-1`):

    sample_index        (n,) int64             sequence positions in the dataset
    input_sha256        (n, 32) uint8          sequence digests (tokenizer hash + real ids)
    lengths             (n,) int64             real tokens per sequence
    <task>.values       (sum(lengths) | n, k | classes)  token-level tasks: a row per token
    <task>.indices      same rows, (.., k) int64          top-k only
    <task>.tail_mass    same rows, float32                top-k of probs / log_probs only

The manifest is the image export's (`export_format`) plus `dataset.kind = "tokens"`,
`teacher.tokenizer_hash` and `settings.token_tasks`. Every shard is checked against its sha256
in the manifest when the export is opened (`CorruptShardError` otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from student_client.digests import sequence_digests
from student_client.offline.export_format import (
    ExportError,
    check_shard_rows,
    concat_rows,
    read_manifest,
    read_shard,
)
from student_client.offline.reader import MissingSampleError, OfflineStats
from student_client.types import SoftTargets, TaskTargets, TokenBatch, as_token_batch

TOKENS_KIND = "tokens"


class OfflineTokenTargets:
    """A token export read into memory: per task the rows of every exported sequence, in dataset
    order, checked against the manifest."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if self.manifest["dataset"].get("kind") != TOKENS_KIND:
            raise ExportError(
                f"{self.folder}: not a token export; read it with "
                "student_client.offline.reader.OfflineSoftTargets"
            )
        teacher, settings = self.manifest["teacher"], self.manifest["settings"]
        self.model: str = teacher["model"]
        self.model_version: str = teacher["model_version"]
        self.tokenizer_hash: str = teacher["tokenizer_hash"]
        self.tasks: tuple[str, ...] = tuple(settings["tasks"])
        self.token_tasks: tuple[str, ...] = tuple(settings["token_tasks"])
        self.output: str = settings["output"]
        self.temperature: float = float(settings["temperature"])
        self.top_k: int = int(settings["top_k"])
        self.complete: bool = bool(self.manifest.get("complete"))
        shards = sorted(self.manifest["shards"], key=lambda entry: int(entry["start"]))
        loaded = [self._load(entry) for entry in shards]
        self.sample_index = concat_rows([s["sample_index"] for s in loaded], (0,), np.int64)
        self.digests = concat_rows([s["input_sha256"] for s in loaded], (0, 32), np.uint8)
        self.lengths = concat_rows([s["lengths"] for s in loaded], (0,), np.int64)
        # the first token row of each sequence in the token-level arrays
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.arrays: dict[str, np.ndarray] = {}
        for task in self.tasks:
            for part in ("values", "indices", "tail_mass"):
                name = f"{task}.{part}"
                if loaded and name in loaded[0]:
                    self.arrays[name] = np.concatenate([s[name] for s in loaded])
        self._positions = {bytes(d): i for i, d in enumerate(self.digests)}

    def _load(self, entry: dict[str, Any]) -> dict[str, np.ndarray]:
        rows = int(entry["stop"]) - int(entry["start"])
        tensors = read_shard(
            self.folder, entry, dict.fromkeys(("sample_index", "input_sha256", "lengths"), rows)
        )
        tokens = int(tensors["lengths"].sum())
        task_rows = {
            f"{task}.values": tokens if task in self.token_tasks else rows for task in self.tasks
        }
        check_shard_rows(self.folder, entry, tensors, task_rows)
        return tensors

    def __len__(self) -> int:
        return len(self.sample_index)

    def rows_for_batch(self, batch: TokenBatch) -> np.ndarray:
        """The export rows (sequence positions) of the batch's sequences, found by content."""
        digests = sequence_digests(batch.ids, batch.lengths, self.tokenizer_hash)
        rows = np.empty(len(digests), dtype=np.int64)
        for i, digest in enumerate(digests):
            row = self._positions.get(digest)
            if row is None:
                raise MissingSampleError(
                    f"sequence {i} of the batch (sha256 {digest.hex()[:16]}...) is not in the "
                    f"export {self.folder}: other ids, another tokenizer than "
                    f"{self.tokenizer_hash}, or an incomplete export"
                )
            rows[i] = row
        return rows

    def targets(self, rows: np.ndarray, batch_id: str = "") -> SoftTargets:
        """The soft targets of export sequences `rows`, as the teacher answered them: token-level
        tasks (sum(lengths), ...) in sequence order, sequence-level ones (len(rows), ...)."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        chosen = [np.arange(s, s + n) for s, n in zip(self.starts[rows], lengths, strict=True)]
        token_rows = np.concatenate(chosen).astype(np.int64) if chosen else rows[:0]
        outputs = {}
        for task in self.tasks:
            level = "token" if task in self.token_tasks else "sequence"
            where = token_rows if level == "token" else rows
            indices = self.arrays.get(f"{task}.indices")
            tail = self.arrays.get(f"{task}.tail_mass")
            outputs[task] = TaskTargets(
                task,
                self.output,
                self.arrays[f"{task}.values"][where],
                indices[where] if indices is not None else None,
                tail[where] if tail is not None else None,
                level=level,
            )
        return SoftTargets(
            self.model, self.model_version, batch_id, self.temperature, outputs, lengths=lengths
        )


class OfflineTokenTargetLoader:
    """`TokenTargetLoader`'s triples from a token export (see the module docstring)."""

    def __init__(
        self, batches: Iterable[Any], export: str | os.PathLike[str] | OfflineTokenTargets
    ) -> None:
        self.batches = batches
        self.export = (
            export if isinstance(export, OfflineTokenTargets) else OfflineTokenTargets(export)
        )
        self.stats = OfflineStats()

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[TokenBatch, Any, SoftTargets]]:
        self.stats = OfflineStats()
        for number, item in enumerate(self.batches):
            batch, labels = as_token_batch(item)
            try:
                rows = self.export.rows_for_batch(batch)
            except MissingSampleError as error:
                raise MissingSampleError(f"batch {number}: {error}") from None
            targets = self.export.targets(rows, f"offline-{number}")
            self.stats.yielded += 1
            self.stats.samples += len(rows)
            yield batch, labels, targets
