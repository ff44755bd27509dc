"""Writing a token export: a token dataset's per-token soft targets, fetched once from a sequence
teacher (`student-client export --tokens FILE.npz`). Read it back with
`student_client.offline.token_reader` (no teacher needed); the layout is documented there.

The dataset is streamed through `TokenTargetLoader` (tokenizer handshake, order kept, each batch
once, version pinned) and written like the image export (`exporter`): one shard per `shard_size`
sequences, each written to a temporary file, flushed and renamed into place, the manifest
rewritten the same way after each shard. Run again with the same arguments, an interrupted
export keeps every listed shard whose sha256 matches and writes only the others; another
dataset, tokenizer, model or settings stops it with `ExportError`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as save_safetensors

from student_client.digests import dataset_fingerprint, sequence_digests
from student_client.offline.export_format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ExportError,
    ShardInfo,
    file_sha256,
    notes_for,
    read_manifest,
    shard_name,
    write_atomic,
)
from student_client.offline.token_reader import TOKENS_KIND
from student_client.online.client import TeacherClient
from student_client.online.exporter import LOCK_FILE, ExportResult, settings_record, utc_now
from student_client.online.token_loader import TokenTargetLoader
from student_client.types import SoftTargets, TargetOptions, TokenBatch

DEFAULT_TOKEN_BATCH_SIZE = 32  # sequences per request
DEFAULT_TOKEN_SHARD_SIZE = 4096  # sequences per shard


def load_token_dataset(path: str | os.PathLike[str]) -> TokenBatch:
    """A token dataset file: an `.npz` holding `ids`, packed (sum(lengths),) integers (or padded
    (n, L)), and `lengths` (n,) integers >= 1; returned packed, int64."""
    with np.load(path, allow_pickle=False) as data:
        missing = {"ids", "lengths"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: needs arrays 'ids' and 'lengths', missing {sorted(missing)}")
        ids, lengths = data["ids"], data["lengths"]
    if ids.dtype.kind not in "iu" or lengths.dtype.kind not in "iu" or lengths.ndim != 1:
        raise ValueError(f"{path}: ids and lengths must be integers, lengths (n,)")
    if len(lengths) == 0 or lengths.min() < 1:
        raise ValueError(f"{path}: lengths: expected n >= 1 sequences of >= 1 tokens")
    batch = TokenBatch(ids.astype(np.int64), lengths.astype(np.int64)).packed()
    if len(batch.ids) != int(batch.lengths.sum()):
        raise ValueError(
            f"{path}: ids: packed ids have {len(batch.ids)} tokens, sum(lengths) is "
            f"{int(batch.lengths.sum())}"
        )
    return batch


def export_token_targets(
    client: TeacherClient,
    dataset: TokenBatch,
    out: str | os.PathLike[str],
    options: TargetOptions,
    tokenizer_hash: str,
    *,
    dataset_name: str = "",
    batch_size: int = DEFAULT_TOKEN_BATCH_SIZE,
    shard_size: int = DEFAULT_TOKEN_SHARD_SIZE,
    depth: int = 16,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export the teacher's soft targets for every sequence of `dataset` into `out` (created),
    resuming an earlier export there. `tokenizer_hash` (`"sha256:<hex>"`) is the tokenizer the
    ids come from; the teacher must read the same one."""
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    options = client.with_model(options)
    say = log or (lambda _message: None)
    data = dataset.packed()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(f"{folder}: another export is writing into this folder") from None
        for stale in folder.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
        return _export(
            client, data, folder, options, tokenizer_hash, dataset_name, batch_size, shard_size,
            depth, say,
        )  # fmt: skip


def _export(
    client: TeacherClient,
    data: TokenBatch,
    folder: Path,
    options: TargetOptions,
    tokenizer_hash: str,
    dataset_name: str,
    batch_size: int,
    shard_size: int,
    depth: int,
    say: Callable[[str], None],
) -> ExportResult:
    n = data.batch_size
    starts = np.concatenate([[0], np.cumsum(data.lengths)]).astype(np.int64)
    fingerprint = (
        "sha256:"
        + hashlib.sha256(
            f"{dataset_fingerprint(data.ids)}|{dataset_fingerprint(data.lengths)}".encode()
        ).hexdigest()
    )
    loader = TokenTargetLoader([], client, options, tokenizer_hash=tokenizer_hash)
    info = loader.check_tokenizer()  # the tokenizer handshake, before anything is written
    tasks = tuple(options.tasks) or tuple(task.name for task in info.tasks)
    token_tasks = [task.name for task in info.tasks if task.name in tasks and task.level == "token"]
    settings = {**settings_record(options, tasks, shard_size), "token_tasks": token_tasks}
    manifest_path = folder / MANIFEST
    if manifest_path.exists():
        manifest = read_manifest(folder)
        found = (
            manifest["dataset"].get("fingerprint"),
            manifest["teacher"].get("model_version"),
            manifest["teacher"].get("tokenizer_hash"),
            manifest["settings"],
        )
        wanted = (fingerprint, info.model_version, tokenizer_hash, settings)
        if found != wanted:
            raise ExportError(
                f"{manifest_path}: this folder holds an export of another dataset, teacher "
                f"version, tokenizer or settings ({found[:3]} vs {wanted[:3]}); use the same "
                "arguments, or a new folder"
            )
    else:
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": utc_now(),
            "updated": utc_now(),
            "complete": False,
            "teacher": {
                "address": client.address,
                "model": info.name,
                "model_version": info.model_version,
                "tokenizer_hash": tokenizer_hash,
                "tasks": [
                    {"name": task.name, "classes": list(task.class_names), "level": task.level}
                    for task in info.tasks
                    if task.name in tasks
                ],
            },
            "settings": settings,
            "dataset": {
                "kind": TOKENS_KIND,
                "name": dataset_name,
                "samples": n,
                "tokens": int(data.lengths.sum()),
                "fingerprint": fingerprint,
            },
            "samples": {"total": n, "written": 0},
            "shards": [],
            "notes": notes_for(options.output, options.temperature, options.top_k),
        }
    listed: dict[int, dict[str, Any]] = {}
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if path.is_file() and file_sha256(path) == entry["sha256"]:
            listed[int(entry["index"])] = entry
    kept = sorted(listed)
    ranges = [(i, s, min(s + shard_size, n)) for i, s in enumerate(range(0, n, shard_size))]
    todo = [r for r in ranges if r[0] not in listed]
    written: list[int] = []

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, tuple[int, int, int]]]:
        for index, start, stop in todo:
            for begin in range(start, stop, batch_size):
                end = min(begin + batch_size, stop)
                ids = data.ids[starts[begin] : starts[end]]
                yield ids, data.lengths[begin:end], (index, begin, end)

    def finish(index: int, start: int, stop: int, parts: list[SoftTargets]) -> None:
        lengths = data.lengths[start:stop]
        ids = data.ids[starts[start] : starts[stop]]
        digests = sequence_digests(ids, lengths, tokenizer_hash)
        tensors: dict[str, np.ndarray] = {
            "sample_index": np.arange(start, stop, dtype=np.int64),
            "input_sha256": np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 32),
            "lengths": np.ascontiguousarray(lengths, dtype=np.int64),
        }
        for task in tasks:
            outputs = [part.outputs[task] for part in parts]
            tensors[f"{task}.values"] = np.concatenate([o.values for o in outputs])
            if outputs[0].indices is not None:
                tensors[f"{task}.indices"] = np.concatenate([o.indices for o in outputs])  # type: ignore[misc]
            if outputs[0].tail_mass is not None:
                tensors[f"{task}.tail_mass"] = np.concatenate([o.tail_mass for o in outputs])  # type: ignore[misc]
        tensors = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
        metadata = {"format": FORMAT, "model_version": info.model_version, "shard": str(index)}
        blob = save_safetensors(tensors, metadata=metadata)
        name = shard_name(index)
        write_atomic(folder / name, blob)
        shard = ShardInfo(index, name, start, stop, hashlib.sha256(blob).hexdigest(), len(blob))
        listed[index] = shard.to_json()
        _write_manifest(folder, manifest, listed, n, len(ranges))
        written.append(index)
        say(f"shard {index}: sequences {start}..{stop - 1} -> {name} ({len(blob):,} bytes)")

    _write_manifest(folder, manifest, listed, n, len(ranges))
    if todo:
        bounds = {index: (start, stop) for index, start, stop in todo}
        parts: list[SoftTargets] = []
        # pinned to the version whose tokenizer was checked and which the manifest records
        pinned = TokenTargetLoader(
            batches(),
            client,
            dataclasses.replace(options, model_version=info.model_version, tasks=tasks),
            tokenizer_hash=tokenizer_hash,
            depth=depth,
        )
        for _, (index, _, end), targets in pinned:
            parts.append(targets)
            start, stop = bounds[index]
            if end == stop:
                finish(index, start, stop, parts)
                parts = []
    return ExportResult(folder, manifest, written, kept, len(listed) == len(ranges))


def _write_manifest(
    folder: Path, manifest: dict[str, Any], listed: dict[int, dict[str, Any]], n: int, count: int
) -> None:
    manifest["shards"] = [listed[i] for i in sorted(listed)]
    manifest["updated"] = utc_now()
    manifest["samples"] = {
        "total": n,
        "written": sum(int(entry["stop"]) - int(entry["start"]) for entry in manifest["shards"]),
    }
    manifest["complete"] = len(manifest["shards"]) == count
    write_atomic(folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
