"""The ceiling of Python gRPC on this machine: a bidirectional-stream echo, no work at all.

    python -m bench.grpc_echo [--messages 20000] [--duration 10] [--json out.json]

A `grpc.aio` server (its own process, 127.0.0.1, an ephemeral port) answers every message of
one bidirectional stream with the same bytes; the client (a sync stub, as `TeacherClient` uses)
keeps 1, 16 or 64 messages in flight, for payloads of 16 bytes and of 3,000 bytes (about one
float32 MNIST image). Reported: messages per second. Any soft-target service written with Python
gRPC, ours or KServe's `ModelServer`, pays at least this per message on the same cores, before
parsing a request, running a model or encoding an answer: at batch 1 it bounds samples/s.

Each cell is bounded by `--messages` and by `--duration` seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.common import machine_summary, print_table, write_json

METHOD = "/bench.Echo/Stream"
PAYLOADS = (16, 3000)
IN_FLIGHT = (1, 16, 64)


def _serve(ports: Any) -> None:
    """The echo server's process: report the port, then serve until terminated."""

    async def main() -> None:
        server = grpc.aio.server()

        async def echo(requests: AsyncIterator[bytes], _: Any) -> AsyncIterator[bytes]:
            async for message in requests:
                yield message

        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(echo)}
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ports.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def time_cell(
    stub: grpc.StreamStreamMultiCallable, size: int, in_flight: int, messages: int, duration: float
) -> tuple[int, float]:
    """(messages echoed, seconds) for one stream with `in_flight` messages outstanding."""
    payload = b"x" * size
    window = threading.Semaphore(in_flight)
    deadline = time.perf_counter() + duration

    def requests() -> Iterator[bytes]:
        for _ in range(messages):
            window.acquire()
            if time.perf_counter() > deadline:
                return
            yield payload

    count, started = 0, time.perf_counter()
    for _ in stub(requests()):
        window.release()
        count += 1
    return count, time.perf_counter() - started


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.grpc_echo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--messages", type=int, default=20_000, help="most messages per cell")
    parser.add_argument("--duration", type=float, default=10.0, help="most seconds per cell")
    parser.add_argument("--json", type=Path, help="write every number to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_summary()
    print(f"machine: {machine}")
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    server = context.Process(target=_serve, args=(ports,), daemon=True)
    server.start()
    rows, cells = [], []
    try:
        port = ports.get(timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = channel.stream_stream(METHOD)
            time_cell(stub, 16, 16, 2000, 5.0)  # warm-up
            for size in PAYLOADS:
                for in_flight in IN_FLIGHT:
                    count, seconds = time_cell(stub, size, in_flight, args.messages, args.duration)
                    rate = count / seconds
                    rows.append([size, in_flight, count, rate])
                    cells.append(
                        {
                            "payload_bytes": size,
                            "in_flight": in_flight,
                            "messages": count,
                            "seconds": round(seconds, 4),
                            "messages_per_s": round(rate, 1),
                        }
                    )
    finally:
        server.terminate()
        server.join(timeout=10)
    print_table(
        "Python gRPC bidirectional-stream echo (grpc.aio server, sync client, one stream)",
        ["payload bytes", "in flight", "messages", "messages/s"],
        rows,
    )
    if args.json:
        write_json(args.json, {"machine": machine, "cells": cells})


if __name__ == "__main__":
    main()
