"""`teacher-server`: serve the model repository, train a default teacher into it, package one."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
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
    return Settings(**overrides)


def _add_package_parser(commands: Any) -> None:
    package = commands.add_parser(
        "package",
        help="package trained weights as a model version of the repository",
        description="Build ARCHITECTURE(tasks=..., **KWARGS), load WEIGHTS into it, check it, and "
        "write config.json + model.safetensors into OUT (model_repository/NAME or "
        "model_repository/NAME/VERSION); prints the model version. See docs/model-repository.md.",
    )
    package.add_argument("--architecture", required=True, help="import path, pkg.module:Class")
    package.add_argument("--kwargs", default="{}", help="constructor arguments as a JSON object")
    package.add_argument(
        "--weights", type=Path, required=True, help=".safetensors, or .pt/.pth state dict"
    )
    package.add_argument(
        "--task",
        action="append",
        required=True,
        metavar="NAME=CLASS,CLASS,...",
        help="a task and its class names, in head output order (repeat per task)",
    )
    package.add_argument("--input-shape", required=True, help="per-sample shape, e.g. 1,28,28")
    package.add_argument("--input-dtype", default="float32", choices=["float32", "int64"])
    package.add_argument("--uint8-scale", type=float, default=1.0, help="uint8 inputs x this")
    package.add_argument(
        "--hint", action="append", default=[], help="a forward_features() entry to serve"
    )
    package.add_argument("--max-value", type=int, help="token models: ids must be below this")
    package.add_argument("--description", default="")
    package.add_argument(
        "--out", type=Path, required=True, help="model_repository/NAME or model_repository/NAME/N"
    )
    package.add_argument(
        "--name", help="model name (default: the model folder's name, NAME in --out)"
    )
    package.add_argument(
        "--allow-architecture-prefix",
        action="append",
        default=[],
        help="also allow architectures under this import prefix (besides "
        "TEACHER_ALLOWED_ARCHITECTURES or its default teacher_server.models.)",
    )
    package.add_argument("--overwrite", action="store_true", help="replace an existing OUT")


def _environment_settings() -> Settings:
    """The settings from `TEACHER_*` variables and defaults alone, as the server reads them."""
    environment: dict[str, Any] = {}
    return Settings(**environment)


def _package(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from teacher_server.repository.model_config import ModelLoadError
    from teacher_server.repository.package import package_command

    try:
        version = package_command(
            architecture=args.architecture,
            kwargs_json=args.kwargs,
            weights=args.weights,
            tasks=args.task,
            input_shape=args.input_shape,
            out=args.out,
            input_dtype=args.input_dtype,
            uint8_scale=args.uint8_scale,
            hints=args.hint,
            max_value=args.max_value,
            description=args.description,
            name=args.name,
            server_prefixes=_environment_settings().allowed_architectures,
            allow_architecture_prefixes=args.allow_architecture_prefix,
            overwrite=args.overwrite,
        )
    except (ValueError, ModelLoadError, OSError) as error:
        parser.exit(2, f"teacher-server package: error: {error}\n")
    print(version)


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
    sequence_parser = commands.add_parser(
        "train-default-sequence",
        help="train the default sequence teacher (a causal transformer on the Python docs)",
    )
    sequence_parser.add_argument(
        "--out", type=Path, default=Path("model_repository/pydoc-causal-lm")
    )
    sequence_parser.add_argument("--seed", type=int, default=0)
    sequence_parser.add_argument(
        "--small", action="store_true", help="a tiny model in seconds (for tests)"
    )
    sequence_parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="lower this process's CPU priority by N first (the server's background training: 10)",
    )
    _add_package_parser(commands)
    args = parser.parse_args(argv)

    if args.command == "serve":
        settings = _settings(args)
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        from teacher_server.server import serve

        asyncio.run(serve(settings))
    elif args.command == "package":
        _package(parser, args)
    elif args.command == "train-default-sequence":
        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from teacher_server.repository.default_sequence_teacher import (
            train_default_sequence_teacher,
        )

        if args.nice:
            os.nice(args.nice)
        train_default_sequence_teacher(args.out, small=args.small, seed=args.seed)
    else:
        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from teacher_server.repository.default_teacher import train_default_teacher

        train_default_teacher(args.out, epochs=args.epochs)


if __name__ == "__main__":
    main()
