"""The floor of one-request-at-a-time serving: a server that does no work, answering every request
with the bytes a real teacher once answered to a request of the same shape.

    python -m bench.replay_server --upstream-grpc 127.0.0.1:GRPC --upstream-http http://127.0.0.1:HTTP \
        --port-file ports.json

A benchmark client that measures it (bench.throughput's section f, with the same `tritonclient`
script as our server and KServe, in the same run) measures what Python gRPC / HTTP, the loopback
network and the client itself cost on this machine: the latency no model server in Python can go
below, and so the highest samples/s ratio over KServe that any server could show. The first
request of each kind (method, path and body size) is forwarded to the upstream teacher and its
answer kept (the warm-up sends it); every later one is answered from memory without reading the
request. gRPC unary calls (any method) and HTTP requests (any path) are replayed; streams are
not. The answers are exact for the benchmark's requests (same model, tasks and temperature per
body size) and meaningless for anything else: a measuring tool, never a teacher.

The gRPC side is a `grpc.aio` server with one generic handler and no interceptors; the HTTP side a
bare ASGI callable under uvicorn (no routing framework); both on one event loop, as a Python model
server runs them. Prints nothing until it writes `--port-file` ({"grpc_port", "http_port"}).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import uvicorn

MAX_MESSAGE = 256 * 1024 * 1024
# Headers of an upstream HTTP answer that are replayed (the rest, e.g. date and server, are not).
REPLAYED_HEADERS = ("content-type", "inference-header-content-length")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class GrpcReplay(grpc.GenericRpcHandler):
    """Every unary method: the upstream's answer to the first request of each body size."""

    def __init__(self, upstream: grpc.aio.Channel) -> None:
        self._upstream = upstream
        self._answers: dict[tuple[str, int], bytes] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        metadata = tuple(handler_call_details.invocation_metadata or ())  # type: ignore[attr-defined]

        async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            key = (method, len(request))
            kept = self._answers.get(key)
            if kept is None:
                call = self._upstream.unary_unary(method)  # bytes in, bytes out
                kept = await call(request, metadata=metadata, timeout=60)
                self._answers[key] = kept
            return kept

        return grpc.unary_unary_rpc_method_handler(answer)  # type: ignore[arg-type]


class HttpReplay:
    """A bare ASGI app: the upstream's answer to the first request of each (method, path, body
    size), replayed with its status, content type and inference header length."""

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream
        self._client: httpx.AsyncClient | None = None
        self._answers: dict[tuple[str, str, int], tuple[int, list[tuple[bytes, bytes]], bytes]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
            if self._client is not None:
                await self._client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        key = (scope["method"], scope["path"], len(body))
        kept = self._answers.get(key)
        if kept is None:
            kept = await self._forward(scope, body)
            self._answers[key] = kept
        status, headers, content = kept
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def _forward(
        self, scope: dict[str, Any], body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self._upstream, timeout=60)
        headers = {
            name.decode(): value.decode()
            for name, value in scope["headers"]
            if name.decode().lower() in (*REPLAYED_HEADERS, "authorization")
        }
        url = scope["path"] + (
            f"?{scope['query_string'].decode()}" if scope["query_string"] else ""
        )
        response = await self._client.request(scope["method"], url, content=body, headers=headers)
        kept = [
            (name.encode(), response.headers[name].encode())
            for name in REPLAYED_HEADERS
            if name in response.headers
        ]
        kept.append((b"content-length", str(len(response.content)).encode()))
        return response.status_code, kept, response.content


async def serve(upstream_grpc: str, upstream_http: str, port_file: Path) -> None:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]
    upstream = grpc.aio.insecure_channel(upstream_grpc, options=options)
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((GrpcReplay(upstream),))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # IPPROTO_TCP explicitly, as the teacher does: asyncio sets TCP_NODELAY only on such sockets.
    http_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    http_socket.bind(("127.0.0.1", 0))
    http_port = http_socket.getsockname()[1]
    http = uvicorn.Server(uvicorn.Config(HttpReplay(upstream_http), log_level="warning"))
    http_task = asyncio.create_task(http.serve(sockets=[http_socket]))
    while not http.started:
        if http_task.done():
            await http_task
        await asyncio.sleep(0.01)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"grpc_port": grpc_port, "http_port": http_port}))
    tmp.replace(port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    http.should_exit = True
    await server.stop(1.0)
    await http_task
    await upstream.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream-grpc", required=True, help="HOST:PORT of the real teacher")
    parser.add_argument("--upstream-http", required=True, help="http://HOST:PORT of the same")
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.upstream_grpc, args.upstream_http, args.port_file))


if __name__ == "__main__":
    main()
