"""Shared pieces of the benchmarks: timing loops, percentiles, tables, teacher processes.

Every load loop here is bounded twice: by wall time (`duration`, seconds) and by a count
(`max_calls` / `max_batches`), whichever comes first. Times are `time.perf_counter()` seconds;
latencies are reported in milliseconds; throughput in samples per second.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from protocol.errors import TeacherError
from student_client.online.client import TeacherClient
from student_client.teacher_process import TeacherProcess
from student_client.types import Event, TargetOptions

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"
DEFAULT_MODEL = "mnist-multitask"
STREAM_ANSWER_TIMEOUT_S = 120.0  # a stream answer later than this fails the run (queue.Empty)


@dataclass
class Measurement:
    """One timed cell: `requests` calls carrying `samples` samples in `seconds` of wall time.

    `latencies_s` holds one entry per request (seconds from send to answer; on a stream this
    includes the time a batch waited behind the others in flight).
    """

    label: str
    batch_size: int
    requests: int = 0
    samples: int = 0
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list, repr=False)
    note: str = ""

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_s), q) * 1000.0)

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(50)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(99)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "batch_size": self.batch_size,
            "requests": self.requests,
            "samples": self.samples,
            "seconds": round(self.seconds, 6),
            "samples_per_s": round(self.samples_per_s, 2),
            "p50_ms": round(self.p50_ms, 4),
            "p99_ms": round(self.p99_ms, 4),
            "note": self.note,
        }


@dataclass(frozen=True)
class Budget:
    """How long each timed cell runs: `warmup_s` untimed, then `duration_s` timed, stopping early
    after `max_calls` calls; at least `min_calls` calls are timed even if that takes longer."""

    duration_s: float = 3.0
    warmup_s: float = 0.5
    max_calls: int = 20_000
    min_calls: int = 3


def cycled_batches(images: np.ndarray, batch_size: int, count: int) -> list[np.ndarray]:
    """`count` C-contiguous batches of `batch_size` consecutive images, wrapping around."""
    n = len(images)
    return [
        np.ascontiguousarray(
            np.take(images, np.arange(i * batch_size, (i + 1) * batch_size) % n, 0)
        )
        for i in range(count)
    ]


def time_calls(
    label: str, call: Callable[[np.ndarray], object], batches: Sequence[np.ndarray], budget: Budget
) -> Measurement:
    """Call `call(batch)` back to back (one in flight): untimed warm-up, then the timed loop."""
    warm_end = time.perf_counter() + budget.warmup_s
    for i in range(budget.max_calls):
        call(batches[i % len(batches)])
        if time.perf_counter() >= warm_end and i >= 1:
            break
    result = Measurement(label, len(batches[0]))
    start = time.perf_counter()
    deadline = start + budget.duration_s
    for i in range(budget.max_calls):
        batch = batches[i % len(batches)]
        sent = time.perf_counter()
        call(batch)
        done = time.perf_counter()
        result.latencies_s.append(done - sent)
        result.requests += 1
        result.samples += len(batch)
        if done >= deadline and result.requests >= budget.min_calls:
            break
    result.seconds = time.perf_counter() - start
    return result


def _stream_run(
    client: TeacherClient,
    batches: Sequence[np.ndarray],
    options: TargetOptions,
    depth: int,
    seconds: float,
    max_batches: int,
) -> Measurement:
    """Keep `depth` batches in flight on one gRPC stream for `seconds` (or `max_batches`), then
    drain; throughput counts every answered batch over the whole time including the drain."""
    model = client.resolve_model(options.model)
    result = Measurement("stream", len(batches[0]))
    events: queue.Queue[Event] = queue.Queue()
    stream = client.open_stream(events, "bench")
    sent: dict[str, float] = {}
    index = 0

    def send_next() -> None:
        nonlocal index
        batch_id = f"bench-{index}"
        sent[batch_id] = time.perf_counter()
        stream.send(batches[index % len(batches)], options, model, batch_id)
        index += 1

    try:
        start = time.perf_counter()
        deadline = start + seconds
        for _ in range(min(depth, max_batches)):
            send_next()
        while sent:
            _, batch_id, answer = events.get(timeout=STREAM_ANSWER_TIMEOUT_S)
            now = time.perf_counter()
            if isinstance(answer, TeacherError):
                raise answer  # a failed batch, or the stream broke (batch_id None)
            assert batch_id is not None
            result.latencies_s.append(now - sent.pop(batch_id))
            result.requests += 1
            result.samples += answer.batch_size
            if now < deadline and index < max_batches:
                send_next()
        result.seconds = time.perf_counter() - start
    finally:
        stream.close()
    return result


def time_stream(
    label: str,
    client: TeacherClient,
    batches: Sequence[np.ndarray],
    options: TargetOptions,
    depth: int,
    budget: Budget,
) -> Measurement:
    """Samples/s and per-batch latency with `depth` batches in flight on one stream (after an
    untimed warm-up stream)."""
    _stream_run(client, batches, options, depth, budget.warmup_s, max(depth, 4))
    result = _stream_run(
        client, batches, options, depth, budget.duration_s, max(budget.max_calls, depth)
    )
    result.label = label
    result.note = f"{depth} in flight"
    return result


def ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else float("nan")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: numbers right-aligned, floats with sensible precision."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            if value != value:  # NaN
                return "n/a"
            if abs(value) >= 100:
                return f"{value:,.0f}"
            if abs(value) >= 10:
                return f"{value:.1f}"
            return f"{value:.2f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row, raw in zip(text, rows, strict=True):
        parts = []
        for value, original, width in zip(row, raw, widths, strict=True):
            numeric = isinstance(original, (int, float))
            parts.append(value.rjust(width) if numeric else value.ljust(width))
        lines.append("  ".join(parts))
    return "\n".join(lines)


def print_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO | None = None
) -> None:
    stream = out or sys.stdout
    print(f"\n{title}\n", file=stream)
    print(format_table(headers, rows), file=stream, flush=True)


@contextlib.contextmanager
def teacher_process(
    repository: Path, extra_args: Sequence[str] = (), env: dict[str, str] | None = None
) -> Iterator[TeacherProcess]:
    """A teacher subprocess on free loopback ports, its output in a temporary log file (whose tail
    a failed start raises with). The child gets this process's environment plus `env`, with the
    repository root on PYTHONPATH so `bench.` architectures import."""
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    with (
        tempfile.TemporaryDirectory(prefix="bench-teacher-") as folder,
        TeacherProcess(
            repository,
            # A benchmark measures the teacher alone: no background training of the default
            # sequence teacher beside it.
            [*extra_args, "--default-sequence-teacher", "false"],
            env={"PYTHONPATH": pythonpath, **(env or {})},
            log=Path(folder) / "server.log",
            start_timeout=300,
        ) as teacher,
    ):
        yield teacher


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that cannot take port 0)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


def machine_summary() -> dict[str, Any]:
    """What the numbers were measured on (cores, load, torch threads, versions)."""
    import platform

    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in load],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
    }


def ensure_repository(repository: Path) -> Path:
    """`repository`, with the default teacher trained into it first if it holds no model (no
    `config.json` in a model folder or a version subfolder)."""
    from teacher_server.repository.default_teacher import train_default_teacher

    if not any(repository.glob("*/config.json")) and not any(repository.glob("*/*/config.json")):
        print(f"no model in {repository}: training the default teacher (about 30 s)...")
        train_default_teacher(repository / DEFAULT_MODEL)
    return repository


def run_subprocess_json(command: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run a helper that prints one JSON object as its last stdout line; return that object."""
    completed = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"{command[:3]} exited {completed.returncode}:\n{completed.stderr[-3000:]}"
        )
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    return dict(json.loads(lines[-1]))
