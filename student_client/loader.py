"""`SoftTargetLoader`: wraps any iterable of batches and adds the teacher's soft targets.

    loader = SoftTargetLoader(train_loader, teacher, TargetOptions(temperature=4.0), depth=8)
    for inputs, labels, targets in loader:    # targets: SoftTargets for exactly this batch
        loss = kd(student(inputs), targets.tensor("digit"), labels)

Up to `depth` batches are sent ahead on one stream, so the network and the teacher work while the
student trains. Batches come out in the order they went in; each is sent once and answered once
(matched by batch id). A batch the teacher answers with an error raises that error, naming the
batch, from the iteration that would have yielded it: nothing is skipped silently.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from protocol.errors import Internal, TeacherError
from student_client.client import TeacherClient, as_numpy
from student_client.types import SoftTargets, TargetOptions


@dataclass
class LoaderStats:
    """Counters of one pass, to check that every batch was accounted for."""

    sent: int = 0
    received: int = 0
    yielded: int = 0
    samples: int = 0


class SoftTargetLoader:
    def __init__(
        self,
        batches: Iterable[Any],
        client: TeacherClient,
        options: TargetOptions | None = None,
        depth: int = 8,
        input_dtype: str | None = None,
    ) -> None:
        """`batches` yields `(inputs, labels)` tuples (labels: anything, passed through) or bare
        inputs. `depth` >= 1 is the number of batches in flight. `input_dtype` converts inputs
        before sending (e.g. `uint8` for pixels already in 0..255)."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.batches = batches
        self.client = client
        self.options = client.with_model(options or TargetOptions())
        self.depth = depth
        self.input_dtype = input_dtype
        self.stats = LoaderStats()

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def _split(self, batch: Any) -> tuple[Any, Any]:
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[0], batch[1]
        return batch, None

    def __iter__(self) -> Iterator[tuple[Any, Any, SoftTargets]]:
        self.stats = LoaderStats()
        run = uuid.uuid4().hex[:12]
        model = str(self.options.model)
        stream = self.client.open_stream()
        pending: deque[tuple[str, Any, Any]] = deque()  # (batch_id, inputs, labels), in order
        answers: dict[str, SoftTargets | TeacherError] = {}
        awaited: set[str] = set()  # sent, not yet answered
        source = iter(self.batches)
        exhausted = False
        index = 0
        try:
            while True:
                while not exhausted and len(pending) < self.depth:
                    try:
                        batch = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    inputs, labels = self._split(batch)
                    batch_id = f"{run}-{index}"
                    array = as_numpy(inputs)
                    if self.input_dtype is not None:
                        array = array.astype(self.input_dtype)
                    stream.send(array, self.options, model, batch_id)
                    awaited.add(batch_id)
                    self.stats.sent += 1
                    pending.append((batch_id, inputs, labels))
                    index += 1
                if not pending:
                    return
                batch_id, inputs, labels = pending.popleft()
                while batch_id not in answers:
                    received_id, answer = stream.receive()
                    if received_id not in awaited:
                        raise Internal(
                            f"teacher answered unknown or repeated batch id {received_id!r}"
                        )
                    awaited.discard(received_id)
                    answers[received_id] = answer
                    self.stats.received += 1
                answer = answers.pop(batch_id)
                if isinstance(answer, TeacherError):
                    number = int(batch_id.rsplit("-", 1)[1])
                    raise type(answer)(
                        f"batch {number} (id {batch_id}): {answer.message}", answer.field
                    )
                self.stats.yielded += 1
                self.stats.samples += answer.batch_size
                yield inputs, labels, answer
        finally:
            stream.close()
