"""Getting the teacher's soft targets over gRPC: raw logits once, compressed variants as sent."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch

from bench.distill_eval.data import BATCH_SIZE, DTYPES, FETCH_BATCH, SOFTMAX_TOLERANCE, Dataset
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from student_client.online.client import TeacherClient
from student_client.online.messages import request_to_pb, soft_targets_from_pb
from student_client.types import SoftTargets, TargetOptions


class Wire:
    """Unary `GetSoftTargets` on a raw stub, so each answer's serialized size can be measured;
    requests and answers are converted exactly as `TeacherClient` does (`student_client.online.messages`),
    batch ids as `SoftTargetLoader` makes them."""

    def __init__(self, address: str, model: str) -> None:
        self.model = model
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.enable_http_proxy", 0),
            ],
        )
        self._stub = pb_grpc.TeacherServiceStub(self._channel)
        self._run_id = uuid.uuid4().hex[:12]
        self._count = 0

    def fetch(
        self, inputs: np.ndarray, options: TargetOptions
    ) -> tuple[SoftTargets, pb.SoftTargetsResponse]:
        batch_id = f"{self._run_id}-{self._count}"
        self._count += 1
        request = request_to_pb(np.ascontiguousarray(inputs), options, self.model, batch_id)
        response = self._stub.GetSoftTargets(request, timeout=120)
        return soft_targets_from_pb(response), response

    def close(self) -> None:
        self._channel.close()


@dataclass
class TeacherOutputs:
    """The teacher's raw logits (T = 1) for the training and held-out sets, and its `features`
    hint for the training set (None if it serves none)."""

    model: str
    model_version: str
    parameters: int
    train_logits: dict[str, np.ndarray]
    test_logits: dict[str, np.ndarray]
    features: np.ndarray | None

    def accuracy(self, data: Dataset) -> dict[str, float]:
        return {
            task: float((logits.argmax(1) == data.test_y[task]).mean())
            for task, logits in self.test_logits.items()
        }


def fetch_logits(
    client: TeacherClient,
    inputs: np.ndarray,
    hints: Sequence[str] = (),
    model: str | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Raw logits (T = 1) per task for every input, in batches of `FETCH_BATCH`, over gRPC, from
    `model` (None: the teacher's first; an ensemble answers the mean of its members' logits)."""
    parts: dict[str, list[np.ndarray]] = {}
    features: list[np.ndarray] = []
    for start in range(0, len(inputs), FETCH_BATCH):
        targets = client.soft_targets(
            inputs[start : start + FETCH_BATCH],
            output="logits",
            temperature=1.0,
            hints=hints,
            model=model,
        )
        for task, output in targets.outputs.items():
            parts.setdefault(task, []).append(np.array(output.values, dtype=np.float32))
        if hints:
            features.append(np.array(targets.hints[hints[0]], dtype=np.float32))
    logits = {task: np.concatenate(values) for task, values in parts.items()}
    return logits, (np.concatenate(features) if features else None)


def probs_at(logits: np.ndarray, temperature: float) -> torch.Tensor:
    """softmax(logits / T) in float64, rounded to float32: the server's own computation of
    `probs` (teacher_server.serving.engine.task_values)."""
    z = torch.from_numpy(np.asarray(logits, dtype=np.float32)).double() / temperature
    return torch.softmax(z, dim=1).float()


def softmax_check(
    client: TeacherClient, inputs: np.ndarray, logits: dict[str, np.ndarray], temperature: float
) -> dict[str, Any]:
    """Compare the client-side softmax of the fetched logits with the server's probs at T on the
    first batch of `FETCH_BATCH` training inputs."""
    batch = inputs[:FETCH_BATCH]
    served = client.soft_targets(batch, temperature=temperature, output="probs")
    diffs = {
        task: float(
            np.abs(
                probs_at(values[: len(batch)], temperature).numpy()
                - np.asarray(served.outputs[task].values, dtype=np.float32)
            ).max()
        )
        for task, values in logits.items()
    }
    worst = max(diffs.values())
    return {
        "temperature": temperature,
        "samples": len(batch),
        "max_abs_diff": worst,
        "max_abs_diff_per_task": diffs,
        "tolerance": SOFTMAX_TOLERANCE,
        "holds": worst <= SOFTMAX_TOLERANCE,
    }


@dataclass
class Fetched:
    """One output setting fetched for the whole training set, as the server sent it: per task the
    values (n, classes | k) as float32 (float16 values converted exactly), indices (n, k) int64
    and tail mass (n,) for top-k; and the bytes on the wire."""

    setting: str
    temperature: float
    values: dict[str, torch.Tensor]
    indices: dict[str, torch.Tensor]
    tail: dict[str, torch.Tensor]
    bytes: dict[str, float]
    tail_zeroed_max: float = 0.0  # the largest tail of a top-k over all classes, set to 0


def parse_setting(setting: str) -> tuple[int, str]:
    """`dense-f16` -> (0, "float16"); `top3-f32` -> (3, "float32")."""
    kind, dtype = setting.split("-")
    k = 0 if kind == "dense" else int(kind.removeprefix("top"))
    return k, DTYPES[dtype]


def task_groups(tasks: dict[str, int], k: int) -> dict[int, list[str]]:
    """Tasks grouped by their effective k = min(k, classes) (0: dense); the server takes one
    top_k per request, at most the fewest classes of the requested tasks."""
    groups: dict[int, list[str]] = {}
    for task, classes in tasks.items():
        groups.setdefault(min(k, classes) if k else 0, []).append(task)
    return groups


def response_bytes(response: pb.SoftTargetsResponse) -> tuple[int, int]:
    """(serialized size, payload = values + indices + tail mass bytes) of one answer."""
    payload = sum(
        len(o.values.data) + len(o.indices.data) + len(o.tail_mass.data) for o in response.outputs
    )
    return len(response.SerializeToString()), payload


def measure_bytes(
    wire: Wire, data: Dataset, setting: str, temperature: float, batch: int
) -> dict[str, float]:
    """Bytes per sample of one answer for the first `batch` training inputs: all tasks (one
    request per effective k) and the digit task alone; total and payload only."""
    k, dtype = parse_setting(setting)
    inputs = data.train_x[:batch]
    out: dict[str, float] = {}
    for scope, tasks in (("all", data.tasks), ("digit", {"digit": data.tasks["digit"]})):
        total = payload = 0
        for group_k, names in task_groups(tasks, k).items():
            options = TargetOptions(
                model=wire.model,
                tasks=tuple(names),
                temperature=temperature,
                top_k=group_k,
                output_dtype=dtype,
            )
            _, response = wire.fetch(inputs, options)
            size, data_bytes = response_bytes(response)
            total += size
            payload += data_bytes
        out[f"{scope}_b{batch}"] = total / len(inputs)
        out[f"{scope}_payload"] = payload / len(inputs)
    return out


def fetch_setting(wire: Wire, data: Dataset, setting: str, temperature: float) -> Fetched:
    """The whole training set in `setting` at `temperature`, in batches of `FETCH_BATCH`."""
    k, dtype = parse_setting(setting)
    values: dict[str, list[np.ndarray]] = {}
    indices: dict[str, list[np.ndarray]] = {}
    tail: dict[str, list[np.ndarray]] = {}
    total = 0
    rounding = 0.0
    for start in range(0, len(data.train_x), FETCH_BATCH):
        batch = data.train_x[start : start + FETCH_BATCH]
        for group_k, names in task_groups(data.tasks, k).items():
            options = TargetOptions(
                model=wire.model,
                tasks=tuple(names),
                temperature=temperature,
                top_k=group_k,
                output_dtype=dtype,
            )
            targets, response = wire.fetch(batch, options)
            total += response_bytes(response)[0]
            for task, output in targets.outputs.items():
                values.setdefault(task, []).append(np.array(output.values, dtype=np.float32))
                if output.indices is not None:
                    indices.setdefault(task, []).append(np.asarray(output.indices, np.int64))
                if output.tail_mass is not None:
                    tail_mass = np.array(output.tail_mass, np.float32)
                    if group_k == data.tasks[task]:
                        # Top-k over every class: the server's tail is float64 rounding (up to
                        # ~3e-16), and TopKKDLoss gives +inf for any teacher tail > 0 when the
                        # student has no tail class; it is exactly 0.
                        rounding = max(rounding, float(tail_mass.max()))
                        tail_mass[:] = 0.0
                    tail.setdefault(task, []).append(tail_mass)
    measured = {f"all_b{FETCH_BATCH}_mean": total / len(data.train_x)}
    for batch_size in (FETCH_BATCH, BATCH_SIZE):
        measured.update(measure_bytes(wire, data, setting, temperature, batch_size))

    def cat(parts: dict[str, list[np.ndarray]]) -> dict[str, torch.Tensor]:
        return {task: torch.from_numpy(np.concatenate(arrays)) for task, arrays in parts.items()}

    return Fetched(setting, temperature, cat(values), cat(indices), cat(tail), measured, rounding)
