"""The Open Inference Protocol (KServe v2 / Triton) over gRPC: `inference.GRPCInferenceService`.

Implements ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer on
`grpc.aio`, beside `distill.v1.TeacherService` on the same port, so `tritonclient.grpc` works
unchanged; Triton's other RPCs answer UNIMPLEMENTED. Each handler decodes
(`teacher_server.v2_convert`), calls the core, encodes; a `TeacherError` aborts with its gRPC
status and message (plus trailing metadata `error-code`, `error-field`, as on the v1 service).
"""

from __future__ import annotations

from typing import Final, NoReturn

import grpc

from protocol.errors import GRPC_CODE_KEY, GRPC_FIELD_KEY, TeacherError
from protocol.kserve_v2 import grpc_predict_v2_pb2 as pb
from protocol.kserve_v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from teacher_server import v2_convert
from teacher_server.core import TeacherCore

SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


async def _abort(context: grpc.aio.ServicerContext, error: TeacherError) -> NoReturn:
    context.set_trailing_metadata(((GRPC_CODE_KEY, error.code), (GRPC_FIELD_KEY, error.field)))
    await context.abort(error.grpc_status, error.message)
    raise AssertionError("unreachable: abort raises")


def _min_timeout(*timeouts: float | None) -> float | None:
    given = [t for t in timeouts if t is not None]
    return min(given) if given else None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: TeacherCore, max_elements: int) -> None:
        self._core = core
        self._max_elements = max_elements

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._core.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """Ready when the server is and the model (and version, if given) is served; an unknown
        model or version is not ready rather than an error."""
        try:
            v2_convert.resolve(self._core, request.name, request.version)
        except TeacherError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._core.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**v2_convert.server_metadata())

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            info = v2_convert.resolve(self._core, request.name, request.version)
            versions = v2_convert.served_versions(self._core, request.name)
            return v2_convert.model_metadata_pb(info, versions)
        except TeacherError as error:
            await _abort(context, error)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        try:
            version = request.model_version
            info = v2_convert.resolve(self._core, request.model_name, version)
            pinned = info.model_version if version else ""
            decoded = v2_convert.decode_grpc_infer(request, pinned, self._max_elements)
            timeout = _min_timeout(decoded.timeout, context.time_remaining())
            result = await self._core.soft_targets(decoded.request, timeout, "v2-grpc")
            return v2_convert.encode_grpc_infer(result, decoded)
        except TeacherError as error:
            await _abort(context, error)


def add_inference_service(server: grpc.aio.Server, core: TeacherCore, max_elements: int) -> None:
    """Register `inference.GRPCInferenceService` on `server`."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(core, max_elements), server
    )
