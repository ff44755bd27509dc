"""The cache's SQLite file: schema, format check, namespaces, and reading, writing and evicting
entries. Not thread-safe: `SoftTargetCache` calls it under its lock.

One file (the standard library's `sqlite3`) in WAL mode: each write is one atomic transaction
(`transaction()`), readers in other processes see either all of it or nothing and never block a
writer; `synchronous=NORMAL` (a power cut may lose the last transactions, never corrupt the file:
a cache can always be refilled). `meta.bytes` is the sum of `entries.size`, kept by triggers.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from student_client.offline.rows import (
    DTYPES,
    Namespace,
    Row,
    decode_rows,
    decode_token_rows,
    dtype_name,
    little_endian,
    row_size,
)
from student_client.offline.scope import CacheError, CacheScope
from student_client.types import TaskTargets

FORMAT_VERSION = 1
_SQL_VARIABLES = 900  # stay under SQLite's default limit of bound parameters per statement

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('format', 1), ('bytes', 0);
CREATE TABLE IF NOT EXISTS namespaces (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    task TEXT NOT NULL,
    output TEXT NOT NULL,
    temperature REAL NOT NULL,
    top_k INTEGER NOT NULL,
    output_dtype TEXT NOT NULL,
    value_dtype TEXT NOT NULL,
    index_dtype TEXT,
    tail_dtype TEXT,
    width INTEGER NOT NULL,
    created REAL NOT NULL,
    UNIQUE (model, model_version, task, output, temperature, top_k, output_dtype)
);
CREATE TABLE IF NOT EXISTS entries (
    ns INTEGER NOT NULL REFERENCES namespaces (id),
    sample BLOB NOT NULL,
    vals BLOB NOT NULL,
    idx BLOB,
    tail BLOB,
    size INTEGER NOT NULL,
    last_used INTEGER NOT NULL,
    PRIMARY KEY (ns, sample)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_last_used ON entries (last_used);
CREATE TRIGGER IF NOT EXISTS entries_added AFTER INSERT ON entries BEGIN
    UPDATE meta SET value = value + NEW.size WHERE name = 'bytes';
END;
CREATE TRIGGER IF NOT EXISTS entries_removed AFTER DELETE ON entries BEGIN
    UPDATE meta SET value = value - OLD.size WHERE name = 'bytes';
END;
"""


class EntryFile:
    """An open cache file (created if missing). `touched` holds the keys (namespace id, sample
    digest) hit since their `last_used` was last written."""

    def __init__(self, path: Path, busy_timeout_s: float) -> None:
        self.path = path
        self.namespaces: dict[tuple[object, ...], Namespace] = {}
        self.touched: set[tuple[int, bytes]] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            version = self._format()
            if version is None:
                self.db.executescript(_SCHEMA)
                version = self._format()
        except sqlite3.DatabaseError as error:
            raise CacheError(
                f"{self.path}: not a usable soft-target cache ({error}); delete it to start over"
            ) from error
        if version != FORMAT_VERSION:
            self.db.close()
            raise CacheError(
                f"{self.path}: cache format {version}, this client reads {FORMAT_VERSION}; "
                "delete the file to start over"
            )

    def _format(self) -> object:
        """The file's format number; None for a new file (no `meta` table yet)."""
        has_meta = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if has_meta is None:
            return None
        found = self.db.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
        return found[0] if found else "missing"

    @property
    def closed(self) -> bool:
        return self.db is None

    def close(self) -> None:
        self.db.close()
        self.db = None  # type: ignore[assignment]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def namespace(
        self, scope: CacheScope, task: str, create_from: TaskTargets | None = None
    ) -> Namespace | None:
        ident = (
            scope.model, scope.model_version, task, scope.output,
            scope.temperature, scope.top_k, scope.stored_dtype,
        )  # fmt: skip
        known = self.namespaces.get(ident)
        if known is not None:
            return known
        query = (
            "SELECT id, value_dtype, index_dtype, tail_dtype, width FROM namespaces WHERE "
            "model = ? AND model_version = ? AND task = ? AND output = ? AND temperature = ? "
            "AND top_k = ? AND output_dtype = ?"
        )
        found = self.db.execute(query, ident).fetchone()
        if found is None and create_from is not None:
            values = create_from.values
            self.db.execute(
                "INSERT OR IGNORE INTO namespaces (model, model_version, task, output, "
                "temperature, top_k, output_dtype, value_dtype, index_dtype, tail_dtype, width, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    *ident,
                    dtype_name(values.dtype),
                    dtype_name(create_from.indices.dtype)
                    if create_from.indices is not None
                    else None,
                    dtype_name(create_from.tail_mass.dtype)
                    if create_from.tail_mass is not None
                    else None,
                    int(values.shape[1]),
                    time.time(),
                ),
            )
            found = self.db.execute(query, ident).fetchone()
        if found is None:
            return None
        ns_id, value_dtype, index_dtype, tail_dtype, width = found
        namespace = Namespace(
            int(ns_id),
            self._checked_dtype(value_dtype),
            self._checked_dtype(index_dtype) if index_dtype else None,
            self._checked_dtype(tail_dtype) if tail_dtype else None,
            int(width),
        )
        self.namespaces[ident] = namespace
        return namespace

    def _checked_dtype(self, name: str) -> np.dtype:
        try:
            return DTYPES[name]
        except KeyError:
            raise CacheError(f"{self.path}: unknown stored dtype {name!r}") from None

    def _select(self, keys: list[tuple[int, bytes]]) -> Iterable[tuple[tuple[int, bytes], Row]]:
        namespaces = sorted({ns for ns, _ in keys})
        samples = sorted({sample for _, sample in keys})
        wanted = set(keys)
        step = max(1, _SQL_VARIABLES - len(namespaces))
        for chunk in _chunks(samples, step):
            query = (
                "SELECT ns, sample, vals, idx, tail FROM entries WHERE ns IN "
                f"({','.join('?' * len(namespaces))}) AND sample IN ({','.join('?' * len(chunk))})"
            )
            for ns, sample, vals, idx, tail in self.db.execute(query, (*namespaces, *chunk)):
                key = (ns, sample)
                if key in wanted:
                    yield key, (vals, idx, tail)

    def read(
        self, scope: CacheScope, digests: list[bytes], touch: bool
    ) -> tuple[np.ndarray, dict[str, TaskTargets]]:
        """The positions in `digests` of the samples cached for every task, and their soft targets
        per task; `touch` marks them in `touched`."""
        namespaces = {task: self.namespace(scope, task) for task in scope.tasks}
        if any(namespace is None for namespace in namespaces.values()):
            return np.zeros(0, np.int64), {}
        ids = [namespace.id for namespace in namespaces.values() if namespace is not None]
        rows = dict(self._select([(i, digest) for i in ids for digest in digests]))
        found = [p for p, d in enumerate(digests) if all((i, d) in rows for i in ids)]
        parts = {}
        for task, namespace in namespaces.items():
            assert namespace is not None
            task_rows = [rows[(namespace.id, digests[p])] for p in found]
            decode = decode_token_rows if task in scope.token_tasks else decode_rows
            parts[task] = decode(task, scope.output, namespace, task_rows, self.path)
        if touch:
            self.touched.update((i, digests[p]) for i in ids for p in found)
        return np.asarray(found, np.int64), parts

    def insert(
        self,
        namespace: Namespace,
        digests: Sequence[bytes],
        output: TaskTargets,
        now: int,
        lengths: np.ndarray | None = None,
    ) -> int:
        """Inside a write transaction: one task's rows of the samples `digests` (a sample already
        stored keeps its first row); returns the entries written. With `lengths` (a token-level
        task) the rows are split by sequence: one entry holds its sequence's `lengths[i]` rows."""
        values = little_endian(output.values)
        indices = little_endian(output.indices) if output.indices is not None else None
        tail = little_endian(output.tail_mass) if output.tail_mass is not None else None
        ends = np.cumsum(lengths) if lengths is not None else np.arange(1, len(digests) + 1)
        records = []
        for position, digest in enumerate(digests):
            rows = slice(int(ends[position - 1]) if position else 0, int(ends[position]))
            if lengths is None:  # one row per sample, stored as it is (no leading axis)
                rows = position  # type: ignore[assignment]
            row: Row = (
                values[rows].tobytes(),
                indices[rows].tobytes() if indices is not None else None,
                tail[rows].tobytes() if tail is not None else None,
            )
            records.append((namespace.id, digest, *row, row_size(digest, row), now))
        before = self.db.total_changes
        self.db.executemany(
            "INSERT OR IGNORE INTO entries (ns, sample, vals, idx, tail, size, "
            "last_used) VALUES (?, ?, ?, ?, ?, ?, ?)",
            records,
        )
        # total_changes also counts the trigger's meta updates: one per new row
        return (self.db.total_changes - before) // 2

    def write_touches(self, now: int) -> None:
        """Inside a write transaction: set `last_used` of the entries in `touched`."""
        if self.touched:
            self.db.executemany(
                "UPDATE entries SET last_used = ? WHERE ns = ? AND sample = ?",
                [(now, ns, sample) for ns, sample in self.touched],
            )
            self.touched.clear()

    def evict_over_bound(self, max_bytes: int) -> list[tuple[int, bytes]]:
        """Inside a write transaction: delete least recently used entries until under the bound;
        returns their keys."""
        (total,) = self.db.execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()
        excess = int(total) - max_bytes
        evicted: list[tuple[int, bytes]] = []
        while excess > 0:
            victims = self.db.execute(
                "SELECT ns, sample, size FROM entries ORDER BY last_used LIMIT 1024"
            ).fetchall()
            if not victims:
                break
            chosen = []
            for ns, sample, size in victims:
                chosen.append((ns, sample))
                excess -= size
                if excess <= 0:
                    break
            self.db.executemany("DELETE FROM entries WHERE ns = ? AND sample = ?", chosen)
            evicted += chosen
        return evicted

    def total_bytes(self) -> int:
        (value,) = self.db.execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()
        return int(value)

    def count(self) -> int:
        (count,) = self.db.execute("SELECT COUNT(*) FROM entries").fetchone()
        return int(count)

    def versions(self) -> list[tuple[str, str, int, int]]:
        return [
            (str(m), str(v), int(c), int(b or 0))
            for m, v, c, b in self.db.execute(
                "SELECT n.model, n.model_version, COUNT(e.sample), SUM(e.size) "
                "FROM namespaces n LEFT JOIN entries e ON e.ns = n.id "
                "GROUP BY n.model, n.model_version ORDER BY n.model, n.model_version"
            )
        ]

    def drop(self, model_version: str | None) -> tuple[int, set[int]]:
        """Delete the entries and namespaces of `model_version` (None: everything); returns the
        entries deleted and the ids of the namespaces gone."""
        with self.transaction():
            where, args = (
                ("WHERE model_version = ?", (model_version,)) if model_version else ("", ())
            )
            ids = [i for (i,) in self.db.execute(f"SELECT id FROM namespaces {where}", args)]
            deleted = 0
            for chunk in _chunks(ids, _SQL_VARIABLES):
                marks = ",".join("?" * len(chunk))
                deleted += self.db.execute(
                    f"DELETE FROM entries WHERE ns IN ({marks})", chunk
                ).rowcount
                self.db.execute(f"DELETE FROM namespaces WHERE id IN ({marks})", chunk)
        gone = set(ids)
        self.namespaces = {k: v for k, v in self.namespaces.items() if v.id not in gone}
        self.touched = {k for k in self.touched if k[0] not in gone}
        return deleted, gone


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:  # type: ignore[type-arg]
    for start in range(0, len(items), size):
        yield items[start : start + size]
