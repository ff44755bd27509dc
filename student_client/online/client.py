"""`TeacherClient`: the student's handle on a remote teacher.

    from student_client import TeacherClient

    with TeacherClient("127.0.0.1:50051") as teacher:           # gRPC (default)
        info = teacher.model_info()                              # tasks, classes, version
        targets = teacher.soft_targets(images, temperature=4.0)  # images: (batch, 1, 28, 28)
        probs = targets.tensor("digit")                          # (batch, 10) float32

    with TeacherClient("127.0.0.1:50051") as teacher:           # a sequence model
        batch = TokenBatch.padded([[1, 57, 402], [1, 88]])       # ids (2, 3), lengths (2,)
        targets = teacher.sequence_targets(batch, top_k=8, temperature=2.0)
        rows = targets.outputs["next_token"]                     # (5, 8): one row per real token
        per_sequence = targets.split("next_token")               # [(3, 8), (2, 8)]

Every server error is raised as its `protocol.errors` class (`InvalidArgument`, `NotFound`, ...),
whatever the transport; a teacher that cannot be reached raises `Unavailable` naming the address.
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from protocol.errors import FailedPrecondition, Unavailable
from student_client.online.grpc_transport import GrpcTransport
from student_client.online.http_transport import HttpTransport
from student_client.online.retry import DEFAULT_RETRY, RetryPolicy, call_with_retries
from student_client.types import (
    Event,
    ModelInfo,
    ModelSummary,
    SoftTargets,
    TargetOptions,
    TeacherInputs,
    TokenBatch,
    TokenizerFile,
    as_numpy,
)


def file_sha256(content: bytes) -> str:
    """`"sha256:<hex>"` of a file's bytes: how the protocol names a tokenizer."""
    return "sha256:" + hashlib.sha256(content).hexdigest()


class Stream(Protocol):
    """Many batches in flight: `send` returns at once; answers arrive on the `events` queue given
    to `open_stream` as `(tag, batch_id, answer)`, and a broken stream as `(tag, None, error)`."""

    def send(
        self, inputs: TeacherInputs, options: TargetOptions, model: str, batch_id: str
    ) -> None: ...

    def close(self) -> None: ...


class Transport(Protocol):
    address: str

    def list_models(self) -> list[ModelSummary]: ...

    def model_info(self, model: str, model_version: str = "") -> ModelInfo: ...

    def reload(self, model: str) -> list[ModelSummary]: ...

    def tokenizer(self, model: str, model_version: str = "") -> TokenizerFile: ...

    def soft_targets(
        self, inputs: TeacherInputs, options: TargetOptions, model: str, batch_id: str
    ) -> SoftTargets: ...

    def open_stream(self, events: queue.Queue[Event], tag: object) -> Stream: ...

    def close(self) -> None: ...


class TeacherClient:
    """A connection to a teacher (or several replicas of it). Thread-safe for unary calls.

    `address`: `host:port` for gRPC; several as a list or comma-separated (`127.0.0.1:50051,
    127.0.0.1:50052`) or one `dns:///name:port`, balanced with gRPC's round_robin; for HTTP,
    `http(s)://host:port` (`transport="http"` sends protobuf bodies, `"http-json"` JSON).
    `token`: bearer token if the teacher requires one. `tls_ca_file`: PEM file of the CA that
    signed the teacher's certificate (turns TLS on). `retry`: how unary calls and the loader retry
    what is safe to retry (see `student_client.online.retry`).
    """

    def __init__(
        self,
        address: str | Sequence[str],
        transport: Literal["grpc", "http", "http-json"] = "grpc",
        timeout: float = 60.0,
        token: str | None = None,
        tls_ca_file: str | Path | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        addresses = (
            [a.strip() for a in address.split(",") if a.strip()]
            if isinstance(address, str)
            else list(address)
        )
        if not addresses:
            raise ValueError("address: give at least one teacher address")
        if transport == "grpc":
            root = Path(tls_ca_file).read_bytes() if tls_ca_file is not None else None
            self._transport: Transport = GrpcTransport(addresses, timeout, token, root)
        elif transport in ("http", "http-json"):
            if len(addresses) != 1:
                raise ValueError("address: HTTP takes one address (put replicas behind a balancer)")
            url = addresses[0]
            scheme = "https" if tls_ca_file is not None else "http"
            base_url = url if url.startswith(("http://", "https://")) else f"{scheme}://{url}"
            ca = str(tls_ca_file) if tls_ca_file is not None else None
            self._transport = HttpTransport(base_url, timeout, transport == "http", token, ca)
        else:
            raise ValueError(f"transport must be 'grpc', 'http' or 'http-json', got {transport!r}")
        self.address = ",".join(addresses)
        self.replicas = len(addresses)
        self.retry = retry
        self._default_model: str | None = None

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._transport.close()

    def list_models(self) -> list[ModelSummary]:
        return call_with_retries(self.retry, self._transport.list_models)

    def resolve_model(self, model: str | None) -> str:
        """`model`, or the teacher's first model when None."""
        if model is not None:
            return model
        if self._default_model is None:
            models = self.list_models()
            if not models:
                raise LookupError(f"teacher at {self.address} serves no model")
            self._default_model = models[0].name
        return self._default_model

    def wait_ready(self, timeout: float, model: str | None = None) -> ModelInfo:
        """Poll the teacher until it answers with `model`'s info (e.g. while its container starts);
        raises the last `Unavailable` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.model_info(model)
            except (Unavailable, LookupError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def model_info(self, model: str | None = None, model_version: str = "") -> ModelInfo:
        """The model's tasks, input, hints and version: of the default version, or of
        `model_version`."""
        name = self.resolve_model(model)
        return call_with_retries(
            self.retry, lambda: self._transport.model_info(name, model_version)
        )

    def tokenizer(self, model: str | None = None, model_version: str = "") -> TokenizerFile:
        """A sequence model's tokenizer file (GetTokenizer over gRPC, GET
        /v1/models/{model}/tokenizer over HTTP), its bytes checked against the SHA-256 the teacher
        states; a model without a tokenizer raises `FailedPrecondition` (field `model`)."""
        name = self.resolve_model(model)
        file = call_with_retries(self.retry, lambda: self._transport.tokenizer(name, model_version))
        actual = file_sha256(file.content)
        if file.sha256 != actual:
            raise FailedPrecondition(
                f"tokenizer: teacher at {self.address} states {file.sha256!r} for model {name!r} "
                f"but the file received hashes to {actual!r}",
                "tokenizer",
            )
        return file

    def reload(self, model: str) -> list[ModelSummary]:
        """Admin: make the teacher re-read `model`'s repository folder; returns the versions it
        serves afterwards. Needs the token when the teacher has auth on."""
        return self._transport.reload(model)

    def soft_targets(
        self,
        inputs: np.ndarray | torch.Tensor,
        model: str | None = None,
        tasks: Sequence[str] = (),
        temperature: float = 1.0,
        output: str = "probs",
        top_k: int = 0,
        output_dtype: str = "float32",
        hints: Sequence[str] = (),
        model_version: str = "",
        batch_id: str | None = None,
    ) -> SoftTargets:
        """The teacher's soft targets for one batch `inputs` (batch, *input_shape)."""
        options = TargetOptions(
            model,
            tuple(tasks),
            temperature,
            output,
            top_k,
            output_dtype,
            tuple(hints),
            model_version,
        )
        return self.soft_targets_with(inputs, options, batch_id)

    def sequence_targets(
        self,
        batch: TokenBatch,
        model: str | None = None,
        tasks: Sequence[str] = (),
        temperature: float = 1.0,
        output: str = "probs",
        top_k: int = 0,
        output_dtype: str = "float32",
        model_version: str = "",
        scored_ids: np.ndarray | None = None,
        tokenizer_hash: str = "",
        batch_id: str | None = None,
    ) -> SoftTargets:
        """A sequence model's soft targets for one `TokenBatch` (padded or packed). Token-level
        tasks answer one row per real token (`targets.split(task)` gives them per sequence);
        `scored_ids` (sum(lengths), m) overrides the batch's own; `tokenizer_hash`, when given,
        makes the teacher refuse (`FailedPrecondition`) ids of another tokenizer."""
        if scored_ids is not None:
            batch = dataclasses.replace(batch, scored_ids=scored_ids)
        options = TargetOptions(
            model,
            tuple(tasks),
            temperature,
            output,
            top_k,
            output_dtype,
            (),
            model_version,
            tokenizer_hash,
        )
        return self.soft_targets_with(batch, options, batch_id)

    def soft_targets_with(
        self,
        inputs: np.ndarray | torch.Tensor | TokenBatch,
        options: TargetOptions,
        batch_id: str | None = None,
    ) -> SoftTargets:
        """Like `soft_targets` (or `sequence_targets` for a `TokenBatch`), with the options as one
        `TargetOptions`."""
        array = inputs if isinstance(inputs, TokenBatch) else as_numpy(inputs)
        model = self.resolve_model(options.model)
        batch_id = batch_id if batch_id is not None else uuid.uuid4().hex
        return call_with_retries(
            self.retry, lambda: self._transport.soft_targets(array, options, model, batch_id)
        )

    def open_stream(self, events: queue.Queue[Event], tag: object = None) -> Stream:
        """A bidirectional stream (gRPC), or a pool of unary calls (HTTP), for many batches in
        flight; answers arrive on `events` (see `Stream`). `SoftTargetLoader` uses it; it does
        not retry: the loader does."""
        return self._transport.open_stream(events, tag)

    def with_model(self, options: TargetOptions) -> TargetOptions:
        """`options` with its model resolved to a name."""
        return dataclasses.replace(options, model=self.resolve_model(options.model))
