"""Crash and restart: a teacher killed with SIGKILL in the middle of an epoch.

- One teacher on fixed ports, killed after N batches and restarted on the same ports: the
  student's `SoftTargetLoader` rides it out (broken stream -> backoff -> reconnect -> re-send of
  the unanswered batches) and finishes the epoch with every batch yielded exactly once and the
  right soft targets.
- Two replicas behind one client (`TeacherClient("a,b")`, round_robin, one stream each): one is
  killed mid-epoch and not restarted; its stream's batches go to the other; nothing is lost.

Each batch's soft targets are computed beforehand, one request at a time; the loader's are then
compared with them. The restarted teacher serves the same files, hence the same model version,
so the loader's version pin holds across the restart.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from student_client import SoftTargetLoader, TargetOptions, TeacherClient
from student_client.online.retry import RetryPolicy
from student_client.types import SoftTargets
from tests.reliability.conftest import Launcher, Teacher, assert_same_targets, free_port

BATCH = 16
OPTIONS = TargetOptions(temperature=2.0, tasks=("digit", "loops"))
RETRY = RetryPolicy(max_elapsed_s=60.0)
EPOCH_SECONDS = 120.0


def epoch(images: np.ndarray, count: int) -> list[tuple[np.ndarray, int]]:
    """`count` batches (inputs, label = the batch's number)."""
    return [(images[i * BATCH : (i + 1) * BATCH], i) for i in range(count)]


def references(client: TeacherClient, batches: list[tuple[np.ndarray, int]]) -> list[SoftTargets]:
    return [client.soft_targets_with(inputs, OPTIONS) for inputs, _ in batches]


class Restart:
    """Start a teacher in a thread (the student keeps running meanwhile); `join` re-raises."""

    def __init__(self, launcher: Launcher, **kwargs: Any) -> None:
        self.error: BaseException | None = None
        self.teacher: Teacher | None = None
        self._thread = threading.Thread(target=self._run, args=(launcher, kwargs), daemon=True)
        self._thread.start()

    def _run(self, launcher: Launcher, kwargs: dict[str, Any]) -> None:
        try:
            self.teacher = launcher.start(**kwargs)
        except BaseException as error:  # pytest.fail raises a BaseException subclass
            self.error = error

    def join(self) -> Teacher:
        self._thread.join(timeout=90)
        if self.error is not None:
            raise self.error
        assert self.teacher is not None, "restart did not finish"
        return self.teacher


def run_epoch(
    loader: SoftTargetLoader,
    expected: list[SoftTargets],
    on_batch: Any,
) -> tuple[list[int], list[str]]:
    labels, ids = [], []
    started = time.monotonic()
    for number, (_, label, targets) in enumerate(loader):
        labels.append(label)
        ids.append(targets.batch_id)
        assert_same_targets(targets, expected[label], exact=False)
        on_batch(number)
        assert time.monotonic() - started < EPOCH_SECONDS, "epoch took too long"
    return labels, ids


def test_teacher_killed_and_restarted_on_the_same_ports(
    launcher: Launcher, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    count, kill_after = 60, 20
    grpc_port, http_port = free_port(), free_port()
    first = launcher.start(grpc_port=grpc_port, http_port=http_port)
    batches = epoch(mnist_test_images[0], count)
    restart: list[Restart] = []

    def on_batch(number: int) -> None:
        if number == kill_after:
            first.kill()  # SIGKILL: the stream breaks with batches in flight
            assert first.process.returncode == -9
            restart.append(Restart(launcher, grpc_port=grpc_port, http_port=http_port))

    with TeacherClient(first.grpc_address, retry=RETRY) as client:
        expected = references(client, batches)
        loader = SoftTargetLoader(batches, client, OPTIONS, depth=4)
        labels, ids = run_epoch(loader, expected, on_batch)
    second = restart[0].join()
    assert (second.grpc_port, second.http_port) == (grpc_port, http_port)
    assert second.pid != first.pid and second.process.poll() is None

    assert labels == list(range(count)), "every batch exactly once, in order"
    assert len(set(ids)) == count
    stats = loader.stats
    assert (stats.sent, stats.received, stats.yielded) == (count, count, count), stats
    assert stats.reconnects >= 1, stats
    assert stats.samples == count * BATCH


def test_one_of_two_replicas_killed_mid_epoch(
    launcher: Launcher, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    count, kill_after = 40, 10
    a, b = launcher.start_many((), ())
    batches = epoch(mnist_test_images[0], count)
    killed: list[Teacher] = []

    def on_batch(number: int) -> None:
        if number == kill_after:
            a.kill()
            killed.append(a)

    with TeacherClient(f"{a.grpc_address},{b.grpc_address}", retry=RETRY) as client:
        assert client.replicas == 2
        # Computing the references through both replicas also connects the channel to both,
        # so the loader's two streams (one per replica) land on different teachers.
        expected = references(client, batches)
        loader = SoftTargetLoader(batches, client, OPTIONS, depth=4)
        assert loader.streams == 2
        labels, ids = run_epoch(loader, expected, on_batch)
    assert killed and a.process.returncode == -9
    assert b.process.poll() is None, "the surviving replica still serves"

    assert labels == list(range(count))
    assert len(set(ids)) == count
    stats = loader.stats
    assert (stats.sent, stats.received, stats.yielded) == (count, count, count), stats
    assert stats.reconnects >= 1, stats


pytestmark = pytest.mark.timeout(240)
