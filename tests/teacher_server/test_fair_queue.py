"""The batcher's waiting room (`teacher_server.serving.fair_queue`), as pure logic: deficit
round-robin shares by rows and weight, the new-client turn that lets a light client's request
leave first, each client's order kept, queued-row accounting, and the FIFO escape hatch."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from teacher_server.serving.fair_queue import FairQueue


def drain(queue: FairQueue[tuple[str, int, int]], count: int) -> list[tuple[str, int, int]]:
    return [queue.pop() for _ in range(count)]


def test_two_backlogged_clients_with_equal_weights_get_equal_rows() -> None:
    queue: FairQueue[tuple[str, int, int]] = FairQueue(quantum=64)
    for i in range(200):  # a: 64-row requests, b: 16-row requests
        queue.put("a", 1.0, 64, 64, ("a", i, 64))
    for i in range(800):
        queue.put("b", 1.0, 16, 16, ("b", i, 16))
    rows: Counter[str] = Counter()
    for client, _, size in drain(queue, 400):
        rows[client] += size
    assert abs(rows["a"] - rows["b"]) <= 64, rows  # within one quantum


def test_weights_share_rows_in_proportion() -> None:
    queue: FairQueue[tuple[str, int, int]] = FairQueue(quantum=64)
    for i in range(1000):
        queue.put("heavy", 1.0, 32, 32, ("heavy", i, 32))
        queue.put("interactive", 3.0, 32, 32, ("interactive", i, 32))
    rows: Counter[str] = Counter()
    for client, _, size in drain(queue, 400):
        rows[client] += size
    assert rows["interactive"] / rows["heavy"] == pytest.approx(3.0, rel=0.05), rows


def test_a_light_client_leaves_before_a_heavy_backlog() -> None:
    queue: FairQueue[tuple[str, int, int]] = FairQueue(quantum=64)
    for i in range(128):
        queue.put("heavy", 1.0, 64, 64, ("heavy", i, 64))
    drain(queue, 3)  # the heavy client is mid-backlog
    queue.put("light", 1.0, 8, 8, ("light", 0, 8))
    assert queue.peek() == ("light", 0, 8)  # first in the next forward
    assert queue.pop() == ("light", 0, 8)
    assert queue.pop()[0] == "heavy"


def test_each_clients_order_is_kept_and_every_item_leaves_once() -> None:
    rng = random.Random(0)
    queue: FairQueue[tuple[str, int, int]] = FairQueue(quantum=16)
    sent: dict[str, int] = Counter()
    out: list[tuple[str, int, int]] = []
    for _ in range(2000):  # interleave puts and pops, clients of random sizes and weights
        if rng.random() < 0.6:
            client = rng.choice("abcde")
            size = rng.choice([1, 8, 64, 300])
            queue.put(client, rng.choice([0.5, 1.0, 2.0]), size, size, (client, sent[client], size))
            sent[client] += 1
        elif len(queue):
            peeked = queue.peek()
            assert queue.peek() == peeked  # stable until popped
            assert queue.pop() == peeked
            out.append(peeked)
    out += drain(queue, len(queue))
    for client, count in sent.items():
        assert [i for c, i, _ in out if c == client] == list(range(count)), client
    assert len(out) == sum(sent.values())
    assert queue.queued_rows_by_client() == {}


def test_queued_rows_are_counted_per_client() -> None:
    queue: FairQueue[str] = FairQueue(quantum=64)
    queue.put("a", 1.0, 64, 64, "a0")
    queue.put("a", 1.0, 32, 32, "a1")
    queue.put("b", 1.0, 8, 8, "b0")
    assert queue.queued_rows("a") == 96 and queue.queued_rows("b") == 8
    assert queue.pop() == "a0"
    assert queue.queued_rows_by_client() == {"a": 32, "b": 8}
    assert sorted(queue.items()) == ["a1", "b0"]
    assert len(queue) == 0 and queue.queued_rows("a") == 0


def test_fifo_mode_keeps_arrival_order_across_clients() -> None:
    queue: FairQueue[str] = FairQueue(quantum=64, fair=False)
    order = [f"{c}{i}" for i in range(20) for c in ("heavy", "heavy", "light")]
    for name in order:
        queue.put(name.rstrip("0123456789"), 1.0, 8, 8, name)
    assert drain(queue, len(order)) == order  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        queue.peek()


def test_serving_new_and_backlogged_tell_the_batcher_when_to_cut_a_forward_short() -> None:
    queue: FairQueue[str] = FairQueue(quantum=64)
    queue.put("heavy", 1.0, 64, 64, "h0")
    assert queue.serving_new and not queue.backlogged  # alone: nothing to jump
    queue.put("heavy", 1.0, 64, 64, "h1")
    assert queue.pop() == "h0"
    assert not queue.serving_new and queue.backlogged  # its turn is over: the regular round
    queue.put("light", 1.0, 8, 8, "l0")
    assert queue.serving_new and queue.backlogged  # a light client ahead of a backlog
    assert queue.pop() == "l0"
    assert not queue.serving_new and queue.pop() == "h1"
    assert not queue.backlogged and len(queue) == 0
