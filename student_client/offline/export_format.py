"""The offline export's format on disk: manifest, shard names, atomic writes and their checks.

An export is a folder of shards, `shard-00000.safetensors`, ... (one per `shard_size` samples, in
dataset order) and `manifest.json`; `student_client.online.exporter` writes it (from a teacher),
`student_client.offline.reader` reads it (no teacher needed). A shard holds, for its samples
`start..stop-1`:

    sample_index        (n,) int64       dataset positions
    input_sha256        (n, 32) uint8    sha256 of each input as sent (dtype, shape, bytes)
    <task>.values       (n, classes | k) as the teacher sent them (float32 / float16)
    <task>.indices      (n, k) int64     top-k exports only
    <task>.tail_mass    (n,) float32     top-k exports of probs / log_probs only

and safetensors metadata (format, model version, shard number, start, stop). The manifest lists
the teacher (model, version, tasks with class names), the settings, the dataset (name, sample
count, input shape and dtype, fingerprint = sha256 over all input bytes), the shards with the
sha256 of each file, the created / updated times, whether the export is complete, and notes on
what the values allow (see `notes_for`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors

FORMAT = "distill-soft-targets"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ExportError(RuntimeError):
    """An export cannot be written or read as asked; the message says why and names the file."""


class CorruptShardError(ExportError):
    """A shard file does not match its manifest entry (sha256) or cannot be read."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def notes_for(output: str, temperature: float, top_k: int) -> list[str]:
    """What the exported values allow, written into the manifest."""
    notes = [
        "rows are dataset samples in order: shard i holds samples start..stop-1; input_sha256 is "
        "the sha256 of each input as sent (dtype, per-sample shape, bytes)"
    ]
    if top_k:
        notes.append(
            f"top-{top_k} export: only the exported temperature T={temperature:g} is exact; the "
            "classes outside the top k are summed into tail_mass (probs / log_probs) or dropped "
            "(logits), so no other temperature can be recovered"
        )
    elif output == "logits":
        notes.append(
            f"logits at T={temperature:g} (logits / T): any temperature T' can be applied on the "
            f"student side as softmax(values * {temperature:g} / T') (OfflineSoftTargets("
            "temperature=T')); exact for T=1 exports of a single model; for an ensemble teacher "
            "the values are the members' mean logits, whose softmax differs from the ensemble's "
            "averaged probabilities"
        )
    else:
        notes.append(
            f"{output} at T={temperature:g}: only this temperature is available (export "
            "--output logits --temperature 1 to apply any temperature later)"
        )
    return notes


@dataclass(frozen=True)
class ShardInfo:
    index: int
    file: str
    start: int
    stop: int
    sha256: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "file": self.file,
            "start": self.start,
            "stop": self.stop,
            "samples": self.stop - self.start,
            "sha256": self.sha256,
            "bytes": self.bytes,
        }


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: no manifest; is {folder} an export?") from None
    except (OSError, ValueError) as error:
        raise ExportError(f"{path}: unreadable manifest: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{path}: format version {manifest.get('format_version')}, this client reads "
            f"{FORMAT_VERSION}"
        )
    return manifest


def read_shard(folder: Path, entry: dict[str, Any], rows_of: dict[str, int]) -> dict[str, Any]:
    """The tensors of the manifest's shard `entry`, checked: a plain file name in `folder`, the
    sha256 the manifest states, a readable safetensors file, and each tensor named in `rows_of`
    present with that many rows. Raises `CorruptShardError` naming the file otherwise."""
    path = folder / str(entry["file"])
    if Path(entry["file"]).name != entry["file"]:
        raise CorruptShardError(f"{folder / MANIFEST}: bad shard name {entry!r}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CorruptShardError(f"{path}: cannot read the shard: {error}") from error
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise CorruptShardError(
            f"{path}: sha256 {digest} does not match the manifest's {entry['sha256']}: the "
            "shard is corrupted or was changed; not using this export (run the export again "
            "into the same folder to rewrite the shard)"
        )
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as error:
        raise CorruptShardError(f"{path}: not a readable safetensors file: {error}") from error
    check_shard_rows(folder, entry, tensors, rows_of)
    return tensors


def check_shard_rows(
    folder: Path, entry: dict[str, Any], tensors: dict[str, Any], rows_of: dict[str, int]
) -> None:
    """Each tensor named in `rows_of` is in the shard with that many rows (`CorruptShardError`)."""
    for name, rows in rows_of.items():
        if name not in tensors or len(tensors[name]) != rows:
            raise CorruptShardError(
                f"{folder / str(entry['file'])}: tensor {name!r} missing or not {rows} rows"
            )


def concat_rows(parts: list[np.ndarray], empty: tuple[int, ...], dtype: type) -> np.ndarray:
    """The shards' arrays end to end (an empty array of shape `empty` for no shards)."""
    return np.concatenate(parts) if parts else np.zeros(empty, dtype=dtype)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
