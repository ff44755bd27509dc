"""Load client for the KServe teacher, run as a subprocess in the KServe venv.

    bench/.venv-kserve/bin/python -m bench.kserve_client --http-url http://127.0.0.1:PORT \
        --grpc-address 127.0.0.1:PORT --model NAME --inputs batch.npy --batch-sizes 1,256

Measures, per batch size: v2 REST JSON (httpx, one request in flight), v2 gRPC with
`raw_input_contents` (KServe's own generated stubs, one in flight) and v2 gRPC with
`--in-flight` requests outstanding (futures). Each answer is decoded into numpy arrays, as our
client does. Prints one JSON object: {cell: {batch_size: {"latencies_s": [...], "samples": n,
"seconds": s}}}. Self-contained on purpose: this venv has protobuf 6 and cannot import the
project's protocol package (protobuf 7 gencode), nor may KServe's and tritonclient's gRPC modules
share a process.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import numpy as np
from kserve.protocol.grpc import grpc_predict_v2_pb2 as v2
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as v2_grpc

from bench.sequential_timing import time_sequential

MAX_MESSAGE = 256 * 1024 * 1024


def rest_call(client: httpx.Client, model: str, temperature: float) -> Callable[[np.ndarray], Any]:
    """One v2 REST JSON inference per call; returns {output name: array}."""

    def call(batch: np.ndarray) -> dict[str, np.ndarray]:
        body = {
            "inputs": [
                {
                    "name": "inputs",
                    "shape": list(batch.shape),
                    "datatype": "FP32",
                    "data": batch.ravel().tolist(),
                }
            ],
            "parameters": {"temperature": temperature},
        }
        response = client.post(f"/v2/models/{model}/infer", json=body)
        response.raise_for_status()
        return {
            out["name"]: np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
            for out in response.json()["outputs"]
        }

    return call


def grpc_request(model: str, batch: np.ndarray, temperature: float) -> v2.ModelInferRequest:
    return v2.ModelInferRequest(
        model_name=model,
        inputs=[
            v2.ModelInferRequest.InferInputTensor(
                name="inputs", datatype="FP32", shape=list(batch.shape)
            )
        ],
        raw_input_contents=[np.ascontiguousarray(batch, dtype=np.float32).tobytes()],
        parameters={"temperature": v2.InferParameter(string_param=repr(float(temperature)))},
    )


def grpc_decode(response: v2.ModelInferResponse) -> dict[str, np.ndarray]:
    return {
        out.name: np.frombuffer(raw, dtype=np.float32).reshape(list(out.shape))
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def time_in_flight(
    stub: v2_grpc.GRPCInferenceServiceStub,
    model: str,
    batches: list[np.ndarray],
    args: argparse.Namespace,
    seconds: float,
) -> dict[str, Any]:
    """`args.in_flight` gRPC requests outstanding (answers taken in send order), then drained."""
    window: collections.deque[tuple[float, Any]] = collections.deque()
    latencies, samples, index = [], 0, 0
    start = time.perf_counter()

    def send() -> None:
        nonlocal index
        request = grpc_request(model, batches[index % len(batches)], args.temperature)
        window.append((time.perf_counter(), stub.ModelInfer.future(request, timeout=60)))
        index += 1

    for _ in range(args.in_flight):
        send()
    while window:
        sent, future = window.popleft()
        grpc_decode(future.result())
        now = time.perf_counter()
        latencies.append(now - sent)
        samples += len(batches[0])
        if now - start < seconds and index < args.max_calls:
            send()
    return {"latencies_s": latencies, "samples": samples, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http-url", required=True)
    parser.add_argument("--grpc-address", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", required=True, help=".npy of samples (n, *input_shape)")
    parser.add_argument("--batch-sizes", default="1,256")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--max-calls", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=16)
    args = parser.parse_args()
    samples = np.load(args.inputs).astype(np.float32)
    results: dict[str, dict[int, Any]] = {"rest_json": {}, "grpc": {}, "grpc_in_flight": {}}
    channel = grpc.insecure_channel(
        args.grpc_address,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    stub = v2_grpc.GRPCInferenceServiceStub(channel)
    with httpx.Client(base_url=args.http_url, timeout=60) as http:
        for size in (int(s) for s in args.batch_sizes.split(",")):
            index = np.arange(size * 8) % len(samples)
            batches = [np.ascontiguousarray(b) for b in np.split(samples[index], 8)]
            results["rest_json"][size] = time_sequential(
                rest_call(http, args.model, args.temperature), batches, args
            )
            unary = lambda b: grpc_decode(  # noqa: E731
                stub.ModelInfer(grpc_request(args.model, b, args.temperature), timeout=60)
            )
            results["grpc"][size] = time_sequential(unary, batches, args)
            time_in_flight(stub, args.model, batches, args, args.warmup)
            results["grpc_in_flight"][size] = time_in_flight(
                stub, args.model, batches, args, args.duration
            )
    channel.close()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
