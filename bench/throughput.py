"""Throughput benchmark of the teacher service ("Fast soft targets"), all cells side by side in one
run, on the default teacher (the MNIST multi-task CNN) and real MNIST test images.

    python -m bench.throughput [--quick] [--json out.json] [--repository PATH] [--duration S]
                               [--rounds N] [--device cpu] [--kserve] [--tritonclient-only]
                               [--triton-rounds N]

Tables (samples/s are samples per second of wall time; latencies are per request, in ms):

a. Transports at batch 1, 32 and 256: the in-process engine (`Engine.run`: input copy, forward,
   per-task softmax at T = 4, results as numpy; the physical limit), gRPC unary, a gRPC stream
   with 16 batches in flight (float32 and uint8 inputs), HTTP JSON and HTTP protobuf, each with
   its ratio to in-process at the same batch size.
b. Concurrency: 1, 8 and 32 client threads (each its own `TeacherClient`, gRPC unary, batch 8)
   against the default teacher (batcher on), a teacher with `--max-queue-delay-ms 0` (no wait:
   merges only what queued during the previous forward) and a teacher with
   `--max-queue-delay-ms 0 --max-batch-size 8` (batcher off: a request of 8 fills a forward, so
   every forward holds exactly one request), with the server's requests per forward (from
   `/metrics`) and both processes' CPU ms per request; plus one client of batch 256.
c. Bytes on the wire per sample for a batch of 256 (serialized `SoftTargetsResponse` size / 256)
   for dense float32 / float16 / bfloat16 and top-k, for the `digit` task alone and all tasks,
   and request bytes per sample for float32, float16 and uint8 inputs.
d. The issue's targets with the measured values, PASS/FAIL (informational: exit code 0).
e. With `--kserve`: the same teacher, and the issue's light teacher (MLP 64-512-512, 3 heads, on
   scikit-learn digits), behind KServe's Python ModelServer (separate venv and process), v2 REST
   JSON and v2 gRPC at batch 1 and 256, against our server.
f. With `--kserve` (or alone with `--tritonclient-only`): one request at a time with an unmodified
   `tritonclient` (v2 gRPC, v2 REST JSON, v2 REST binary; batch 1, 32, 256), run from the KServe
   venv (`bench/kserve_tritonclient.py`), against our server and KServe, both serving the light
   teacher at once with torch at one thread, cell by cell in turn (each batch size and protocol:
   ours then KServe, reversed every other round), `--triton-rounds` rounds; plus our own v1
   unary (TeacherClient) at the same batch sizes. A third server in the same run,
   `bench/replay_server.py`, answers each request with our teacher's captured answer and does no
   work: its cells are the floor (Python gRPC/HTTP, loopback and the client), and floor / KServe
   the highest ratio over KServe any Python server could show here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import torch

from bench.common import (
    DEFAULT_MODEL,
    DEFAULT_REPOSITORY,
    REPO_ROOT,
    Budget,
    Measurement,
    cycled_batches,
    ensure_repository,
    free_port,
    machine_summary,
    print_table,
    ratio,
    run_subprocess_json,
    teacher_process,
    time_calls,
    time_stream,
    write_json,
)
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from student_client.online.client import TeacherClient
from student_client.online.messages import request_to_pb
from student_client.teacher_process import TeacherProcess
from student_client.training.datasets import mnist_multitask
from student_client.types import TargetOptions
from teacher_server.repository.store import load_model
from teacher_server.serving.engine import Engine
from teacher_server.serving.schema import SoftTargetsRequest, ValidatedRequest

BATCH_SIZES = (1, 32, 256)
STREAM_DEPTH = 16
CLIENT_COUNTS = (1, 8, 32)
CONCURRENCY_BATCH = 8
BATCHER_OFF_ARGS = ("--max-queue-delay-ms", "0", "--max-batch-size", str(CONCURRENCY_BATCH))
NO_DELAY_ARGS = ("--max-queue-delay-ms", "0")
# Section b's teachers: (label, extra serve flags). "batcher on" is the default teacher (waits up
# to 2 ms to merge); "no wait" merges only what queued while the previous forward ran; "batcher
# off" holds exactly one request of 8 per forward (a request of 8 fills max_batch_size 8).
CONCURRENCY_TEACHERS = (
    ("batcher on", ()),
    ("batcher on, no wait", NO_DELAY_ARGS),
    ("batcher off", BATCHER_OFF_ARGS),
)
TEMPERATURE = 4.0
OPTIONS = TargetOptions(temperature=TEMPERATURE, output="probs")  # all tasks, dense float32
LIGHT_ARGS = ("--allowed-architectures", "bench.,teacher_server.models.")
TRANSPORTS = (
    "in-process",
    "grpc-unary",
    "grpc-stream",
    "grpc-stream-uint8",
    "http-json",
    "http-protobuf",
)


# --- a. transports ---------------------------------------------------------------------------


def load_engine(
    folder: Path,
    device: str = "cpu",
    allowed: tuple[str, ...] = ("teacher_server.models.",),
    forward_workers: int = 1,
) -> Engine:
    """The server's own engine for one model folder, in this process, on `device`."""
    return Engine(load_model(folder, torch.device(device), allowed), None, forward_workers)


class InProcess:
    """The in-process limit: the engine on the model loaded in this process, in the faster of
    two CPU configurations, both measured each time: torch's default (one forward over every
    core, chunks in turn) and the server's default (a chunk per core at once, 1 thread each).
    On a GPU only the first. The row's note says which won."""

    def __init__(
        self,
        folder: Path,
        device: str = "cpu",
        allowed: tuple[str, ...] = ("teacher_server.models.",),
    ) -> None:
        self.variants = {"intra-op": load_engine(folder, device, allowed)}
        workers = os.cpu_count() or 1
        if device == "cpu" and workers > 1:
            self.variants["workers"] = load_engine(folder, device, allowed, workers)

    @property
    def config(self) -> Any:
        return self.variants["intra-op"].config

    def measure(self, batches: Sequence[np.ndarray], budget: Budget) -> Measurement:
        best: Measurement | None = None
        for name, engine in self.variants.items():
            threads = torch.get_num_threads()
            if name == "workers":
                torch.set_num_threads(1)
            try:
                m = time_calls("in-process", in_process_call(engine), batches, budget)
            finally:
                torch.set_num_threads(threads)
            m.note = f"best: {name}" if len(self.variants) > 1 else ""
            if best is None or m.samples_per_s > best.samples_per_s:
                best = m
        assert best is not None
        return best


def in_process_call(engine: Engine) -> Callable[[np.ndarray], object]:
    """`Engine.run` on one request of every task at T = 4: what the batcher's worker does for a
    forward holding one request (input copy, forward, softmax per task, numpy results)."""
    tasks = engine.config.task_names
    name = engine.config.name

    def call(batch: np.ndarray) -> object:
        request = SoftTargetsRequest(model=name, inputs=batch, tasks=tasks, temperature=TEMPERATURE)
        return engine.run([ValidatedRequest(request, tasks, batch)])

    return call


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1] back to 0..255 bytes (exact for MNIST, which is k / 255)."""
    return np.rint(images * 255.0).astype(np.uint8)


def bench_transports(
    engine: InProcess,
    grpc_address: str,
    http_url: str,
    images: np.ndarray,
    batch_sizes: Sequence[int],
    budget: Budget,
) -> dict[str, dict[int, Measurement]]:
    """Table a: every transport at every batch size (interleaved per batch size, so slow drifts
    of a shared machine hit all transports alike)."""
    results: dict[str, dict[int, Measurement]] = {name: {} for name in TRANSPORTS}
    with contextlib.ExitStack() as stack:
        unary = stack.enter_context(TeacherClient(grpc_address))
        http_json = stack.enter_context(TeacherClient(http_url, transport="http-json"))
        http_pb = stack.enter_context(TeacherClient(http_url, transport="http"))
        cells: dict[str, Callable[[list[np.ndarray]], Measurement]] = {
            "in-process": lambda b: engine.measure(b, budget),
            "grpc-unary": lambda b: time_calls(
                "grpc-unary", lambda x: unary.soft_targets_with(x, OPTIONS), b, budget
            ),
            "grpc-stream": lambda b: time_stream(
                "grpc-stream", unary, b, OPTIONS, STREAM_DEPTH, budget
            ),
            "grpc-stream-uint8": lambda b: time_stream(
                "grpc-stream-uint8", unary, b, OPTIONS, STREAM_DEPTH, budget
            ),
            "http-json": lambda b: time_calls(
                "http-json", lambda x: http_json.soft_targets_with(x, OPTIONS), b, budget
            ),
            "http-protobuf": lambda b: time_calls(
                "http-protobuf", lambda x: http_pb.soft_targets_with(x, OPTIONS), b, budget
            ),
        }
        for size in batch_sizes:
            batches = cycled_batches(images, size, 8)
            for name, measure in cells.items():
                data = [to_uint8(b) for b in batches] if name.endswith("uint8") else batches
                results[name][size] = measure(data)
                print(f"  a. {name:<18} batch {size:>3}: {results[name][size].samples_per_s:,.0f}")
    return results


def print_transports(results: dict[str, dict[int, Measurement]]) -> None:
    sizes = sorted(results["in-process"])
    rows = []
    for name, cells in results.items():
        for size in sizes:
            m = cells[size]
            reference = results["in-process"][size].samples_per_s
            rows.append(
                [
                    name,
                    size,
                    m.samples_per_s,
                    m.p50_ms,
                    m.p99_ms,
                    ratio(m.samples_per_s, reference),
                    m.requests,
                    m.note,
                ]
            )
    print_table(
        "a. Transports (default teacher, all 3 tasks, probs at T=4, float32 inputs unless noted)",
        ["transport", "batch", "samples/s", "p50 ms", "p99 ms", "x in-proc", "requests", "note"],
        rows,
    )


def best_of_rounds(
    rounds: Sequence[dict[str, dict[int, Measurement]]],
) -> dict[str, dict[int, Measurement]]:
    """Per cell, the round with the highest samples/s (on a shared machine, the round least
    disturbed by other work; with one round, that round)."""
    best = {name: dict(cells) for name, cells in rounds[0].items()}
    for other in rounds[1:]:
        for name, cells in other.items():
            for size, m in cells.items():
                if m.samples_per_s > best[name][size].samples_per_s:
                    best[name][size] = m
    return best


# --- b. concurrency ----------------------------------------------------------------------------


def batch_requests_snapshot(http_url: str) -> tuple[float, float] | None:
    """(sum, count) of the `teacher_batch_requests` histogram on `GET /metrics` (summed over its
    label sets), or None when there is no such endpoint or histogram."""
    try:
        response = httpx.get(f"{http_url}/metrics", timeout=5.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    total = {"_sum": 0.0, "_count": 0.0}
    found = False
    for line in response.text.splitlines():
        if not line.startswith("teacher_batch_requests_"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        suffix = name.removeprefix("teacher_batch_requests")
        if suffix in total:
            total[suffix] += float(line.rsplit(" ", 1)[1])
            found = True
    return (total["_sum"], total["_count"]) if found else None


def requests_per_forward(http_url: str, since: tuple[float, float] | None = None) -> float | None:
    """*** Server-side number: mean requests merged per forward. ***

    Parses the Prometheus text of `GET {http_url}/metrics` for a histogram named
    `teacher_batch_requests` (one observation per forward: the number of requests in it) and
    returns sum / count, over the window since the snapshot `since` when one is given. Returns
    None when the endpoint or the histogram is missing (the tables then print "n/a")."""
    now = batch_requests_snapshot(http_url)
    if now is None:
        return None
    total, count = now
    if since is not None:
        total, count = total - since[0], count - since[1]
    return total / count if count > 0 else None


def run_clients(
    grpc_address: str, clients: int, batches: Sequence[np.ndarray], budget: Budget
) -> Measurement:
    """`clients` threads, each with its own gRPC `TeacherClient`, sending unary requests back to
    back for `budget.duration_s` (each at most `budget.max_calls` calls); samples/s over the wall
    time from the common start to the last answer."""
    result = Measurement(f"{clients} clients", len(batches[0]))
    lock = threading.Lock()
    errors: list[BaseException] = []
    timing: dict[str, float] = {}

    def begin() -> None:  # runs once, when every thread has arrived, before any is released
        timing["start"] = time.perf_counter()
        timing["deadline"] = timing["start"] + budget.duration_s

    start_gate = threading.Barrier(clients + 1, action=begin)

    def worker(offset: int) -> None:
        latencies: list[float] = []
        try:
            with TeacherClient(grpc_address) as client:
                for i in range(2):  # connect and warm up before the common start
                    client.soft_targets_with(batches[(offset + i) % len(batches)], OPTIONS)
                start_gate.wait(timeout=120)
                for i in range(budget.max_calls):
                    sent = time.perf_counter()
                    client.soft_targets_with(batches[(offset + i) % len(batches)], OPTIONS)
                    done = time.perf_counter()
                    latencies.append(done - sent)
                    if done >= timing["deadline"]:
                        break
        except BaseException as error:  # reported by the main thread
            errors.append(error)
            with contextlib.suppress(threading.BrokenBarrierError):
                start_gate.abort()
        with lock:
            result.latencies_s.extend(latencies)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed: raised below
        start_gate.wait(timeout=180)
    for thread in threads:
        thread.join(timeout=budget.duration_s + 120)
    if errors or "start" not in timing:
        raise errors[0] if errors else RuntimeError("clients did not start together")
    result.seconds = time.perf_counter() - timing["start"]
    result.requests = len(result.latencies_s)
    result.samples = result.requests * len(batches[0])
    return result


@dataclass
class ConcurrencyRow:
    """One cell of table b; `server_cpu_ms` / `client_cpu_ms`: CPU time (user + system, all
    threads) the teacher process / this benchmark process spent per request during the cell."""

    teacher: str  # "batcher on" / "batcher on, no wait" / "batcher off"
    measurement: Measurement
    requests_per_forward: float | None
    server_cpu_ms: float = float("nan")
    client_cpu_ms: float = float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher,
            "requests_per_forward": self.requests_per_forward,
            "server_cpu_ms_per_request": round(self.server_cpu_ms, 4),
            "client_cpu_ms_per_request": round(self.client_cpu_ms, 4),
            **self.measurement.to_json(),
        }


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) used so far by process `pid` (Linux /proc);
    NaN where /proc is not readable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_concurrency(
    label: str, teacher: TeacherProcess, images: np.ndarray, budget: Budget
) -> list[ConcurrencyRow]:
    """Table b for one teacher: 1, 8 and 32 clients of batch 8, with the server's requests per
    forward and both processes' CPU time per request (the client's includes its warm-up calls)."""
    batches = cycled_batches(images, CONCURRENCY_BATCH, 64)
    pid = teacher.process.pid
    rows = []
    for clients in CLIENT_COUNTS:
        before = batch_requests_snapshot(teacher.http_url)
        server_cpu, client_cpu = process_cpu_s(pid), time.process_time()
        measurement = run_clients(teacher.grpc_address, clients, batches, budget)
        server_cpu, client_cpu = process_cpu_s(pid) - server_cpu, time.process_time() - client_cpu
        per_request = 1000.0 / max(measurement.requests, 1)
        rows.append(
            ConcurrencyRow(
                label,
                measurement,
                requests_per_forward(teacher.http_url, before),
                server_cpu * per_request,
                client_cpu * per_request,
            )
        )
        print(f"  b. {label}, {clients:>2} clients: {measurement.samples_per_s:,.0f} samples/s")
    return rows


def print_concurrency(rows: Sequence[ConcurrencyRow], reference: Measurement) -> None:
    table = [
        [
            row.teacher,
            row.measurement.label,
            row.measurement.batch_size,
            row.measurement.samples_per_s,
            row.measurement.p50_ms,
            row.measurement.p99_ms,
            "n/a" if row.requests_per_forward is None else f"{row.requests_per_forward:.2f}",
            row.server_cpu_ms,
            row.client_cpu_ms,
            ratio(row.measurement.samples_per_s, reference.samples_per_s),
        ]
        for row in rows
    ]
    table.append(
        [
            "batcher on",
            "1 client (table a)",
            reference.batch_size,
            reference.samples_per_s,
            reference.p50_ms,
            reference.p99_ms,
            "n/a",
            float("nan"),
            float("nan"),
            1.0,
        ]
    )
    print_table(
        f"b. Concurrency: gRPC unary, batch {CONCURRENCY_BATCH} per client (threads); batcher "
        f"off = --max-queue-delay-ms 0 --max-batch-size {CONCURRENCY_BATCH}",
        [
            "teacher",
            "clients",
            "batch",
            "samples/s",
            "p50 ms",
            "p99 ms",
            "req/forward",
            "server CPU ms/req",
            "client CPU ms/req",
            "x 1x256",
        ],
        table,
    )


# --- c. bytes on the wire ----------------------------------------------------------------------


@dataclass(frozen=True)
class WireVariant:
    name: str
    output_dtype: str = "float32"
    top_k: int = 0


WIRE_VARIANTS = (
    WireVariant("dense float32"),
    WireVariant("dense float16", "float16"),
    WireVariant("dense bfloat16", "bfloat16"),
    WireVariant("top-1 float32", top_k=1),
    WireVariant("top-3 float32", top_k=3),
    WireVariant("top-5 float32", top_k=5),
    WireVariant("top-5 float16", "float16", 5),
)


def response_bytes(
    stub: pb_grpc.TeacherServiceStub,
    batch: np.ndarray,
    tasks: tuple[str, ...],
    variant: WireVariant,
) -> dict[str, float] | str:
    """Bytes per sample of the serialized response and of its tensor payloads; or the server's
    error message when the variant is refused (e.g. top_k above a task's class count)."""
    options = TargetOptions(
        tasks=tasks,
        temperature=TEMPERATURE,
        top_k=variant.top_k,
        output_dtype=variant.output_dtype,
    )
    request = request_to_pb(batch, options, DEFAULT_MODEL, "wire-bytes")
    try:
        response = stub.GetSoftTargets(request, timeout=60)
    except grpc.RpcError as error:
        return f"refused: {error.details()}"  # type: ignore[attr-defined]
    payload = sum(
        len(o.values.data) + len(o.indices.data) + len(o.tail_mass.data) for o in response.outputs
    )
    n = len(batch)
    return {"bytes_per_sample": len(response.SerializeToString()) / n, "payload": payload / n}


def bench_wire_bytes(grpc_address: str, images: np.ndarray) -> dict[str, Any]:
    """Table c: response bytes per sample per variant and task set; request bytes per sample
    per input dtype (batch of 256)."""
    batch = cycled_batches(images, 256, 1)[0]
    results: dict[str, Any] = {"responses": {}, "requests": {}}
    with grpc.insecure_channel(
        grpc_address, options=[("grpc.max_receive_message_length", 256 << 20)]
    ) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        for task_set, tasks in (("digit", ("digit",)), ("all tasks", ())):
            results["responses"][task_set] = {
                v.name: response_bytes(stub, batch, tasks, v) for v in WIRE_VARIANTS
            }
    for dtype, array in (
        ("float32", batch),
        ("float16", batch.astype(np.float16)),
        ("uint8", to_uint8(batch)),
    ):
        message = request_to_pb(array, OPTIONS, DEFAULT_MODEL, "wire-bytes")
        results["requests"][dtype] = len(message.SerializeToString()) / len(batch)
    return results


def print_wire_bytes(results: dict[str, Any]) -> None:
    rows: list[list[object]] = []
    for variant in WIRE_VARIANTS:
        row: list[object] = [variant.name]
        for task_set in ("digit", "all tasks"):
            cell = results["responses"][task_set][variant.name]
            if isinstance(cell, str):
                row += ["n/a", "n/a"]
            else:
                row += [cell["bytes_per_sample"], cell["payload"]]
        rows.append(row)
    print_table(
        "c. Response bytes per sample (batch 256; 'total' = serialized SoftTargetsResponse / 256,"
        " 'tensors' = values + indices (int64) + tail_mass bytes; n/a: top_k above parity's 2"
        " classes is refused)",
        ["output", "digit total", "digit tensors", "all total", "all tensors"],
        rows,
    )
    print_table(
        "c. Request bytes per sample (batch 256, serialized SoftTargetsRequest / 256)",
        ["input dtype", "bytes/sample"],
        [[dtype, value] for dtype, value in results["requests"].items()],
    )


# --- e. KServe ---------------------------------------------------------------------------------


@contextlib.contextmanager
def kserve_process(
    python: Path,
    folders: Sequence[Path],
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
) -> Iterator[Any]:
    """bench/kserve_teacher.py serving `folders` on free loopback ports (this environment plus
    `env`); yields (http_url, grpc_address) once every model answers ready."""
    http_port, grpc_port = free_port(), free_port()
    command = [str(python), "-m", "bench.kserve_teacher"]
    for folder in folders:
        command += ["--model-dir", str(folder)]
    command += [
        "--http_port",
        str(http_port),
        "--grpc_port",
        str(grpc_port),
        "--enable_latency_logging",
        "false",
    ]
    from bench.common import REPO_ROOT

    log = tempfile.NamedTemporaryFile(prefix="bench-kserve-", suffix=".log", delete=False)
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=log, stderr=log, env={**os.environ, **(env or {})}
    )
    http_url = f"http://127.0.0.1:{http_port}"
    try:
        wait_kserve_ready(process, http_url, [f.name for f in folders], timeout, Path(log.name))
        yield http_url, f"127.0.0.1:{grpc_port}"
    finally:
        stop_process(process)
        log.close()
        Path(log.name).unlink(missing_ok=True)


def stop_process(process: subprocess.Popen[Any], grace_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace_s` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_kserve_ready(
    process: subprocess.Popen[bytes], http_url: str, models: list[str], timeout: float, log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"KServe exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if all(
                httpx.get(f"{http_url}/v2/models/{m}/ready", timeout=2).status_code == 200
                for m in models
            ):
                return
        time.sleep(0.2)
    raise RuntimeError(f"KServe not ready within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def replay_process(
    grpc_address: str, http_url: str, timeout: float = 60.0
) -> Iterator[tuple[str, str]]:
    """bench/replay_server.py in front of the teacher at (`grpc_address`, `http_url`); yields its
    own (http_url, grpc_address) once it listens."""
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as folder:
        port_file = Path(folder) / "ports.json"
        log_path = Path(folder) / "replay.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [
                    sys.executable, "-m", "bench.replay_server",
                    "--upstream-grpc", grpc_address,
                    "--upstream-http", http_url,
                    "--port-file", str(port_file),
                ],
                cwd=REPO_ROOT, stdout=log, stderr=log, env={**os.environ, **ONE_THREAD_ENV},
            )  # fmt: skip
            try:
                deadline = time.monotonic() + timeout
                while not port_file.exists():
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"replay server did not start:\n{log_path.read_text()}")
                    time.sleep(0.05)
                ports = json.loads(port_file.read_text())
                yield f"http://127.0.0.1:{ports['http_port']}", f"127.0.0.1:{ports['grpc_port']}"
            finally:
                stop_process(process)


def kserve_measurements(
    python: Path,
    http_url: str,
    grpc_address: str,
    model: str,
    samples: np.ndarray,
    budget: Budget,
) -> dict[str, dict[int, Measurement]]:
    """Run bench/kserve_client.py (in the KServe venv) and turn its output into Measurements."""
    with tempfile.TemporaryDirectory(prefix="bench-kserve-") as folder:
        inputs = Path(folder) / "inputs.npy"
        np.save(inputs, samples)
        raw = run_subprocess_json(
            [
                str(python),
                "-m",
                "bench.kserve_client",
                "--http-url",
                http_url,
                "--grpc-address",
                grpc_address,
                "--model",
                model,
                "--inputs",
                str(inputs),
                "--batch-sizes",
                "1,256",
                "--temperature",
                str(TEMPERATURE),
                "--duration",
                str(budget.duration_s),
                "--warmup",
                str(budget.warmup_s),
                "--max-calls",
                str(budget.max_calls),
                "--in-flight",
                str(STREAM_DEPTH),
            ],
            timeout=300 + 20 * budget.duration_s,
        )
    names = {
        "rest_json": "kserve v2 REST JSON",
        "grpc": "kserve v2 gRPC",
        "grpc_in_flight": "kserve v2 gRPC",
    }
    results: dict[str, dict[int, Measurement]] = {}
    for cell, by_size in raw.items():
        results[cell] = {}
        for size, data in by_size.items():
            m = Measurement(names[cell], int(size), seconds=float(data["seconds"]))
            m.latencies_s = [float(x) for x in data["latencies_s"]]
            m.requests = len(m.latencies_s)
            m.samples = int(data["samples"])
            m.note = f"{STREAM_DEPTH} in flight" if cell == "grpc_in_flight" else "1 in flight"
            results[cell][int(size)] = m
    return results


def bench_ours_light(
    light_folder: Path, grpc_address: str, http_url: str, samples: np.ndarray, budget: Budget
) -> dict[str, dict[int, Measurement]]:
    """Our server with the light teacher: in-process, gRPC unary, gRPC stream, HTTP JSON."""
    engine = InProcess(light_folder, "cpu", ("bench.",))
    results: dict[str, dict[int, Measurement]] = {}
    with (
        TeacherClient(grpc_address) as client,
        TeacherClient(http_url, transport="http-json") as http_json,
    ):
        cells: dict[str, Callable[[list[np.ndarray]], Measurement]] = {
            "in-process": lambda b: engine.measure(b, budget),
            "grpc-unary": lambda b: time_calls(
                "grpc-unary", lambda x: client.soft_targets_with(x, OPTIONS), b, budget
            ),
            "grpc-stream": lambda b: time_stream(
                "grpc-stream", client, b, OPTIONS, STREAM_DEPTH, budget
            ),
            "http-json": lambda b: time_calls(
                "http-json", lambda x: http_json.soft_targets_with(x, OPTIONS), b, budget
            ),
        }
        for size in (1, 256):
            batches = cycled_batches(samples, size, 8)
            for name, measure in cells.items():
                results.setdefault(name, {})[size] = measure(batches)
                print(f"  e. ours light {name:<12} batch {size:>3}: ", end="")
                print(f"{results[name][size].samples_per_s:,.0f}")
    return results


def comparison_rows(
    ours: dict[str, dict[int, Measurement]], theirs: dict[str, dict[int, Measurement]]
) -> list[list[object]]:
    rows: list[list[object]] = []
    for server, cells in (("ours", ours), ("kserve", theirs)):
        for name, by_size in cells.items():
            row: list[object] = [server, by_size[1].label if server == "kserve" else name]
            row.append(by_size[1].note or "1 in flight")
            for size in (1, 256):
                row += [by_size[size].samples_per_s, by_size[size].p50_ms]
            rows.append(row)
    return rows


def print_comparison(
    title: str, ours: dict[str, dict[int, Measurement]], theirs: dict[str, dict[int, Measurement]]
) -> None:
    print_table(
        title,
        ["server", "transport", "in flight", "b1 samples/s", "b1 p50 ms", "b256 samples/s",
         "b256 p50 ms"],
        comparison_rows(ours, theirs),
    )  # fmt: skip


def best_grpc(cells: dict[str, dict[int, Measurement]], size: int) -> float:
    """The best gRPC samples/s at `size` among the cells whose name mentions grpc."""
    return max(
        (by_size[size].samples_per_s for name, by_size in cells.items() if "grpc" in name),
        default=float("nan"),
    )


Cells = dict[str, dict[int, Measurement]]  # transport -> batch size -> measurement


def dump_cells(cells: Cells) -> dict[str, Any]:
    return {k: {str(s): m.to_json() for s, m in v.items()} for k, v in cells.items()}


@dataclass
class KServeComparison:
    """Section e: our server and KServe on the default teacher (CNN) and the light teacher."""

    version: str | None
    cnn_ours: Cells
    cnn_kserve: Cells
    light_ours: Cells
    light_kserve: Cells

    @property
    def light_ratio_b256(self) -> float:
        return ratio(best_grpc(self.light_ours, 256), best_grpc(self.light_kserve, 256))

    @property
    def light_ratio_b1(self) -> float:
        return ratio(best_grpc(self.light_ours, 1), best_grpc(self.light_kserve, 1))

    def print(self) -> None:
        print_comparison(
            f"e. Default teacher (CNN): ours vs KServe {self.version}",
            self.cnn_ours,
            self.cnn_kserve,
        )
        print_comparison(
            f"e. Light teacher (MLP 64-512-512): ours vs KServe {self.version}",
            self.light_ours,
            self.light_kserve,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kserve_version": self.version,
            "default_teacher": {
                "ours": dump_cells(self.cnn_ours),
                "kserve": dump_cells(self.cnn_kserve),
            },
            "light_teacher": {
                "ours": dump_cells(self.light_ours),
                "kserve": dump_cells(self.light_kserve),
            },
            "light_ratio_b256": self.light_ratio_b256,
            "light_ratio_b1": self.light_ratio_b1,
        }


def bench_kserve(repository: Path, ours_cnn: Cells, budget: Budget) -> KServeComparison:
    """Section e: measure the light teacher on our server, then both teachers on KServe (the CNN
    on our server comes from table a of the same run)."""
    from bench.kserve_env import ensure_kserve_venv, kserve_version
    from bench.light_teacher import LIGHT_MODEL_NAME, build_light_repository, digits_data

    python = ensure_kserve_venv()
    version = kserve_version()
    print(f"\ne. KServe {version} ({python})")
    mnist = mnist_multitask().test_x
    light_samples = digits_data()[2]
    with tempfile.TemporaryDirectory(prefix="bench-light-") as folder:
        light_root = build_light_repository(Path(folder))
        light_folder = light_root / LIGHT_MODEL_NAME
        with teacher_process(light_root, (*LIGHT_ARGS, "--device", "cpu")) as teacher:
            ours_light = bench_ours_light(
                light_folder, teacher.grpc_address, teacher.http_url, light_samples, budget
            )
        with kserve_process(python, [repository / DEFAULT_MODEL, light_folder]) as (http, grpc_):
            kserve_cnn = kserve_measurements(python, http, grpc_, DEFAULT_MODEL, mnist, budget)
            print("  e. KServe default teacher measured")
            kserve_light = kserve_measurements(
                python, http, grpc_, LIGHT_MODEL_NAME, light_samples, budget
            )
            print("  e. KServe light teacher measured")
    names = ("in-process", "grpc-unary", "grpc-stream", "http-json", "http-protobuf")
    cnn_ours = {name: {size: ours_cnn[name][size] for size in (1, 256)} for name in names}
    return KServeComparison(version, cnn_ours, kserve_cnn, ours_light, kserve_light)


# --- f. one request at a time with tritonclient, ours vs KServe -------------------------------

TRITON_CELLS = {
    "v2_grpc": "v2 gRPC",
    "v2_rest_json": "v2 REST JSON",
    "v2_rest_binary": "v2 REST binary",
}
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tritonclient_measurements(
    python: Path,
    servers: dict[str, tuple[str, str]],
    samples: np.ndarray,
    budget: Budget,
    rounds: int,
) -> list[dict[str, Cells]]:
    """bench/kserve_tritonclient.py (in the KServe venv) against every server in `servers`
    (name -> (http_url, grpc_address)), cell by cell in turn, `rounds` times; per round
    {server: cells}."""
    from bench.light_teacher import LIGHT_MODEL_NAME

    command = [str(python), "-m", "bench.kserve_tritonclient"]
    for name, (http_url, grpc_address) in servers.items():
        command += ["--server", f"{name}={http_url.removeprefix('http://')},{grpc_address}"]
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as folder:
        inputs = Path(folder) / "inputs.npy"
        np.save(inputs, samples)
        completed = subprocess.run(
            [
                *command,
                "--model",
                LIGHT_MODEL_NAME,
                "--inputs",
                str(inputs),
                "--batch-sizes",
                ",".join(str(size) for size in BATCH_SIZES),
                "--rounds",
                str(rounds),
                "--duration",
                str(budget.duration_s),
                "--warmup",
                str(budget.warmup_s),
                "--max-calls",
                str(budget.max_calls),
            ],
            capture_output=True,
            text=True,
            timeout=300 + 80 * rounds * budget.duration_s,
            cwd=REPO_ROOT,
        )
    if completed.returncode != 0:
        raise RuntimeError(f"kserve_tritonclient exited {completed.returncode}:\n"
                           f"{completed.stderr[-3000:]}")  # fmt: skip
    raw = json.loads([line for line in completed.stdout.splitlines() if line.strip()][-1])
    results: list[dict[str, Cells]] = []
    for by_server in raw:
        round_cells: dict[str, Cells] = {}
        for server, cells in by_server.items():
            for cell, by_size in cells.items():
                for size, data in by_size.items():
                    m = Measurement(TRITON_CELLS[cell], int(size), seconds=float(data["seconds"]))
                    m.latencies_s = [float(x) for x in data["latencies_s"]]
                    m.requests = len(m.latencies_s)
                    m.samples = int(data["samples"])
                    m.note = "1 in flight"
                    round_cells.setdefault(server, {}).setdefault(cell, {})[int(size)] = m
        results.append(round_cells)
    return results


@dataclass
class TritonComparison:
    """Section f: per round, our server's, KServe's and the replay floor's cells measured by the
    same tritonclient script, cell by cell in turn, all three up (light teacher, torch at one
    thread in both model servers); plus our own v1 unary (TeacherClient) at every batch size,
    against our server and against the replay floor."""

    version: str | None
    rounds: list[dict[str, Cells]]  # [{"ours": cells, "kserve": cells, "floor": cells}, ...]
    v1_unary: list[Cells]  # per round {"v1 unary": {size: m}, "v1 unary floor": {size: m}}

    def ratios(self, cell: str, size: int, server: str = "ours") -> list[float]:
        """`server`'s samples/s over KServe's in each round ("floor": the highest ratio a server
        doing no work reached)."""
        return [
            ratio(r[server][cell][size].samples_per_s, r["kserve"][cell][size].samples_per_s)
            for r in self.rounds
        ]

    def v1_unary_p50_ms(self, size: int = 1, row: str = "v1 unary") -> float:
        """The best (lowest) round's median latency of our v1 unary at `size` (`row` "v1 unary
        floor": the same client against the replay floor)."""
        return min(r[row][size].p50_ms for r in self.v1_unary)

    def print(self) -> None:
        rows: list[list[object]] = []
        for cell, label in TRITON_CELLS.items():
            for size in BATCH_SIZES:
                for index, r in enumerate(self.rounds):
                    ours, theirs, floor = (r[s][cell][size] for s in ("ours", "kserve", "floor"))
                    rows.append(
                        [label, size, index + 1, ours.samples_per_s, ours.p50_ms,
                         theirs.samples_per_s, theirs.p50_ms, floor.samples_per_s, floor.p50_ms,
                         ratio(ours.samples_per_s, theirs.samples_per_s),
                         ratio(floor.samples_per_s, theirs.samples_per_s)]
                    )  # fmt: skip
        nan = float("nan")
        for index, unary in enumerate(self.v1_unary):
            for size in BATCH_SIZES:
                m, floor = unary["v1 unary"][size], unary["v1 unary floor"][size]
                rows.append(["v1 unary (ours only)", size, index + 1, m.samples_per_s, m.p50_ms,
                             nan, nan, floor.samples_per_s, floor.p50_ms, nan, nan])  # fmt: skip
        print_table(
            f"f. One request at a time, unmodified tritonclient, light teacher: ours vs KServe "
            f"{self.version} (both up, torch 1 thread each); floor: bench/replay_server.py "
            "(no work: our answers replayed)",
            ["client / protocol", "batch", "round", "ours samples/s", "ours p50 ms",
             "kserve samples/s", "kserve p50 ms", "floor samples/s", "floor p50 ms",
             "ours / kserve", "floor / kserve"],
            rows,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "kserve_version": self.version,
            "rounds": [
                {server: dump_cells(cells) for server, cells in r.items()} for r in self.rounds
            ],
            "v1_unary": [dump_cells(r) for r in self.v1_unary],
            "ratios": {
                cell: {str(size): self.ratios(cell, size) for size in BATCH_SIZES}
                for cell in TRITON_CELLS
            },
            "floor_ratios": {
                cell: {str(size): self.ratios(cell, size, "floor") for size in BATCH_SIZES}
                for cell in TRITON_CELLS
            },
        }


def bench_tritonclient(budget: Budget, rounds: int = 2) -> TritonComparison:
    """Section f: both servers serve the light teacher at once, the replay floor in front of
    ours; one tritonclient process measures the three cell by cell in turn (`rounds` rounds, the
    order reversed every other round), then our v1 unary, against ours and the floor, `rounds`
    times."""
    from bench.kserve_env import ensure_kserve_venv, kserve_version
    from bench.light_teacher import LIGHT_MODEL_NAME, build_light_repository, digits_data

    python = ensure_kserve_venv()
    version = kserve_version()
    print(f"\nf. tritonclient one at a time, ours vs KServe {version} ({python})")
    samples = digits_data()[2]
    options = TargetOptions(LIGHT_MODEL_NAME, temperature=TEMPERATURE, output="probs")
    unary: list[Cells] = []
    with tempfile.TemporaryDirectory(prefix="bench-light-") as folder:
        light_root = build_light_repository(Path(folder))
        ours_args = (*LIGHT_ARGS, "--device", "cpu", "--torch-threads", "1")
        with (
            teacher_process(light_root, ours_args, ONE_THREAD_ENV) as teacher,
            kserve_process(python, [light_root / LIGHT_MODEL_NAME], env=ONE_THREAD_ENV) as (
                kserve_http,
                kserve_grpc,
            ),
            TeacherClient(teacher.grpc_address) as client,
            replay_process(teacher.grpc_address, teacher.http_url) as (floor_http, floor_grpc),
            TeacherClient(floor_grpc) as floor_client,
        ):
            servers = {
                "ours": (teacher.http_url, teacher.grpc_address),
                "kserve": (kserve_http, kserve_grpc),
                "floor": (floor_http, floor_grpc),
            }
            results = tritonclient_measurements(python, servers, samples, budget, rounds)
            print(f"  f. {rounds} rounds of tritonclient measured: ours, KServe, floor in turn")
            for _ in range(rounds):
                unary.append(
                    {
                        row: {
                            size: time_calls(
                                row,
                                lambda x, c=each: c.soft_targets_with(x, options),
                                cycled_batches(samples, size, 8),
                                budget,
                            )
                            for size in BATCH_SIZES
                        }
                        for row, each in (("v1 unary", client), ("v1 unary floor", floor_client))
                    }
                )
    return TritonComparison(version, results, unary)


# --- d. targets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    measured: float
    target: float

    @property
    def passed(self) -> bool:
        return self.measured >= self.target

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measured": round(self.measured, 4),
            "target": self.target,
            "pass": self.passed,
        }


def triton_targets(comparison: TritonComparison) -> list[Target]:
    """The issue's one-at-a-time targets; each ratio is the worse of the rounds."""
    result = []
    for cell in ("v2_grpc", "v2_rest_binary"):
        for size in BATCH_SIZES:
            needed = 1.2 if size >= 256 else 1.5
            bound = max(comparison.ratios(cell, size, "floor"))
            result.append(
                Target(
                    f"tritonclient {TRITON_CELLS[cell]} at batch {size}, ours / KServe (worse "
                    f"round; a server doing no work: {bound:.2f})",
                    min(comparison.ratios(cell, size)),
                    needed,
                )
            )
    p50 = comparison.v1_unary_p50_ms(1)
    floor = comparison.v1_unary_p50_ms(1, "v1 unary floor")
    # a target below: expressed as 0.6 ms / p50 >= 1
    result.append(
        Target(
            f"v1 unary at batch 1: 0.6 ms / p50 ({p50:.3f} ms; no work: {floor:.3f} ms)",
            0.6 / p50,
            1.0,
        )
    )
    return result


def targets(
    transports: dict[str, dict[int, Measurement]],
    concurrency: Sequence[ConcurrencyRow],
    kserve: KServeComparison | None,
) -> list[Target]:
    big = max(transports["in-process"])
    reference = transports["in-process"][big].samples_per_s
    at32 = {
        row.teacher: row.measurement.samples_per_s
        for row in concurrency
        if row.measurement.label == "32 clients"
    }
    on32, off32 = at32["batcher on"], at32["batcher off"]
    one_big = transports["grpc-unary"][big].samples_per_s
    result = [
        Target(
            f"gRPC stream at batch {big} / in-process",
            ratio(transports["grpc-stream"][big].samples_per_s, reference),
            0.85,
        ),
        Target(
            f"HTTP protobuf at batch {big} / in-process",
            ratio(transports["http-protobuf"][big].samples_per_s, reference),
            0.7,
        ),
        Target(f"32 clients x 8, batcher on / 1 client x {big}", ratio(on32, one_big), 0.7),
        Target("32 clients x 8, batcher on / batcher off", ratio(on32, off32), 3.0),
    ]
    if kserve is not None:
        result += [
            Target("light teacher, ours / KServe gRPC at batch 256", kserve.light_ratio_b256, 2.5),
            Target("light teacher, ours / KServe gRPC at batch 1", kserve.light_ratio_b1, 10.0),
        ]  # fmt: skip
    return result


def print_targets(items: Sequence[Target]) -> None:
    print_table(
        "d. Targets of the issue (informational; measured on this machine, this run)",
        ["target", "measured", "needed", "result"],
        [[t.name, t.measured, f">= {t.target:g}x", "PASS" if t.passed else "FAIL"] for t in items],
    )


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, help="write every number to this JSON file")
    parser.add_argument("--quick", action="store_true", help="short cells (the run takes ~1 min)")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--duration", type=float, help="timed seconds per cell (default 3)")
    parser.add_argument(
        "--kserve", action="store_true", help="also compare with KServe (e. and f.)"
    )
    parser.add_argument(
        "--tritonclient-only",
        action="store_true",
        help="run only f. (tritonclient one request at a time, ours vs KServe, light teacher)",
    )
    parser.add_argument(
        "--triton-rounds", type=int, default=2, help="rounds of f. (both servers, cell by cell)"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device of the teachers and the in-process engine (default cpu; --kserve "
        "compares on the CPU only)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat table a this many times (interleaved) and keep each cell's best round",
    )
    return parser.parse_args(argv)


def budget_for(args: argparse.Namespace) -> Budget:
    if args.quick:
        return Budget(duration_s=args.duration or 0.5, warmup_s=0.2)
    return Budget(duration_s=args.duration or 3.0, warmup_s=0.5)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.kserve and args.device != "cpu":
        raise SystemExit("--kserve compares CPU serving: use it with --device cpu")
    budget = budget_for(args)
    started = time.perf_counter()
    if args.tritonclient_only:
        run_tritonclient_only(args, budget, started)
        return
    repository = ensure_repository(args.repository.resolve())
    images = mnist_multitask().test_x  # 1,000 held-out real MNIST images, float32 in [0, 1]
    machine = machine_summary()
    print(f"machine: {machine}")
    print(f"budget per cell: {budget}")
    device_args = ("--device", args.device)
    engine = InProcess(repository / DEFAULT_MODEL, args.device)
    with teacher_process(repository, device_args) as teacher:
        print(f"teacher (batcher on): gRPC {teacher.grpc_address}, HTTP {teacher.http_url}")
        transports = best_of_rounds(
            [
                bench_transports(
                    engine, teacher.grpc_address, teacher.http_url, images, BATCH_SIZES, budget
                )
                for _ in range(args.rounds)
            ]
        )
        wire = bench_wire_bytes(teacher.grpc_address, images)
        concurrency = bench_concurrency("batcher on", teacher, images, budget)
    for label, extra in CONCURRENCY_TEACHERS[1:]:
        with teacher_process(repository, (*extra, *device_args)) as teacher:
            concurrency += bench_concurrency(label, teacher, images, budget)
    kserve = bench_kserve(repository, transports, budget) if args.kserve else None
    triton = bench_tritonclient(budget, args.triton_rounds) if args.kserve else None
    print_transports(transports)
    print_concurrency(concurrency, transports["grpc-unary"][max(BATCH_SIZES)])
    print_wire_bytes(wire)
    if kserve is not None:
        kserve.print()
    if triton is not None:
        triton.print()
    items = targets(transports, concurrency, kserve)
    items += triton_targets(triton) if triton is not None else []
    print_targets(items)
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f}s; machine load now {os.getloadavg()}")
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine,
                "budget": dataclasses.asdict(budget),
                "quick": args.quick,
                "rounds": args.rounds,
                "seconds": round(elapsed, 1),
                "transports": {
                    name: {str(size): m.to_json() for size, m in cells.items()}
                    for name, cells in transports.items()
                },
                "concurrency": [row.to_json() for row in concurrency],
                "wire_bytes": wire,
                "kserve": None if kserve is None else kserve.to_json(),
                "tritonclient": None if triton is None else triton.to_json(),
                "targets": [t.to_json() for t in items],
            },
        )


def run_tritonclient_only(args: argparse.Namespace, budget: Budget, started: float) -> None:
    """`--tritonclient-only`: section f and its targets."""
    if args.device != "cpu":
        raise SystemExit("--tritonclient-only compares CPU serving: use it with --device cpu")
    machine = machine_summary()
    print(f"machine: {machine}")
    print(f"budget per cell: {budget}")
    triton = bench_tritonclient(budget, args.triton_rounds)
    triton.print()
    items = triton_targets(triton)
    print_targets(items)
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f}s; machine load now {os.getloadavg()}")
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine,
                "budget": dataclasses.asdict(budget),
                "seconds": round(elapsed, 1),
                "load_after": [round(x, 2) for x in os.getloadavg()],
                "tritonclient": triton.to_json(),
                "targets": [t.to_json() for t in items],
            },
        )


if __name__ == "__main__":
    main()
