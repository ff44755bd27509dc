"""HTTP transport of the student client, for networks where gRPC cannot pass.

Soft targets travel as `application/x-protobuf` (the same `distill.v1` messages as gRPC) unless
`binary=False`, which sends and receives JSON.

A "stream" here is a small pool of threads sending unary requests, so a loader can keep several
batches in flight the same way it does over gRPC.
"""

from __future__ import annotations

import base64
import queue
import ssl
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np

from protocol import codec, packed
from protocol.errors import TeacherError, Unavailable, error_from_code
from protocol.v1 import teacher_pb2 as pb
from student_client.online.messages import (
    request_to_pb,
    soft_targets_from_pb,
    top_k_encoding,
)
from student_client.types import (
    Event,
    ModelInfo,
    ModelSummary,
    SoftTargets,
    TargetOptions,
    TaskInfo,
    TaskTargets,
    TeacherInputs,
    TokenBatch,
    TokenizerFile,
    TokenizerInfo,
)


def _array(values: Any, dtype: str = "float32") -> np.ndarray:
    return np.asarray(values, dtype=dtype)


def _packed_ints(entry: dict[str, Any]) -> pb.PackedInts:
    return pb.PackedInts(
        bits=entry["bits"], shape=entry["shape"], data=base64.b64decode(entry["data"])
    )


def _task_from_json(task: str, entry: dict[str, Any]) -> TaskTargets:
    values: np.ndarray
    indices: np.ndarray | None
    tail_mass: np.ndarray | None
    if "packed" in entry:  # the bytes of a distill.v1.PackedTopK, base64 (docs/protocol.md)
        body = entry["packed"]
        message = pb.PackedTopK(
            indices=_packed_ints(body["indices"]),
            values=_packed_ints(body["values"]),
            values_dtype=codec.parse_dtype_name(body["values_dtype"], "values_dtype"),
            log_prob_step=body.get("log_prob_step", 0.0),
        )
        if "tail_mass" in body:
            message.tail_mass.CopyFrom(_packed_ints(body["tail_mass"]))
            message.tail_dtype = codec.parse_dtype_name(body["tail_dtype"], "tail_dtype")
        values, indices, tail_mass = packed.decode_top_k(
            message, entry["kind"], f"outputs[{task}].packed", max_elements=1 << 34
        )
    else:
        values = _array(entry["values"])
        indices = _array(entry["indices"], "int64") if "indices" in entry else None
        tail_mass = _array(entry["tail_mass"]) if "tail_mass" in entry else None
    return TaskTargets(
        task=task,
        kind=entry["kind"],
        values=values,
        indices=indices,
        tail_mass=tail_mass,
        level=entry.get("level", "sequence"),
        scored_values=_array(entry["scored_values"]) if "scored_values" in entry else None,
    )


def soft_targets_from_json(body: dict[str, Any]) -> SoftTargets:
    outputs = {task: _task_from_json(task, entry) for task, entry in body["outputs"].items()}
    return SoftTargets(
        model=body["model"],
        model_version=body["model_version"],
        batch_id=body["batch_id"],
        temperature=body["temperature"],
        outputs=outputs,
        hints={name: _array(value) for name, value in body.get("hints", {}).items()},
        lengths=_array(body["lengths"], "int64") if body.get("lengths") is not None else None,
    )


PROTOBUF = "application/x-protobuf"
TOKENIZER_SHA256_HEADER = "x-tokenizer-sha256"


def _summary(entry: dict[str, Any]) -> ModelSummary:
    return ModelSummary(
        entry["name"],
        entry["model_version"],
        entry["ready"],
        entry.get("default_version", False),
        entry.get("error", ""),
        entry.get("label", ""),
    )


class HttpTransport:
    def __init__(
        self,
        base_url: str,
        timeout: float,
        binary: bool = True,
        token: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.address = base_url
        self.binary = binary
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(
            base_url=base_url,
            timeout=timeout,
            headers=headers,
            # A context, not the file name: httpx deprecates `verify=<str>`.
            verify=ssl.create_default_context(cafile=ca_file) if ca_file is not None else True,
            trust_env=False,  # a teacher on the loopback or a private network: no proxies
        )

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise Unavailable(
                f"teacher at {self.address}: {type(error).__name__}: {error}"
            ) from None
        if response.status_code >= 400:
            raise self._error(response)
        return response

    def _error(self, response: httpx.Response) -> TeacherError:
        try:
            if response.headers.get("content-type", "").startswith(PROTOBUF):
                error = pb.Error.FromString(response.content)
                return error_from_code(error.code, error.message, error.field)
            detail = response.json()["error"]
            return error_from_code(detail["code"], detail["message"], detail.get("field", ""))
        except (ValueError, KeyError, TypeError):
            return error_from_code(
                "INTERNAL",
                f"teacher at {self.address}: HTTP {response.status_code}: {response.text[:200]}",
            )

    def _request(self, method: str, path: str, json: dict[str, Any] | None = None) -> Any:
        return self._send(method, path, json=json).json()

    def list_models(self) -> list[ModelSummary]:
        body = self._request("GET", "/v1/models")
        return [_summary(m) for m in body["models"]]

    def reload(self, model: str) -> list[ModelSummary]:
        return [
            _summary(m) for m in self._request("POST", f"/v1/models/{model}/reload")["versions"]
        ]

    def model_info(self, model: str, model_version: str = "") -> ModelInfo:
        query = f"?model_version={model_version}" if model_version else ""
        body = self._request("GET", f"/v1/models/{model}{query}")
        return ModelInfo(
            name=body["name"],
            model_version=body["model_version"],
            tasks=tuple(
                TaskInfo(
                    t["name"],
                    tuple(t["class_names"]),
                    t.get("test_accuracy"),
                    t.get("level", "sequence"),
                    t.get("num_classes", 0),
                )
                for t in body["tasks"]
            ),
            input_shape=tuple(body["input_shape"]),
            input_dtype=body["input_dtype"],
            accepted_input_dtypes=tuple(body["accepted_input_dtypes"]),
            uint8_scale=body["uint8_scale"],
            hints={name: tuple(shape) for name, shape in body["hints"].items()},
            max_batch_size=body["max_batch_size"],
            description=body.get("description", ""),
            parameter_count=body.get("parameter_count", 0),
            input_kind=body.get("input_kind", "tensor"),
            max_length=body.get("max_length", 0),
            vocab_size=body.get("vocab_size", 0),
            max_batch_tokens=body.get("max_batch_tokens", 0),
            tokenizer=TokenizerInfo(
                tokenizer["file_name"],
                tokenizer["sha256"],
                tokenizer["vocab_size"],
                dict(tokenizer.get("special_ids", {})),
            )
            if (tokenizer := body.get("tokenizer"))
            else None,
            held_out_metrics=dict(body.get("held_out_metrics", {})),
        )

    def tokenizer(self, model: str, model_version: str = "") -> TokenizerFile:
        query = f"?model_version={model_version}" if model_version else ""
        response = self._send("GET", f"/v1/models/{model}/tokenizer{query}")
        disposition = response.headers.get("content-disposition", "")
        file_name = (
            disposition.split("filename=", 1)[1].strip('"') if "filename=" in disposition else ""
        )
        return TokenizerFile(
            file_name, response.headers.get(TOKENIZER_SHA256_HEADER, ""), response.content
        )

    def soft_targets(
        self, inputs: TeacherInputs, options: TargetOptions, model: str, batch_id: str
    ) -> SoftTargets:
        path = f"/v1/models/{model}/soft-targets"
        if self.binary:
            message = request_to_pb(inputs, options, model, batch_id).SerializeToString()
            response = self._send("POST", path, content=message, headers={"content-type": PROTOBUF})
            return soft_targets_from_pb(pb.SoftTargetsResponse.FromString(response.content))
        ids = inputs.ids if isinstance(inputs, TokenBatch) else inputs
        body: dict[str, Any] = {
            "inputs": ids.tolist(),
            "dtype": ids.dtype.name,
            "tasks": list(options.tasks),
            "temperature": options.temperature,
            "output": options.output,
            "batch_id": batch_id,
            "model_version": options.model_version,
            "top_k": options.top_k,
            "output_dtype": options.output_dtype,
            "hints": list(options.hints),
        }
        if isinstance(inputs, TokenBatch):  # sequence fields only for sequences (older servers)
            body["lengths"] = inputs.lengths.tolist()
            body["tokenizer_hash"] = options.tokenizer_hash
            encoding = top_k_encoding(inputs, options)
            if encoding != "tensors":  # a server older than the field refuses unknown fields
                body["top_k_encoding"] = encoding
            if inputs.scored_ids is not None:
                body["scored_ids"] = inputs.scored_ids.tolist()
        return soft_targets_from_json(self._request("POST", path, body))

    def open_stream(self, events: queue.Queue[Event], tag: object) -> HttpStream:
        return HttpStream(self, events, tag)

    def close(self) -> None:
        self._client.close()


class HttpStream:
    """Unary HTTP requests on a few threads; each answer (or error, e.g. a refused connection) is
    put on `events` as `(tag, batch_id, answer)` when it completes."""

    def __init__(
        self, transport: HttpTransport, events: queue.Queue[Event], tag: object, workers: int = 4
    ) -> None:
        self._transport = transport
        self._events = events
        self._tag = tag
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="http-stream")

    def _one(
        self, inputs: TeacherInputs, options: TargetOptions, model: str, batch_id: str
    ) -> None:
        try:
            answer: SoftTargets | TeacherError = self._transport.soft_targets(
                inputs, options, model, batch_id
            )
        except TeacherError as error:
            answer = error
        self._events.put((self._tag, batch_id, answer))

    def send(
        self, inputs: TeacherInputs, options: TargetOptions, model: str, batch_id: str
    ) -> None:
        self._pool.submit(self._one, inputs, options, model, batch_id)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
