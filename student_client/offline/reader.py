"""Reading an offline export: train from it (`OfflineSoftTargetLoader`) with no teacher running.

    from student_client.offline.reader import OfflineSoftTargetLoader

    for inputs, labels, targets in OfflineSoftTargetLoader(batches, "runs/mnist-T4"):
        loss = kd(student(inputs), {t: targets.tensor(t) for t in tasks}, labels)

`OfflineSoftTargetLoader` takes the same batches as `SoftTargetLoader` and yields the same
`(inputs, labels, SoftTargets)` triples, so one training loop runs online, offline, or mixed (fill
a `SoftTargetCache` from the export with `cache.import_export(folder)` and the online loader asks
the teacher only for samples the export does not hold). Samples are found by the sha256 of each
input (`key="inputs"`, the default: any order, any batch composition, and an input that is not in
the export is an error, never a wrong answer), or by dataset position (`key="index"`: each batch's
first element is the dataset indices of its samples).

For an export of raw logits (`--output logits --temperature 1`), `temperature=T` gives
`softmax(logits / T)` computed here, in float64, rounded to float32 like the teacher's own probs.
Other exports are returned as stored, and only at their own temperature.

Every shard is checked against the sha256 in the manifest when the export is opened; a shard that
does not match, or cannot be parsed, raises `CorruptShardError` naming the file, and nothing of
the export is used.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from student_client.digests import sample_digests
from student_client.offline.export_format import (
    CorruptShardError,
    ExportError,
    concat_rows,
    read_manifest,
    read_shard,
)
from student_client.types import SoftTargets, TaskTargets, as_numpy


class MissingSampleError(LookupError):
    """A batch holds a sample the export does not have."""


def softmax_at(values: np.ndarray, scale: float) -> np.ndarray:
    """softmax(values * scale) per row, in float64, rounded to float32."""
    z = values.astype(np.float64) * scale
    if z.size == 0:
        return z.astype(np.float32)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32)


class OfflineSoftTargets:
    """An export read into memory: per task the values (and indices, tail mass) of every
    exported sample, in dataset order, checked against the manifest."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if self.manifest["dataset"].get("kind") == "tokens":
            raise ExportError(
                f"{self.folder}: a token export; read it with "
                "student_client.offline.token_reader.OfflineTokenTargets"
            )
        teacher, settings = self.manifest["teacher"], self.manifest["settings"]
        self.model: str = teacher["model"]
        self.model_version: str = teacher["model_version"]
        self.tasks: tuple[str, ...] = tuple(settings["tasks"])
        self.output: str = settings["output"]
        self.temperature: float = float(settings["temperature"])
        self.top_k: int = int(settings["top_k"])
        self.complete: bool = bool(self.manifest.get("complete"))
        shards = sorted(self.manifest["shards"], key=lambda entry: int(entry["start"]))
        loaded = [self._load(entry) for entry in shards]
        self.sample_index = concat_rows([s["sample_index"] for s in loaded], (0,), np.int64)
        self.digests = concat_rows([s["input_sha256"] for s in loaded], (0, 32), np.uint8)
        self.arrays: dict[str, np.ndarray] = {}
        for task in self.tasks:
            for part in ("values", "indices", "tail_mass"):
                name = f"{task}.{part}"
                if loaded and name in loaded[0]:
                    self.arrays[name] = np.concatenate([s[name] for s in loaded])
                elif not loaded and part == "values":
                    self.arrays[name] = np.zeros((0, 0), np.float32)
        self._positions: dict[bytes, int] | None = None

    def _load(self, entry: dict[str, Any]) -> dict[str, np.ndarray]:
        rows = int(entry["stop"]) - int(entry["start"])
        names = ["sample_index", "input_sha256", *(f"{t}.values" for t in self.tasks)]
        tensors = read_shard(self.folder, entry, dict.fromkeys(names, rows))
        if not np.array_equal(
            tensors["sample_index"], np.arange(int(entry["start"]), int(entry["stop"]))
        ):
            raise CorruptShardError(
                f"{self.folder / str(entry['file'])}: sample_index does not match the manifest"
            )
        return tensors

    @property
    def output_dtype(self) -> str:
        return str(self.manifest["settings"]["output_dtype"])

    def __len__(self) -> int:
        return len(self.sample_index)

    def rows_for_inputs(self, inputs: np.ndarray) -> np.ndarray:
        """The export rows of the samples of `inputs` (batch, ...), found by content."""
        if self._positions is None:
            self._positions = {bytes(d): i for i, d in enumerate(self.digests)}
        positions = self._positions
        rows = np.empty(len(inputs), dtype=np.int64)
        for i, digest in enumerate(sample_digests(inputs)):
            row = positions.get(digest)
            if row is None:
                raise MissingSampleError(
                    f"sample {i} of the batch (sha256 {digest.hex()[:16]}...) is not in the export "
                    f"{self.folder}: another dataset, an augmented input, or an incomplete export"
                )
            rows[i] = row
        return rows

    def rows_for_indices(self, indices: np.ndarray) -> np.ndarray:
        """The export rows of dataset positions `indices`."""
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = np.searchsorted(self.sample_index, wanted)
        inside = rows < len(self.sample_index)
        ok = inside.copy()
        ok[inside] = self.sample_index[rows[inside]] == wanted[inside]
        if not ok.all():
            bad = wanted[~ok][:5].tolist()
            raise MissingSampleError(f"dataset indices {bad} are not in the export {self.folder}")
        return rows

    def targets(
        self,
        rows: np.ndarray,
        temperature: float | None = None,
        batch_id: str = "",
        raw: bool = False,
    ) -> SoftTargets:
        """The soft targets of export `rows`. `temperature`: see the module docstring; `raw`:
        exactly as stored (for `SoftTargetCache.import_export`)."""
        rows = np.asarray(rows, dtype=np.int64)
        kind, applied = self.output, self.temperature
        rescale = None
        if temperature is not None and not raw:
            if self.output == "logits" and self.top_k == 0:
                kind, applied, rescale = "probs", float(temperature), self.temperature / temperature
            elif float(temperature) != self.temperature:
                raise ValueError(
                    f"temperature: the export {self.folder} holds {self.output} at "
                    f"T={self.temperature:g}{f' (top {self.top_k})' if self.top_k else ''}; only "
                    "that temperature is exact (export raw logits, --output logits --temperature "
                    "1, to choose T later)"
                )
        outputs = {}
        for task in self.tasks:
            values = self.arrays[f"{task}.values"][rows]
            if rescale is not None:
                values = softmax_at(values, rescale)
            indices = self.arrays.get(f"{task}.indices")
            tail = self.arrays.get(f"{task}.tail_mass")
            outputs[task] = TaskTargets(
                task,
                kind,
                values,
                indices[rows] if indices is not None else None,
                tail[rows] if tail is not None else None,
            )
        return SoftTargets(self.model, self.model_version, batch_id, applied, outputs)


@dataclass
class OfflineStats:
    yielded: int = 0
    samples: int = 0


class OfflineSoftTargetLoader:
    """`SoftTargetLoader`'s triples from an export: `batches` yields `(inputs, labels)` or bare
    inputs (with `key="index"`: dataset indices in place of the inputs); `export` is the export
    folder or an `OfflineSoftTargets`. `input_dtype` converts inputs before hashing, as the online
    loader does before sending."""

    def __init__(
        self,
        batches: Iterable[Any],
        export: str | os.PathLike[str] | OfflineSoftTargets,
        temperature: float | None = None,
        key: str = "inputs",
        input_dtype: str | None = None,
    ) -> None:
        if key not in ("inputs", "index"):
            raise ValueError(f"key must be 'inputs' or 'index', got {key!r}")
        self.batches = batches
        self.export = (
            export if isinstance(export, OfflineSoftTargets) else OfflineSoftTargets(export)
        )
        self.temperature = temperature
        self.key = key
        self.input_dtype = input_dtype
        self.stats = OfflineStats()
        # Fail now, not at the first batch, if the temperature cannot be served.
        self.export.targets(np.zeros(0, np.int64), temperature)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Any, Any, SoftTargets]]:
        self.stats = OfflineStats()
        for number, batch in enumerate(self.batches):
            if isinstance(batch, (tuple, list)) and len(batch) >= 2:
                inputs, labels = batch[0], batch[1]
            else:
                inputs, labels = batch, None
            array = as_numpy(inputs)
            if self.key == "index":
                rows = self.export.rows_for_indices(array)
            else:
                if self.input_dtype is not None:
                    array = array.astype(self.input_dtype)
                try:
                    rows = self.export.rows_for_inputs(array)
                except MissingSampleError as error:
                    raise MissingSampleError(f"batch {number}: {error}") from None
            targets = self.export.targets(rows, self.temperature, f"offline-{number}")
            self.stats.yielded += 1
            self.stats.samples += len(rows)
            yield inputs, labels, targets


__all__ = [
    "CorruptShardError",
    "ExportError",
    "MissingSampleError",
    "OfflineSoftTargetLoader",
    "OfflineSoftTargets",
    "softmax_at",
]
