"""A sequence teacher killed with SIGKILL in the middle of a `TokenTargetLoader` epoch and
restarted on the same ports: every batch is labelled exactly once, in order, with the teacher's
answer for it, and the version pin (the restarted teacher serves the same files, hence the same
version) holds across the restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from student_client import TargetOptions, TeacherClient
from student_client.online.retry import RetryPolicy
from student_client.online.token_loader import TokenTargetLoader
from student_client.types import TokenBatch
from tests.reliability.conftest import Launcher, Teacher, free_port
from tests.student_client.test_token_loader import MODEL, random_batches

OPTIONS = TargetOptions(model=MODEL, tasks=("next_token", "topic_group"), top_k=3)
EPOCH_SECONDS = 120.0


@pytest.fixture
def sequence_launcher(sequence_repository: Path, tmp_path: Path) -> Iterator[Launcher]:
    pool = Launcher(sequence_repository, tmp_path)
    try:
        yield pool
    finally:
        pool.close()


def test_sequence_teacher_killed_and_restarted_mid_epoch(
    sequence_launcher: Launcher, sequence_repository: Path
) -> None:
    count, kill_after = 30, 8
    grpc_port, http_port = free_port(), free_port()
    first = sequence_launcher.start(grpc_port=grpc_port, http_port=http_port)
    restarted: list[Teacher] = []
    errors: list[BaseException] = []

    def restart() -> None:
        try:
            restarted.append(sequence_launcher.start(grpc_port=grpc_port, http_port=http_port))
        except BaseException as error:  # pytest.fail raises a BaseException subclass
            errors.append(error)

    thread = threading.Thread(target=restart, daemon=True)
    with TeacherClient(first.grpc_address, retry=RetryPolicy(max_elapsed_s=60.0)) as client:
        info = client.model_info(MODEL)
        batches = random_batches(info, count, seed=5)
        expected = [
            client.soft_targets_with(TokenBatch(ids, lengths), OPTIONS)
            for ids, lengths, _ in batches
        ]
        loader = TokenTargetLoader(
            batches,
            client,
            OPTIONS,
            tokenizer_file=sequence_repository / MODEL / "tokenizer.json",
            depth=4,
        )
        labels, ids, started = [], [], time.monotonic()
        for number, (_, label, targets) in enumerate(loader):
            labels.append(label)
            ids.append(targets.batch_id)
            assert targets.model_version == info.model_version  # pinned across the restart
            for task in OPTIONS.tasks:
                np.testing.assert_allclose(
                    targets.outputs[task].values, expected[label].outputs[task].values, atol=1e-3
                )
            if number == kill_after:
                first.kill()  # SIGKILL: the stream breaks with batches in flight
                assert first.process.returncode == -9
                thread.start()  # the student keeps going meanwhile
            assert time.monotonic() - started < EPOCH_SECONDS, "epoch took too long"
    thread.join(timeout=90)
    if errors:
        raise errors[0]
    assert restarted and restarted[0].pid != first.pid

    assert labels == list(range(count)), "every batch exactly once, in order"
    assert len(set(ids)) == count
    stats = loader.stats
    assert (stats.sent, stats.received, stats.yielded) == (count, count, count), stats
    assert stats.reconnects >= 1, stats
    assert loader.info is not None and loader.info.model_version == info.model_version


pytestmark = pytest.mark.timeout(240)
