"""`SoftTargetCache`: the teacher's soft targets kept on the student's disk, one entry per sample.

    from student_client.offline.cache import SoftTargetCache

    with SoftTargetCache("runs/soft-targets.sqlite", max_bytes=2 << 30) as cache:
        for epoch in range(epochs):   # epoch 1 asks the teacher; later epochs are answered locally
            for inputs, labels, targets in SoftTargetLoader(batches(epoch), teacher, options,
                                                            cache=cache):
                ...

Keys. An entry is one sample's values for one task, keyed by (model, model version, task, output
kind, temperature, top-k, output dtype) -- a *namespace* -- and the sample's digest: sha256 over
the input's dtype, per-sample shape and bytes, exactly as they are sent to the teacher (after the
loader's `input_dtype` conversion). Keys are per sample, so a re-shuffled epoch whose batches mix
different samples still hits. A new model version is a new namespace: entries of another version
are never returned, and `SoftTargetLoader` looks up only the version its pass is pinned to.

Values. The bytes the teacher sent, little-endian, unchanged: a dense row (classes,) of float32 /
float16 (bfloat16 arrives decoded as float32), or for top-k the values (k,), the indices (k,)
int64 and the tail mass () float32. Nothing is pickled: a value is decoded with
`numpy.frombuffer` and a dtype from a fixed allow-list, so a tampered file can give wrong numbers
or an error, never code execution. A cached batch is bitwise identical to what the teacher sent.

Store. One SQLite file (the standard library's `sqlite3`) in WAL mode: each write is one atomic
transaction, readers in other processes see either all of it or nothing and never block a
writer; `synchronous=NORMAL` (a power cut may lose the last transactions, never corrupt the
file: a cache can always be refilled). Keep the file on a local disk (WAL needs shared memory).

Size bound. `max_bytes` bounds the stored keys and values (`entries.size` per row, summed by
triggers into `meta.bytes`; the file adds SQLite's page and index overhead on top). A write that
goes over the bound evicts the least recently used entries (smallest `last_used`) until it is
under. Hits update `last_used` lazily: touched keys are written in one transaction at the next
write, every `touch_interval_s`, before an eviction, and at `close()` -- LRU-ish, and a hit never
costs a write of its own.

Speed. A bounded in-process layer (`memory_bytes`) in front of SQLite keeps the entries this
process used recently: per scope, one numpy array per task and output part with a slot per
sample, and a dict from sample digest to slot. A second epoch in the same process then costs one
sha256 and one dict look-up per sample, and one numpy gather per task and batch; when the layer
is over its bound, the least recently used slots are dropped (they stay in the file).
`memory_bytes=0` turns it off: every look-up reads SQLite.

Modules: `scope` (keys and results), `rows` (entries as bytes), `sqlite_file` (the file), `slab`
(the in-process layer); this module holds them together under one lock.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from student_client.offline.reader import OfflineSoftTargets
from student_client.offline.rows import fits, merge_rows, token_rows
from student_client.offline.scope import CachedRows, CacheScope, CacheStats
from student_client.offline.slab import Slab
from student_client.offline.sqlite_file import EntryFile
from student_client.types import SoftTargets, TaskTargets

DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_MEMORY_BYTES = 64 << 20


class SoftTargetCache:
    """A soft-target cache in one SQLite file (created if missing). Thread-safe; several processes
    may share the file. Use as a context manager or call `close()` (which writes pending
    access times)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        busy_timeout_s: float = 30.0,
        touch_interval_s: float = 60.0,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes: must be > 0, got {max_bytes}")
        if memory_bytes < 0:
            raise ValueError(f"memory_bytes: must be >= 0, got {memory_bytes}")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.memory_bytes = int(memory_bytes)
        self.touch_interval_s = touch_interval_s
        self.stats = CacheStats()
        self._lock = threading.RLock()
        self._slabs: dict[CacheScope, Slab] = {}
        self._tick = 0  # counts look-ups: the in-process layer's clock
        self._last_touch_flush = time.monotonic()
        self._file = EntryFile(self.path, busy_timeout_s)

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> SoftTargetCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._file.closed:
                return
            try:
                self._flush_touches()
            finally:
                self._file.close()

    def flush(self) -> None:
        """Write the pending access times now (they are written lazily)."""
        with self._lock:
            self._flush_touches()

    # -- reading ------------------------------------------------------------------------------

    def lookup(
        self, scope: CacheScope, digests: Sequence[bytes], lengths: np.ndarray | None = None
    ) -> CachedRows:
        """The cached soft targets of the samples `digests` under `scope`; for a token batch,
        `lengths` (batch,) gives each sequence's real tokens (its rows in a token-level task)."""
        with self._lock:
            self._tick += 1
            tick, n = self._tick, len(digests)
            memory = self._memory(scope)
            slab = self._slabs.get(scope) if memory else None
            slots = slab.find(digests) if slab is not None else np.full(n, -1, np.int64)
            need = np.flatnonzero(slots < 0)
            if slab is not None and len(need) < n:
                slab.used[slots[slots >= 0]] = tick  # so that making room keeps them
            memory_hits = n - len(need)
            from_file: dict[str, TaskTargets] = {}
            file_hit = np.zeros(0, np.int64)
            if len(need):
                found, from_file = self._file.read(
                    scope, [digests[i] for i in need.tolist()], touch=not memory
                )
                file_hit = need[found]
                if len(file_hit) and memory:
                    slab = self._slab(scope, tick, len(file_hit))
                    slab.insert([digests[i] for i in file_hit.tolist()], from_file, tick)
                    slots[file_hit] = slab.find([digests[i] for i in file_hit.tolist()])
                    from_file = {}
            if memory:
                hit = np.flatnonzero(slots >= 0)
                found_rows = slab.take(slots[hit], tick) if len(hit) and slab else {}
            else:
                hit, found_rows = file_hit, from_file
            missing = sorted(set(range(n)) - set(hit.tolist())) if len(hit) < n else []
            self.stats.hits += len(hit)
            self.stats.misses += len(missing)
            self.stats.memory_hits += memory_hits
            if time.monotonic() - self._last_touch_flush > self.touch_interval_s:
                self._flush_touches()
            if lengths is not None:
                lengths = np.asarray(lengths, dtype=np.int64)
            return CachedRows(scope, list(digests), hit, missing, found_rows, lengths)

    def assemble(
        self,
        cached: CachedRows,
        fresh: SoftTargets | None = None,
        batch_id: str = "",
    ) -> SoftTargets:
        """The batch's soft targets: the cached rows, and `fresh` (the teacher's answer for the
        `cached.missing` samples, in that order) for the others; bitwise what the teacher sent."""
        scope, n = cached.scope, len(cached.digests)
        missing = np.asarray(cached.missing, dtype=np.int64)
        if fresh is None:
            if len(missing):
                raise ValueError(f"{len(missing)} samples are not cached: give the fresh answer")
            return SoftTargets(
                scope.model,
                scope.model_version,
                batch_id,
                scope.temperature,
                dict(cached.found),
                lengths=cached.lengths,
            )
        if fresh.batch_size != len(missing):
            raise ValueError(
                f"fresh answer has {fresh.batch_size} rows, {len(missing)} samples were missing"
            )
        outputs = {}
        for task in scope.tasks:
            if len(cached.hit) == 0:
                outputs[task] = fresh.outputs[task]
            elif task in scope.token_tasks:  # rows of real tokens: place each sequence's rows
                assert cached.lengths is not None
                outputs[task] = merge_rows(
                    task,
                    int(cached.lengths.sum()),
                    token_rows(cached.lengths, cached.hit),
                    cached.found[task],
                    token_rows(cached.lengths, missing),
                    fresh.outputs[task],
                )
            else:
                outputs[task] = merge_rows(
                    task, n, cached.hit, cached.found[task], missing, fresh.outputs[task]
                )
        return SoftTargets(
            fresh.model,
            fresh.model_version,
            batch_id or fresh.batch_id,
            fresh.temperature,
            outputs,
            lengths=cached.lengths,
        )

    # -- writing ------------------------------------------------------------------------------

    def store(self, scope: CacheScope, digests: Sequence[bytes], targets: SoftTargets) -> int:
        """Keep `targets` (the teacher's answer for the samples `digests`, in order) under
        `scope`; returns the entries written. Evicts the least recently used entries if the
        file goes over `max_bytes`."""
        if targets.model_version != scope.model_version:
            raise ValueError(
                f"answer of version {targets.model_version!r} cannot be stored under "
                f"{scope.model_version!r}"
            )
        if targets.batch_size != len(digests):
            raise ValueError(f"{targets.batch_size} rows for {len(digests)} digests")
        now = _now_us()
        with self._lock:
            with self._file.transaction():
                written, all_fit = 0, True
                for task in scope.tasks:
                    output = targets.outputs[task]
                    namespace = self._file.namespace(scope, task, create_from=output)
                    assert namespace is not None
                    if not fits(namespace, output):
                        all_fit = False
                        continue  # the teacher changed its answer's layout: do not mix
                    if task in scope.token_tasks:
                        if targets.lengths is None:
                            raise ValueError(f"task {task!r}: token rows need the answer's lengths")
                        lengths = np.asarray(targets.lengths, dtype=np.int64)
                        written += self._file.insert(namespace, digests, output, now, lengths)
                    else:
                        written += self._file.insert(namespace, digests, output, now)
                self._write_touches(now)
                evicted = self._file.evict_over_bound(self.max_bytes)
                self.stats.evicted += len(evicted)
            self._forget(evicted)
            if all_fit and self._memory(scope):
                self._tick += 1
                parts = {task: targets.outputs[task] for task in scope.tasks}
                self._slab(scope, self._tick, len(digests)).insert(digests, parts, self._tick)
            self.stats.stored += written
            return written

    # -- housekeeping -------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """Bytes of the stored keys and values (what `max_bytes` bounds)."""
        with self._lock:
            return self._file.total_bytes()

    def __len__(self) -> int:
        with self._lock:
            return self._file.count()

    def versions(self) -> list[tuple[str, str, int, int]]:
        """(model, model_version, entries, bytes) per cached model version."""
        with self._lock:
            return self._file.versions()

    def drop(self, model_version: str | None = None) -> int:
        """Delete the entries of `model_version` (None: everything); returns entries deleted."""
        with self._lock:
            deleted, gone = self._file.drop(model_version)
            self._slabs = {
                scope: slab
                for scope, slab in self._slabs.items()
                if not any(n.id in gone for n in slab.namespaces.values())
            }
            return deleted

    def clear(self) -> int:
        """Delete every entry; returns how many."""
        return self.drop(None)

    def import_export(self, export: str | os.PathLike[str] | OfflineSoftTargets) -> int:
        """Fill the cache from an offline export (`student-client export`), under the export's
        own model version and settings, so an online loader with the same options answers the
        exported samples locally and asks the teacher only for the others (mixed training).
        Returns the entries written."""
        offline = export if isinstance(export, OfflineSoftTargets) else OfflineSoftTargets(export)
        scope = CacheScope(
            offline.model,
            offline.model_version,
            offline.tasks,
            offline.output,
            offline.temperature,
            offline.top_k,
            offline.output_dtype,
        )
        written = 0
        rows = np.arange(len(offline))
        for start in range(0, len(rows), 4096):
            chunk = rows[start : start + 4096]
            targets = offline.targets(chunk, raw=True)
            digests = [offline.digests[i].tobytes() for i in chunk]
            written += self.store(scope, digests, targets)
        return written

    # -- internals ----------------------------------------------------------------------------

    def _memory(self, scope: CacheScope) -> bool:
        """Whether `scope` uses the in-process layer: not for token-level tasks, whose entries
        have a row per token (no fixed slot size); those are read from the file."""
        return bool(self.memory_bytes) and not scope.token_tasks

    def _slab(self, scope: CacheScope, tick: int, incoming: int) -> Slab:
        """The in-process layer of `scope`, with room for `incoming` more samples (made by
        dropping the least recently used slots, not those of look-up `tick`)."""
        slab = self._slabs.get(scope)
        if slab is None:
            namespaces = {task: self._file.namespace(scope, task) for task in scope.tasks}
            slab = Slab(scope, {t: n for t, n in namespaces.items() if n is not None})
            self._slabs[scope] = slab
        short = incoming - len(slab.free)
        if short <= 0:
            return slab
        capacity, occupied = slab.capacity, slab.capacity - len(slab.free)
        while capacity - occupied < incoming:
            capacity = max(64, 2 * capacity)
        total = sum(other.size for other in self._slabs.values())
        extra = (capacity - slab.capacity) * slab.slot_bytes
        others = sorted(
            (other for other in self._slabs.values() if other is not slab),
            key=lambda other: other.last_used,
        )
        while total + extra > self.memory_bytes and others:
            victim = others.pop(0)
            self._keep_touches(victim, victim.take_touched())
            del self._slabs[victim.scope]
            total -= victim.size
        if total + extra > self.memory_bytes:
            self._keep_touches(slab, slab.evict(short, tick))
        return slab

    def _keep_touches(self, slab: Slab, digests: list[bytes]) -> None:
        ids = [namespace.id for namespace in slab.namespaces.values()]
        self._file.touched.update((i, digest) for i in ids for digest in digests)

    def _forget(self, keys: list[tuple[int, bytes]]) -> None:
        """Entries evicted from the file leave the in-process layer too."""
        if not keys:
            return
        for slab in self._slabs.values():
            ids = {namespace.id for namespace in slab.namespaces.values()}
            for ns, digest in keys:
                if ns in ids:
                    slab.discard(digest)
        self._file.touched.difference_update(keys)

    def _flush_touches(self) -> None:
        for slab in self._slabs.values():
            self._keep_touches(slab, slab.take_touched())
        if not self._file.touched:
            self._last_touch_flush = time.monotonic()
            return
        with self._file.transaction():
            self._write_touches(_now_us())

    def _write_touches(self, now: int) -> None:
        """Inside a write transaction: set `last_used` of the entries hit since the last write."""
        for slab in self._slabs.values():
            self._keep_touches(slab, slab.take_touched())
        self._file.write_touches(now)
        self._last_touch_flush = time.monotonic()


def _now_us() -> int:
    return time.time_ns() // 1000
