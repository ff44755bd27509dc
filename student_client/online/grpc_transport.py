"""gRPC transport of the student client: `distill.v1.TeacherService` over a blocking channel.

Server errors come back as the `protocol.errors` class the server raised (read from the trailing
metadata `error-code` / `error-field`); connection failures become `Unavailable` naming the address.
"""

from __future__ import annotations

import ipaddress
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc

from protocol.errors import (
    GRPC_CODE_KEY,
    GRPC_FIELD_KEY,
    MessageTooLarge,
    TeacherError,
    Unavailable,
    error_from_code,
    error_from_grpc_status,
)
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from student_client.online.messages import model_info_from_pb, request_to_pb, soft_targets_from_pb
from student_client.types import (
    Event,
    ModelInfo,
    ModelSummary,
    SoftTargets,
    TargetOptions,
    TeacherInputs,
    TokenizerFile,
)

T = TypeVar("T")


def error_from_rpc(error: grpc.RpcError, address: str) -> TeacherError:
    """The `protocol.errors` exception for a failed call (works for unary and stream calls)."""
    metadata = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    details = error.details() or ""  # type: ignore[attr-defined]
    code = metadata.get(GRPC_CODE_KEY)
    if code:
        return error_from_code(str(code), details, str(metadata.get(GRPC_FIELD_KEY, "")))
    status = error.code()  # type: ignore[attr-defined]
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        # grpc's own size check ("Received message larger than max (N vs. LIMIT)"), on either
        # side: the same message can never pass, so it is not retried (field `body`, as over HTTP).
        return MessageTooLarge(f"body: teacher at {address}: {details}", "body")
    return error_from_grpc_status(status, f"teacher at {address}: {details}")


class GrpcStream:
    """One bidirectional `StreamSoftTargets` call. `send` queues a batch; a reader thread decodes
    each answer (off the training thread) and puts `(tag, batch_id, answer)` on `events`. When the
    call breaks, it puts `(tag, None, error)` once."""

    def __init__(
        self,
        stub: pb_grpc.TeacherServiceStub,
        address: str,
        metadata: tuple[tuple[str, str], ...],
        events: queue.Queue[Event],
        tag: object,
    ) -> None:
        self._address = address
        self._events = events
        self._tag = tag
        self._closed = threading.Event()
        self._outgoing: queue.Queue[pb.SoftTargetsRequest | None] = queue.Queue()
        self._call = stub.StreamSoftTargets(iter(self._outgoing.get, None), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="soft-target-stream", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self._call:
                if message.HasField("error"):
                    e = message.error
                    answer: SoftTargets | TeacherError = error_from_code(e.code, e.message, e.field)
                else:
                    answer = soft_targets_from_pb(message.soft_targets)
                self._events.put((self._tag, message.batch_id, answer))
            broken: TeacherError = Unavailable(f"teacher at {self._address} ended the stream")
        except grpc.RpcError as error:
            broken = error_from_rpc(error, self._address)
        if not self._closed.is_set():
            self._events.put((self._tag, None, broken))

    def send(
        self, inputs: TeacherInputs, options: TargetOptions, model: str, batch_id: str
    ) -> None:
        self._outgoing.put(request_to_pb(inputs, options, model, batch_id))

    def close(self) -> None:
        self._closed.set()
        self._outgoing.put(None)
        self._call.cancel()


def grpc_target(addresses: Sequence[str]) -> str:
    """The channel target for one address (`host:port`, `dns:///name:port`, ...) or several IP
    `host:port` addresses (`ipv4:a:p,b:p`), which the channel balances with round_robin."""
    if len(addresses) == 1:
        return addresses[0]
    scheme = "ipv6" if all(a.startswith("[") for a in addresses) else "ipv4"
    for address in addresses:
        host = address.rsplit(":", 1)[0].strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"several addresses must be IP host:port pairs, got {address!r}; for host names "
                "give one 'dns:///name:port' address, which resolves to every replica"
            ) from None
    return f"{scheme}:{','.join(addresses)}"


class GrpcTransport:
    def __init__(
        self,
        addresses: Sequence[str],
        timeout: float,
        token: str | None = None,
        root_certificates: bytes | None = None,
    ) -> None:
        self.address = ",".join(addresses)
        self.timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        options = [
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.enable_http_proxy", 0),
        ]
        target = grpc_target(addresses)
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.TeacherServiceStub(self._channel)

    def _call(self, method: Callable[..., T], request: object) -> T:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.address) from None

    def list_models(self) -> list[ModelSummary]:
        response = self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [
            ModelSummary(m.name, m.model_version, m.ready, m.default_version, m.error, m.label)
            for m in response.models
        ]

    def model_info(self, model: str, model_version: str = "") -> ModelInfo:
        request = pb.GetModelInfoRequest(model=model, model_version=model_version)
        return model_info_from_pb(self._call(self._stub.GetModelInfo, request))

    def tokenizer(self, model: str, model_version: str = "") -> TokenizerFile:
        request = pb.GetTokenizerRequest(model=model, model_version=model_version)
        response = self._call(self._stub.GetTokenizer, request)
        return TokenizerFile(response.file_name, response.sha256, response.content)

    def reload(self, model: str) -> list[ModelSummary]:
        response = self._call(self._stub.ReloadModel, pb.ReloadModelRequest(model=model))
        return [
            ModelSummary(m.name, m.model_version, m.ready, m.default_version, m.error, m.label)
            for m in response.versions
        ]

    def soft_targets(
        self, inputs: TeacherInputs, options: TargetOptions, model: str, batch_id: str
    ) -> SoftTargets:
        request = request_to_pb(inputs, options, model, batch_id)
        return soft_targets_from_pb(self._call(self._stub.GetSoftTargets, request))

    def open_stream(self, events: queue.Queue[Event], tag: object) -> GrpcStream:
        return GrpcStream(self._stub, self.address, self._metadata, events, tag)

    def close(self) -> None:
        self._channel.close()
