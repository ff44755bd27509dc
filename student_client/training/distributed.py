"""Training one student on several processes (`torchrun`): ranks, shards, the process group.

Each process streams its own shard of every epoch from the teacher (its own `TeacherClient` and
`SoftTargetLoader`); `DistributedDataParallel` averages the gradients. The shards follow
`torch.utils.data.DistributedSampler` with `drop_last=True`: one seeded permutation per epoch,
shared by every rank, cut to a multiple of the world size, dealt out round-robin. So no sample
is in two shards, and an epoch labels `(n // world_size) * world_size` samples: the up to
`world_size - 1` left over (a different few each epoch) are skipped, never padded with repeats
that the teacher would label twice.

With a per-rank batch of `global_batch // world_size`, step k of every rank holds positions
`[k * global_batch, (k + 1) * global_batch)` of the epoch's permutation: the same samples as step
k of one process with `global_batch`, so the averaged gradient is that process's gradient (the
losses are batch means and every rank's batch has the same size) up to float rounding.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler


@dataclass(frozen=True)
class ProcessPlace:
    """Where this process stands: `rank` in [0, `world_size`), as `torchrun` sets them in
    `RANK`, `WORLD_SIZE` and `LOCAL_RANK`; 0, 1, 0 when run without it."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes results and logs."""
        return self.rank == 0


def process_place(environ: Mapping[str, str] | None = None) -> ProcessPlace:
    """This process's place, from the environment `torchrun` sets."""
    env = os.environ if environ is None else environ
    rank = int(env.get("RANK", "0"))
    world_size = int(env.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK: expected 0 <= RANK < WORLD_SIZE ({world_size}), got {rank}")
    return ProcessPlace(rank, world_size, int(env.get("LOCAL_RANK", "0")))


def init_process_group(place: ProcessPlace, backend: str = "gloo") -> None:
    """Join the group `torchrun` describes (`MASTER_ADDR`, `MASTER_PORT` in the environment).
    A world of one needs no group: nothing is done."""
    if place.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, rank=place.rank, world_size=place.world_size)


def wait_for_every_rank() -> None:
    """A barrier over the group, if one was joined: put it after a run's last collective, so no
    rank starts tearing its group down (and exits) while another still talks to it."""
    if dist.is_initialized():
        dist.barrier()


def destroy_process_group() -> None:
    """Leave the group, if one was joined (safe to call in a `finally`)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_indices(n: int, place: ProcessPlace, epoch: int, seed: int) -> np.ndarray:
    """The indices of `n` samples that `place`'s rank trains on in `epoch`, in order: exactly
    `DistributedSampler(range(n), shuffle=True, seed=seed, drop_last=True)` after
    `set_epoch(epoch)`. Every rank gets `n // world_size` of them, disjoint from the others'."""
    sampler: DistributedSampler[int] = DistributedSampler(
        range(n),  # type: ignore[arg-type]  # a Sequence; the sampler reads only its length
        num_replicas=place.world_size,
        rank=place.rank,
        shuffle=True,
        seed=seed,
        drop_last=True,
    )
    sampler.set_epoch(epoch)
    return np.fromiter(sampler, dtype=np.int64)


def per_rank_batch_size(global_batch_size: int, place: ProcessPlace) -> int:
    """`global_batch_size / world_size`; raises `ValueError` unless it divides evenly (then one
    step of all ranks sees the samples one process's step would)."""
    if global_batch_size % place.world_size:
        raise ValueError(
            f"batch_size: {global_batch_size} does not split over {place.world_size} processes"
        )
    return global_batch_size // place.world_size


def wrap_model(model: nn.Module, place: ProcessPlace) -> nn.Module:
    """`DistributedDataParallel(model)` in a group (rank 0's weights are broadcast to all);
    the model itself in a world of one."""
    if place.world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(model)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The student inside a `DistributedDataParallel` wrapper (its weights, without the
    wrapper's collectives), or `model` itself."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


@torch.inference_mode()
def evaluate_sharded(
    model: nn.Module,
    images: np.ndarray,
    labels: Mapping[str, np.ndarray],
    place: ProcessPlace,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Accuracy per task over all of `images`: each rank scores the images `rank::world_size`
    (every image once, none padded), and the counts are summed over the group, so every rank
    returns the same figures. Every rank must call it (it is a collective)."""
    student = unwrap_model(model)
    was_training = student.training
    student.eval()
    mine = np.arange(place.rank, len(images), place.world_size)
    tasks = list(labels)
    counts = torch.zeros(len(tasks) + 1, dtype=torch.int64)  # correct per task, then images
    for start in range(0, len(mine), batch_size):
        index = mine[start : start + batch_size]
        logits = student(torch.from_numpy(images[index]))
        for number, task in enumerate(tasks):
            predicted = logits[task].argmax(1).numpy()
            counts[number] += int((predicted == labels[task][index]).sum())
        counts[-1] += len(index)
    student.train(was_training)
    if place.world_size > 1:
        dist.all_reduce(counts)
    total = int(counts[-1])
    return {task: int(counts[number]) / total for number, task in enumerate(tasks)}


def gather_objects(value: object, place: ProcessPlace) -> list[object]:
    """Every rank's `value`, in rank order (a collective; `[value]` in a world of one)."""
    if place.world_size == 1:
        return [value]
    gathered: list[object] = [None] * place.world_size
    dist.all_gather_object(gathered, value)
    return gathered
