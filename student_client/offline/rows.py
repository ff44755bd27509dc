"""A cached entry as bytes and back: the allowed dtypes, encoding, decoding, and merging the cached
rows of a batch with the teacher's fresh ones.

Nothing is pickled: a value is decoded with `numpy.frombuffer` and a dtype from the fixed
allow-list `DTYPES`, so a tampered file can give wrong numbers or an error, never code execution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from student_client.offline.scope import CacheError
from student_client.types import TaskTargets

ROW_OVERHEAD = 24  # bytes counted per entry on top of its key and values (ns, size, last_used)
# Little-endian dtypes a stored value may have; anything else in the file is refused.
DTYPES = {name: np.dtype(name) for name in ("<f4", "<f2", "<f8", "<i8", "<i4")}
_LITTLE = np.little_endian


@dataclass(frozen=True)
class Namespace:
    """One (scope, task) row of the `namespaces` table: the layout of its entries."""

    id: int
    value_dtype: np.dtype
    index_dtype: np.dtype | None
    tail_dtype: np.dtype | None
    width: int


Row = tuple[bytes, bytes | None, bytes | None]  # values, indices, tail mass, as stored


def dtype_name(dtype: np.dtype) -> str:
    name = dtype.newbyteorder("<").str if dtype.byteorder != "|" else dtype.str
    if name not in DTYPES:
        raise ValueError(f"cannot cache values of dtype {dtype}")
    return name


def little_endian(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not _LITTLE):
        return array.astype(array.dtype.newbyteorder("<"))
    return array


def fits(namespace: Namespace, output: TaskTargets) -> bool:
    return (
        DTYPES[dtype_name(output.values.dtype)] == namespace.value_dtype
        and output.values.ndim == 2
        and output.values.shape[1] == namespace.width
        and (output.indices is None) == (namespace.index_dtype is None)
        and (output.tail_mass is None) == (namespace.tail_dtype is None)
    )


def row_size(digest: bytes, row: Row) -> int:
    return len(digest) + sum(len(part) for part in row if part is not None) + ROW_OVERHEAD


def decode_rows(
    task: str, kind: str, namespace: Namespace, rows: Sequence[Row | None], path: Path
) -> TaskTargets:
    n = len(rows)

    def column(part: int, dtype: np.dtype | None, width: int) -> np.ndarray | None:
        if dtype is None:
            return None
        data = b"".join([row[part] for row in rows])  # type: ignore[misc, index]
        if len(data) != n * max(width, 1) * dtype.itemsize:
            raise CacheError(f"{path}: a stored entry of task {task!r} has the wrong length")
        array = np.frombuffer(data, dtype=dtype)
        return array.reshape(n, width) if width else array  # width 0: one value per row

    values = column(0, namespace.value_dtype, namespace.width)
    assert values is not None
    indices = column(1, namespace.index_dtype, namespace.width)
    tail = column(2, namespace.tail_dtype, 0)
    return TaskTargets(task, kind, values, indices, tail)


def merge_rows(
    task: str,
    n: int,
    hit: np.ndarray,
    cached: TaskTargets,
    missing: np.ndarray,
    fresh: TaskTargets,
) -> TaskTargets:
    def place(old: np.ndarray | None, new: np.ndarray | None) -> np.ndarray | None:
        if old is None or new is None:
            if (old is None) != (new is None):
                raise ValueError(f"task {task!r}: cached and fresh answers differ in layout")
            return None
        if old.dtype != new.dtype or old.shape[1:] != new.shape[1:]:
            raise ValueError(
                f"task {task!r}: cached {old.dtype}{old.shape[1:]} and fresh "
                f"{new.dtype}{new.shape[1:]} differ"
            )
        out = np.empty((n, *old.shape[1:]), dtype=old.dtype)
        out[hit] = old
        out[missing] = new
        return out

    values = place(cached.values, fresh.values)
    assert values is not None
    return dataclasses.replace(
        fresh,
        values=values,
        indices=place(cached.indices, fresh.indices),
        tail_mass=place(cached.tail_mass, fresh.tail_mass),
    )


def token_rows(lengths: np.ndarray, positions: np.ndarray | Sequence[int]) -> np.ndarray:
    """The token rows (int64, ascending within each sequence) of the sequences at `positions` of
    a batch whose sequences have `lengths` real tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    chosen = [np.arange(starts[p], starts[p] + lengths[p]) for p in np.asarray(positions).tolist()]
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, np.int64)


def decode_token_rows(
    task: str, kind: str, namespace: Namespace, rows: Sequence[Row], path: Path
) -> TaskTargets:
    """A token-level task's entries (one per sequence, each (length, width) rows) as one
    (sum(lengths), width) answer, `level="token"`."""
    row_bytes = namespace.width * namespace.value_dtype.itemsize
    counts = []
    for vals, idx, tail_bytes in rows:
        count = len(vals) // row_bytes if row_bytes else 0
        ok = count >= 1 and len(vals) == count * row_bytes
        if namespace.index_dtype is not None:
            index_bytes = count * namespace.width * namespace.index_dtype.itemsize
            ok = ok and idx is not None and len(idx) == index_bytes
        if namespace.tail_dtype is not None:
            tail_size = count * namespace.tail_dtype.itemsize
            ok = ok and tail_bytes is not None and len(tail_bytes) == tail_size
        if not ok:
            raise CacheError(f"{path}: a stored entry of task {task!r} has the wrong length")
        counts.append(count)
    total = sum(counts)

    def column(part: int, dtype: np.dtype | None, width: int) -> np.ndarray | None:
        if dtype is None:
            return None
        array = np.frombuffer(b"".join([row[part] for row in rows]), dtype=dtype)  # type: ignore[misc]
        return array.reshape(total, width) if width else array

    values = column(0, namespace.value_dtype, namespace.width)
    assert values is not None
    indices = column(1, namespace.index_dtype, namespace.width)
    tail = column(2, namespace.tail_dtype, 0)
    return TaskTargets(task, kind, values, indices, tail, level="token")
