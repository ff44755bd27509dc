"""`bench/replay_server.py`, the no-work floor of bench.throughput's section f: in front of a real
teacher it answers exactly what the teacher answered (v2 gRPC, v2 REST binary, our v1 client),
and forwards only the first request of each size (counted on the teacher's own metrics)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import tritonclient.http as httpclient

from protocol.kserve_v2 import grpc_predict_v2_pb2 as v2pb
from student_client import TeacherClient
from student_client.types import TargetOptions

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
throughput = importlib.import_module("bench.throughput")

MODEL = "mnist-multitask"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def served_requests(http_url: str) -> float:
    """The teacher's teacher_requests_total, summed over every label."""
    text = httpx.get(f"{http_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("teacher_requests_total{")
    )


def infer_request(images: np.ndarray) -> bytes:
    request = v2pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            v2pb.ModelInferRequest.InferInputTensor(
                name="inputs", datatype="FP32", shape=list(images.shape)
            )
        ],
        raw_input_contents=[images.tobytes()],
        parameters={"temperature": v2pb.InferParameter(double_param=4.0)},
    )
    return request.SerializeToString()


def test_replays_the_teachers_answers_and_forwards_each_size_once(
    teacher: Any, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images = mnist_test_images[0][:8].astype(np.float32)
    with throughput.replay_process(teacher.grpc_address, teacher.http_url) as (http_url, address):
        # v2 gRPC: the same bytes as the teacher's own answer; the second call is not forwarded
        with (
            grpc.insecure_channel(teacher.grpc_address) as direct,
            grpc.insecure_channel(address) as replayed,
        ):
            request = infer_request(images[:4])
            expected = direct.unary_unary(INFER)(request, timeout=30)
            before = served_requests(teacher.http_url)
            first = replayed.unary_unary(INFER)(request, timeout=30)
            again = replayed.unary_unary(INFER)(infer_request(images[4:8]), timeout=30)
            assert first == expected and again == expected  # same size: the kept answer
            assert served_requests(teacher.http_url) == before + 1

            # another size is another kind of request: forwarded once, then kept
            other = replayed.unary_unary(INFER)(infer_request(images[:2]), timeout=30)
            outputs = v2pb.ModelInferResponse.FromString(other).outputs
            assert [list(o.shape) for o in outputs] == [[2, o.shape[1]] for o in outputs]
            assert served_requests(teacher.http_url) == before + 2

        # v2 REST with the binary extension, through an unmodified tritonclient
        reference = httpclient.InferenceServerClient(teacher.http_url.removeprefix("http://"))
        client = httpclient.InferenceServerClient(http_url.removeprefix("http://"))
        try:
            tensor = httpclient.InferInput("inputs", [4, *images.shape[1:]], "FP32")
            tensor.set_data_from_numpy(images[:4], binary_data=True)
            want = reference.infer(MODEL, [tensor], parameters={"temperature": 4})
            before = served_requests(teacher.http_url)
            for _ in range(3):
                got = client.infer(MODEL, [tensor], parameters={"temperature": 4})
                for out in want.get_response()["outputs"]:
                    np.testing.assert_array_equal(
                        got.as_numpy(out["name"]), want.as_numpy(out["name"])
                    )
            assert served_requests(teacher.http_url) == before + 1
        finally:
            reference.close()
            client.close()

        # our own v1 client: the teacher's soft targets for the first call of each size
        options = TargetOptions(MODEL, temperature=4.0)
        with TeacherClient(teacher.grpc_address) as own, TeacherClient(address) as floor:
            want_v1 = own.soft_targets_with(images[:4], options)
            got_v1 = floor.soft_targets_with(images[:4], options)
            assert set(got_v1.outputs) == set(want_v1.outputs)
            for task, targets in want_v1.outputs.items():
                np.testing.assert_array_equal(got_v1.outputs[task].values, targets.values)
