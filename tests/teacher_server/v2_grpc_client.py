"""Run `tritonclient.grpc` calls against a teacher and print their results as JSON.

Used by tests/teacher_server/test_v2_protocol.py in a subprocess: `tritonclient.grpc` registers the
same `inference.*` protobuf symbols as the teacher's `protocol.kserve_v2` module, so the two cannot
be imported by one process. Reads `{"address": "host:port", "calls": [...]}` on stdin; each call is
`{"op": ..., ...}`; prints a list with, per call, `{"ok": value}` or `{"error": {"status",
"message"}}`.

Ops: live, ready, model_ready (model, version), server_metadata, model_metadata (model, version),
infer (model, version, inputs: nested list, dtype, datatype, input_name, outputs, parameters, id;
returns {"outputs": {name: nested list}, "parameters", "id", "model_version"}), call (method: a
unary GRPCInferenceService method, sent with an empty request), descriptors (names: message
names; returns their fields, for comparing field numbers with the teacher's .proto).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf import json_format
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException


def describe(descriptor: Any) -> dict[str, Any]:
    """Fields (number, type, label, message type, oneof) of a message and its nested messages."""
    return {
        "fields": {
            f.name: {
                "number": f.number,
                "type": f.type,
                "repeated": f.is_repeated,
                "message": f.message_type.full_name if f.message_type else "",
                "oneof": f.containing_oneof.name if f.containing_oneof else "",
            }
            for f in descriptor.fields
        },
        "nested": {nested.name: describe(nested) for nested in descriptor.nested_types},
    }


def run(client: grpcclient.InferenceServerClient, address: str, call: dict[str, Any]) -> Any:
    op = call["op"]
    if op == "live":
        return client.is_server_live()
    if op == "ready":
        return client.is_server_ready()
    if op == "model_ready":
        return client.is_model_ready(call["model"], call.get("version", ""))
    if op == "server_metadata":
        return client.get_server_metadata(as_json=True)
    if op == "model_metadata":
        return client.get_model_metadata(call["model"], call.get("version", ""), as_json=True)
    if op == "infer":
        array = np.asarray(call["inputs"], dtype=call.get("dtype", "float32"))
        tensor = grpcclient.InferInput(
            call.get("input_name", "inputs"), list(array.shape), call.get("datatype", "FP32")
        )
        tensor.set_data_from_numpy(array)
        outputs = [grpcclient.InferRequestedOutput(name) for name in call.get("outputs", [])]
        result = client.infer(
            call["model"],
            [tensor],
            model_version=call.get("version", ""),
            outputs=outputs or None,
            request_id=call.get("id", ""),
            parameters=call.get("parameters"),
        )
        response = result.get_response()
        return {
            "outputs": {o.name: result.as_numpy(o.name).tolist() for o in response.outputs},
            "parameters": json_format.MessageToDict(response)["parameters"],
            "id": response.id,
            "model_version": response.model_version,
        }
    if op == "call":
        import grpc

        with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            method = getattr(stub, call["method"])
            request_type = getattr(service_pb2, call["method"] + "Request")
            try:
                method(request_type(), timeout=30)
            except grpc.RpcError as error:
                raise InferenceServerException(error.details(), str(error.code())) from None
            return "OK"
    if op == "descriptors":
        return {
            name: describe(service_pb2.DESCRIPTOR.message_types_by_name[name])
            for name in call["names"]
        }
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    request = json.load(sys.stdin)
    client = grpcclient.InferenceServerClient(
        request["address"], channel_args=[("grpc.enable_http_proxy", 0)]
    )
    results = []
    for call in request["calls"]:
        try:
            results.append({"ok": run(client, request["address"], call)})
        except InferenceServerException as error:
            results.append({"error": {"status": error.status(), "message": error.message()}})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
