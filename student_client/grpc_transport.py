"""gRPC transport of the student client: `distill.v1.TeacherService` over a blocking channel.

Server errors come back as the `protocol.errors` class the server raised (read from the trailing
metadata `error-code` / `error-field`); connection failures become `Unavailable` naming the address.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import TypeVar

import grpc
import numpy as np

from protocol.errors import (
    GRPC_CODE_KEY,
    GRPC_FIELD_KEY,
    TeacherError,
    error_from_code,
    error_from_grpc_status,
)
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from student_client.messages import model_info_from_pb, request_to_pb, soft_targets_from_pb
from student_client.types import ModelInfo, ModelSummary, SoftTargets, TargetOptions

T = TypeVar("T")


def error_from_rpc(error: grpc.RpcError, address: str) -> TeacherError:
    """The `protocol.errors` exception for a failed call (works for unary and stream calls)."""
    metadata = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    details = error.details() or ""  # type: ignore[attr-defined]
    code = metadata.get(GRPC_CODE_KEY)
    if code:
        return error_from_code(str(code), details, str(metadata.get(GRPC_FIELD_KEY, "")))
    return error_from_grpc_status(error.code(), f"teacher at {address}: {details}")  # type: ignore[attr-defined]


class GrpcStream:
    """One bidirectional `StreamSoftTargets` call: `send` queues a batch, `receive` blocks for the
    next answer (any order). Not thread-safe: one sender/receiver thread."""

    def __init__(self, stub: pb_grpc.TeacherServiceStub, address: str) -> None:
        self._address = address
        self._outgoing: queue.Queue[pb.SoftTargetsRequest | None] = queue.Queue()
        self._call = stub.StreamSoftTargets(iter(self._outgoing.get, None))

    def send(self, inputs: np.ndarray, options: TargetOptions, model: str, batch_id: str) -> None:
        self._outgoing.put(request_to_pb(inputs, options, model, batch_id))

    def receive(self) -> tuple[str, SoftTargets | TeacherError]:
        try:
            message = next(self._call)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self._address) from None
        except StopIteration:
            raise error_from_code(
                "UNAVAILABLE", f"teacher at {self._address} ended the stream"
            ) from None
        if message.HasField("error"):
            e = message.error
            return message.batch_id, error_from_code(e.code, e.message, e.field)
        return message.batch_id, soft_targets_from_pb(message.soft_targets)

    def close(self) -> None:
        self._outgoing.put(None)
        self._call.cancel()


class GrpcTransport:
    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
            ],
        )
        self._stub = pb_grpc.TeacherServiceStub(self._channel)

    def _call(self, method: Callable[..., T], request: object) -> T:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.address) from None

    def list_models(self) -> list[ModelSummary]:
        response = self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [ModelSummary(m.name, m.model_version, m.ready) for m in response.models]

    def model_info(self, model: str) -> ModelInfo:
        return model_info_from_pb(
            self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(model=model))
        )

    def soft_targets(
        self, inputs: np.ndarray, options: TargetOptions, model: str, batch_id: str
    ) -> SoftTargets:
        request = request_to_pb(inputs, options, model, batch_id)
        return soft_targets_from_pb(self._call(self._stub.GetSoftTargets, request))

    def open_stream(self) -> GrpcStream:
        return GrpcStream(self._stub, self.address)

    def close(self) -> None:
        self._channel.close()
