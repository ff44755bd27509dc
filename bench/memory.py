"""Teacher server memory over a long bounded run of mixed requests ("Server memory stays flat
(within 10%) over a long bounded run of mixed requests").

    python -m bench.memory [--duration S] [--quick] [--json out.json] [--repository PATH]
                           [--threads N] [--warmup S] [--max-requests N] [--interval S]
                           [--kinds grpc-stream,...] [--no-refusals] [--teacher-arg=FLAG ...]

One real teacher (the default teacher on `--repository`, a subprocess on 127.0.0.1) is driven by
`--threads` client threads for `--duration` seconds (default 120; `--quick` 20) and at most
`--max-requests` requests in all, whichever ends first. Each thread has its own gRPC, HTTP
protobuf and HTTP JSON `TeacherClient`s (reopened every 64 requests, so connections come and go
too) and walks a fixed, seeded mix of requests from its own offset:

- kinds: gRPC unary, gRPC stream (a `SoftTargetLoader` pass over 3 batches, 2 in flight), HTTP
  protobuf, HTTP JSON (batches of 1 and 8 only: JSON is slow);
- batch sizes 1, 8, 64, 256 of real MNIST test images, sent as uint8 codes or float32;
- temperatures 1, 2, 4, 8; outputs probs, log_probs, logits; top_k 0, 1, 2; output dtypes
  float32, float16, bfloat16; all tasks or a subset; no hint, `features` or `feature_map`;
- one request in 8 is one the server must refuse: a NaN input, an unknown task, a wrong input
  shape, top_k above the fewest classes, a pinned model version it does not serve, a negative
  temperature. A refusal with the expected error class counts as expected; any other error, a
  refused request that the server accepted, or a valid request that failed counts as an
  unexpected failure (the run goes on; the exit code is then 1).

Meanwhile the server's resident set size (VmRSS of /proc/<pid>/status, with its thread count and
open file descriptors) is sampled every `--interval` seconds. The baseline is the first sample at
or after the end of the warm-up (`--warmup`, default 20% of the run and at least 5 s: allocators,
caches and connection pools grow at first). Reported: baseline, max after warm-up, last, the
ratios max/baseline and last/baseline, the slope of a line fitted to the samples after warm-up,
RSS at every 10% of the run, requests by kind, refusals by reason, and the verdict on
max/baseline <= 1.10. Exit 0 whatever the verdict (a measurement), 1 after an unexpected failure.

To find which requests make memory grow, run kinds alone (`--kinds grpc-stream`), without the
refusals (`--no-refusals`), or with other teacher flags (`--teacher-arg=--forward-chunk=0`). The
report names how the teacher runs merged batches (chunks of 64 rows or whole batches, chosen by
timing a probe batch at load): with whole batches RSS swings by hundreds of MiB (a merged forward
of up to 1,024 rows), so the run is only comparable with runs in the same mode.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    DEFAULT_REPOSITORY,
    cycled_batches,
    ensure_repository,
    machine_summary,
    print_table,
    teacher_process,
    write_json,
)
from protocol.errors import FailedPrecondition, InvalidArgument, TeacherError
from student_client.online.client import TeacherClient
from student_client.online.loader import SoftTargetLoader
from student_client.online.retry import NO_RETRY
from student_client.training.datasets import mnist_multitask
from student_client.types import SoftTargets, TargetOptions

TARGET_RATIO = 1.10
DEFAULT_DURATION_S = 120.0
QUICK_DURATION_S = 20.0
WARMUP_FRACTION = 0.2
MIN_WARMUP_S = 5.0
SAMPLE_INTERVAL_S = 0.5
THREADS = 4
MAX_REQUESTS = 200_000  # in all threads together; the run usually ends on time first
RECONNECT_EVERY = 64  # requests per thread between reopening its three clients
SERIES_POINTS = 10  # the printed time series: RSS at every 10% of the run

KINDS = ("grpc-unary", "grpc-stream", "http-protobuf", "http-json")
BATCH_SIZES = (1, 8, 64, 256)
JSON_BATCH_SIZES = (1, 8)
TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
OUTPUTS = ("probs", "log_probs", "logits")
TOP_KS = (0, 1, 2)  # the default teacher's `parity` task has 2 classes
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
INPUT_DTYPES = ("uint8", "float32")
TASK_SETS: tuple[tuple[str, ...], ...] = ((), ("digit",), ("parity", "loops"))
HINT_SETS: tuple[tuple[str, ...], ...] = ((), ("features",), ("feature_map",))
JSON_HINT_SETS: tuple[tuple[str, ...], ...] = ((), ("features",))
STREAM_BATCHES = 3
STREAM_DEPTH = 2
BATCHES_PER_SIZE = 4  # distinct batches per size, cycled

# Requests the server must refuse, and the error class it must refuse them with.
REFUSALS: dict[str, type[TeacherError]] = {
    "nan-input": InvalidArgument,
    "unknown-task": InvalidArgument,
    "wrong-shape": InvalidArgument,
    "top-k-too-large": InvalidArgument,
    "stale-version": FailedPrecondition,
    "negative-temperature": InvalidArgument,
}
REFUSAL_EVERY = 8  # the last request of every 8 in the mix is one to refuse
# JSON has no NaN (httpx refuses to encode one before sending): HTTP JSON gets this one instead.
JSON_NAN_STANDIN = "negative-temperature"
MIX_LENGTH = 2 * REFUSAL_EVERY * len(REFUSALS) * len(KINDS)  # every refusal on every kind, twice


@dataclass(frozen=True)
class Spec:
    """One request of the mix: `refusal` names why the server must refuse it ("" if valid)."""

    kind: str
    batch_size: int
    input_dtype: str
    options: TargetOptions
    refusal: str = ""


def build_mix(seed: int = 0, length: int = MIX_LENGTH) -> list[Spec]:
    """The fixed mix: valid requests cycle through the kinds with settings drawn from a seeded
    generator; every `REFUSAL_EVERY`-th is a request to refuse, cycling through every (refusal,
    kind) pair."""
    rng = np.random.default_rng(seed)

    def pick(values: Sequence[Any]) -> Any:
        return values[int(rng.integers(len(values)))]

    mix = []
    for i in range(length):
        refused = i % REFUSAL_EVERY == REFUSAL_EVERY - 1
        if refused:
            # Refusal j: kind j mod 4 and reason (j + j // 12) mod 6: refusals 24m .. 24m + 23
            # hold every (reason, kind) pair once.
            j = i // REFUSAL_EVERY
            pairs = math.lcm(len(REFUSALS), len(KINDS))
            refusal = list(REFUSALS)[(j + j // pairs) % len(REFUSALS)]
            kind = KINDS[j % len(KINDS)]
            if kind == "http-json" and refusal == "nan-input":
                refusal = JSON_NAN_STANDIN
        else:
            refusal, kind = "", KINDS[i % len(KINDS)]
        json = kind == "http-json"
        options = TargetOptions(
            tasks=pick(TASK_SETS),
            temperature=pick(TEMPERATURES),
            output=pick(OUTPUTS),
            top_k=pick(TOP_KS),
            output_dtype=pick(OUTPUT_DTYPES),
            hints=pick(JSON_HINT_SETS if json else HINT_SETS),
        )
        input_dtype = pick(INPUT_DTYPES)
        if refusal == "nan-input":
            input_dtype = "float32"  # uint8 has no NaN
        elif refusal == "unknown-task":
            options = dataclasses.replace(options, tasks=("colour",))
        elif refusal == "top-k-too-large":
            options = dataclasses.replace(options, tasks=(), top_k=3)  # parity has 2 classes
        elif refusal == "stale-version":
            options = dataclasses.replace(options, model_version="no-such-version")
        elif refusal == "negative-temperature":
            options = dataclasses.replace(options, temperature=-1.0)
        size = pick(JSON_BATCH_SIZES if json else BATCH_SIZES)
        mix.append(Spec(kind, size, input_dtype, options, refusal))
    return mix


class Inputs:
    """Real MNIST test batches of every size, as float32 in [0, 1] and as uint8 codes."""

    def __init__(self, images: np.ndarray) -> None:
        self.batches: dict[tuple[int, str], list[np.ndarray]] = {}
        for size in BATCH_SIZES:
            floats = cycled_batches(images, size, BATCHES_PER_SIZE)
            self.batches[size, "float32"] = floats
            self.batches[size, "uint8"] = [np.rint(b * 255.0).astype(np.uint8) for b in floats]

    def get(self, spec: Spec, index: int) -> np.ndarray:
        """Batch `index` (cycled) for `spec`, spoiled the way its refusal needs."""
        batch = self.batches[spec.batch_size, spec.input_dtype][index % BATCHES_PER_SIZE]
        if spec.refusal == "nan-input":
            batch = batch.copy()
            batch.flat[index % batch.size] = np.nan
        elif spec.refusal == "wrong-shape":
            batch = batch.reshape(len(batch), 1, -1)  # (N, 1, 784) instead of (N, 1, 28, 28)
        return batch


class Clients:
    """One thread's three clients (no retries: every failure is seen and counted)."""

    def __init__(self, grpc_address: str, http_url: str) -> None:
        self.grpc_address, self.http_url = grpc_address, http_url
        self.by_kind: dict[str, TeacherClient] = {}
        self.reopen()

    def reopen(self) -> None:
        self.close()
        grpc_client = TeacherClient(self.grpc_address, retry=NO_RETRY)
        self.by_kind = {
            "grpc-unary": grpc_client,
            "grpc-stream": grpc_client,
            "http-protobuf": TeacherClient(self.http_url, transport="http", retry=NO_RETRY),
            "http-json": TeacherClient(self.http_url, transport="http-json", retry=NO_RETRY),
        }

    def close(self) -> None:
        for client in {id(c): c for c in self.by_kind.values()}.values():
            client.close()
        self.by_kind = {}


def execute(spec: Spec, clients: Clients, inputs: Inputs, index: int) -> int:
    """Send one request of the mix; the number of samples answered. Raises what the client
    raised, or `AssertionError` for an answer of the wrong size."""
    client = clients.by_kind[spec.kind]
    if spec.kind == "grpc-stream":
        # Three batches on one stream; with a NaN or wrong shape, only the middle one is bad.
        batches = [
            inputs.get(spec if j == 1 else dataclasses.replace(spec, refusal=""), index + j)
            if spec.refusal in ("nan-input", "wrong-shape")
            else inputs.get(spec, index + j)
            for j in range(STREAM_BATCHES)
        ]
        loader = SoftTargetLoader(batches, client, spec.options, depth=STREAM_DEPTH)
        answered = 0
        for _, _, targets in loader:
            check_answer(spec, targets)
            answered += targets.batch_size
        return answered
    targets = client.soft_targets_with(inputs.get(spec, index), spec.options)
    check_answer(spec, targets)
    return targets.batch_size


def check_answer(spec: Spec, targets: SoftTargets) -> None:
    if targets.batch_size != spec.batch_size:
        raise AssertionError(f"answer of {targets.batch_size} rows for {spec.batch_size} samples")
    if spec.options.tasks and tuple(targets.outputs) != tuple(spec.options.tasks):
        raise AssertionError(
            f"answer for tasks {list(targets.outputs)}, asked {spec.options.tasks}"
        )
    if set(targets.hints) != set(spec.options.hints):
        raise AssertionError(f"answer with hints {list(targets.hints)}, asked {spec.options.hints}")


@dataclass
class Tally:
    """Outcomes of every request, by kind (shared by the threads; `lock` guards it)."""

    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    ok: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    samples: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)  # expected refusals, by reason
    coverage: dict[str, Counter[str]] = field(default_factory=dict)  # setting -> value -> ok
    failures: list[str] = field(default_factory=list)  # the first few unexpected failures
    reconnects: int = 0

    @property
    def total(self) -> int:
        return sum(self.ok.values()) + sum(self.refused.values()) + sum(self.failed.values())

    @property
    def unexpected(self) -> int:
        return sum(self.failed.values())

    def record(self, spec: Spec, samples: int, error: BaseException | None) -> None:
        expected = REFUSALS.get(spec.refusal)
        with self.lock:
            if expected is None and error is None:
                self.ok[spec.kind] += 1
                self.samples[spec.kind] += samples
                o = spec.options
                for name, value in (
                    ("batch_size", spec.batch_size),
                    ("input_dtype", spec.input_dtype),
                    ("temperature", o.temperature),
                    ("output", o.output),
                    ("top_k", o.top_k),
                    ("output_dtype", o.output_dtype),
                    ("tasks", ",".join(o.tasks) or "all"),
                    ("hints", ",".join(o.hints) or "none"),
                ):
                    self.coverage.setdefault(name, Counter())[str(value)] += 1
            elif expected is not None and isinstance(error, expected):
                self.refused[spec.kind] += 1
                self.refusals[spec.refusal] += 1
            else:
                self.failed[spec.kind] += 1
                if len(self.failures) < 20:
                    why = (
                        "accepted, but must be refused"
                        if error is None
                        else f"{type(error).__name__}: {error}"
                    )
                    self.failures.append(f"{spec.kind} {spec.refusal or 'valid'} {spec}: {why}")

    def to_json(self) -> dict[str, Any]:
        return {
            "by_kind": {
                kind: {
                    "ok": self.ok[kind],
                    "refused_expected": self.refused[kind],
                    "failed_unexpected": self.failed[kind],
                    "samples": self.samples[kind],
                }
                for kind in KINDS
            },
            "total": self.total,
            "refusals_by_reason": {reason: self.refusals[reason] for reason in REFUSALS},
            "unexpected_failures": self.unexpected,
            "failures": self.failures,
            "coverage": {name: dict(values) for name, values in self.coverage.items()},
            "reconnects": self.reconnects,
        }


# --- sampling the server ---------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t_s: float  # seconds since the load started
    rss_kib: int
    threads: int
    open_fds: int
    requests: int  # requests finished so far


def read_process(pid: int) -> tuple[int, int, int]:
    """(VmRSS KiB, threads, open file descriptors) of process `pid`, from /proc."""
    rss = threads = -1
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    if rss < 0:
        raise RuntimeError(f"no VmRSS in /proc/{pid}/status")
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = -1
    return rss, threads, fds


def teacher_forward(pid: int) -> str:
    """How the teacher runs merged batches on the CPU, from its start-up log (its stderr, read
    through /proc): chunks of N rows or whole batches. The default (`--forward-chunk -1`) times a
    probe batch at load and logs its choice, except when the probe forward is slower than the
    engine's `PROBE_MAX_S` (a busy machine): it then runs whole batches without a log line.
    Whole merged batches (up to 1,024 rows) take hundreds of MiB for a moment: RSS then swings."""
    try:
        log = Path(f"/proc/{pid}/fd/2").read_text(errors="replace")
    except OSError:
        return "unknown (log not readable)"
    found = re.findall(r"forward in chunks of (.+?) \(probe of", log)
    if found:
        return found[-1]
    return "no probe logged: whole batches unless --forward-chunk says otherwise"


class Sampler:
    """Samples the server every `interval` seconds on a thread until `stop()`; sets `dead` (and
    `gone`) when the process can no longer be read."""

    def __init__(self, pid: int, interval: float, tally: Tally, start: float) -> None:
        self.pid, self.interval, self.tally, self.start = pid, interval, tally, start
        self.samples: list[Sample] = []
        self.gone = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> Sample:
        rss, threads, fds = read_process(self.pid)
        with self.tally.lock:
            done = self.tally.total
        return Sample(round(time.monotonic() - self.start, 3), rss, threads, fds, done)

    def _run(self) -> None:
        while True:
            try:
                self.samples.append(self.sample())
            except (OSError, RuntimeError):
                self.gone.set()
                return
            if self._stop.wait(self.interval):
                return

    def begin(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    duration_s: float
    warmup_s: float
    threads: int
    max_requests: int
    interval_s: float
    seed: int
    kinds: tuple[str, ...] = KINDS
    refusals: bool = True
    teacher_args: tuple[str, ...] = ()  # extra `serve` flags

    def mix(self) -> list[Spec]:
        """The mix, keeping only `kinds` (and no refusals without `refusals`)."""
        return [
            spec
            for spec in build_mix(self.seed)
            if spec.kind in self.kinds and (self.refusals or not spec.refusal)
        ]


def drive(
    plan: Plan, grpc_address: str, http_url: str, pid: int
) -> tuple[Tally, list[Sample], Sample | None, float]:
    """Run the load and the sampler; (tally, samples during the load, a sample 1 s after the
    load, seconds the load ran)."""
    mix = plan.mix()
    inputs = Inputs(mnist_multitask().test_x)
    tally = Tally()
    per_thread = math.ceil(plan.max_requests / plan.threads)
    start = time.monotonic()
    deadline = start + plan.duration_s
    sampler = Sampler(pid, plan.interval_s, tally, start)
    sampler.begin()

    def worker(number: int) -> None:
        offset = number * (len(mix) // plan.threads) + number  # not in step on the kinds
        clients: Clients | None = None
        try:
            clients = Clients(grpc_address, http_url)
            for n in range(per_thread):
                if time.monotonic() >= deadline or sampler.gone.is_set():
                    break
                if n and n % RECONNECT_EVERY == 0:
                    clients.reopen()
                    with tally.lock:
                        tally.reconnects += 1
                spec = mix[(offset + n) % len(mix)]
                samples, error = 0, None
                try:
                    samples = execute(spec, clients, inputs, offset + n)
                except Exception as caught:  # counted, never stops the run
                    error = caught
                tally.record(spec, samples, error)
        except Exception as error:  # the clients themselves failed: counted as a failure
            with tally.lock:
                tally.failed["client"] += 1
                tally.failures.append(f"thread {number}: {type(error).__name__}: {error}")
        finally:
            if clients is not None:
                clients.close()

    workers = [
        threading.Thread(target=worker, args=(i,), name=f"load-{i}", daemon=True)
        for i in range(plan.threads)
    ]
    for thread in workers:
        thread.start()
    last_report = start
    while any(thread.is_alive() for thread in workers):
        for thread in workers:
            thread.join(timeout=1.0)
        now = time.monotonic()
        if now - last_report >= 10 and sampler.samples:
            last_report = now
            s = sampler.samples[-1]
            print(
                f"  {s.t_s:6.1f} s: RSS {s.rss_kib / 1024:.1f} MiB, {s.threads} threads, "
                f"{s.open_fds} fds, {s.requests} requests ({tally.unexpected} unexpected failures)",
                flush=True,
            )
        if now > deadline + 300:  # a request hung far beyond the client timeout
            with tally.lock:
                tally.failed["client"] += 1
                tally.failures.append("load threads still running 300 s after the deadline")
            break
    load_s = time.monotonic() - start
    sampler.stop()
    if sampler.gone.is_set():
        with tally.lock:
            tally.failed["server"] += 1
            tally.failures.append(f"the server process {pid} exited during the run")
    after: Sample | None = None
    time.sleep(1.0)
    with contextlib.suppress(OSError, RuntimeError):
        after = sampler.sample()
    return tally, sampler.samples, after, load_s


def summarize(samples: Sequence[Sample], warmup_s: float) -> dict[str, Any]:
    """Baseline (the first sample at or after `warmup_s`), max and last after it, their ratios,
    and the slope (KiB per minute) of a least-squares line through the samples after warm-up."""
    after = [s for s in samples if s.t_s >= warmup_s]
    if not after:
        raise RuntimeError(f"no RSS sample after the {warmup_s:g} s warm-up: run longer")
    baseline = after[0].rss_kib
    peak = max(s.rss_kib for s in after)
    last = after[-1].rss_kib
    slope = (
        float(np.polyfit([s.t_s for s in after], [s.rss_kib for s in after], 1)[0]) * 60.0
        if len(after) >= 2
        else float("nan")
    )
    quarter = max(1, len(after) // 4)
    first_q = float(np.median([s.rss_kib for s in after[:quarter]]))
    last_q = float(np.median([s.rss_kib for s in after[-quarter:]]))
    return {
        "baseline_kib": baseline,
        "baseline_t_s": after[0].t_s,
        "max_after_warmup_kib": peak,
        "last_kib": last,
        "max_ratio": round(peak / baseline, 4),
        "last_ratio": round(last / baseline, 4),
        "slope_kib_per_min": round(slope, 1),
        # Less sensitive to what is in flight at one sample: the median of the last quarter of
        # the samples after warm-up over the median of the first quarter.
        "median_first_quarter_kib": round(first_q, 1),
        "median_last_quarter_kib": round(last_q, 1),
        "quarter_drift_ratio": round(last_q / first_q, 4),
        "samples_after_warmup": len(after),
        "warmup_max_kib": max((s.rss_kib for s in samples if s.t_s < warmup_s), default=None),
        "threads_baseline_last": [after[0].threads, after[-1].threads],
        "open_fds_baseline_last": [after[0].open_fds, after[-1].open_fds],
        "within_target": peak / baseline <= TARGET_RATIO,
        "target_ratio": TARGET_RATIO,
    }


def series(
    samples: Sequence[Sample], duration_s: float, points: int = SERIES_POINTS
) -> list[Sample]:
    """The last sample at or before each `1/points` of the run (the first sample for 0%)."""
    chosen = []
    for k in range(points + 1):
        target = duration_s * k / points
        before = [s for s in samples if s.t_s <= target + 1e-9]
        chosen.append(before[-1] if before else samples[0])
    return chosen


def mib(kib: float) -> float:
    return kib / 1024.0


def report(
    plan: Plan,
    samples: Sequence[Sample],
    summary: dict[str, Any],
    tally: Tally,
    load_s: float,
    forward: str,
) -> None:
    baseline = summary["baseline_kib"]
    print_table(
        f"Server RSS over the run ({plan.threads} client threads, "
        f"{'mixed requests' if plan.kinds == KINDS else ' + '.join(plan.kinds)}"
        f"{'' if plan.refusals else ', no refusals'}; baseline = the sample at "
        f"{summary['baseline_t_s']:.1f} s, after the {plan.warmup_s:g} s warm-up)",
        ["elapsed s", "of run", "RSS MiB", "x baseline", "threads", "open fds", "requests", ""],
        [
            [
                s.t_s,
                f"{round(100 * s.t_s / plan.duration_s):d}%",
                mib(s.rss_kib),
                s.rss_kib / baseline,
                s.threads,
                s.open_fds,
                s.requests,
                "warm-up" if s.t_s < plan.warmup_s else "",
            ]
            for s in series(samples, plan.duration_s)
        ],
    )
    rows: list[list[object]] = [
        [
            kind,
            tally.ok[kind],
            tally.refused[kind],
            tally.failed[kind],
            tally.samples[kind],
            (tally.ok[kind] + tally.refused[kind] + tally.failed[kind]) / load_s,
        ]
        for kind in KINDS
    ]
    rows += [[other, 0, 0, n, 0, 0.0] for other, n in tally.failed.items() if other not in KINDS]
    rows.append(
        [
            "all",
            sum(tally.ok.values()),
            sum(tally.refused.values()),
            tally.unexpected,
            sum(tally.samples.values()),
            tally.total / load_s,
        ]
    )
    print_table(
        f"Requests by kind over {load_s:.0f} s (a gRPC stream request is one loader pass of "
        f"{STREAM_BATCHES} batches)",
        ["kind", "ok", "refused (expected)", "failed (unexpected)", "samples", "requests/s"],
        rows,
    )
    print_table(
        "Expected refusals by reason",
        ["reason", "refused", "error class"],
        [[r, tally.refusals[r], cls.__name__] for r, cls in REFUSALS.items()],
    )
    print_table(
        f"Server RSS after warm-up (teacher forward on merged batches: {forward})",
        [
            "baseline MiB",
            "max MiB",
            "last MiB",
            "max/baseline",
            "last/baseline",
            "slope KiB/min",
            "median last/first quarter",
        ],
        [
            [
                mib(baseline),
                mib(summary["max_after_warmup_kib"]),
                mib(summary["last_kib"]),
                f"{summary['max_ratio']:.3f}",
                f"{summary['last_ratio']:.3f}",
                summary["slope_kib_per_min"],
                f"{summary['quarter_drift_ratio']:.3f}",
            ]
        ],
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, help="write every number to this JSON file")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument(
        "--duration", type=float, help=f"seconds of load (default {DEFAULT_DURATION_S:g})"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"a {QUICK_DURATION_S:g} s run (unless --duration)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        help=f"seconds before the baseline (default {WARMUP_FRACTION:.0%} of the run, at least "
        f"{MIN_WARMUP_S:g} s)",
    )
    parser.add_argument(
        "--threads", type=int, default=THREADS, help=f"client threads (default {THREADS})"
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=MAX_REQUESTS,
        help=f"most requests in all (default {MAX_REQUESTS:,})",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=SAMPLE_INTERVAL_S,
        help=f"seconds between RSS samples (default {SAMPLE_INTERVAL_S:g})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help="comma-separated request kinds to send (default all: to find which one grows)",
    )
    parser.add_argument(
        "--no-refusals", action="store_true", help="leave out the requests the server must refuse"
    )
    parser.add_argument(
        "--teacher-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="an extra flag of the teacher's `serve` (repeatable; e.g. --teacher-arg=--forward-"
        "chunk=64)",
    )
    return parser.parse_args(argv)


def plan_for(args: argparse.Namespace) -> Plan:
    duration = args.duration or (QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S)
    warmup = (
        args.warmup if args.warmup is not None else max(MIN_WARMUP_S, WARMUP_FRACTION * duration)
    )
    if not 0 <= warmup < duration:
        raise SystemExit(f"--warmup {warmup:g}: must be at least 0 and below --duration")
    if args.threads < 1 or args.max_requests < 1 or args.interval <= 0:
        raise SystemExit("--threads, --max-requests and --interval must be positive")
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or set(kinds) - set(KINDS):
        raise SystemExit(f"--kinds: a comma-separated subset of {','.join(KINDS)}")
    return Plan(
        duration,
        warmup,
        args.threads,
        args.max_requests,
        args.interval,
        args.seed,
        kinds,
        not args.no_refusals,
        tuple(args.teacher_arg),
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the bench; the result (also written to `--json`). `result["unexpected_failures"]` > 0
    means a request that should have succeeded (or been refused) did not."""
    args = parse_args(argv)
    plan = plan_for(args)
    started = time.perf_counter()
    repository = ensure_repository(args.repository.resolve())
    machine = machine_summary()
    print(f"machine: {machine}")
    print(f"plan: {plan}")
    with teacher_process(repository, plan.teacher_args) as teacher:
        pid = teacher.process.pid
        print(f"teacher pid {pid}: gRPC {teacher.grpc_address}, HTTP {teacher.http_url}")
        forward = teacher_forward(pid)
        print(f"teacher forward on merged batches: {forward}")
        tally, samples, after, load_s = drive(plan, teacher.grpc_address, teacher.http_url, pid)
    summary = summarize(samples, plan.warmup_s)
    report(plan, samples, summary, tally, load_s, forward)
    verdict = "within" if summary["within_target"] else "NOT within"
    print(
        f"\nmax RSS after warm-up / baseline = {summary['max_ratio']:.3f}, last / baseline = "
        f"{summary['last_ratio']:.3f}: {verdict} {TARGET_RATIO - 1:.0%} "
        f"(baseline {mib(summary['baseline_kib']):.1f} MiB)"
    )
    if after is not None:
        print(f"1 s after the load: RSS {mib(after.rss_kib):.1f} MiB")
    if forward == "whole batches" or forward.startswith("no probe"):
        print(
            f"note: the teacher ran merged batches whole ({forward}): each merged forward of up "
            "to 1,024 rows takes hundreds of MiB for a moment, so RSS swings; compare with "
            "--teacher-arg=--forward-chunk=64"
        )
    if tally.unexpected:
        print(f"\n{tally.unexpected} UNEXPECTED FAILURES; the first ones:")
        for line in tally.failures:
            print(f"  {line}")
    print(f"total {time.perf_counter() - started:.0f}s")
    result: dict[str, Any] = {
        "command": "python -m bench.memory " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "plan": dataclasses.asdict(plan),
        "load_s": round(load_s, 3),
        "teacher_forward": forward,
        **summary,
        "verdict": f"{verdict} {TARGET_RATIO - 1:.0%}",
        "series": [dataclasses.asdict(s) for s in series(samples, plan.duration_s)],
        "samples": [dataclasses.asdict(s) for s in samples],
        "after_load": None if after is None else dataclasses.asdict(after),
        "requests": tally.to_json(),
        "unexpected_failures": tally.unexpected,
        "mix_length": len(plan.mix()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    raise SystemExit(1 if main()["unexpected_failures"] else 0)
