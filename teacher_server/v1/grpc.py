"""The gRPC door of our own protocol: `distill.v1.TeacherService` on `grpc.aio`.

Each handler decodes (`teacher_server.v1.convert`), calls the core, encodes. A `TeacherError` it
raises becomes its gRPC status in `teacher_server.grpc_errors`. On the stream, an error in one
batch is sent as that batch's `error` and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from protocol.errors import Internal, TeacherError
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.serving.core import TeacherCore
from teacher_server.v1 import convert

log = logging.getLogger(__name__)


def _stream_error(batch_id: str, error: TeacherError) -> pb.StreamSoftTargetsResponse:
    return pb.StreamSoftTargetsResponse(
        batch_id=batch_id, error=pb.Error(code=error.code, message=error.message, field=error.field)
    )


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    """`distill.v1.TeacherService` over `core`; `max_elements` bounds a decoded tensor."""

    def __init__(self, core: TeacherCore, max_elements: int, stream_max_in_flight: int) -> None:
        self._core = core
        self._max_elements = max_elements
        self._stream_max_in_flight = stream_max_in_flight

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[convert.summary_to_pb(m) for m in self._core.list_models()]
        )

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return convert.model_info_to_pb(self._core.model_info(request.model, request.model_version))

    async def GetTokenizer(
        self, request: pb.GetTokenizerRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTokenizerResponse:
        tokenizer, content = self._core.tokenizer_file(request.model, request.model_version)
        return pb.GetTokenizerResponse(
            file_name=tokenizer.file_name, sha256=tokenizer.sha256, content=content
        )

    async def ReloadModel(
        self, request: pb.ReloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadModelResponse:
        result = await self._core.reload(request.model)
        return pb.ReloadModelResponse(
            model=result.model,
            versions=[convert.summary_to_pb(v) for v in result.versions],
            loaded=result.loaded,
            unloaded=result.unloaded,
        )

    async def _answer(
        self, request: pb.SoftTargetsRequest, timeout: float | None, transport: str
    ) -> pb.SoftTargetsResponse:
        stamps = self._core.stages.begin(transport)  # None unless stage timing is on
        query = convert.request_from_pb(request, self._max_elements)
        if stamps is not None:
            stamps.mark("decoded")
        result = await self._core.soft_targets(query, timeout, transport)
        response = convert.response_to_pb(result)
        if stamps is not None:
            stamps.mark("encoded")
        self._core.metrics.record_bytes(transport, request.ByteSize(), response.ByteSize())
        self._core.stages.finish(stamps)
        return response

    async def GetSoftTargets(
        self, request: pb.SoftTargetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SoftTargetsResponse:
        return await self._answer(request, context.time_remaining(), "grpc")

    async def StreamSoftTargets(
        self,
        request_iterator: AsyncIterator[pb.SoftTargetsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamSoftTargetsResponse]:
        responses: asyncio.Queue[pb.StreamSoftTargetsResponse | None] = asyncio.Queue()
        in_flight = asyncio.Semaphore(self._stream_max_in_flight)
        tasks: set[asyncio.Task[None]] = set()

        async def answer_one(request: pb.SoftTargetsRequest) -> None:
            try:
                message = pb.StreamSoftTargetsResponse(
                    batch_id=request.batch_id,
                    soft_targets=await self._answer(request, None, "grpc-stream"),
                )
            except TeacherError as error:
                message = _stream_error(request.batch_id, error)
            except Exception as error:  # one batch's bug must not end the other batches' stream
                log.exception("batch %r failed", request.batch_id)
                message = _stream_error(request.batch_id, Internal(f"batch failed: {error!r}"))
            await responses.put(message)

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    await in_flight.acquire()  # backpressure: stop reading when too many in flight
                    task = asyncio.create_task(answer_one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                await responses.put(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (message := await responses.get()) is not None:
                yield message
                in_flight.release()  # counted until sent, so unread answers cannot pile up
            await reader  # surfaces a reader failure
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
