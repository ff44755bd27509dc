"""Per-request stage stamps (decode, validate, queue, ... encode), kept only when switched on.

`bench/request_cost.py` starts a teacher with `TEACHER_STAGE_TIMING_FILE=path`; each soft-target
request then carries a `Stamps` (a list of `(mark, time.perf_counter_ns())`) from the door's
handler through the core, the batcher's queue and worker thread and back, and the door hands it
to `StageRecorder.finish`; at shutdown the recorder writes one JSON line per request. Off (the
default), `StageRecorder.begin` returns None, every `mark` site is one `is not None` test, and
nothing is kept. `perf_counter_ns` is CLOCK_MONOTONIC on Linux, the same clock in every process,
so a client on the same machine can set its own send and receive times beside the server's marks.

The marks, in order (each ends the stage named in `STAGE_OF_MARK`): `entry` (the handler starts),
on HTTP `received` (the body read), `decoded`, `validated`, `dequeued` (the batcher took it), `dispatched` (handed to the worker
thread), `worker` (the thread runs it), `inputs` (the merged input tensor is on the device),
`forward`, `post` (soft targets shaped; on a CPU this includes the device-to-host copy, which is
free there), `engine_done`, `resumed` (back on the event loop), `handed` (per-forward metrics and
the caller's future set), `woken` (the handler runs again), `recorded` (request metrics),
`encoded`, `exit`. The engine's per-sample telemetry runs inside `post`; its time is carried as
`telemetry_ns` and counted as metrics. A lone-request fast path (`DynamicBatcher._run_lone`) has
no `dispatched`/`worker`/`resumed` hop: those stages are then 0.

Thread-safety: a `Stamps` is written by one request's handler, then by the batcher's worker while
the handler waits, never at once. `finish` runs on the event loop.
"""

from __future__ import annotations

import itertools
import json
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

# mark -> the stage that ends at it (stages are summed when several marks map to one)
STAGE_OF_MARK: Final = {
    "received": "receive",  # HTTP: the body read after the handler started
    "decoded": "decode",
    "validated": "validate",
    "dequeued": "queue",
    "dispatched": "batch assembly",
    "worker": "executor hop",
    "inputs": "host-to-device",
    "forward": "forward",
    "post": "post-processing",
    "engine_done": "post-processing",
    "resumed": "executor hop",
    "handed": "metrics",
    "woken": "executor hop",
    "recorded": "metrics",
    "encoded": "encode",
    "exit": "metrics",
}
STAGES: Final = (
    "receive",
    "decode",
    "validate",
    "queue",
    "batch assembly",
    "executor hop",
    "host-to-device",
    "forward",
    "device-to-host",
    "post-processing",
    "encode",
    "metrics",
    "send",
)

_current: ContextVar[Stamps | None] = ContextVar("teacher_stage_stamps", default=None)


@dataclass(slots=True)
class Stamps:
    """One request's marks, `(name, perf_counter_ns)` in the order they were made."""

    door: str
    marks: list[tuple[str, int]] = field(default_factory=list)
    batch_size: int = 0
    telemetry_ns: int = 0  # the engine's per-sample telemetry, inside `post`

    def mark(self, name: str) -> None:
        self.marks.append((name, time.perf_counter_ns()))

    def to_json(self) -> dict[str, Any]:
        return {
            "door": self.door,
            "batch_size": self.batch_size,
            "telemetry_ns": self.telemetry_ns,
            "marks": self.marks,
        }


def current() -> Stamps | None:
    """The stamps of the request this task is handling (None when timing is off)."""
    return _current.get()


def mark(name: str) -> None:
    """Mark `name` on the current request's stamps, if any."""
    stamps = _current.get()
    if stamps is not None:
        stamps.mark(name)


def stages_us(record: dict[str, Any]) -> dict[str, float]:
    """Microseconds per stage of one written record. `receive` holds only what the server
    marks (an HTTP body read after the handler starts) and `send` nothing: the rest of both needs
    the client's own times. Stages without marks (another path) are 0."""
    result = dict.fromkeys(STAGES, 0.0)
    marks = record["marks"]
    for (_, before), (name, after) in itertools.pairwise(marks):
        stage = STAGE_OF_MARK.get(name)
        if stage is not None:
            result[stage] += (after - before) / 1000.0
    telemetry = record.get("telemetry_ns", 0) / 1000.0
    result["post-processing"] -= telemetry
    result["metrics"] += telemetry
    return result


class StageRecorder:
    """Collects finished requests' stamps (at most `limit`) and writes them to `path` as JSON
    lines at `write()`. With `path` None it is off: `begin` returns None."""

    def __init__(self, path: Path | None, limit: int = 200_000) -> None:
        self.path = path
        self.limit = limit
        self.records: list[Stamps] = []

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def begin(self, door: str) -> Stamps | None:
        """New stamps for a request arriving at `door`, made current for this task."""
        if self.path is None:
            return None
        stamps = Stamps(door)
        stamps.mark("entry")
        _current.set(stamps)
        return stamps

    def finish(self, stamps: Stamps | None) -> None:
        if stamps is None:
            return
        stamps.mark("exit")
        _current.set(None)
        if len(self.records) < self.limit:
            self.records.append(stamps)

    def write(self) -> None:
        if self.path is None:
            return
        with self.path.open("w") as out:
            for stamps in self.records:
                out.write(json.dumps(stamps.to_json()) + "\n")
