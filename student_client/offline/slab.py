"""The cache's in-process layer: one scope's recently used rows in numpy arrays, a slot per sample.

A second epoch in the same process then costs one sha256 and one dict look-up per sample, and one
numpy gather per task and batch. Not thread-safe: `SoftTargetCache` calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from student_client.offline.rows import Namespace
from student_client.offline.scope import CacheScope
from student_client.types import TaskTargets

MEMORY_SLOT_OVERHEAD = 160  # rough bytes per sample of the in-process layer beyond its arrays


class Slab:
    """The in-process layer for one scope: slot i holds every task's row of one sample."""

    def __init__(self, scope: CacheScope, namespaces: dict[str, Namespace]) -> None:
        self.scope = scope
        self.namespaces = namespaces
        self.index: dict[bytes, int] = {}
        self.digests: list[bytes | None] = []
        self.free: list[int] = []
        self.capacity = 0
        self.arrays: dict[tuple[str, int], np.ndarray] = {}  # (task, part) -> (capacity, ...)
        self.used = np.zeros(0, np.int64)  # tick of the last look-up that used the slot
        self.touched = np.zeros(0, bool)  # used since `last_used` was last written to the file
        self.occupied = np.zeros(0, bool)
        self.slot_bytes = MEMORY_SLOT_OVERHEAD
        for namespace in namespaces.values():
            self.slot_bytes += namespace.width * namespace.value_dtype.itemsize
            if namespace.index_dtype is not None:
                self.slot_bytes += namespace.width * namespace.index_dtype.itemsize
            if namespace.tail_dtype is not None:
                self.slot_bytes += namespace.tail_dtype.itemsize

    @property
    def size(self) -> int:
        return self.capacity * self.slot_bytes

    @property
    def last_used(self) -> int:
        return int(self.used.max()) if self.capacity else 0

    def __len__(self) -> int:
        return len(self.index)

    def find(self, digests: Sequence[bytes]) -> np.ndarray:
        get = self.index.get
        return np.fromiter((get(d, -1) for d in digests), np.int64, len(digests))

    def insert(self, digests: Sequence[bytes], parts: dict[str, TaskTargets], tick: int) -> None:
        """Keep the rows (a digest already held keeps its first rows, like the file)."""
        slots, rows = [], []
        for row, digest in enumerate(digests):
            if digest in self.index:
                continue
            if not self.free:
                self._grow()
            slot = self.free.pop()
            self.index[digest] = slot
            self.digests[slot] = digest
            slots.append(slot)
            rows.append(row)
        if not slots:
            return
        at, pick = np.asarray(slots, np.int64), np.asarray(rows, np.int64)
        for task, output in parts.items():
            for part, array in enumerate((output.values, output.indices, output.tail_mass)):
                if array is not None:
                    self._array(task, part, array)[at] = array[pick]
        self.used[at] = tick
        self.occupied[at] = True

    def take(self, slots: np.ndarray, tick: int) -> dict[str, TaskTargets]:
        self.used[slots] = tick
        self.touched[slots] = True
        found = {}
        for task in self.scope.tasks:
            parts = [self.arrays.get((task, part)) for part in range(3)]
            values, indices, tail = (None if a is None else a[slots] for a in parts)
            assert values is not None
            found[task] = TaskTargets(task, self.scope.output, values, indices, tail)
        return found

    def evict(self, count: int, below_tick: int) -> list[bytes]:
        """Free up to `count` least recently used slots not used at `below_tick` or later;
        returns the digests of those that were touched since the last write of access times."""
        candidates = np.flatnonzero(self.occupied & (self.used < below_tick))
        if len(candidates) > count:
            candidates = candidates[np.argpartition(self.used[candidates], count - 1)[:count]]
        touched = []
        for slot in candidates.tolist():
            digest = self.digests[slot]
            assert digest is not None
            if self.touched[slot]:
                touched.append(digest)
            self._release(slot, digest)
        return touched

    def discard(self, digest: bytes) -> None:
        slot = self.index.get(digest)
        if slot is not None:
            self._release(slot, digest)

    def take_touched(self) -> list[bytes]:
        slots = np.flatnonzero(self.touched)
        self.touched[slots] = False
        return [d for d in (self.digests[s] for s in slots.tolist()) if d is not None]

    def _release(self, slot: int, digest: bytes) -> None:
        del self.index[digest]
        self.digests[slot] = None
        self.touched[slot] = False
        self.occupied[slot] = False
        self.free.append(slot)

    def _grow(self) -> None:
        old = self.capacity
        new = max(64, 2 * old)
        for key, array in self.arrays.items():
            grown = np.zeros((new, *array.shape[1:]), dtype=array.dtype)
            grown[:old] = array
            self.arrays[key] = grown
        self.used = np.concatenate([self.used, np.zeros(new - old, np.int64)])
        self.touched = np.concatenate([self.touched, np.zeros(new - old, bool)])
        self.occupied = np.concatenate([self.occupied, np.zeros(new - old, bool)])
        self.digests.extend([None] * (new - old))
        self.free.extend(range(new - 1, old - 1, -1))  # pop() hands out the lowest slot first
        self.capacity = new

    def _array(self, task: str, part: int, like: np.ndarray) -> np.ndarray:
        array = self.arrays.get((task, part))
        if array is None:
            array = np.zeros((self.capacity, *like.shape[1:]), dtype=like.dtype)
            self.arrays[(task, part)] = array
        return array
