"""The dynamic batcher: merges requests from every client and transport into one forward.

Requests wait in a bounded queue (`teacher_server.serving.fair_queue`): by default one line per
client served in turn by deficit round-robin, by rows (real tokens for a sequence model), so each
forward takes work from every waiting client and a light client is not stuck behind a heavy
one's backlog; `fair=False` keeps one line, first come, first served. The batcher's task takes
the next waiting request, then keeps taking more until the merged batch would pass
`max_batch_size` samples (or, for a sequence model, `max_batch_tokens` real tokens: a single
larger request runs alone) or `max_queue_delay_ms` has passed, and runs the engine on one worker
thread, so the event loop never blocks on a forward. Each request keeps its own tasks,
temperature, output kind, top-k and dtype; results go back to each caller's future. Requests whose
caller has gone (cancelled future) are dropped before the forward.

Limits: `max_queue_size` requests in all, and per client `max_queued_rows` rows waiting (the
client's own cap, else the batcher's): beyond either, `ResourceExhausted` for that request only.

Thread-safety: `submit` must be called from the event loop that `start` ran on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from protocol.errors import DeadlineExceeded, Internal, ResourceExhausted, Unavailable
from teacher_server.serving.clients import Client, current_client
from teacher_server.serving.engine import Engine
from teacher_server.serving.fair_queue import FairQueue
from teacher_server.serving.schema import SoftTargets, ValidatedRequest
from teacher_server.serving.sequence_engine import SequenceEngine
from teacher_server.serving.stage_timing import Stamps, current

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    request: ValidatedRequest
    future: asyncio.Future[SoftTargets]
    client: Client
    queued_at: float  # time.perf_counter() when queued
    stamps: Stamps | None = None  # stage timing (bench/request_cost.py); None when off


OnServed = Callable[[str, int, float], None]  # (client name, rows, seconds waited)


class DynamicBatcher:
    def __init__(
        self,
        engine: Engine | SequenceEngine,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_size: int,
        on_forward: Callable[[int, int, float], None] | None = None,
        max_batch_tokens: int = 0,
        fair: bool = True,
        max_queued_rows: int = 0,
        on_served: OnServed | None = None,
        on_refused: Callable[[str], None] | None = None,
        inline_forward_max_ms: float = 0.0,
    ) -> None:
        """`on_forward(requests, samples, seconds)` is called after each forward (metrics).
        `max_batch_tokens`: most `ValidatedRequest.tokens` merged into one forward (0: no
        budget; for sequence models). `fair`: deficit round-robin across clients (else FIFO).
        `max_queued_rows`: a client's cap on rows waiting, unless its `Client` names its own
        (0: none). `on_served(client, rows, seconds waited)` is called per request as its
        forward starts; `on_refused(client)` when a client's request passes its cap.
        `inline_forward_max_ms`: a lone request whose forward took at most this long before
        runs on the event loop (see `_run_lone`); 0: never."""
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_delay = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.max_queued_rows = max_queued_rows
        # A turn earns 1/16 of a forward's budget: 16 clients fill a forward in one round.
        quantum = max(1, (max_batch_tokens or max_batch_size) // 16)
        self._quantum = quantum
        self._queue: FairQueue[_Pending] = FairQueue(quantum, fair)
        self._arrived = asyncio.Event()
        self._on_served = on_served
        self._on_refused = on_refused
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._task: asyncio.Task[None] | None = None
        self._on_forward = on_forward
        self.forwards = 0
        self.requests_forwarded = 0
        self._accepting = True
        self._busy = False  # a forward is running
        self._lone = True  # the last forward held a single request
        # The lone-request fast path (`_run_lone`): seconds a lone forward took, by row bucket
        # (the next power of two of its rows), and when the last inline one ended (loop time).
        self.inline_forward_max = inline_forward_max_ms / 1000.0
        self._lone_seconds: dict[int, float] = {}
        self._inline_ended = 0.0
        self._inline_seconds = 0.0
        self._engine_seconds = 0.0  # the last queue-path forward's time in the worker thread
        self.inline_forwards = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def close(self) -> None:
        """Stop taking work; fail whatever still waits with UNAVAILABLE."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in self._queue.items():
            if not item.future.done():
                item.future.set_exception(Unavailable("server is shutting down"))
        self._executor.shutdown(wait=True)
        self.engine.close()

    async def drain(self) -> None:
        """Stop accepting, let every accepted request finish, then close (a reload's old version)."""
        self._accepting = False
        while self.queue_depth or self._busy:
            await asyncio.sleep(0.005)
        await self.close()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def queued_rows_by_client(self) -> dict[str, int]:
        """Client name -> rows waiting for a forward (clients with none left out)."""
        return self._queue.queued_rows_by_client()

    async def submit(
        self, request: ValidatedRequest, timeout: float, client: Client | None = None
    ) -> SoftTargets:
        """Queue a request for `client` (default: the current call's, `current_client()`) and
        wait up to `timeout` seconds for its soft targets. Raises `ResourceExhausted` at once
        when the queue is full or the client is over its cap of queued rows,
        `DeadlineExceeded` after `timeout` (the request is then dropped from the queue, or its
        result discarded if already running)."""
        if self._task is None or self._task.done() or not self._accepting:
            raise Unavailable(
                f"model {self.engine.config.name!r} version {self.engine.loaded.version[:19]} is "
                "not accepting requests (unloading or stopped); retry"
            )
        client = current_client() if client is None else client
        if self._may_run_inline(request):  # nothing waiting or running: no cap can be passed
            if self._on_served is not None:
                self._on_served(client.name, request.batch_size, 0.0)
            return self._run_lone(request)
        if len(self._queue) >= self.max_queue_size:
            raise ResourceExhausted(
                f"queue: {self.max_queue_size} requests already waiting for model "
                f"{self.engine.config.name!r}; retry with backoff",
                "queue",
            )
        rows = request.batch_size
        cap = self.max_queued_rows if client.max_queued_rows is None else client.max_queued_rows
        queued = self._queue.queued_rows(client.name)
        if cap and queued and queued + rows > cap:  # one request alone always fits
            if self._on_refused is not None:
                self._on_refused(client.name)
            raise ResourceExhausted(
                f"queue: client {client.name!r} already has {queued} rows waiting for model "
                f"{self.engine.config.name!r} (its cap: {cap} rows queued); retry when its "
                "answers arrive",
                "queue",
            )
        future: asyncio.Future[SoftTargets] = asyncio.get_running_loop().create_future()
        pending = _Pending(request, future, client, time.perf_counter(), current())
        self._queue.put(client.name, client.weight, rows, request.tokens, pending)
        self._arrived.set()
        try:
            return await asyncio.wait_for(future, timeout)  # cancels `future` on timeout
        except TimeoutError:
            raise DeadlineExceeded(
                f"deadline: no answer within {timeout:.3g}s (queue depth {self.queue_depth})",
                "deadline",
            ) from None

    async def _wait_for_arrival(self, timeout: float | None) -> bool:
        """Wait until a request is queued (or `timeout` seconds pass: False)."""
        self._arrived.clear()
        if len(self._queue):
            return True
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _next_batch(self) -> list[_Pending]:
        while not len(self._queue):
            await self._wait_for_arrival(None)
        self._busy = True  # holding requests from here until their results are set
        # A client that was idle (a light or interactive one) is served first, and its forward is
        # short: the new round's requests, topped up to one quantum of cost (rows, or tokens for
        # a sequence model: `tokens` counts rows for the others), so its
        # answer comes after this short forward instead of a full one. The top-up keeps the
        # backlogged clients moving even if new clients keep every forward short. With no
        # backlog there is nothing to jump: the forward fills as usual.
        short = self._queue.serving_new and self._queue.backlogged
        first = self._queue.pop()
        if first.stamps is not None:
            first.stamps.mark("dequeued")
        batch, samples, tokens = [first], first.request.batch_size, first.request.tokens
        budget = self.max_batch_tokens or None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_queue_delay
        if not len(self._queue) and self._lone:
            # The last forward held a single request too: no one to wait for, answer at once.
            # Under concurrency requests queue during each forward and merge without waiting.
            deadline = loop.time()
        while samples < self.max_batch_size and (budget is None or tokens < budget):
            if not len(self._queue):
                remaining = deadline - loop.time()
                if remaining <= 0 or not await self._wait_for_arrival(remaining):
                    break
                continue
            if short and tokens >= self._quantum and not self._queue.serving_new:
                break
            item = self._queue.peek()
            if samples + item.request.batch_size > self.max_batch_size or (
                budget is not None and tokens + item.request.tokens > budget
            ):
                break  # stays first in line: the first of the next forward
            self._queue.pop()
            if item.stamps is not None:
                item.stamps.mark("dequeued")
            batch.append(item)
            samples += item.request.batch_size
            tokens += item.request.tokens
        kept = [item for item in batch if not item.future.done()]  # drop callers that left
        if self._on_served is not None:
            now = time.perf_counter()
            for item in kept:
                self._on_served(item.client.name, item.request.batch_size, now - item.queued_at)
        return kept

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                if batch:
                    await self._forward(batch)
            finally:
                self._busy = False

    async def _forward(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        stamps = [item.stamps for item in batch if item.stamps is not None]
        for each in stamps:
            each.mark("dispatched")
        try:
            results = await loop.run_in_executor(
                self._executor, self._run_engine, [item.request for item in batch], stamps
            )
        except Exception as error:  # a failed forward fails its requests, not the server
            log.exception("forward failed for %d requests", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(Internal(f"forward failed: {error!r}"))
            return
        for each in stamps:
            each.mark("resumed")
        self.forwards += 1
        self.requests_forwarded += len(batch)
        self._lone = len(batch) == 1
        seconds = time.perf_counter() - started
        if self._lone:
            self._note_lone(batch[0].request.batch_size, self._engine_seconds)
        if self._on_forward is not None:
            samples = sum(item.request.batch_size for item in batch)
            self._on_forward(len(batch), samples, seconds)
        for each in stamps:
            each.mark("handed")
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    def _run_engine(
        self, requests: list[ValidatedRequest], stamps: list[Stamps]
    ) -> list[SoftTargets]:
        """The forward, on the worker thread; with stage timing on, the engine's marks are copied
        onto every request's stamps (they shared the forward)."""
        started = time.perf_counter()
        try:
            if not stamps or not isinstance(self.engine, Engine):
                return self.engine.run(requests)
            for each in stamps:
                each.mark("worker")
            return self._run_engine_marked(requests, stamps)
        finally:
            self._engine_seconds = time.perf_counter() - started  # read after the await

    def _run_engine_marked(
        self, requests: list[ValidatedRequest], stamps: list[Stamps]
    ) -> list[SoftTargets]:
        assert isinstance(self.engine, Engine)
        marks: list[tuple[str, int]] = []
        self.engine.stage_marks = marks
        try:
            results = self.engine.run(requests)
        finally:
            self.engine.stage_marks = None
        telemetry = sum(ns for name, ns in marks if name == "telemetry_ns")
        marks = [(name, ns) for name, ns in marks if name != "telemetry_ns"]
        for each in stamps:
            each.marks.extend(marks)
            each.telemetry_ns += telemetry
            each.mark("engine_done")
        return results

    # ---- the lone-request fast path (issue 19) -----------------------------------------------
    # One client sending one request at a time pays, on the queue path, a wake-up of the batcher
    # task, two thread hops (to the worker and back) and a wake-up of its handler: most of the
    # server's time for a small forward, and far more on a loaded machine, where each hop waits
    # for the OS to schedule a thread. When nothing else is waiting or running, and the same
    # request size ran alone in at most `inline_forward_max_ms` before, the forward runs right
    # here on the event loop instead, as a model server without a batcher does; the loop is
    # blocked for about that long. Requests that arrive meanwhile wait in the socket; when the
    # next one comes in sooner after an inline forward than that forward took (requests were
    # queuing behind it: several clients), it takes the queue path, where they merge.

    def _note_lone(self, rows: int, seconds: float) -> None:
        """Keep a smoothed time of lone forwards of about `rows` rows (the engine's time only:
        on the queue path, without the thread hops)."""
        bucket = _row_bucket(rows)
        before = self._lone_seconds.get(bucket, seconds)
        self._lone_seconds[bucket] = 0.5 * (before + seconds)

    def _may_run_inline(self, request: ValidatedRequest) -> bool:
        if self.inline_forward_max <= 0 or self._busy:
            return False
        if not (self._lone and not len(self._queue)):
            return False
        seconds = self._lone_seconds.get(_row_bucket(request.batch_size))
        if seconds is None or seconds > self.inline_forward_max:
            return False  # not measured alone yet (the queue path measures it), or too slow
        now = asyncio.get_running_loop().time()
        return now - self._inline_ended >= self._inline_seconds

    def _run_lone(self, request: ValidatedRequest) -> SoftTargets:
        """Forward one request on the event loop (see above); a failed forward raises
        `Internal`, as on the queue path."""
        stamps = current()
        if stamps is not None:
            stamps.mark("dequeued")
        started = time.perf_counter()
        self._busy = True
        try:
            if stamps is not None and isinstance(self.engine, Engine):
                results = self._run_engine_marked([request], [stamps])
            else:
                results = self.engine.run([request])
        except Exception as error:  # a failed forward fails its request, not the server
            log.exception("inline forward failed")
            raise Internal(f"forward failed: {error!r}") from None
        finally:
            self._busy = False
        seconds = time.perf_counter() - started
        self._note_lone(request.batch_size, seconds)
        self._inline_seconds = seconds
        self._inline_ended = asyncio.get_running_loop().time()
        self.forwards += 1
        self.inline_forwards += 1
        self.requests_forwarded += 1
        if self._on_forward is not None:
            self._on_forward(1, request.batch_size, seconds)
        if stamps is not None:
            stamps.mark("handed")
        return results[0]


def _row_bucket(rows: int) -> int:
    """The power of two at or above `rows`: lone forwards' times are kept per bucket."""
    return 1 << max(0, rows - 1).bit_length()
