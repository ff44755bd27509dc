"""The gRPC door of the Open Inference Protocol (KServe v2 / Triton): `GRPCInferenceService`.

Implements ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer on
`grpc.aio`, beside `distill.v1.TeacherService` on the same port, so `tritonclient.grpc` works
unchanged; Triton's other RPCs answer UNIMPLEMENTED. Each handler decodes
(`teacher_server.v2.convert_grpc`), calls the core, encodes; a `TeacherError` it raises becomes its
gRPC status in `teacher_server.grpc_errors` (with trailing metadata, as on the v1 service).
"""

from __future__ import annotations

from typing import Final

import grpc

from protocol.errors import TeacherError
from protocol.kserve_v2 import grpc_predict_v2_pb2 as pb
from protocol.kserve_v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from teacher_server.serving.core import TeacherCore
from teacher_server.v2 import convert_grpc, metadata

SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


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
            metadata.resolve(self._core, request.name, request.version)
        except TeacherError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._core.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**metadata.server_metadata())

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        info = metadata.resolve(self._core, request.name, request.version)
        versions = metadata.served_versions(self._core, request.name)
        return convert_grpc.model_metadata_pb(info, versions)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        stamps = self._core.stages.begin("v2-grpc")  # None unless stage timing is on
        version = request.model_version
        info = metadata.resolve(self._core, request.model_name, version)
        pinned = info.model_version if version else ""
        decoded = convert_grpc.decode_grpc_infer(request, pinned, self._max_elements)
        if stamps is not None:
            stamps.mark("decoded")
        timeout = _min_timeout(decoded.timeout, context.time_remaining())
        result = await self._core.soft_targets(decoded.request, timeout, "v2-grpc")
        response = convert_grpc.encode_grpc_infer(result, decoded)
        if stamps is not None:
            stamps.mark("encoded")
        self._core.stages.finish(stamps)
        return response


def add_inference_service(server: grpc.aio.Server, core: TeacherCore, max_elements: int) -> None:
    """Register `inference.GRPCInferenceService` on `server`."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(core, max_elements), server
    )
