"""Per-request cost: microseconds per stage, per door and batch size, one request at a time.

    python -m bench.request_cost [--batch-sizes 1,32,256] [--calls 300] [--doors v1-unary,...]
                                 [--device cpu] [--json out.json] [--teacher-arg=--flag=value]

Starts the light teacher (`bench/light_teacher.py`: MLP 64-512-512, three heads; torch at one
thread) with `TEACHER_STAGE_TIMING_FILE` set, so the server stamps each soft-target request's
stages (`teacher_server/serving/stage_timing.py`), and sends `--calls` requests of each batch size
to each door, one in flight (a closed loop: the next is sent when the answer is decoded):

    v1-unary        distill.v1 GetSoftTargets (TeacherClient, gRPC)
    v1-stream       distill.v1 StreamSoftTargets, one batch in flight on one open stream
    v2-grpc         inference.GRPCInferenceService/ModelInfer, raw_input_contents
    http-json       POST /v1/models/{model}/soft-targets, JSON
    http-protobuf   the same route, application/x-protobuf
    v2-http-binary  POST /v2/models/{model}/infer with the binary tensor data extension
                    (tritonclient.http)

All tasks, probabilities at T = 4, float32 in and out. The table gives each stage's median over
the calls (after `--warmup` untimed ones) in microseconds. `receive` is from the client's call
to the handler's first line (the client's encoding, the network, the server's parsing; on HTTP
also the body read); `send` from the handler's return to the client holding decoded arrays (the
server's serialization, the network, the client's decoding); both use the client's
`perf_counter_ns`, the same clock as the server's on Linux. `total` is the client's median
latency; `server` the median from the handler's first to last line. Medians of stages do not add
up to the median total exactly.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import queue
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.http as triton_http

from bench.common import machine_summary, print_table, teacher_process, write_json
from bench.light_teacher import LIGHT_MODEL_NAME, build_light_repository, digits_data
from protocol.errors import TeacherError
from protocol.kserve_v2 import grpc_predict_v2_pb2 as v2
from protocol.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from student_client.online.client import TeacherClient
from student_client.types import Event, TargetOptions
from teacher_server.serving.stage_timing import STAGES, stages_us

DOORS = ("v1-unary", "v1-stream", "v2-grpc", "http-json", "http-protobuf", "v2-http-binary")
# the server's door label of each (v2 HTTP is one route; the label says which body it had)
SERVER_DOOR = {
    "v1-unary": "grpc",
    "v1-stream": "grpc-stream",
    "v2-grpc": "v2-grpc",
    "http-json": "http-json",
    "http-protobuf": "http-protobuf",
    "v2-http-binary": "v2-http-binary",
}
TEMPERATURE = 4.0
OPTIONS = TargetOptions(LIGHT_MODEL_NAME, temperature=TEMPERATURE, output="probs")
LIGHT_ARGS = ("--allowed-architectures", "bench.,teacher_server.models.", "--torch-threads", "1")
MAX_MESSAGE = 256 * 1024 * 1024

Call = Callable[[np.ndarray], object]


@contextlib.contextmanager
def door_calls(grpc_address: str, http_url: str, model: str) -> Iterator[dict[str, Call]]:
    """One blocking call per door, each returning the decoded soft targets."""
    with contextlib.ExitStack() as stack:
        unary = stack.enter_context(TeacherClient(grpc_address))
        http_json = stack.enter_context(TeacherClient(http_url, transport="http-json"))
        http_pb = stack.enter_context(TeacherClient(http_url, transport="http"))
        events: queue.Queue[Event] = queue.Queue()
        stream = unary.open_stream(events, "request-cost")
        stack.callback(stream.close)
        channel = grpc.insecure_channel(
            grpc_address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        stack.callback(channel.close)
        infer = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        triton = triton_http.InferenceServerClient(http_url.removeprefix("http://"))
        stack.callback(triton.close)
        counter = iter(range(10**9))

        def stream_call(batch: np.ndarray) -> object:
            stream.send(batch, OPTIONS, model, f"b{next(counter)}")
            _, _, answer = events.get(timeout=60)
            if isinstance(answer, TeacherError):
                raise answer
            return answer

        def v2_grpc_call(batch: np.ndarray) -> object:
            request = v2.ModelInferRequest(
                model_name=model,
                inputs=[
                    v2.ModelInferRequest.InferInputTensor(
                        name="inputs", datatype="FP32", shape=list(batch.shape)
                    )
                ],
                raw_input_contents=[batch.tobytes()],
                parameters={"temperature": v2.InferParameter(double_param=TEMPERATURE)},
            )
            response = infer(request, timeout=60)
            return {
                out.name: np.frombuffer(raw, np.float32).reshape(tuple(out.shape))
                for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
            }

        def v2_binary_call(batch: np.ndarray) -> object:
            tensor = triton_http.InferInput("inputs", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch, binary_data=True)
            result = triton.infer(model, [tensor], parameters={"temperature": TEMPERATURE})
            return {
                out["name"]: result.as_numpy(out["name"])
                for out in result.get_response()["outputs"]
            }

        yield {
            "v1-unary": lambda b: unary.soft_targets_with(b, OPTIONS),
            "v1-stream": stream_call,
            "v2-grpc": v2_grpc_call,
            "http-json": lambda b: http_json.soft_targets_with(b, OPTIONS),
            "http-protobuf": lambda b: http_pb.soft_targets_with(b, OPTIONS),
            "v2-http-binary": v2_binary_call,
        }


def time_door(call: Call, batches: list[np.ndarray], calls: int, warmup: int) -> list[list[int]]:
    """[send_ns, done_ns] of each timed call (after `warmup` untimed ones), one in flight."""
    for i in range(warmup):
        call(batches[i % len(batches)])
    spans = []
    for i in range(calls):
        batch = batches[i % len(batches)]
        sent = time.perf_counter_ns()
        call(batch)
        spans.append([sent, time.perf_counter_ns()])
    return spans


def breakdown(spans: list[list[int]], records: list[dict[str, Any]]) -> dict[str, float]:
    """Median microseconds per stage over the calls in `spans`, from the server records whose
    handler started inside a call (one request in flight: exactly one per call)."""
    starts = [span[0] for span in spans]
    per_stage: dict[str, list[float]] = {stage: [] for stage in (*STAGES, "server", "total")}
    for record in records:
        entry, exit_ = record["marks"][0][1], record["marks"][-1][1]
        index = bisect.bisect_right(starts, entry) - 1
        if index < 0 or not spans[index][0] <= entry <= spans[index][1]:
            continue  # a warm-up call
        sent, done = spans[index]
        stages = stages_us(record)
        stages["receive"] += (entry - sent) / 1000.0
        stages["send"] = (done - exit_) / 1000.0
        stages["server"] = (exit_ - entry) / 1000.0
        stages["total"] = (done - sent) / 1000.0
        for stage, value in stages.items():
            per_stage[stage].append(value)
    return {
        stage: statistics.median(values) if values else float("nan")
        for stage, values in per_stage.items()
    } | {"requests": float(len(per_stage["total"]))}


def cycled(samples: np.ndarray, size: int, count: int = 8) -> list[np.ndarray]:
    n = len(samples)
    return [
        np.ascontiguousarray(samples[np.arange(i * size, (i + 1) * size) % n], dtype=np.float32)
        for i in range(count)
    ]


def measure(args: argparse.Namespace) -> dict[str, dict[int, dict[str, float]]]:
    samples = digits_data()[2]
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    doors = args.doors.split(",")
    spans: dict[str, dict[int, list[list[int]]]] = {door: {} for door in doors}
    with tempfile.TemporaryDirectory(prefix="bench-request-cost-") as folder:
        root = build_light_repository(Path(folder) / "repository")
        stage_file = Path(folder) / "stages.jsonl"
        extra = (*LIGHT_ARGS, "--device", args.device, *args.teacher_arg)
        with teacher_process(root, extra, {"TEACHER_STAGE_TIMING_FILE": str(stage_file)}) as t:
            with door_calls(t.grpc_address, t.http_url, LIGHT_MODEL_NAME) as calls:
                for size in sizes:
                    batches = cycled(samples, size)
                    for door in doors:
                        spans[door][size] = time_door(calls[door], batches, args.calls, args.warmup)
                        print(f"  {door:<15} batch {size:>3}: done", flush=True)
        records = [json.loads(line) for line in stage_file.read_text().splitlines()]
    results: dict[str, dict[int, dict[str, float]]] = {}
    for door in doors:
        mine = [r for r in records if r["door"] == SERVER_DOOR[door]]
        results[door] = {size: breakdown(spans[door][size], mine) for size in sizes}
    return results


def print_breakdown(results: dict[str, dict[int, dict[str, float]]]) -> None:
    short = {"batch assembly": "batch", "executor hop": "hop", "host-to-device": "h2d",
             "device-to-host": "d2h", "post-processing": "post"}  # fmt: skip
    headers = ["door", "batch", *(short.get(s, s) for s in STAGES), "server", "total"]
    rows = [
        [door, size, *(cells[s] for s in (*STAGES, "server", "total"))]
        for door, by_size in results.items()
        for size, cells in by_size.items()
    ]
    print_table("Per-request cost, median microseconds per stage (one request in flight)",
                headers, rows)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.request_cost", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--batch-sizes", default="1,32,256")
    parser.add_argument("--doors", default=",".join(DOORS), help=f"of {','.join(DOORS)}")
    parser.add_argument("--calls", type=int, default=300, help="timed calls per door and size")
    parser.add_argument("--warmup", type=int, default=30, help="untimed calls first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="write the medians to this JSON file")
    parser.add_argument(
        "--teacher-arg",
        action="append",
        default=[],
        help="an extra `teacher-server serve` flag (repeat), e.g. --teacher-arg=--max-queue-delay-ms=0",
    )
    args = parser.parse_args(argv)
    unknown = set(args.doors.split(",")) - set(DOORS)
    if unknown:
        parser.error(f"--doors: unknown {sorted(unknown)}; choose from {','.join(DOORS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_summary()
    print(f"machine: {machine}")
    results = measure(args)
    print_breakdown(results)
    if args.json:
        write_json(
            args.json,
            {
                "machine": machine,
                "args": {k: str(v) for k, v in vars(args).items()},
                "stages_us": {d: {str(s): c for s, c in v.items()} for d, v in results.items()},
            },
        )


if __name__ == "__main__":
    main()
