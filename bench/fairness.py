"""Fair shares: a light client's latency beside heavy streaming students, FIFO vs fair queuing.

    python -m bench.fairness [--quick] [--duration 6] [--json out.json]

Two teachers on the default MNIST teacher run side by side, one with `--fair-queuing false`
(first come, first served) and one with fair queuing (the default), each with a tokens file that
names every client. In each cell, N heavy students (N in 1, 4, 16; each its own token and gRPC
stream of batches of 64 uint8 images, keeping `depth` batches in flight, depth 16 or 128; run in
up to 4 child processes, threads inside) stream for `--duration` seconds while a light client
(batch 8, one unary request at a time, its own token, in this process) measures its latency.
Each cell runs on the FIFO teacher, then on the fair one (`--repeat N`: N times each, alternating
which goes first, the runs pooled).

Reported per cell and mode: the light client's median and p99 latency and their ratio to the
light client alone (measured first on the same teacher); the mean forward time in the window
(from the teacher's `teacher_forward_seconds`); the time of one full forward (max_batch_size rows at
the window's mean time per row); the issue's targets (median beside one depth-128 student <= 3x
alone plus one full forward, beside 16 students <= 5x alone plus one full forward); and the
total samples/s of all clients, with fair / FIFO.

Bounds: each cell measures for `--duration` seconds; if the light client has fewer than
`--min-light` answers by then (a deep FIFO backlog), the heavy load goes on until it has them or
`--max-extra` seconds pass (a light request still unanswered then is counted at that bound, a
lower bound, marked "cut"). Heavy streams are then cancelled (their queued batches are dropped).
`--quick`: one heavy student at depth 16, 2 s cells (for tests/bench).
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

from bench.common import DEFAULT_MODEL, DEFAULT_REPOSITORY, machine_summary, print_table, write_json
from protocol import codec
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from student_client.teacher_process import TeacherProcess

HEAVY_BATCH = 64
LIGHT_BATCH = 8
MAX_PROCESSES = 4
MAX_BATCH = 1024  # the teachers' max_batch_size (the default): a full merged forward
MAX_LIGHT_REQUESTS = 5000  # per cell: a bound, not a target
RPC_TIMEOUT_S = 120.0


def token(name: str) -> str:
    return f"bench-{name}-token"


def metadata(name: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token(name)}"),)


def images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)


# ---- heavy students (child processes) ----------------------------------------------------------


def _stream(
    address: str,
    name: str,
    depth: int,
    stop: Any,
    ready: Any,
    answers: list[float],
    errors: list[str],
) -> None:
    """One heavy student: a stream keeping `depth` batches in flight until `stop`; the
    time.monotonic() of each answer goes to `answers`; its name goes to `ready` at the first."""
    inputs = codec.encode(images(HEAVY_BATCH, hash(name) % 1000))
    slots = threading.Semaphore(depth)

    def requests() -> Iterator[pb.SoftTargetsRequest]:
        sent = 0
        while not stop.is_set():
            if slots.acquire(timeout=0.1):
                yield pb.SoftTargetsRequest(model=DEFAULT_MODEL, inputs=inputs, batch_id=str(sent))
                sent += 1

    channel = grpc.insecure_channel(address)
    call = pb_grpc.TeacherServiceStub(channel).StreamSoftTargets(
        requests(), metadata=metadata(name)
    )
    watcher = threading.Thread(target=lambda: (stop.wait(), call.cancel()), daemon=True)
    watcher.start()
    try:
        for response in call:
            if not answers:
                ready.put(name)
            answers.append(time.monotonic())
            slots.release()
            if response.HasField("error"):
                errors.append(f"{response.error.code}: {response.error.message}")
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.CANCELLED:
            errors.append(f"{error.code().name}: {error.details()}")
    finally:
        channel.close()


def _heavy_process(
    address: str, names: list[str], depth: int, stop: Any, ready: Any, out: Any
) -> None:
    """A child process running one heavy student per name on threads; puts (answer times,
    errors) per student on `out` when `stop` is set and the streams have ended."""
    results: dict[str, tuple[list[float], list[str]]] = {n: ([], []) for n in names}
    threads = [
        threading.Thread(target=_stream, args=(address, n, depth, stop, ready, *results[n]))
        for n in names
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put({n: (times, errors) for n, (times, errors) in results.items()})


@dataclass
class Heavy:
    """N heavy students spread over up to MAX_PROCESSES child processes."""

    address: str
    count: int
    depth: int
    context: Any = field(default_factory=lambda: multiprocessing.get_context("spawn"))

    def __post_init__(self) -> None:
        self.stop = self.context.Event()
        self.ready = self.context.Queue()
        self.out = self.context.Queue()
        names = [f"heavy-{i}" for i in range(self.count)]
        groups = [names[i::MAX_PROCESSES] for i in range(min(MAX_PROCESSES, self.count))]
        self.processes = [
            self.context.Process(
                target=_heavy_process,
                args=(self.address, group, self.depth, self.stop, self.ready, self.out),
                daemon=True,
            )
            for group in groups
        ]
        for process in self.processes:
            process.start()

    def wait_ready(self, settle_s: float) -> None:
        """Wait until every student has its first answer, then `settle_s` more seconds (their
        windows fill up)."""
        for _ in range(self.count):
            self.ready.get(timeout=RPC_TIMEOUT_S)
        time.sleep(settle_s)

    def finish(self) -> dict[str, tuple[list[float], list[str]]]:
        self.stop.set()
        results: dict[str, tuple[list[float], list[str]]] = {}
        for _ in self.processes:
            results.update(self.out.get(timeout=RPC_TIMEOUT_S))
        for process in self.processes:
            process.join(30)
        return results


# ---- the light client and the teacher's own figures --------------------------------------------


def light_call(
    stub: pb_grpc.TeacherServiceStub, inputs: pb.Tensor, timeout: float = RPC_TIMEOUT_S
) -> float:
    started = time.perf_counter()
    stub.GetSoftTargets(
        pb.SoftTargetsRequest(model=DEFAULT_MODEL, inputs=inputs),
        timeout=timeout,
        metadata=metadata("light"),
    )
    return time.perf_counter() - started


def forward_totals(http_url: str) -> tuple[float, float, float]:
    """(sum of forward seconds, forwards, samples forwarded) so far, from the teacher's metrics."""
    text = httpx.get(f"{http_url}/metrics", timeout=30).text
    found = []
    for name in ("forward_seconds_sum", "forward_seconds_count", "batch_samples_sum"):
        match = re.search(rf'teacher_{name}{{model="{DEFAULT_MODEL}"}} (\S+)', text)
        found.append(float(match.group(1)) if match else 0.0)
    return found[0], found[1], found[2]


@dataclass
class Cell:
    mode: str  # "fifo" or "fair"
    heavy: int
    depth: int
    light_ms: list[float]
    light_rows: int
    heavy_rows: int
    seconds: float
    forward_ms: float  # mean forward in the window
    full_forward_ms: float  # a forward of max_batch_size rows at the window's time per row
    errors: list[str]
    censored: int = 0  # light requests unanswered within the bound (counted at the bound)

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.light_ms) if self.light_ms else float("nan")

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.light_ms, 99)) if self.light_ms else float("nan")

    @property
    def samples_per_s(self) -> float:
        return (self.light_rows + self.heavy_rows) / self.seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "heavy": self.heavy,
            "depth": self.depth,
            "light_requests": len(self.light_ms),
            "light_p50_ms": self.p50_ms,
            "light_p99_ms": self.p99_ms,
            "forward_mean_ms": self.forward_ms,
            "full_forward_ms": self.full_forward_ms,
            "samples_per_s": self.samples_per_s,
            "heavy_rows": self.heavy_rows,
            "light_rows": self.light_rows,
            "seconds": self.seconds,
            "errors": self.errors[:5],
            "error_count": len(self.errors),
            "light_censored": self.censored,
        }


def run_cell(
    teacher: TeacherProcess,
    mode: str,
    heavy: int,
    depth: int,
    duration: float,
    min_light: int,
    max_extra: float,
) -> Cell:
    inputs = codec.encode(images(LIGHT_BATCH, 7))
    load = Heavy(teacher.grpc_address, heavy, depth) if heavy else None
    latencies: list[float] = []
    errors: list[str] = []
    censored = 0
    with grpc.insecure_channel(teacher.grpc_address) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        light_call(stub, inputs)  # connect
        if load is not None:
            load.wait_ready(1.0)
        before = forward_totals(teacher.http_url)
        started = time.monotonic()
        ended = started + duration
        while len(latencies) < MAX_LIGHT_REQUESTS:
            now = time.monotonic()
            if now > ended and (len(latencies) >= min_light or now > ended + max_extra):
                break
            wait = max(1.0, ended + max_extra - now)
            try:
                latencies.append(light_call(stub, inputs, wait))
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    errors.append(f"light {error.code().name}: {error.details()}")
                censored += 1  # no answer within the bound: counted at the bound, a lower bound
                latencies.append(wait)
                break
        window_end = min(time.monotonic(), ended)
        after = forward_totals(teacher.http_url)
    results = load.finish() if load is not None else {}
    heavy_rows = 0
    for times, stream_errors in results.values():
        heavy_rows += HEAVY_BATCH * sum(started <= t <= window_end for t in times)
        errors += stream_errors
    forwards, rows = after[1] - before[1], after[2] - before[2]
    return Cell(
        mode,
        heavy,
        depth,
        [s * 1000 for s in latencies],
        LIGHT_BATCH * len(latencies),  # the light client's samples (its window may run over)
        heavy_rows,
        window_end - started,
        1000 * (after[0] - before[0]) / forwards if forwards else float("nan"),
        1000 * MAX_BATCH * (after[0] - before[0]) / rows if rows else float("nan"),
        errors,
        censored,
    )


def merge(runs: list[Cell]) -> Cell:
    """One cell from repeated runs of it: latencies pooled, rows and seconds summed, forward
    times weighted by the seconds measured."""
    seconds = sum(run.seconds for run in runs)
    return Cell(
        runs[0].mode,
        runs[0].heavy,
        runs[0].depth,
        [ms for run in runs for ms in run.light_ms],
        sum(run.light_rows for run in runs),
        sum(run.heavy_rows for run in runs),
        seconds,
        sum(run.forward_ms * run.seconds for run in runs) / seconds,
        sum(run.full_forward_ms * run.seconds for run in runs) / seconds,
        [error for run in runs for error in run.errors],
        sum(run.censored for run in runs),
    )


def write_tokens(folder: Path, heavy: int) -> Path:
    path = folder / "tokens.toml"
    names = ["light", *(f"heavy-{i}" for i in range(heavy))]
    path.write_text(
        "".join(
            f'[[clients]]\nname = "{n}"\ntoken = "{token(n)}"\nscopes = ["infer"]\n\n'
            for n in names
        )
    )
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 heavy student, depth 16, 2 s")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds measured per cell")
    parser.add_argument("--heavy", default="1,4,16", help="heavy student counts")
    parser.add_argument("--depths", default="16,128", help="batches in flight per student")
    parser.add_argument("--min-light", type=int, default=5, help="light answers wanted per cell")
    parser.add_argument("--max-extra", type=float, default=60.0, help="most extra seconds")
    parser.add_argument(
        "--repository", type=Path, default=DEFAULT_REPOSITORY, help="holds mnist-multitask"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each cell this many times per mode, alternating which mode goes first "
        "(fifo-fair, fair-fifo, ...), and pool the runs: drifting load from other processes "
        "then weighs on both modes alike",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.heavy, args.depths, args.duration, args.min_light = "1", "16", 2.0, 3
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    heavy_counts = [int(n) for n in args.heavy.split(",")]
    depths = [int(n) for n in args.depths.split(",")]
    source = args.repository / DEFAULT_MODEL
    if not (source / "config.json").is_file():
        raise SystemExit(f"{source}: no default MNIST teacher (run `make demo` or the server once)")
    with tempfile.TemporaryDirectory(prefix="fairness-") as scratch:
        root = Path(scratch)
        shutil.copytree(source, root / "repository" / DEFAULT_MODEL)
        tokens = write_tokens(root, max(heavy_counts))
        common = [
            "--train-default-if-missing",
            "false",
            "--auth-tokens-file",
            str(tokens),
            "--max-queue-size",
            str(max(256, 2 * max(heavy_counts) * max(depths))),
            "--log-level",
            "warning",
        ]
        teachers = {
            mode: TeacherProcess(
                root / "repository",
                [*common, "--fair-queuing", str(mode == "fair").lower()],
                inherit_teacher_env=False,
                log=root / f"{mode}.log",
            )
            for mode in ("fifo", "fair")
        }
        try:
            alone = {
                mode: run_cell(teacher, mode, 0, 0, args.duration, args.min_light, 0)
                for mode, teacher in teachers.items()
            }
            cells = []
            for n in heavy_counts:
                for depth in depths:
                    runs: dict[str, list[Cell]] = {"fifo": [], "fair": []}
                    for repeat in range(args.repeat):  # ABBA: fifo, fair, fair, fifo, ...
                        order = ("fifo", "fair") if repeat % 2 == 0 else ("fair", "fifo")
                        for mode in order:
                            runs[mode].append(
                                run_cell(
                                    teachers[mode],
                                    mode,
                                    n,
                                    depth,
                                    args.duration,
                                    args.min_light,
                                    args.max_extra,
                                )
                            )
                    cells += [merge(runs["fifo"]), merge(runs["fair"])]
        finally:
            for teacher in teachers.values():
                teacher.stop(15)
    report = summarize(alone, cells)
    report["machine"] = machine_summary()
    if args.json is not None:
        write_json(args.json, report)
    return report


def summarize(alone: dict[str, Cell], cells: list[Cell]) -> dict[str, Any]:
    rows, out = [], []
    fifo = {(c.heavy, c.depth): c for c in cells if c.mode == "fifo"}
    for cell in cells:
        base = alone[cell.mode].p50_ms
        factor = 3 if cell.heavy == 1 else 5
        budget = factor * base + cell.full_forward_ms
        ratio = cell.samples_per_s / fifo[(cell.heavy, cell.depth)].samples_per_s
        entry = cell.to_json() | {
            "alone_p50_ms": base,
            "p50_over_alone": cell.p50_ms / base,
            "p99_over_alone": cell.p99_ms / base,
            "target_ms": budget if cell.heavy in (1, 16) else None,
            "meets_target": (cell.p50_ms <= budget) if cell.heavy in (1, 16) else None,
            "throughput_over_fifo": ratio,
        }
        out.append(entry)
        rows.append(
            [
                f"{cell.heavy} x depth {cell.depth}",
                cell.mode,
                f"{len(cell.light_ms)}" + (f" ({cell.censored} cut)" if cell.censored else ""),
                f"{cell.p50_ms:.1f}",
                f"{cell.p99_ms:.1f}",
                f"{cell.p50_ms / base:.1f}x",
                f"{cell.forward_ms:.0f}/{cell.full_forward_ms:.0f}",
                f"{budget:.0f}" if cell.heavy in (1, 16) else "-",
                f"{cell.samples_per_s:.0f}",
                f"{ratio:.3f}",
                len(cell.errors),
            ]
        )
    print(
        "light alone: "
        + ", ".join(f"{m} p50 {c.p50_ms:.1f} ms p99 {c.p99_ms:.1f} ms" for m, c in alone.items())
    )
    print_table(
        "light client (batch 8) beside heavy students (batch 64), FIFO vs fair queuing",
        [
            "heavy students",
            "mode",
            "light n",
            "p50 ms",
            "p99 ms",
            "p50/alone",
            "fwd ms mean/full",
            "target ms",
            "samples/s",
            "vs fifo",
            "errors",
        ],
        rows,
    )
    return {"alone": {m: c.to_json() for m, c in alone.items()}, "cells": out}


if __name__ == "__main__":
    main()
