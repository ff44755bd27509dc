"""`SoftTargetLoader`: wraps any iterable of batches and adds the teacher's soft targets.

    loader = SoftTargetLoader(train_loader, teacher, TargetOptions(temperature=4.0), depth=16)
    for inputs, labels, targets in loader:    # targets: SoftTargets for exactly this batch
        loss = kd(student(inputs), targets.tensor("digit"), labels)

Up to `depth` batches are in flight on `streams` streams (one per teacher replica by default), so
the network and the teachers work while the student trains; answers are decoded on the streams'
reader threads. Batches come out in the order they went in, each labelled exactly once: answers
are matched by batch id, and a batch is re-sent only when its answer did not arrive.

Failures:
- a batch answered with a retryable error (an overloaded teacher's RESOURCE_EXHAUSTED, ...) is
  re-sent after a backoff, while the other batches' answers keep being handled;
- a broken stream (teacher killed, restarted, connection reset) is reopened after a backoff and
  every batch it had not answered is re-sent, possibly to another replica;
- both are bounded by the client's `RetryPolicy` (time since the last answer that arrived);
- an error that retrying cannot fix (INVALID_ARGUMENT, FAILED_PRECONDITION, ...) is raised from
  the iteration that would have yielded that batch, naming it: nothing is skipped silently;
- an exception raised by `batches` itself is raised after the batches read before it.

With `pin_version=True` (the default) the first answer's model version is pinned for the rest of
the pass: a teacher that changes weights mid-epoch (a reload, a replica with other weights) makes
the loader raise `FailedPrecondition` instead of mixing two teachers' soft targets.

With `cache=SoftTargetCache(...)` (see `student_client.offline.cache`) every sample of a batch is looked
up first: a batch found whole is answered locally (no request), otherwise only its missing
samples are sent (one request with those rows) and the batch is assembled in its original row
order; the teacher's rows are stored for the next pass. Each pass looks up one model version,
`options.model_version` or the version the teacher serves when the pass starts (one `ModelInfo`
call), and pins its requests to it. Token batches (`TokenBatch`, with `options.tokenizer_hash`)
are looked up per sequence, and a partly cached batch sends only its uncached sequences.
"""

from __future__ import annotations

import dataclasses
import heapq
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from protocol.errors import FailedPrecondition, Internal, TeacherError
from student_client.offline.cache import SoftTargetCache
from student_client.offline.scope import CachedRows
from student_client.online.cache_pass import CachePass
from student_client.online.client import Stream, TeacherClient
from student_client.online.retry import RetryBudget, is_retryable
from student_client.types import (
    Event,
    SoftTargets,
    TargetOptions,
    TeacherInputs,
    TokenBatch,
    as_numpy,
)


@dataclass
class LoaderStats:
    """Counters of one pass, to check that every batch was accounted for. `sent` counts first
    sends only; re-sends after failures are counted in `resent`."""

    sent: int = 0
    received: int = 0
    yielded: int = 0
    samples: int = 0
    resent: int = 0
    reconnects: int = 0
    cached_batches: int = 0  # batches answered whole from the cache: no request (not in `sent`)
    cached_samples: int = 0  # samples answered from the cache, in whole or partial batches


@dataclass
class _Lane:
    """One stream and the batches it owes an answer for (batch id -> encoded inputs)."""

    stream: Stream
    generation: int
    awaited: dict[str, TeacherInputs] = field(default_factory=dict)


class SoftTargetLoader:
    def __init__(
        self,
        batches: Iterable[Any],
        client: TeacherClient,
        options: TargetOptions | None = None,
        depth: int = 16,
        input_dtype: str | None = None,
        streams: int | None = None,
        pin_version: bool = True,
        cache: SoftTargetCache | None = None,
    ) -> None:
        """`batches` yields `(inputs, labels)` tuples (labels: anything, passed through) or bare
        inputs. `depth` >= 1 batches are in flight. `input_dtype` converts inputs before sending:
        `uint8` sends integer inputs as they are and floating ones as the exact uint8 codes of the
        model's `uint8_scale` (MNIST-like pixels k / 255: a quarter of float32's bytes, and the
        server restores the floats; inexact inputs raise `ValueError`). `streams` defaults to the client's number of
        replica addresses. `cache`: answer cached samples locally (needs `pin_version`: a batch
        of cached and fresh rows must come from one teacher version)."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if cache is not None and not pin_version:
            raise ValueError("cache: needs pin_version=True (cached rows are of one version)")
        self.batches = batches
        self.client = client
        self.options = client.with_model(options or TargetOptions())
        self.depth = depth
        self.input_dtype = input_dtype
        self.streams = streams or client.replicas
        self.pin_version = pin_version
        self.cache = cache
        self.stats = LoaderStats()

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Any, Any, SoftTargets]]:
        return _Pass(self).run()


class _Pass:
    """The state of one iteration over the loader."""

    def __init__(self, loader: SoftTargetLoader) -> None:
        self.loader = loader
        self.client = loader.client
        self.options = loader.options
        self.model = str(loader.options.model)
        self.stats = loader.stats = LoaderStats()
        self.run_id = uuid.uuid4().hex[:12]
        self.uint8_scale: float | None = None  # the model's, asked when floats go as uint8
        self.events: queue.Queue[Event] = queue.Queue()
        self.cached = (
            CachePass(loader.cache, self.client, self.options) if loader.cache is not None else None
        )
        if self.cached is not None:
            self.options = self.cached.options  # pinned to the version it looks up
            if self.cached.info is not None:  # one ModelInfo call per pass, not two
                self.uint8_scale = float(self.cached.info.uint8_scale) or 1.0
        # With a cache, streams open at the first send: a pass answered from the cache opens none.
        self.lanes = (
            [] if self.cached is not None else [self._open(i, 0) for i in range(loader.streams)]
        )
        self.answers: dict[str, SoftTargets | TeacherError] = {}
        self.budget = RetryBudget(self.client.retry)
        self.pinned = self.options.model_version
        # Batches refused with a retryable error, to re-send once their backoff is over:
        # (due time, batch id, lane index, lane generation).
        self.retries: list[tuple[float, str, int, int]] = []

    def _open(self, index: int, generation: int) -> _Lane:
        return _Lane(self.client.open_stream(self.events, (index, generation)), generation)

    def _send(self, index: int, batch_id: str, array: TeacherInputs) -> None:
        if not self.lanes:
            self.lanes = [self._open(i, 0) for i in range(self.loader.streams)]
        lane = self.lanes[index % len(self.lanes)]
        lane.awaited[batch_id] = array
        lane.stream.send(array, self.options, self.model, batch_id)

    def _encode(self, inputs: Any) -> TeacherInputs:
        if isinstance(inputs, TokenBatch):  # sequences: `input_dtype` converts the ids
            wanted_ids = self.loader.input_dtype
            if wanted_ids is None or inputs.ids.dtype == np.dtype(wanted_ids):
                return inputs
            return dataclasses.replace(inputs, ids=inputs.ids.astype(wanted_ids))
        array = as_numpy(inputs)
        wanted = self.loader.input_dtype
        if wanted is None or array.dtype == np.dtype(wanted):
            return array
        if np.dtype(wanted) == np.uint8 and array.dtype.kind == "f":
            return self._quantize(array)
        return array.astype(wanted)

    def _quantize(self, array: np.ndarray) -> np.ndarray:
        """Floating inputs as the uint8 codes the teacher scales back by its model's
        `uint8_scale` (ModelInfo, asked once per pass): 4x fewer bytes than float32 on the wire
        and to hash. Only exact codes are sent (pixels stored as k * scale, e.g. k / 255 images);
        anything else raises `ValueError` rather than send the teacher other inputs."""
        if self.uint8_scale is None:
            info = self.client.model_info(self.model, self.options.model_version)
            self.uint8_scale = float(info.uint8_scale) or 1.0
        scale = self.uint8_scale
        scaled = np.multiply(array, 1.0 / scale)
        codes = np.rint(scaled)
        # |codes * scale - x| <= 1e-6 * (1 + 255 * scale), in code units; NaN compares False
        scaled -= codes
        np.abs(scaled, out=scaled)
        tolerance = 1e-6 * (1.0 / scale + 255.0)
        if not ((scaled <= tolerance).all() and codes.min() >= 0 and codes.max() <= 255):
            bad = ~(scaled <= tolerance) | (codes < 0) | (codes > 255)
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"input_dtype: uint8 needs inputs that are whole multiples k * {self.uint8_scale:g} "
                f"(the model's uint8_scale) with 0 <= k <= 255; inputs{list(where)} is "
                f"{float(array[where])!r}; send them as float32 (input_dtype=None)"
            )
        return codes.astype(np.uint8)

    def _prepared(self) -> Iterator[_Prepared]:
        """The source's batches, encoded and (with a cache) looked up, in order."""
        for index, batch in enumerate(self.loader.batches):
            inputs, labels = _split(batch)
            batch_id = f"{self.run_id}-{index}"
            array = self._encode(inputs)
            cached = answer = None
            if self.cached is not None:
                cached = self.cached.lookup(array)
                if cached.complete:
                    answer = self.cached.answer(cached, batch_id)
            yield _Prepared(index, batch_id, inputs, labels, array, cached, answer)

    def run(self) -> Iterator[tuple[Any, Any, SoftTargets]]:
        # (batch_id, inputs, labels, cached rows), in order
        pending: deque[tuple[str, Any, Any, CachedRows | None]] = deque()
        cache_pass = self.cached
        # With a cache, a thread reads, hashes and looks up the next batches while the student
        # trains on this one (sha256 and SQLite release the GIL): a cached epoch costs the
        # training loop little more than reading its batches.
        prefetch = _Prefetch(self._prepared(), self.loader.depth) if cache_pass else None
        source = iter(prefetch) if prefetch is not None else self._prepared()
        exhausted = False
        source_error: Exception | None = None  # raised once the batches before it are out
        try:
            while True:
                while not exhausted and len(pending) < self.loader.depth:
                    if (
                        prefetch is not None
                        and pending
                        and pending[0][0] in self.answers
                        and not prefetch.ready()
                    ):
                        break  # the next batch is answered: yield it, do not wait to read ahead
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    except Exception as error:  # raised after the batches read before it
                        source_error, exhausted = error, True
                        break
                    if item.answer is not None:
                        self.answers[item.batch_id] = item.answer
                        self.stats.cached_batches += 1
                    else:
                        missing = item.cached.missing if item.cached is not None else None
                        array = item.array
                        if missing is not None:  # only the uncached samples / sequences
                            if isinstance(array, TokenBatch):
                                array = array.select(missing)
                            else:
                                array = array[missing]
                        self._send(item.index, item.batch_id, array)
                        self.stats.sent += 1
                    pending.append((item.batch_id, item.inputs, item.labels, item.cached))
                if not pending:
                    if source_error is not None:
                        raise source_error
                    return
                batch_id, inputs, labels, cached = pending.popleft()
                while batch_id not in self.answers:
                    self._handle(self._next_event())
                answer = self.answers.pop(batch_id)
                if isinstance(answer, TeacherError):
                    number = int(batch_id.rsplit("-", 1)[1])
                    raise type(answer)(
                        f"batch {number} (id {batch_id}): {answer.message}", answer.field
                    )
                if cache_pass is not None and cached is not None:
                    self.stats.cached_samples += len(cached.digests) - len(cached.missing)
                    if cached.missing:
                        answer = cache_pass.complete(cached, answer)
                self.stats.yielded += 1
                self.stats.samples += answer.batch_size
                yield inputs, labels, answer
        finally:
            if prefetch is not None:
                prefetch.close()
            for lane in self.lanes:
                lane.stream.close()

    def _next_event(self) -> Event:
        """The next event of the streams; meanwhile, re-send each refused batch whose backoff is
        over (on its lane, unless that lane was replaced: a reconnect re-sent it already)."""
        while True:
            now = time.monotonic()
            while self.retries and self.retries[0][0] <= now:
                _, batch_id, lane_index, generation = heapq.heappop(self.retries)
                lane = self.lanes[lane_index]
                if lane.generation == generation and batch_id in lane.awaited:
                    lane.stream.send(lane.awaited[batch_id], self.options, self.model, batch_id)
                    self.stats.resent += 1
            timeout = self.retries[0][0] - now if self.retries else None
            try:
                return self.events.get(timeout=timeout)
            except queue.Empty:
                continue

    def _handle(self, event: Event) -> None:
        tag, batch_id, answer = event
        lane_index, generation = cast(tuple[int, int], tag)
        lane = self.lanes[lane_index]
        if generation != lane.generation:
            return  # from a stream already replaced: its batches were re-sent
        if batch_id is None:
            assert isinstance(answer, TeacherError)
            self._reconnect(lane_index, answer)
            return
        if batch_id not in lane.awaited:
            raise Internal(f"teacher answered unknown or repeated batch id {batch_id!r}")
        if isinstance(answer, TeacherError) and is_retryable(answer):
            # Re-sent after its backoff by `_next_event`, without holding up the other batches'
            # answers (sleeping here, once per refused batch in turn, stalled the pass and could
            # spend the retry time while answers from a working teacher waited in the queue).
            delay = self.budget.next_delay(answer)  # raises when time is up
            heapq.heappush(
                self.retries, (time.monotonic() + delay, batch_id, lane_index, lane.generation)
            )
            return
        del lane.awaited[batch_id]
        self.stats.received += 1
        if isinstance(answer, SoftTargets):
            self.budget.succeeded()
            answer = self._check_version(answer)
        self.answers[batch_id] = answer

    def _check_version(self, answer: SoftTargets) -> SoftTargets:
        if not self.loader.pin_version:
            return answer
        if not self.pinned:
            self.pinned = answer.model_version
            self.options = dataclasses.replace(self.options, model_version=self.pinned)
        elif answer.model_version != self.pinned:
            raise FailedPrecondition(
                f"model_version: batch {answer.batch_id} was answered by {answer.model_version!r}, "
                f"but this pass is pinned to {self.pinned!r}; not mixing two teachers",
                "model_version",
            )
        return answer

    def _reconnect(self, lane_index: int, error: TeacherError) -> None:
        """Replace a broken stream and re-send every batch it had not answered."""
        old = self.lanes[lane_index]
        old.stream.close()
        self.budget.failed(error)  # sleeps the backoff, or raises when time is up
        lane = self._open(lane_index, old.generation + 1)
        self.lanes[lane_index] = lane
        self.stats.reconnects += 1
        for batch_id, array in old.awaited.items():
            lane.awaited[batch_id] = array
            lane.stream.send(array, self.options, self.model, batch_id)
            self.stats.resent += 1


@dataclass
class _Prepared:
    """A source batch ready to answer from the cache or to send."""

    index: int
    batch_id: str
    inputs: Any
    labels: Any
    array: TeacherInputs  # the inputs as sent
    cached: CachedRows | None
    answer: SoftTargets | None  # the whole batch from the cache


_DONE = object()


class _Prefetch:
    """Runs an iterator on a daemon thread, up to `depth` items ahead; an exception it raises is
    raised by the consumer at that point of the sequence. `close()` stops the thread."""

    def __init__(self, items: Iterator[_Prepared], depth: int) -> None:
        self._items = items
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loader-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            self._put(error)
            return
        self._put(_DONE)

    def ready(self) -> bool:
        """An item (or the end, or an error) can be taken without waiting."""
        return not self._queue.empty()

    def __iter__(self) -> Iterator[_Prepared]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    return batch, None
