"""One student trained on several processes by `torchrun`, each streaming its own shard.

    torchrun --standalone --nproc_per_node=2 examples/torchrun_student.py \\
        --teacher 127.0.0.1:50051 --epochs 2 --n-train 1024 --seed 0 --out result.json

Every rank opens its own `TeacherClient` and `SoftTargetLoader` and streams its shard of each
epoch (`DistributedSampler` order, `drop_last`: see `student_client.training.distributed`);
`DistributedDataParallel` (gloo) averages the gradients; the held-out accuracy is counted over
all ranks. The global batch (`--batch-size`) is split over the ranks, so a run with any number
of processes takes the steps of a one-process run with the same seed. Rank 0 writes `--out`:
the accuracy per epoch, and the indices of the samples each rank had labelled in each epoch.
Run without torchrun, it trains on one process.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from student_client import SoftTargetLoader, TargetOptions, TeacherClient
from student_client.training.datasets import mnist_multitask
from student_client.training.distributed import (
    destroy_process_group,
    evaluate_sharded,
    gather_objects,
    init_process_group,
    per_rank_batch_size,
    process_place,
    shard_indices,
    wait_for_every_rank,
    wrap_model,
)
from student_client.training.losses import MultiTaskKDLoss
from student_client.training.models import StudentMLP
from student_client.training.trainer import Batch, distillation_loss, fit


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", required=True, help="the teacher's gRPC address(es)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=None, help="first n training images")
    parser.add_argument("--seed", type=int, default=0, help="weights and shard order")
    parser.add_argument("--batch-size", type=int, default=64, help="global, over all ranks")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None, help="result JSON, written by rank 0")
    args = parser.parse_args(argv)

    place = process_place()
    torch.set_num_threads(1)  # one core per rank; torchrun's ranks share the machine
    init_process_group(place)
    try:
        data = mnist_multitask(args.n_train)
        batch_size = per_rank_batch_size(args.batch_size, place)
        torch.manual_seed(args.seed)  # DDP also broadcasts rank 0's initial weights
        model = wrap_model(StudentMLP((1, 28, 28), data.tasks, (args.hidden,)), place)
        kd = MultiTaskKDLoss(alpha=args.alpha, temperature=args.temperature)
        options = TargetOptions(temperature=args.temperature)
        labelled: list[list[int]] = []  # per epoch: this rank's samples, as labelled
        loader_stats: list[dict[str, int]] = []

        with TeacherClient(args.teacher) as client:

            def epoch_batches(epoch: int) -> Iterator[Batch]:
                order = shard_indices(len(data.train_x), place, epoch, args.seed)
                chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
                batches = [
                    (
                        torch.from_numpy(data.train_x[chunk]),
                        {t: torch.from_numpy(y[chunk]) for t, y in data.train_y.items()},
                    )
                    for chunk in chunks
                ]
                loader = SoftTargetLoader(batches, client, options, input_dtype="uint8")
                seen: list[int] = []
                # The loader yields in the order of `batches`: answer k is for `chunks[k]`.
                for chunk, (inputs, labels, targets) in zip(chunks, loader, strict=True):
                    if targets.batch_size != len(chunk):
                        raise RuntimeError(
                            f"epoch {epoch}: {targets.batch_size} rows for {len(chunk)} samples"
                        )
                    seen.extend(int(i) for i in chunk)
                    yield inputs, labels, targets
                labelled.append(seen)
                stats = loader.stats
                loader_stats.append(
                    {"sent": stats.sent, "samples": stats.samples, "resent": stats.resent}
                )

            history = fit(
                model,
                epoch_batches,
                distillation_loss(kd),
                args.epochs,
                lambda m: evaluate_sharded(m, data.test_x, data.test_y, place),
                lr=args.lr,
                description=f"rank {place.rank}/{place.world_size}",
                progress=place.is_main,
            )
        every_rank = gather_objects({"labelled": labelled, "loader": loader_stats}, place)
        result = {
            "world_size": place.world_size,
            "seed": args.seed,
            "epochs": args.epochs,
            "n_train": len(data.train_x),
            "batch_size": args.batch_size,
            "accuracy": history[-1].accuracy,
            "history": [
                {"epoch": r.epoch, "rank0_loss": r.loss, "accuracy": r.accuracy} for r in history
            ],
            "ranks": every_rank,  # per rank: labelled indices and loader counters, per epoch
        }
        if place.is_main and args.out is not None:
            args.out.write_text(json.dumps(result))
        if place.is_main:
            cells = ", ".join(f"{task} {100 * v:.2f}" for task, v in result["accuracy"].items())
            print(f"{place.world_size} process(es), {args.epochs} epoch(s): held-out % {cells}")
        wait_for_every_rank()  # only on success: a failed rank would leave the others waiting
        return result
    finally:
        destroy_process_group()


if __name__ == "__main__":
    main()
