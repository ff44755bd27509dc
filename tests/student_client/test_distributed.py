"""The pure parts of `training/distributed.py`: places from the environment, shards per rank and
epoch, the batch split and evaluation in a world of one (two processes: tests/e2e/test_torchrun)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from student_client.training.distributed import (
    ProcessPlace,
    evaluate_sharded,
    per_rank_batch_size,
    process_place,
    shard_indices,
)
from student_client.training.models import StudentMLP
from student_client.training.trainer import evaluate


def test_place_comes_from_torchrun_environment_or_defaults_to_one_process() -> None:
    assert process_place({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == ProcessPlace(
        1, 2, 1
    )
    assert process_place({}) == ProcessPlace(0, 1, 0)
    assert process_place({}).is_main
    with pytest.raises(ValueError, match="RANK"):
        process_place({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("n", [1024, 1001, 7])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_are_disjoint_and_drop_only_the_uneven_tail(n: int, world_size: int) -> None:
    for epoch in (1, 2):
        shards = [
            shard_indices(n, ProcessPlace(rank, world_size, rank), epoch, seed=5)
            for rank in range(world_size)
        ]
        every = np.concatenate(shards)
        assert [len(shard) for shard in shards] == [n // world_size] * world_size
        assert len(set(every.tolist())) == len(every) == (n // world_size) * world_size
        assert every.min() >= 0 and every.max() < n
        for rank, shard in enumerate(shards):  # DistributedSampler's own order, drop_last
            sampler: DistributedSampler[int] = DistributedSampler(
                range(n),  # type: ignore[arg-type]
                num_replicas=world_size,
                rank=rank,
                shuffle=True,
                seed=5,
                drop_last=True,
            )
            sampler.set_epoch(epoch)
            assert shard.tolist() == list(sampler)


def test_each_epoch_has_its_own_order_shared_by_the_ranks() -> None:
    place = ProcessPlace(0, 2, 0)
    assert shard_indices(100, place, 1, seed=0).tolist() == shard_indices(100, place, 1, 0).tolist()
    assert shard_indices(100, place, 1, seed=0).tolist() != shard_indices(100, place, 2, 0).tolist()


def test_a_step_of_all_ranks_holds_the_samples_of_one_process_step() -> None:
    n, global_batch = 256, 64
    one = shard_indices(n, ProcessPlace(0, 1, 0), 3, seed=1)
    places = [ProcessPlace(rank, 2, rank) for rank in range(2)]
    half = per_rank_batch_size(global_batch, places[0])
    shards = [shard_indices(n, place, 3, seed=1) for place in places]
    for step in range(n // global_batch):
        together = {int(i) for shard in shards for i in shard[step * half : (step + 1) * half]}
        assert together == set(one[step * global_batch : (step + 1) * global_batch].tolist())


def test_a_global_batch_that_does_not_split_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size: 65 does not split over 2"):
        per_rank_batch_size(65, ProcessPlace(0, 2, 0))


def test_evaluation_in_a_world_of_one_is_the_trainers() -> None:
    torch.manual_seed(0)
    model = StudentMLP((1, 4, 4), {"a": 3, "b": 2}, (8,))
    images = np.random.default_rng(0).random((50, 1, 4, 4), dtype=np.float32)
    labels = {"a": np.arange(50) % 3, "b": np.arange(50) % 2}
    place = ProcessPlace(0, 1, 0)
    assert evaluate_sharded(model, images, labels, place, batch_size=7) == evaluate(
        model, images, labels
    )
    assert model.training  # left as it was
