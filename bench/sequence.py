"""Sequence-teacher benchmark (issue 17): tokens/s served vs in-process, padding waste of the
length buckets, and bytes per token on the wire, side by side in one run, on the default sequence
teacher (`pydoc-causal-lm`, a causal transformer with a 4,096-id vocabulary) and real held-out
text (the Python docs the teacher never saw, tokenized with its own tokenizer).

    python -m bench.sequence [--quick] [--small] [--repository PATH] [--json PATH]
                             [--duration S] [--device cpu]

Sections:

1. Tokens/s at sequence lengths 64 and 256 and batch sizes 1, 8, 32 (a request holds N sequences
   of length L), `next_token` only, top-k 32 log-probs in float16: in-process (the server's own
   `SequenceEngine.run` on an already validated request, in this process: forward in length
   buckets, head, float64 log-softmax, top-k, tail mass, float16, one host copy; the limit the
   server could reach) against the served teacher over one gRPC `StreamSoftTargets` call with
   16 requests in flight (fewer for large requests: `stream_depth`) and over HTTP protobuf with
   4 concurrent clients, both asking for the PACKED encoding the student client uses (so the
   served side also pays for packing). Cells of >= 4,096 tokens per request are marked (*):
   the issue's target there is served >= 0.8x in-process.
2. Padding waste (padded tokens / real tokens - 1) on a length-skewed mix (log-normal lengths,
   capped at the longest length), merged as the batcher merges (in arrival order up to the
   server's default `max_batch_tokens` real tokens): the engine's own counters with the default
   budget, and the same merged batches counted the way `plan_forwards` cuts them with a huge
   budget (the waste cap alone) and as one padded forward per merged batch (no budget, no cap).
3. Bytes per token on the wire from real serialized responses (gRPC `ByteSize()`, HTTP protobuf
   body length, divided by real tokens) for dense float32 log-probs and our top-k at k = 8, 32,
   128 in each `top_k_encoding`: the Tensors (float16 values, UINT16 ids, float32 tail mass),
   PACKED (ids at ceil(log2 V) bits, float16 values and tail without their sign bit; lossless
   but for the tail's float16 rounding; what the student client asks for) and
   PACKED_LOG_PROB_CODES (8-bit codes, lossy: their largest log-prob error and the KL they add
   over the k + 1 buckets are measured against the float32 top-k of the same request); beside
   TRL's format at the same k computed from its definition (float32 value + int32 id per
   (token, k), base64 in JSON: x 4/3) and DistillKit's published ~300 B/token at k = 128 (a
   constant from their docs).

The default teacher reads at most 128 tokens; it uses rotary positions (no table sized by
`max_length`), so for L = 256 the bench serves a copy of its folder whose config allows 256
(`widened_from` in the JSON). The weights are the same; only the length check moves.
"""

from __future__ import annotations

# First, before torch loads: the package sets OMP_WAIT_POLICY=PASSIVE, as in the server process,
# so the in-process limit runs with the server's OpenMP settings.
import teacher_server  # noqa: F401

# isort: split

import argparse
import json
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import torch

from bench.common import (
    STREAM_ANSWER_TIMEOUT_S,
    machine_summary,
    print_table,
    ratio,
    teacher_process,
    write_json,
)
from protocol import codec, packed
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.repository.store import load_model
from teacher_server.serving.core import model_info
from teacher_server.serving.schema import ModelInfo, SoftTargetsRequest, ValidatedRequest
from teacher_server.serving.sequence_engine import (
    MAX_PADDING_WASTE,
    SequenceEngine,
    plan_forwards,
)
from teacher_server.serving.validation import validate
from teacher_server.settings import Settings

LM_TASK = "next_token"
TOP_K = 32
LENGTHS = (64, 256)
BATCH_SIZES = (1, 8, 32)
QUICK_LENGTHS = (32,)
QUICK_BATCH_SIZES = (1, 8)
MARKED_TOKENS = 4096  # cells at or above this many tokens per request carry the 0.8x target
STREAM_DEPTH = 16
HTTP_CLIENTS = 4
WIRE_K = (8, 32, 128)
WIRE_SHAPE = (4, 64)  # (sequences, length) of the requests whose responses are measured
TRL_BYTES_PER_ENTRY = 8  # float32 value + int32 id
BASE64 = 4 / 3
DISTILLKIT_BYTES_PER_TOKEN_K128 = 300.0  # published by DistillKit (their docs), not measured
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_BATCH_TOKENS = int(Settings.model_fields["max_batch_tokens"].default)
DEFAULT_MAX_BATCH_SIZE = int(Settings.model_fields["max_batch_size"].default)
HUGE_BUDGET = 1 << 40
CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True)
class Budget:
    """Per timed cell: `warmup_s` untimed, then `duration_s` timed (at least `min_calls`)."""

    duration_s: float = 3.0
    warmup_s: float = 0.5
    min_calls: int = 3
    max_calls: int = 100_000


@dataclass
class Cell:
    """One timed cell: `requests` answered, `tokens` real tokens in them, over `seconds`."""

    transport: str
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list, repr=False)
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50_ms(self) -> float:
        if not self.latencies_s:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_s), 50) * 1000.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "transport": self.transport,
            "requests": self.requests,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 6),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "p50_ms": round(self.p50_ms, 4),
            "note": self.note,
        }


# --- the teacher and its data -------------------------------------------------------------------


@dataclass(frozen=True)
class Teacher:
    """The served model folder (inside `repository`) and what the bench needs to know of it."""

    repository: Path
    folder: Path
    name: str
    vocab_size: int
    max_length: int
    widened_from: int | None


def find_sequence_model(repository: Path) -> Path:
    """The folder of the sequence model in `repository` (or `repository` itself if it is one)."""
    candidates = [repository, *sorted(p for p in repository.iterdir() if p.is_dir())]
    for folder in candidates:
        config = folder / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("input", {}).get("kind") == (
            "tokens"
        ):
            return folder
    raise SystemExit(f"--repository {repository}: no sequence model folder (input.kind tokens)")


def serve_copy(source: Path, root: Path, max_length: int) -> Teacher:
    """Copy the model folder `source` into the repository `root`, its config allowing
    `max_length` tokens if it allows fewer (rotary positions only: the weights do not depend on
    the length)."""
    config = json.loads((source / "config.json").read_text())
    kwargs = config["kwargs"]
    own = int(config["input"]["max_length"])
    widened_from = None
    if own < max_length:
        if kwargs.get("positions", "rotary") != "rotary":
            raise SystemExit(
                f"{source}: max_length {own} < {max_length} and positions are not rotary"
            )
        kwargs["max_length"] = config["input"]["max_length"] = max_length
        widened_from = own
    folder = root / source.name
    shutil.copytree(source, folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Teacher(
        root,
        folder,
        config["name"],
        int(config["input"]["vocab_size"]),
        int(config["input"]["max_length"]),
        widened_from,
    )


def held_out_stream(folder: Path) -> np.ndarray:
    """Every held-out document of the default teacher's split, tokenized with the model's own
    tokenizer, end to end with `<eos>` between them: (tokens,) int64."""
    from tokenizers import Tokenizer

    from teacher_server.repository.default_sequence_teacher import corpus_split

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = tokenizer.token_to_id("<eos>")
    if eos is None:
        raise SystemExit(f"{folder / 'tokenizer.json'}: no <eos> token")
    ids: list[int] = []
    for text in corpus_split()[1].values():
        ids += [*tokenizer.encode(text).ids, eos]
    return np.asarray(ids, dtype=np.int64)


def windows(stream: np.ndarray, lengths: Sequence[int], offset: int = 0) -> np.ndarray:
    """Padded ids (len(lengths), max(lengths)), row i the next lengths[i] ids of `stream` from
    `offset` on (wrapping around), pad id 0 past each length."""
    ids = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
    cursor = offset
    for row, length in enumerate(lengths):
        ids[row, :length] = np.take(stream, np.arange(cursor, cursor + length), mode="wrap")
        cursor += length
    return ids


def request_pb(
    model: str,
    ids: np.ndarray,
    lengths: np.ndarray,
    top_k: int,
    output_dtype: int,
    encoding: int = pb.PACKED,
) -> pb.SoftTargetsRequest:
    """The LM task's log-probabilities (top-k, or dense with `top_k` 0) at T = 1; top-k in
    `encoding` (the student client's default, PACKED, unless told)."""
    return pb.SoftTargetsRequest(
        top_k_encoding=encoding,  # type: ignore[arg-type]
        model=model,
        tasks=[LM_TASK],
        output=pb.LOG_PROBS,
        top_k=top_k,
        output_dtype=output_dtype,  # type: ignore[arg-type]
        inputs=codec.encode(ids),
        lengths=codec.encode(lengths.astype(np.int64)),
    )


# --- in-process ----------------------------------------------------------------------------------


class InProcess:
    """The server's `SequenceEngine` on the model loaded in this process (the server's default
    token budget), fed requests validated once outside the timing."""

    def __init__(self, teacher: Teacher, device: str) -> None:
        loaded = load_model(teacher.folder, torch.device(device), ("teacher_server.models.",))
        self.engine = SequenceEngine(loaded, DEFAULT_MAX_BATCH_TOKENS)
        self.info: ModelInfo = model_info(
            loaded, self.engine, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS
        )
        self.name = teacher.name

    def validated(
        self, ids: np.ndarray, lengths: np.ndarray, top_k: int = TOP_K
    ) -> ValidatedRequest:
        request = SoftTargetsRequest(
            model=self.name,
            inputs=ids,
            tasks=(LM_TASK,),
            output="log_probs",
            top_k=top_k,
            output_dtype="float16",
            lengths=lengths.astype(np.int64),
        )
        return validate(request, self.info)

    def measure(self, label: str, groups: Sequence[list[ValidatedRequest]], budget: Budget) -> Cell:
        """`SequenceEngine.run` on each group of requests in turn (one merged forward each, as
        the batcher's worker runs it), in the faster of torch's default threads (the server's
        setting) and one thread: on a loaded machine one thread can win."""

        def call(group: list[ValidatedRequest]) -> None:
            self.engine.run(group)

        threads = torch.get_num_threads()
        best: Cell | None = None
        for count in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(count)
            try:
                cell = time_loop(label, call, groups, budget)
            finally:
                torch.set_num_threads(threads)
            cell.note = (
                f"{len(groups[0])} request(s) per SequenceEngine.run; best of torch threads "
                f"{threads} and 1: {count}"
            )
            if best is None or cell.tokens_per_s > best.tokens_per_s:
                best = cell
        assert best is not None
        return best


def time_loop(
    label: str,
    call: Callable[[list[ValidatedRequest]], object],
    groups: Sequence[list[ValidatedRequest]],
    budget: Budget,
) -> Cell:
    """`call` back to back on the groups in turn: an untimed warm-up, then the timed loop
    (latencies per call)."""
    warm_end = time.perf_counter() + budget.warmup_s
    for i in range(budget.max_calls):
        call(groups[i % len(groups)])
        if time.perf_counter() >= warm_end:
            break
    cell = Cell(label)
    start = time.perf_counter()
    for i in range(budget.max_calls):
        group = groups[i % len(groups)]
        sent = time.perf_counter()
        call(group)
        done = time.perf_counter()
        cell.latencies_s.append(done - sent)
        cell.requests += len(group)
        cell.tokens += sum(item.tokens for item in group)
        if done - start >= budget.duration_s and cell.requests >= budget.min_calls:
            break
    cell.seconds = time.perf_counter() - start
    return cell


# --- served --------------------------------------------------------------------------------------


def token_rows(response: pb.SoftTargetsResponse) -> int:
    """Real tokens answered: the rows of the LM task's values."""
    output = next(o for o in response.outputs if o.task == LM_TASK)
    if output.HasField("packed"):
        return int(output.packed.values.shape[0])
    return int(output.values.shape[0])


def _stream_run(
    stub: pb_grpc.TeacherServiceStub,
    requests: Sequence[pb.SoftTargetsRequest],
    depth: int,
    seconds: float,
    min_calls: int,
) -> Cell:
    """Keep `depth` requests in flight on one `StreamSoftTargets` call for `seconds` (and at
    least `min_calls` answers), then drain; the time includes the drain."""
    outgoing: queue.Queue[pb.SoftTargetsRequest | None] = queue.Queue()

    def messages() -> Iterator[pb.SoftTargetsRequest]:
        while (message := outgoing.get()) is not None:
            yield message

    cell = Cell("grpc-stream", note=f"{depth} in flight, 1 stream")
    sent: dict[str, float] = {}
    index = 0

    def send_next() -> None:
        nonlocal index
        message = pb.SoftTargetsRequest()
        message.CopyFrom(requests[index % len(requests)])
        message.batch_id = f"b{index}"
        sent[message.batch_id] = time.perf_counter()
        outgoing.put(message)
        index += 1

    answers = stub.StreamSoftTargets(messages(), timeout=STREAM_ANSWER_TIMEOUT_S * 10)
    try:
        start = time.perf_counter()
        for _ in range(depth):
            send_next()
        for answer in answers:
            now = time.perf_counter()
            if answer.HasField("error"):
                raise RuntimeError(f"batch {answer.batch_id}: {answer.error}")
            cell.latencies_s.append(now - sent.pop(answer.batch_id))
            cell.requests += 1
            cell.tokens += token_rows(answer.soft_targets)
            if now - start < seconds or cell.requests + len(sent) < min_calls:
                send_next()
            elif not sent:
                break
        cell.seconds = time.perf_counter() - start
    finally:
        outgoing.put(None)
        answers.cancel()
    return cell


def stream_depth(tokens_per_request: int) -> int:
    """Requests in flight on the stream: 16, or as many as two forwards' token budget holds, at
    least as many as the HTTP clients. (16 requests of 8,192 tokens queue 131k tokens: on a
    loaded 2-core machine the last ones wait past the server's 60 s default deadline.)"""
    return min(STREAM_DEPTH, max(HTTP_CLIENTS, 2 * DEFAULT_MAX_BATCH_TOKENS // tokens_per_request))


def measure_stream(
    stub: pb_grpc.TeacherServiceStub,
    requests: Sequence[pb.SoftTargetsRequest],
    budget: Budget,
    depth: int = STREAM_DEPTH,
) -> Cell:
    _stream_run(stub, requests, depth, budget.warmup_s, 1)
    return _stream_run(stub, requests, depth, budget.duration_s, budget.min_calls)


def measure_http(
    url: str, bodies: Sequence[bytes], tokens: int, clients: int, budget: Budget
) -> Cell:
    """`clients` threads, each its own httpx client posting protobuf bodies back to back for
    `duration_s` (after `warmup_s` untimed); every answer is parsed and its token rows counted."""
    lock = threading.Lock()
    cell = Cell("http-protobuf", note=f"{clients} clients")
    errors: list[BaseException] = []

    def worker(seconds: float, record: bool, begin: threading.Barrier) -> None:
        headers = {"content-type": "application/x-protobuf"}
        try:
            with httpx.Client(timeout=STREAM_ANSWER_TIMEOUT_S) as client:
                begin.wait()
                start, i = time.perf_counter(), 0
                while True:
                    sent = time.perf_counter()
                    reply = client.post(url, content=bodies[i % len(bodies)], headers=headers)
                    done = time.perf_counter()
                    if reply.status_code != 200:
                        raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:300]}")
                    rows = token_rows(pb.SoftTargetsResponse.FromString(reply.content))
                    if rows != tokens:
                        raise RuntimeError(f"{rows} token rows, expected {tokens}")
                    i += 1
                    if record:
                        with lock:
                            cell.latencies_s.append(done - sent)
                            cell.requests += 1
                            cell.tokens += rows
                    if done - start >= seconds and i >= 1:
                        return
        except BaseException as error:  # re-raised in the caller's thread
            errors.append(error)

    for seconds, record in ((budget.warmup_s, False), (budget.duration_s, True)):
        begin = threading.Barrier(clients + 1)
        threads = [
            threading.Thread(target=worker, args=(seconds, record, begin)) for _ in range(clients)
        ]
        for thread in threads:
            thread.start()
        begin.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        if record:
            cell.seconds = time.perf_counter() - start
    return cell


# --- 1. tokens/s ---------------------------------------------------------------------------------


@dataclass
class ThroughputRow:
    length: int
    batch_size: int
    cells: dict[str, Cell]

    @property
    def tokens_per_request(self) -> int:
        return self.length * self.batch_size

    @property
    def marked(self) -> bool:
        return self.tokens_per_request >= MARKED_TOKENS

    @property
    def limit(self) -> float:
        """The best in-process tokens/s: merged forwards, or one request per forward."""
        return max(
            self.cells["in-process"].tokens_per_s, self.cells["in-process-single"].tokens_per_s
        )

    def ratio(self, transport: str) -> float:
        return ratio(self.cells[transport].tokens_per_s, self.limit)

    def to_json(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "batch_size": self.batch_size,
            "tokens_per_request": self.tokens_per_request,
            "merged_requests_in_process": merged_requests(self.tokens_per_request, self.batch_size),
            "marked": self.marked,
            "cells": {name: cell.to_json() for name, cell in self.cells.items()},
            "in_process_limit_tokens_per_s": round(self.limit, 2),
            "ratio_grpc_stream": round(self.ratio("grpc-stream"), 4),
            "ratio_http_protobuf": round(self.ratio("http-protobuf"), 4),
        }


def merged_requests(tokens_per_request: int, sequences_per_request: int) -> int:
    """How many requests of one cell the batcher can merge into one forward at best: those in
    flight on the stream, within the default token budget and batch size (at least one)."""
    return max(
        1,
        min(
            stream_depth(tokens_per_request),
            DEFAULT_MAX_BATCH_TOKENS // tokens_per_request,
            DEFAULT_MAX_BATCH_SIZE // sequences_per_request,
        ),
    )


def bench_throughput(
    local: InProcess,
    stub: pb_grpc.TeacherServiceStub,
    http_url: str,
    stream: np.ndarray,
    lengths: Sequence[int],
    batch_sizes: Sequence[int],
    budget: Budget,
) -> list[ThroughputRow]:
    rows = []
    url = f"{http_url}/v1/models/{local.name}/soft-targets"
    for length in lengths:
        for size in batch_sizes:
            # 4 different requests per cell, consecutive windows of held-out text
            ids = [windows(stream, [length] * size, i * length * size) for i in range(4)]
            full = np.full(size, length, dtype=np.int64)
            messages = [request_pb(local.name, x, full, TOP_K, pb.FLOAT16) for x in ids]
            validated = [local.validated(x, full) for x in ids]
            merge = merged_requests(length * size, size)
            merged = [[validated[(i * merge + j) % 4] for j in range(merge)] for i in range(4)]
            cells = {
                "in-process": local.measure("in-process", merged, budget),
                "in-process-single": local.measure(
                    "in-process-single", [[item] for item in validated], budget
                ),
                "grpc-stream": measure_stream(stub, messages, budget, stream_depth(length * size)),
                "http-protobuf": measure_http(
                    url,
                    [m.SerializeToString() for m in messages],
                    length * size,
                    HTTP_CLIENTS,
                    budget,
                ),
            }
            row = ThroughputRow(length, size, cells)
            rows.append(row)
            print(
                f"  1. L {length:>3} x N {size:>2}: "
                + ", ".join(f"{n} {c.tokens_per_s:,.0f}" for n, c in cells.items())
                + " tokens/s",
                flush=True,
            )
    return rows


def print_throughput(rows: Sequence[ThroughputRow]) -> None:
    print_table(
        f"1. Tokens/s, top-{TOP_K} log-probs float16 of {LM_TASK} (* : >= {MARKED_TOKENS:,} "
        "tokens per request, target served >= 0.8x in-process); ratio: served / the better "
        "in-process column; merged: requests per in-process forward",
        ["L", "N", "tokens/req", "merged", "in-proc merged", "in-proc 1/fwd", "gRPC stream", "ratio",
         "HTTP protobuf", "ratio", "stream p50 ms", "http p50 ms"],
        [
            [
                r.length,
                r.batch_size,
                f"{r.tokens_per_request:,}{' *' if r.marked else ''}",
                merged_requests(r.tokens_per_request, r.batch_size),
                r.cells["in-process"].tokens_per_s,
                r.cells["in-process-single"].tokens_per_s,
                r.cells["grpc-stream"].tokens_per_s,
                r.ratio("grpc-stream"),
                r.cells["http-protobuf"].tokens_per_s,
                r.ratio("http-protobuf"),
                r.cells["grpc-stream"].p50_ms,
                r.cells["http-protobuf"].p50_ms,
            ]
            for r in rows
        ],
    )  # fmt: skip


# --- 2. padding waste ----------------------------------------------------------------------------


def skewed_lengths(count: int, max_length: int, seed: int = 17) -> np.ndarray:
    """`count` log-normal lengths (median max_length / 6, sigma 1), clipped to [1, max_length]."""
    generator = np.random.default_rng(seed)
    raw = generator.lognormal(math.log(max_length / 6), 1.0, count)
    return np.clip(np.rint(raw), 1, max_length).astype(np.int64)


def merge_like_batcher(tokens: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Request indices grouped in arrival order as the batcher merges a full queue: a group takes
    requests while its real tokens stay within `max_batch_tokens` (a larger one runs alone)."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, count in enumerate(tokens):
        if current and total + count > max_batch_tokens:
            groups.append(current)
            current, total = [], 0
        current.append(index)
        total += count
    if current:
        groups.append(current)
    return groups


def counted_padding(
    merged: Sequence[np.ndarray], max_batch_tokens: int, max_waste: float
) -> tuple[int, int, int]:
    """(real, padded, forwards) of the merged batches' lengths cut the way the engine cuts them
    (`plan_forwards` on the lengths sorted longest first); `max_waste` inf: no cap."""
    real = padded = forwards = 0
    for lengths in merged:
        ordered = np.sort(lengths)[::-1]
        for start, end in plan_forwards(ordered, max_batch_tokens, max_waste):
            padded += (end - start) * int(ordered[start])
            forwards += 1
        real += int(lengths.sum())
    return real, padded, forwards


def bench_padding(
    local: InProcess, stream: np.ndarray, max_length: int, requests: int, per_request: int
) -> dict[str, Any]:
    """The mix through the engine (its counters), then the same merged batches counted with a
    huge budget and with one padded forward each."""
    lengths = skewed_lengths(requests * per_request, max_length).reshape(requests, per_request)
    validated = [
        local.validated(windows(stream, row.tolist(), i * max_length), row, TOP_K)
        for i, row in enumerate(lengths)
    ]
    groups = merge_like_batcher([int(row.sum()) for row in lengths], DEFAULT_MAX_BATCH_TOKENS)
    engine = local.engine
    before = (engine.real_tokens, engine.padded_tokens, engine.forwards)
    for group in groups:
        engine.run([validated[i] for i in group])
    real = engine.real_tokens - before[0]
    padded = engine.padded_tokens - before[1]
    forwards = engine.forwards - before[2]
    merged = [np.concatenate([lengths[i] for i in group]) for group in groups]
    counted = counted_padding(merged, DEFAULT_MAX_BATCH_TOKENS, MAX_PADDING_WASTE)
    if counted != (real, padded, forwards):  # the counting below must be the engine's own
        raise RuntimeError(f"plan_forwards count {counted} != engine counters {real, padded}")
    rows = [
        ("budget on (engine counters)", DEFAULT_MAX_BATCH_TOKENS, (real, padded, forwards)),
        (
            "budget huge, waste cap only",
            HUGE_BUDGET,
            counted_padding(merged, HUGE_BUDGET, MAX_PADDING_WASTE),
        ),
        (
            "budget off: one padded forward per merged batch",
            None,
            counted_padding(merged, HUGE_BUDGET, math.inf),
        ),
    ]
    flat = lengths.reshape(-1)
    return {
        "mix": {
            "distribution": f"log-normal, median {max_length / 6:.0f}, sigma 1, clipped to "
            f"[1, {max_length}]",
            "requests": requests,
            "sequences_per_request": per_request,
            "mean_length": round(float(flat.mean()), 2),
            "median_length": float(np.median(flat)),
            "max_length": int(flat.max()),
            "at_cap": int((flat == max_length).sum()),
            "merged_batches": len(groups),
        },
        "rows": [
            {
                "label": label,
                "max_batch_tokens": budget,
                "real_tokens": r,
                "padded_tokens": p,
                "forwards": f,
                "waste": round(p / r - 1, 6),
            }
            for label, budget, (r, p, f) in rows
        ],
    }


def print_padding(padding: dict[str, Any]) -> None:
    mix = padding["mix"]
    print_table(
        f"2. Padding waste (padded / real - 1) on {mix['requests']} requests x "
        f"{mix['sequences_per_request']} sequences, {mix['distribution']} (mean "
        f"{mix['mean_length']}, {mix['at_cap']} at the cap), {mix['merged_batches']} merged "
        "batches; target < 10% with the budget on",
        ["cut", "max_batch_tokens", "real tokens", "padded tokens", "forwards", "waste %"],
        [
            [
                r["label"],
                "-" if r["max_batch_tokens"] is None else f"{r['max_batch_tokens']:,}",
                r["real_tokens"],
                r["padded_tokens"],
                r["forwards"],
                100.0 * r["waste"],
            ]
            for r in padding["rows"]
        ],
    )


# --- 3. bytes per token --------------------------------------------------------------------------


def _decoded_top_k(response: pb.SoftTargetsResponse) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The LM task's (values, indices, tail mass) of a response, packed or Tensors."""
    output = next(o for o in response.outputs if o.task == LM_TASK)
    if output.HasField("packed"):
        values, indices, tail = packed.decode_top_k(output.packed, "log_probs", "packed")
        assert tail is not None  # log-probs always carry their tail mass
        return values, indices, tail
    return (
        codec.decode(output.values),
        codec.decode(output.indices).astype(np.int64),
        codec.decode(output.tail_mass),
    )


def code_effect(
    exact: tuple[np.ndarray, np.ndarray, np.ndarray],
    coded: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> dict[str, float]:
    """What 8-bit codes do to the targets: the largest log-prob error against the float32 top-k,
    and the mean and largest KL(exact || coded) per token over the k + 1 buckets (top k and the
    tail), the coded buckets renormalised as a loss would see them."""
    values, indices, tail = (np.asarray(a, np.float64) for a in exact)
    coded_values, coded_indices, coded_tail = (np.asarray(a, np.float64) for a in coded)
    if not np.array_equal(indices, coded_indices):
        raise RuntimeError("codes changed the top-k ids")
    p = np.concatenate([np.exp(values), tail[:, None]], axis=1)
    q = np.concatenate([np.exp(coded_values), coded_tail[:, None]], axis=1)
    q = q / q.sum(axis=1, keepdims=True)
    p = np.clip(p, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-300))), 0.0)
    kl = terms.sum(axis=1)
    inside = values >= -255.5 * packed.LOG_PROB_STEP
    return {
        "max_abs_log_prob_error": float(np.abs(coded_values - values)[inside].max()),
        "entries_below_the_last_code": int((~inside).sum()),
        "mean_kl_nats": float(kl.mean()),
        "max_kl_nats": float(kl.max()),
    }


def bench_wire(
    stub: pb_grpc.TeacherServiceStub,
    http_url: str,
    model: str,
    stream: np.ndarray,
    vocab_size: int,
    shape: tuple[int, int],
) -> dict[str, Any]:
    """Serialized response sizes of one request of `shape` (sequences, length) per format."""
    sequences, length = shape
    ids = windows(stream, [length] * sequences)
    lengths = np.full(sequences, length, dtype=np.int64)
    tokens = sequences * length
    rows: list[dict[str, Any]] = []
    responses: dict[tuple[int, int, int], pb.SoftTargetsResponse] = {}

    def measured(label: str, k: int, dtype: int, encoding: int) -> float:
        response = stub.GetSoftTargets(
            request_pb(model, ids, lengths, k, dtype, encoding), timeout=300
        )
        if token_rows(response) != tokens:
            raise RuntimeError(f"{label}: {token_rows(response)} rows, expected {tokens}")
        responses[k, dtype, encoding] = response
        per_token = response.ByteSize() / tokens
        rows.append({"format": label, "k": k, "bytes_per_token": round(per_token, 3),
                     "source": "gRPC SoftTargetsResponse.ByteSize()"})  # fmt: skip
        return per_token

    id_bits = packed.index_bits(vocab_size)
    dense = measured(f"dense float32 log-probs (V = {vocab_size:,})", 0, pb.FLOAT32, 0)
    tensors: dict[int, float] = {}
    ours: dict[int, float] = {}
    coded: dict[int, float] = {}
    for k in WIRE_K:
        if k > vocab_size:
            continue
        tensors[k] = measured(f"top-{k} Tensors: float16 + UINT16 ids + float32 tail", k,
                              pb.FLOAT16, pb.TOP_K_ENCODING_UNSPECIFIED)  # fmt: skip
        ours[k] = measured(f"top-{k} PACKED: {id_bits}-bit ids, 15-bit float16, 15-bit tail", k,
                           pb.FLOAT16, pb.PACKED)  # fmt: skip
        coded[k] = measured(f"top-{k} PACKED_LOG_PROB_CODES: 8-bit codes (lossy)", k,
                            pb.FLOAT16, pb.PACKED_LOG_PROB_CODES)  # fmt: skip
    k = TOP_K if TOP_K in ours else max(ours)
    body = request_pb(model, ids, lengths, k, pb.FLOAT16).SerializeToString()
    reply = httpx.post(
        f"{http_url}/v1/models/{model}/soft-targets",
        content=body,
        headers={"content-type": "application/x-protobuf"},
        timeout=300,
    )
    reply.raise_for_status()
    rows.append({"format": f"top-{k} PACKED, HTTP protobuf body", "k": k,
                 "bytes_per_token": round(len(reply.content) / tokens, 3),
                 "source": "HTTP response body length"})  # fmt: skip
    trl = {k: TRL_BYTES_PER_ENTRY * k * BASE64 for k in ours}
    for key, value in trl.items():
        rows.append({"format": f"TRL top-{key}: float32 value + int32 id, base64 JSON", "k": key,
                     "bytes_per_token": round(value, 3),
                     "source": "computed: 8 B x k x 4/3 (JSON keys and brackets not counted)"})  # fmt: skip
    rows.append({"format": "DistillKit top-128 (published)", "k": 128,
                 "bytes_per_token": DISTILLKIT_BYTES_PER_TOKEN_K128,
                 "source": "constant from DistillKit's docs, not measured"})  # fmt: skip
    # The codes' effect, against the float32 top-k of the same request.
    exact = stub.GetSoftTargets(
        request_pb(model, ids, lengths, k, pb.FLOAT32, pb.TOP_K_ENCODING_UNSPECIFIED), timeout=300
    )
    effect = code_effect(
        _decoded_top_k(exact), _decoded_top_k(responses[k, pb.FLOAT16, pb.PACKED_LOG_PROB_CODES])
    )
    return {
        "request": {"sequences": sequences, "length": length, "tokens": tokens},
        "vocab_size": vocab_size,
        "rows": rows,
        "k": k,
        "ours_over_dense": ours[k] / dense,
        "trl_over_ours": trl[k] / ours[k],
        "trl_over_tensors": trl[k] / tensors[k],
        "trl_over_codes": trl[k] / coded[k],
        "codes_over_dense": coded[k] / dense,
        "code_effect": effect,
    }


def print_wire(wire: dict[str, Any]) -> None:
    request = wire["request"]
    print_table(
        f"3. Bytes per real token on the wire ({request['sequences']} x {request['length']} = "
        f"{request['tokens']} tokens per response; LM task, log-probs)",
        ["format", "B/token", "source"],
        [[r["format"], float(r["bytes_per_token"]), r["source"]] for r in wire["rows"]],
    )
    k = wire["k"]
    effect = wire["code_effect"]
    print(
        f"\n   top-{k} PACKED: {100 * wire['ours_over_dense']:.2f}% of dense float32; TRL's format "
        f"is {wire['trl_over_ours']:.2f}x PACKED, {wire['trl_over_tensors']:.2f}x the Tensors, "
        f"{wire['trl_over_codes']:.2f}x the 8-bit codes\n   8-bit codes vs the float32 top-{k}: "
        f"max |log-prob error| {effect['max_abs_log_prob_error']:.4f} nats "
        f"({effect['entries_below_the_last_code']} entries below the last code), KL(exact || "
        f"coded) over the {k}+1 buckets mean {effect['mean_kl_nats']:.2e}, max "
        f"{effect['max_kl_nats']:.2e} nats per token"
    )


# --- targets and main ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    measured: float
    needed: str
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measured": round(self.measured, 4),
            "needed": self.needed,
            "pass": self.passed,
        }


def targets(
    rows: Sequence[ThroughputRow], padding: dict[str, Any], wire: dict[str, Any]
) -> list[Target]:
    result = []
    for row in rows:
        if not row.marked:
            continue
        for transport in ("grpc-stream", "http-protobuf"):
            value = row.ratio(transport)
            result.append(
                Target(
                    f"{transport} / in-process at L {row.length} x N {row.batch_size}",
                    value,
                    ">= 0.8x",
                    value >= 0.8,
                )
            )
    waste = padding["rows"][0]["waste"]
    result.append(Target("padding waste, budget on", waste, "< 0.10", waste < 0.10))
    k = wire["k"]
    result.append(
        Target(
            f"top-{k} / dense float32 bytes",
            wire["ours_over_dense"],
            "<= 0.05",
            wire["ours_over_dense"] <= 0.05,
        )
    )
    result.append(
        Target(
            f"TRL top-{k} / ours top-{k} (PACKED, lossless) bytes",
            wire["trl_over_ours"],
            ">= 3x",
            wire["trl_over_ours"] >= 3.0,
        )
    )
    return result


def print_targets(items: Sequence[Target]) -> None:
    print_table(
        "Targets of the issue (informational; measured on this machine, this run)",
        ["target", "measured", "needed", "result"],
        [[t.name, t.measured, t.needed, "PASS" if t.passed else "FAIL"] for t in items],
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sequence", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, help="write every number to this JSON file")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the test's run: the small teacher, L 32 x N 1 and 8, short cells (seconds)",
    )
    parser.add_argument(
        "--small", action="store_true", help="train the small teacher (seconds), not the default"
    )
    parser.add_argument(
        "--repository",
        type=Path,
        help="a repository holding a sequence model folder (or the folder); default: train the "
        "default sequence teacher into a temporary folder (~2-4 min on 2 cores)",
    )
    parser.add_argument("--duration", type=float, help="timed seconds per cell (default 3)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return parser.parse_args(argv)


def prepare_teacher(args: argparse.Namespace, root: Path, max_length: int) -> Teacher:
    if args.repository is not None:
        source = find_sequence_model(args.repository.resolve())
    else:
        from teacher_server.repository.default_sequence_teacher import (
            DEFAULT_SEQUENCE_MODEL_NAME,
            train_default_sequence_teacher,
        )

        small = args.quick or args.small
        source = root / "trained" / DEFAULT_SEQUENCE_MODEL_NAME
        print(f"training the {'small' if small else 'default'} sequence teacher into {source}...")
        train_default_sequence_teacher(source, small=small)
    served = root / "repository"
    served.mkdir()
    return serve_copy(source, served, max_length)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    lengths = QUICK_LENGTHS if args.quick else LENGTHS
    batch_sizes = QUICK_BATCH_SIZES if args.quick else BATCH_SIZES
    budget = (
        Budget(duration_s=args.duration or 0.3, warmup_s=0.1, min_calls=2)
        if args.quick
        else Budget(duration_s=args.duration or 3.0)
    )
    machine = machine_summary()
    print(f"machine: {machine}\nbudget per cell: {budget}")
    with tempfile.TemporaryDirectory(prefix="bench-sequence-") as folder:
        teacher = prepare_teacher(args, Path(folder), max(lengths))
        print(
            f"teacher {teacher.name}: vocabulary {teacher.vocab_size}, max_length "
            f"{teacher.max_length}"
            + (f" (widened from {teacher.widened_from})" if teacher.widened_from else "")
        )
        stream = held_out_stream(teacher.folder)
        local = InProcess(teacher, args.device)
        padding = bench_padding(
            local, stream, max(lengths), 8 if args.quick else 64, 4 if args.quick else 8
        )
        print_padding(padding)
        with (
            teacher_process(teacher.repository, ("--device", args.device)) as server,
            grpc.insecure_channel(server.grpc_address, options=CHANNEL_OPTIONS) as channel,
        ):
            stub = pb_grpc.TeacherServiceStub(channel)
            wire_shape = (2, min(lengths)) if args.quick else WIRE_SHAPE
            wire = bench_wire(
                stub, server.http_url, teacher.name, stream, teacher.vocab_size, wire_shape
            )
            print_wire(wire)
            rows = bench_throughput(
                local, stub, server.http_url, stream, lengths, batch_sizes, budget
            )
    print_throughput(rows)
    items = targets(rows, padding, wire)
    print_targets(items)
    elapsed = time.perf_counter() - started
    load_after = [round(x, 2) for x in os.getloadavg()]
    print(f"\ntotal {elapsed:.0f}s; load average now {load_after}")
    result = {
        "machine": machine,
        "load_average_after": load_after,
        "quick": args.quick,
        "budget": {"duration_s": budget.duration_s, "warmup_s": budget.warmup_s},
        "seconds": round(elapsed, 1),
        "model": {
            "name": teacher.name,
            "vocab_size": teacher.vocab_size,
            "max_length": teacher.max_length,
            "widened_from": teacher.widened_from,
            "parameters": int(sum(p.numel() for p in local.engine.loaded.module.parameters()))
            if local.engine.loaded.module is not None
            else None,
        },
        "throughput": {
            "top_k": TOP_K,
            "output": "log_probs float16",
            "stream_depth": STREAM_DEPTH,
            "http_clients": HTTP_CLIENTS,
            "rows": [row.to_json() for row in rows],
        },
        "padding": padding,
        "wire": wire,
        "targets": [t.to_json() for t in items],
    }
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
