"""One request at a time with an unmodified `tritonclient`, run as a subprocess in the KServe venv.

    bench/.venv-kserve/bin/python -m bench.kserve_tritonclient \
        --server ours=127.0.0.1:HTTP_PORT,127.0.0.1:GRPC_PORT \
        --server kserve=127.0.0.1:HTTP_PORT,127.0.0.1:GRPC_PORT \
        --model NAME --inputs batch.npy --batch-sizes 1,32,256 --rounds 2

What a user with a Triton/KServe client does: `tritonclient.grpc` (v2 gRPC), `tritonclient.http`
with JSON tensors (v2 REST JSON) and with the binary tensor data extension (v2 REST binary), one
request in flight, each answer decoded to numpy (`as_numpy` of every output). The same script
measures every `--server` given, cell by cell: for each round, batch size and protocol, each
server in turn (the order reversed every other round), so a shared machine's drifts hit both
alike. Request parameter `temperature` is sent as the integer 4 (int64 over gRPC), which both
servers read as T = 4. Prints one JSON object: [per round {server: {cell: {batch_size:
{"latencies_s": [...], "samples": n, "seconds": s}}}}].

It runs in the KServe venv because `tritonclient[grpc]` pins protobuf below 7 while the project's
generated code needs 7; it imports no kserve module (KServe's and tritonclient's `inference.*`
protobuf modules cannot share a process).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from bench.sequential_timing import time_sequential

TEMPERATURE = 4  # an integer: int64_param over gRPC, which both servers accept
MAX_MESSAGE = 256 * 1024 * 1024


def grpc_call(client: triton_grpc.InferenceServerClient, model: str) -> Callable[[np.ndarray], Any]:
    def call(batch: np.ndarray) -> dict[str, np.ndarray]:
        tensor = triton_grpc.InferInput("inputs", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        result = client.infer(model, [tensor], parameters={"temperature": TEMPERATURE})
        return {out.name: result.as_numpy(out.name) for out in result.get_response().outputs}

    return call


def http_call(
    client: triton_http.InferenceServerClient, model: str, binary: bool
) -> Callable[[np.ndarray], Any]:
    def call(batch: np.ndarray) -> dict[str, np.ndarray]:
        tensor = triton_http.InferInput("inputs", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        # JSON: ask for JSON outputs too (no outputs named would default to binary ones)
        result = client.infer(
            model,
            [tensor],
            outputs=None if binary else json_outputs(client, model),
            parameters={"temperature": TEMPERATURE},
            # tritonclient sends no content type; KServe's route reads a body without one as
            # bytes (the binary extension) and refuses it, so a JSON body says it is JSON
            headers=None if binary else {"Content-Type": "application/json"},
        )
        return {
            out["name"]: result.as_numpy(out["name"]) for out in result.get_response()["outputs"]
        }

    return call


_OUTPUTS: dict[str, list[triton_http.InferRequestedOutput]] = {}


def json_outputs(
    client: triton_http.InferenceServerClient, model: str
) -> list[triton_http.InferRequestedOutput]:
    """Every output of `model`, requested as JSON (read once from the model's metadata)."""
    if model not in _OUTPUTS:
        names = [out["name"] for out in client.get_model_metadata(model)["outputs"]]
        _OUTPUTS[model] = [triton_http.InferRequestedOutput(n, binary_data=False) for n in names]
    return _OUTPUTS[model]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--server",
        action="append",
        required=True,
        help="NAME=HTTP_HOST:PORT,GRPC_HOST:PORT (repeat: measured in turn, cell by cell)",
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", required=True, help=".npy of samples (n, *input_shape)")
    parser.add_argument("--batch-sizes", default="1,32,256")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--max-calls", type=int, default=20_000)
    args = parser.parse_args()
    samples = np.load(args.inputs).astype(np.float32)
    servers: dict[str, dict[str, Callable[[np.ndarray], Any]]] = {}
    clients: list[Any] = []
    for spec in args.server:
        name, _, addresses = spec.partition("=")
        http_address, grpc_address = addresses.split(",")
        grpc_client = triton_grpc.InferenceServerClient(grpc_address)
        http_client = triton_http.InferenceServerClient(http_address)
        clients += [grpc_client, http_client]
        servers[name] = {
            "v2_grpc": grpc_call(grpc_client, args.model),
            "v2_rest_json": http_call(http_client, args.model, binary=False),
            "v2_rest_binary": http_call(http_client, args.model, binary=True),
        }
    rounds: list[dict[str, dict[str, dict[int, Any]]]] = []
    for index in range(args.rounds):
        order = list(servers) if index % 2 == 0 else list(reversed(servers))
        results: dict[str, dict[str, dict[int, Any]]] = {
            name: {cell: {} for cell in cells} for name, cells in servers.items()
        }
        for size in (int(s) for s in args.batch_sizes.split(",")):
            index_rows = np.arange(size * 8) % len(samples)
            batches = [np.ascontiguousarray(b) for b in np.split(samples[index_rows], 8)]
            for cell in ("v2_grpc", "v2_rest_json", "v2_rest_binary"):
                for name in order:
                    results[name][cell][size] = time_sequential(servers[name][cell], batches, args)
        rounds.append(results)
    for client in clients:
        client.close()
    print(json.dumps(rounds))


if __name__ == "__main__":
    main()
