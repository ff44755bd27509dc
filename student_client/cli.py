"""`student-client`: run the quickstart demo, inspect a teacher, or fetch soft targets."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from student_client.demo import DemoSettings, run_demo


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
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="student-client", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _demo_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(
            DemoSettings(
                epochs=args.epochs,
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
                out=args.out,
                progress=not args.no_progress,
            )
        )


if __name__ == "__main__":
    main()
