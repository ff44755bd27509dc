"""`teacher-server`: serve the model repository, or train the default teacher into it."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from teacher_server.settings import Settings


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` flag per settings field; unset flags fall back to TEACHER_* / defaults."""
    for name, field in Settings.model_fields.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            help=f"{field.description or name} (env TEACHER_{name.upper()}; default {field.default!r})",
        )


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)
    }
    if "allowed_architectures" in overrides:
        overrides["allowed_architectures"] = tuple(overrides["allowed_architectures"].split(","))
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="teacher-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve soft targets over gRPC and HTTP")
    _add_settings_flags(serve_parser)
    train_parser = commands.add_parser(
        "train-default", help="train the default MNIST multi-task teacher into a folder"
    )
    train_parser.add_argument("--out", type=Path, default=Path("model_repository/mnist-multitask"))
    train_parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args(argv)

    if args.command == "serve":
        settings = _settings(args)
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        from teacher_server.server import serve

        asyncio.run(serve(settings))
    else:
        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from teacher_server.default_teacher import train_default_teacher

        train_default_teacher(args.out, epochs=args.epochs)


if __name__ == "__main__":
    main()
