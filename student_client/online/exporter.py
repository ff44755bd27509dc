"""Writing an offline export: a whole dataset's soft targets, fetched once from the teacher.

    student-client export --teacher 127.0.0.1:50051 --dataset mnist --out runs/mnist-T4 \\
        --temperature 4

or from Python, `export_soft_targets(client, inputs, out, options)`. The dataset is streamed
through the teacher with `SoftTargetLoader` (order kept, each batch once, retries) and written as
shards plus `manifest.json` (the layout: `student_client.offline.export_format`). Read it back
with `student_client.offline.reader` (no teacher needed).

Resume: an interrupted export, run again with the same arguments, keeps every shard that the
manifest lists with a matching sha256 and writes only the others, so no sample is written twice.
Each shard is written to a temporary file, flushed, and renamed into place; the manifest is
rewritten the same way after each shard. A resumed export must see the same dataset
(fingerprint), the same settings and the same model version, or it stops with `ExportError`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as save_safetensors

from protocol.errors import FailedPrecondition, NotFound
from student_client.digests import dataset_fingerprint, sample_digests
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
from student_client.online.client import TeacherClient
from student_client.online.loader import SoftTargetLoader
from student_client.types import SoftTargets, TargetOptions

LOCK_FILE = ".export.lock"
DEFAULT_SHARD_SIZE = 4096
DEFAULT_BATCH_SIZE = 256


@dataclass
class ExportResult:
    out: Path
    manifest: dict[str, Any]
    written: list[int]  # shard numbers written by this run
    kept: list[int]  # shard numbers already complete, skipped
    complete: bool


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def settings_record(
    options: TargetOptions, tasks: tuple[str, ...], shard_size: int
) -> dict[str, Any]:
    return {
        "tasks": list(tasks),
        "output": options.output,
        "temperature": float(options.temperature),
        "top_k": int(options.top_k),
        "output_dtype": options.output_dtype,
        "shard_size": int(shard_size),
    }


def _shard_tensors(
    start: int, stop: int, digests: list[bytes], parts: list[SoftTargets], tasks: tuple[str, ...]
) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {
        "sample_index": np.arange(start, stop, dtype=np.int64),
        "input_sha256": np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 32),
    }
    for task in tasks:
        outputs = [part.outputs[task] for part in parts]
        tensors[f"{task}.values"] = np.concatenate([o.values for o in outputs])
        if outputs[0].indices is not None:
            tensors[f"{task}.indices"] = np.concatenate([o.indices for o in outputs])  # type: ignore[misc]
        if outputs[0].tail_mass is not None:
            tensors[f"{task}.tail_mass"] = np.concatenate([o.tail_mass for o in outputs])  # type: ignore[misc]
    return {name: np.ascontiguousarray(array) for name, array in tensors.items()}


def export_soft_targets(
    client: TeacherClient,
    inputs: np.ndarray,
    out: str | os.PathLike[str],
    options: TargetOptions | None = None,
    *,
    dataset_name: str = "",
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    depth: int = 16,
    max_shards: int | None = None,
    on_shard: Callable[[ShardInfo], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export the teacher's soft targets for every sample of `inputs` (n, *input_shape) into the
    folder `out` (created), resuming an earlier export there. `max_shards` (tests, chunked runs)
    stops after writing that many shards in this run; `on_shard` is called after each shard is
    written and listed in the manifest (an exception from it stops the export there)."""
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    options = client.with_model(options or TargetOptions())
    if options.hints:
        raise ValueError("hints are not exported")
    say = log or (lambda _message: None)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(f"{folder}: another export is writing into this folder") from None
        for stale in folder.glob(".*.tmp-*"):  # a run killed mid-write left it; never listed
            stale.unlink(missing_ok=True)
        return _export(
            client, inputs, folder, options, dataset_name, batch_size, shard_size, depth,
            max_shards, on_shard, say,
        )  # fmt: skip


def _export(
    client: TeacherClient,
    inputs: np.ndarray,
    folder: Path,
    options: TargetOptions,
    dataset_name: str,
    batch_size: int,
    shard_size: int,
    depth: int,
    max_shards: int | None,
    on_shard: Callable[[ShardInfo], None] | None,
    say: Callable[[str], None],
) -> ExportResult:
    array = np.ascontiguousarray(inputs)
    if array.ndim < 1 or len(array) == 0:
        raise ValueError("inputs: expected a non-empty batch (n, *input_shape)")
    n = len(array)
    fingerprint = dataset_fingerprint(array)
    manifest_path = folder / MANIFEST
    if manifest_path.exists():
        manifest = read_manifest(folder)
        version = manifest["teacher"]["model_version"]
        tasks = tuple(manifest["settings"]["tasks"])
        _check_resume(manifest, manifest_path, options, tasks, shard_size, fingerprint, n)
        try:
            client.model_info(options.model, version)
        except (FailedPrecondition, NotFound) as error:
            raise ExportError(
                f"{manifest_path}: this export was started with {options.model} {version}, which "
                f"the teacher no longer serves ({error.message}); export into a new folder"
            ) from error
    else:
        info = client.model_info(options.model, options.model_version)
        version = info.model_version
        tasks = tuple(options.tasks) or tuple(task.name for task in info.tasks)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": utc_now(),
            "updated": utc_now(),
            "complete": False,
            "teacher": {
                "address": client.address,
                "model": info.name,
                "model_version": version,
                "tasks": [
                    {"name": task.name, "classes": list(task.class_names)}
                    for task in info.tasks
                    if task.name in tasks
                ],
            },
            "settings": settings_record(options, tasks, shard_size),
            "dataset": {
                "name": dataset_name,
                "samples": n,
                "input_shape": list(array.shape[1:]),
                "input_dtype": str(array.dtype),
                "fingerprint": fingerprint,
            },
            "samples": {"total": n, "written": 0},
            "shards": [],
            "notes": notes_for(options.output, options.temperature, options.top_k),
        }
    options = dataclasses.replace(options, model_version=version, tasks=tasks)
    ranges = [
        (i, start, min(start + shard_size, n)) for i, start in enumerate(range(0, n, shard_size))
    ]
    kept: list[int] = []
    listed: dict[int, dict[str, Any]] = {}
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if path.is_file() and file_sha256(path) == entry["sha256"]:
            listed[int(entry["index"])] = entry
            kept.append(int(entry["index"]))
        else:
            say(f"shard {entry['index']}: {path.name} missing or changed, writing it again")
    manifest["shards"] = [listed[i] for i in sorted(listed)]
    todo = [r for r in ranges if r[0] not in listed]
    if max_shards is not None:
        todo = todo[: max(0, max_shards)]
    if kept:
        say(f"{len(kept)} of {len(ranges)} shards already complete, kept")
    written: list[int] = []

    def batches() -> Iterator[tuple[np.ndarray, tuple[int, int, int]]]:
        for index, start, stop in todo:
            for begin in range(start, stop, batch_size):
                end = min(begin + batch_size, stop)
                yield array[begin:end], (index, begin, end)

    def finish(index: int, start: int, stop: int, parts: list[SoftTargets]) -> None:
        digests = sample_digests(array[start:stop])
        tensors = _shard_tensors(start, stop, digests, parts, tasks)
        metadata = {
            "format": FORMAT,
            "model_version": version,
            "shard": str(index),
            "start": str(start),
            "stop": str(stop),
        }
        data = save_safetensors(tensors, metadata=metadata)
        name = shard_name(index)
        write_atomic(folder / name, data)
        info = ShardInfo(index, name, start, stop, hashlib.sha256(data).hexdigest(), len(data))
        listed[index] = info.to_json()
        manifest["shards"] = [listed[i] for i in sorted(listed)]
        _write_manifest(folder, manifest, n, len(ranges))
        written.append(index)
        say(f"shard {index}: samples {start}..{stop - 1} -> {name} ({len(data):,} bytes)")
        if on_shard is not None:
            on_shard(info)

    _write_manifest(folder, manifest, n, len(ranges))
    if todo:
        bounds = {index: (start, stop) for index, start, stop in todo}
        parts: list[SoftTargets] = []  # the answers of the shard being filled, in order
        answers = iter(SoftTargetLoader(batches(), client, options, depth=depth))
        try:
            for _, (index, _, end), targets in answers:
                parts.append(targets)
                start, stop = bounds[index]
                if end == stop:
                    finish(index, start, stop, parts)
                    parts = []
        finally:
            answers.close()  # type: ignore[attr-defined]  # closes the streams at once
    complete = len(listed) == len(ranges)
    return ExportResult(folder, manifest, written, kept, complete)


def _write_manifest(folder: Path, manifest: dict[str, Any], n: int, shard_count: int) -> None:
    manifest["updated"] = utc_now()
    manifest["samples"] = {
        "total": n,
        "written": sum(int(entry["stop"]) - int(entry["start"]) for entry in manifest["shards"]),
    }
    manifest["complete"] = len(manifest["shards"]) == shard_count
    write_atomic(folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def _check_resume(
    manifest: dict[str, Any],
    path: Path,
    options: TargetOptions,
    tasks: tuple[str, ...],
    shard_size: int,
    fingerprint: str,
    n: int,
) -> None:
    """Refuse to continue an export with another dataset, model or settings."""
    if manifest["dataset"]["fingerprint"] != fingerprint or manifest["dataset"]["samples"] != n:
        raise ExportError(
            f"{path}: this folder holds an export of another dataset (fingerprint "
            f"{manifest['dataset']['fingerprint']}, {manifest['dataset']['samples']} samples; "
            f"now {fingerprint}, {n} samples); export into a new folder"
        )
    if manifest["teacher"]["model"] != options.model:
        raise ExportError(
            f"{path}: this export is of model {manifest['teacher']['model']!r}, not "
            f"{options.model!r}"
        )
    if options.model_version and options.model_version != manifest["teacher"]["model_version"]:
        raise ExportError(
            f"{path}: this export is of version {manifest['teacher']['model_version']}, not "
            f"{options.model_version}"
        )
    wanted = settings_record(options, tuple(options.tasks) or tasks, shard_size)
    found = manifest["settings"]
    differ = {
        key: (found.get(key), value) for key, value in wanted.items() if found.get(key) != value
    }
    if differ:
        listing = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in differ.items())
        raise ExportError(
            f"{path}: resuming with other settings ({listing}); use the same arguments, or a "
            "new folder"
        )
