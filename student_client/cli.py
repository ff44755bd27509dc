"""`student-client`: run the quickstart demo, inspect a teacher, fetch soft targets, or export a
dataset's soft targets to disk for offline training."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

import numpy as np

from student_client.online.client import TeacherClient
from student_client.training.augment import AUGMENTATIONS
from student_client.training.datasets import mnist_multitask
from student_client.training.demo import (
    KD_LOSSES,
    PATIENT_EPOCHS,
    TASK_WEIGHTINGS,
    DemoSettings,
    run_demo,
)
from student_client.training.lm_demo import LMDemoSettings, run_lm_demo
from student_client.types import TargetOptions


def _demo_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    defaults = DemoSettings()
    demo = commands.add_parser(
        "demo",
        help="start a local teacher, train a student on hard labels and distilled, compare",
        description="The quickstart: everything runs on this machine, over loopback gRPC.",
    )
    demo.add_argument(
        "--epochs", type=int, default=defaults.epochs, help="training epochs per student"
    )
    demo.add_argument(
        "--seeds", type=int, default=len(defaults.seeds), help="repeat with seeds 0..N-1"
    )
    demo.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=list(defaults.hidden),
        help="student hidden layer widths",
    )
    demo.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="KD temperature T"
    )
    demo.add_argument("--alpha", type=float, default=defaults.alpha, help="weight of the KD term")
    demo.add_argument("--batch-size", type=int, default=defaults.batch_size)
    demo.add_argument(
        "--n-train", type=int, default=None, help="use only the first N training images"
    )
    demo.add_argument(
        "--depth", type=int, default=defaults.depth, help="batches in flight on the stream"
    )
    demo.add_argument(
        "--repository", type=Path, default=defaults.repository, help="teacher model repository"
    )
    demo.add_argument(
        "--out", type=Path, default=defaults.out, help="folder for the plot and results"
    )
    demo.add_argument(
        "--teacher",
        default=None,
        help="gRPC address (host:port) of a running teacher; default: start one locally",
    )
    demo.add_argument(
        "--token",
        default=os.environ.get("TEACHER_AUTH_TOKEN"),
        help="bearer token for --teacher (default: $TEACHER_AUTH_TOKEN)",
    )
    demo.add_argument(
        "--streams",
        type=int,
        default=None,
        help="streams per pass, spread over replicas by round_robin (default: one per address)",
    )
    demo.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        default=defaults.augment,
        help="augment the distilled student's batches before the teacher sees them (shifts of "
        "up to 2 pixels, mixup, cutmix; mixed batches are pure KD)",
    )
    demo.add_argument(
        "--kd-loss",
        choices=KD_LOSSES,
        default=defaults.kd_loss,
        help="the distilled student's loss per task: Hinton KD, decoupled KD or DIST",
    )
    demo.add_argument(
        "--task-weighting",
        choices=TASK_WEIGHTINGS,
        default=defaults.task_weighting,
        help="fixed task weights of 1, or learned (uncertainty, Kendall et al. 2018)",
    )
    demo.add_argument(
        "--int8",
        action="store_true",
        help="also quantise the distilled student to int8 and report accuracy, size, latency",
    )
    demo.add_argument(
        "--patient",
        action="store_true",
        help=f"the long schedule: {PATIENT_EPOCHS} epochs per student (overrides --epochs; "
        "about 5x the run time)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")


def _demo_lm_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    defaults = LMDemoSettings()
    demo = commands.add_parser(
        "demo-lm",
        help="start a local sequence teacher, train a tiny LM on the text and distilled, compare",
        description="The language-model quickstart: the default sequence teacher (trained into "
        "the repository on first use, about 4 min on 2 cores), a tiny causal LM student trained "
        "on hard next-token labels and distilled from the teacher's top-k over loopback gRPC, "
        "held-out perplexity compared.",
    )
    demo.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs per student")
    demo.add_argument("--seed", type=int, default=defaults.seed, help="students' seed")
    demo.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="KD temperature T"
    )
    demo.add_argument(
        "--top-k", type=int, default=defaults.top_k, help="teacher ids per token (plus the tail)"
    )
    demo.add_argument(
        "--alpha", type=float, default=defaults.alpha, help="weight of the KD term (CE: 1 - alpha)"
    )
    demo.add_argument("--dim", type=int, default=defaults.dim, help="student width")
    demo.add_argument("--layers", type=int, default=defaults.layers, help="student layers")
    demo.add_argument(
        "--heads", type=int, default=defaults.attention_heads, help="student attention heads"
    )
    demo.add_argument("--batch-size", type=int, default=defaults.batch_size, help="windows")
    demo.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate")
    demo.add_argument(
        "--max-train-windows",
        type=int,
        default=None,
        help="use only the first N training windows",
    )
    demo.add_argument(
        "--depth", type=int, default=defaults.depth, help="batches in flight on the stream"
    )
    demo.add_argument(
        "--repository", type=Path, default=defaults.repository, help="teacher model repository"
    )
    demo.add_argument(
        "--small-teacher",
        action="store_true",
        help="if the teacher is missing, train its tiny recipe (seconds; for tests)",
    )
    demo.add_argument(
        "--out", type=Path, default=defaults.out, help="folder for the plot and results"
    )
    demo.add_argument(
        "--teacher",
        default=None,
        help="gRPC address (host:port) of a running sequence teacher; default: start one locally",
    )
    demo.add_argument(
        "--token",
        default=os.environ.get("TEACHER_AUTH_TOKEN"),
        help="bearer token for --teacher (default: $TEACHER_AUTH_TOKEN)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress output")


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--teacher",
        default="127.0.0.1:50051",
        help="teacher address: host:port (gRPC), several comma-separated, or http(s)://host:port",
    )
    parser.add_argument(
        "--transport",
        choices=["grpc", "http", "http-json"],
        default=None,
        help="default: http for http(s):// addresses, else grpc",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("TEACHER_AUTH_TOKEN"),
        help="bearer token (default: $TEACHER_AUTH_TOKEN)",
    )
    parser.add_argument("--tls-ca-file", default=None, help="CA certificate (PEM) to verify TLS")
    parser.add_argument("--model", default=None, help="model name (default: the teacher's first)")


def _client(args: argparse.Namespace) -> TeacherClient:
    transport: Literal["grpc", "http", "http-json"] = args.transport or (
        "http" if args.teacher.startswith("http") else "grpc"
    )
    return TeacherClient(args.teacher, transport, token=args.token, tls_ca_file=args.tls_ca_file)


def _info(args: argparse.Namespace) -> None:
    with _client(args) as client:
        print(f"teacher {client.address}")
        for summary in client.list_models():
            flag = " (default)" if summary.default_version else ""
            state = "ready" if summary.ready else f"NOT READY: {summary.error}"
            print(f"  {summary.name} {summary.model_version[:23]} {summary.label}{flag}: {state}")
        info = client.model_info(args.model)
        print(f"\nmodel {info.name}, version {info.model_version}")
        if info.description:
            print(f"  {info.description}")
        print(
            f"  input: shape [N, {', '.join(map(str, info.input_shape))}], dtype {info.input_dtype}"
            f" (accepts {', '.join(info.accepted_input_dtypes)}); max batch {info.max_batch_size}"
        )
        print(f"  parameters: {info.parameter_count:,}")
        for task in info.tasks:
            accuracy = f", held-out accuracy {task.test_accuracy:.4f}" if task.test_accuracy else ""
            names = ", ".join(task.class_names)
            print(f"  task {task.name}: {len(task.class_names)} classes ({names}){accuracy}")
        for name, shape in info.hints.items():
            print(f"  hint {name}: per-sample shape {list(shape)}")


def _soft_targets(args: argparse.Namespace) -> None:
    if args.npy is not None:
        inputs = np.load(args.npy, allow_pickle=False)
        labels = None
    else:
        split = mnist_multitask()
        inputs, labels = split.test_x[: args.mnist], split.test_y["digit"][: args.mnist]
    with _client(args) as client:
        info = client.model_info(args.model)
        targets = client.soft_targets(
            inputs, model=args.model, tasks=args.task or (), temperature=args.temperature
        )
    print(f"{info.name} {targets.model_version[:23]}, T={args.temperature:g}, top {args.top}:")
    for row in range(len(inputs)):
        known = f" (digit {labels[row]})" if labels is not None else ""
        print(f"input {row}{known}")
        for task, output in targets.outputs.items():
            names = info.task(task).class_names
            order = np.argsort(output.values[row])[::-1][: args.top]
            cells = "  ".join(f"{names[i]:>6} {output.values[row][i]:.4f}" for i in order)
            print(f"  {task:<10} {cells}")


def _export_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from student_client.online.exporter import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE

    export = commands.add_parser(
        "export",
        help="stream a whole dataset through the teacher and write its soft targets to disk",
        description="Writes safetensors shards and manifest.json into --out; run again with the "
        "same arguments to resume an interrupted export (complete shards are kept). Train from "
        "it with student_client.offline.reader.OfflineSoftTargetLoader, no teacher needed.",
    )
    _connection_arguments(export)
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--dataset", choices=["mnist"], help="mnist: the 4,000-image training split of the demo"
    )
    source.add_argument("--npy", default=None, help="a .npy file of inputs (n, *input_shape)")
    source.add_argument(
        "--tokens",
        default=None,
        help="a sequence teacher's token dataset: an .npz of 'ids' (packed, sum(lengths)) and "
        "'lengths' (n,); needs --tokenizer or --tokenizer-hash; --batch-size counts sequences",
    )
    export.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="--tokens: the tokenizer.json the ids come from",
    )
    export.add_argument(
        "--tokenizer-hash", default=None, help="--tokens: or its 'sha256:<hex>' (as the teacher's)"
    )
    export.add_argument("--out", type=Path, required=True, help="folder for shards and manifest")
    export.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T")
    export.add_argument(
        "--output",
        choices=["probs", "log_probs", "logits"],
        default="probs",
        help="logits with --temperature 1 lets any T be applied later, offline",
    )
    export.add_argument("--top-k", type=int, default=0, help="k largest classes only (0: dense)")
    export.add_argument(
        "--output-dtype", choices=["float32", "float16", "bfloat16"], default="float32"
    )
    export.add_argument("--task", action="append", help="a task to export (repeat); default all")
    export.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"samples per request (default {DEFAULT_BATCH_SIZE}; --tokens: sequences, 32)",
    )
    export.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard file"
    )
    export.add_argument("--depth", type=int, default=16, help="batches in flight")


def _export_options(args: argparse.Namespace) -> TargetOptions:
    """The `TargetOptions` of `student-client export`, images and token sequences alike."""
    return TargetOptions(
        model=args.model,
        tasks=tuple(args.task or ()),
        temperature=args.temperature,
        output=args.output,
        top_k=args.top_k,
        output_dtype=args.output_dtype,
    )


def _export(args: argparse.Namespace) -> None:
    from student_client.online.exporter import DEFAULT_BATCH_SIZE, export_soft_targets

    if args.tokens is not None:
        _export_tokens(args)
        return

    if args.npy is not None:
        inputs = np.load(args.npy, allow_pickle=False)
        name = Path(args.npy).name
    else:
        inputs, name = mnist_multitask().train_x, "mnist-train"
    options = _export_options(args)
    with _client(args) as client:
        result = export_soft_targets(
            client,
            inputs,
            args.out,
            options,
            dataset_name=name,
            batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
            shard_size=args.shard_size,
            depth=args.depth,
            log=lambda message: print(message, flush=True),
        )
    manifest = result.manifest
    teacher = manifest["teacher"]
    print(
        f"{'complete' if result.complete else 'INCOMPLETE'}: {manifest['samples']['written']} of "
        f"{manifest['samples']['total']} samples of {name} from {teacher['model']} "
        f"{teacher['model_version'][:19]}; {len(result.written)} shard(s) written, "
        f"{len(result.kept)} kept; manifest {result.out / 'manifest.json'}"
    )


def _export_tokens(args: argparse.Namespace) -> None:
    from student_client.online.client import file_sha256
    from student_client.online.token_exporter import (
        DEFAULT_TOKEN_BATCH_SIZE,
        export_token_targets,
        load_token_dataset,
    )

    if (args.tokenizer is None) == (args.tokenizer_hash is None):
        raise SystemExit("export --tokens: give one of --tokenizer FILE or --tokenizer-hash HASH")
    tokenizer_hash = args.tokenizer_hash or file_sha256(args.tokenizer.read_bytes())
    dataset = load_token_dataset(args.tokens)
    options = _export_options(args)
    with _client(args) as client:
        result = export_token_targets(
            client,
            dataset,
            args.out,
            options,
            tokenizer_hash,
            dataset_name=Path(args.tokens).name,
            batch_size=args.batch_size or DEFAULT_TOKEN_BATCH_SIZE,
            shard_size=args.shard_size,
            depth=args.depth,
            log=lambda message: print(message, flush=True),
        )
    manifest = result.manifest
    print(
        f"{'complete' if result.complete else 'INCOMPLETE'}: {manifest['samples']['written']} of "
        f"{manifest['samples']['total']} sequences ({manifest['dataset']['tokens']} tokens) from "
        f"{manifest['teacher']['model']}; {len(result.written)} shard(s) written, "
        f"{len(result.kept)} kept; manifest {result.out / 'manifest.json'}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="student-client", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _demo_parser(commands)
    _demo_lm_parser(commands)
    info = commands.add_parser("info", help="list a teacher's models and describe one")
    _connection_arguments(info)
    soft = commands.add_parser(
        "soft-targets", help="print the teacher's top classes per task for a few inputs"
    )
    _connection_arguments(soft)
    source = soft.add_mutually_exclusive_group()
    source.add_argument(
        "--mnist", type=int, default=3, help="use the first N held-out MNIST images (default 3)"
    )
    source.add_argument("--npy", default=None, help="a .npy file of inputs (batch, *input_shape)")
    soft.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T")
    soft.add_argument("--task", action="append", help="a task to show (repeat); default all")
    soft.add_argument("--top", type=int, default=3, help="classes shown per task")
    _export_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "info":
        _info(args)
    elif args.command == "soft-targets":
        _soft_targets(args)
    elif args.command == "export":
        _export(args)
    elif args.command == "demo":
        run_demo(
            DemoSettings(
                epochs=PATIENT_EPOCHS if args.patient else args.epochs,
                seeds=tuple(range(args.seeds)),
                hidden=tuple(args.hidden),
                temperature=args.temperature,
                alpha=args.alpha,
                batch_size=args.batch_size,
                n_train=args.n_train,
                depth=args.depth,
                repository=args.repository,
                teacher=args.teacher,
                token=args.token,
                streams=args.streams,
                out=args.out,
                progress=not args.no_progress,
                augment=args.augment,
                kd_loss=args.kd_loss,
                task_weighting=args.task_weighting,
                int8=args.int8,
            )
        )
    elif args.command == "demo-lm":
        run_lm_demo(
            LMDemoSettings(
                epochs=args.epochs,
                seed=args.seed,
                temperature=args.temperature,
                top_k=args.top_k,
                alpha=args.alpha,
                dim=args.dim,
                layers=args.layers,
                attention_heads=args.heads,
                batch_size=args.batch_size,
                lr=args.lr,
                max_train_windows=args.max_train_windows,
                depth=args.depth,
                repository=args.repository,
                small_teacher=args.small_teacher,
                teacher=args.teacher,
                token=args.token,
                out=args.out,
                progress=not args.no_progress,
            )
        )


if __name__ == "__main__":
    main()
