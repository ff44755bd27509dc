"""The gRPC front door: `distill.v1.TeacherService` on `grpc.aio`.

Each handler decodes, calls the core, encodes. A `TeacherError` becomes its gRPC status with the
message, plus trailing metadata `error-code` and `error-field`. On the stream, an error in one
batch is sent as that batch's `error` and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from protocol.errors import GRPC_CODE_KEY, GRPC_FIELD_KEY, Internal, InvalidArgument, TeacherError
from protocol.v1 import teacher_pb2 as pb
from protocol.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server import wire
from teacher_server.core import TeacherCore

log = logging.getLogger(__name__)


def _stream_error(batch_id: str, error: TeacherError) -> pb.StreamSoftTargetsResponse:
    return pb.StreamSoftTargetsResponse(
        batch_id=batch_id, error=pb.Error(code=error.code, message=error.message, field=error.field)
    )


async def _abort(context: grpc.aio.ServicerContext, error: TeacherError) -> None:
    context.set_trailing_metadata(((GRPC_CODE_KEY, error.code), (GRPC_FIELD_KEY, error.field)))
    await context.abort(error.grpc_status, error.message)


class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the handler can answer with
    INVALID_ARGUMENT naming `body` instead of grpc's bare UNKNOWN."""

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = descriptor.full_name if descriptor is not None else "request message"

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as error:
            return _Undecodable(InvalidArgument(f"body: not a {name} ({error})", "body"))

    return decode


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """Unparseable unary requests get INVALID_ARGUMENT (field `body`) with the error metadata,
    like every other bad input. (A stream's messages are parsed by grpc before any handler runs;
    a corrupt one still ends that stream.)"""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or handler.request_streaming
            or handler.response_streaming
            or handler.request_deserializer is None
        ):
            return handler
        inner = handler.unary_unary

        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await _abort(context, request.error)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            behaviour,  # type: ignore[arg-type]
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    def __init__(self, core: TeacherCore, max_elements: int, stream_max_in_flight: int) -> None:
        self._core = core
        self._max_elements = max_elements
        self._stream_max_in_flight = stream_max_in_flight

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[wire.summary_to_pb(m) for m in self._core.list_models()]
        )

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        try:
            return wire.model_info_to_pb(
                self._core.model_info(request.model, request.model_version)
            )
        except TeacherError as error:
            await _abort(context, error)
            raise  # unreachable: abort raises

    async def ReloadModel(
        self, request: pb.ReloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadModelResponse:
        try:
            result = await self._core.reload(request.model)
        except TeacherError as error:
            await _abort(context, error)
            raise
        return pb.ReloadModelResponse(
            model=result.model,
            versions=[wire.summary_to_pb(v) for v in result.versions],
            loaded=result.loaded,
            unloaded=result.unloaded,
        )

    async def _answer(
        self, request: pb.SoftTargetsRequest, timeout: float | None, transport: str
    ) -> pb.SoftTargetsResponse:
        query = wire.request_from_pb(request, self._max_elements)
        result = await self._core.soft_targets(query, timeout, transport)
        response = wire.response_to_pb(result)
        self._core.metrics.record_bytes(transport, request.ByteSize(), response.ByteSize())
        return response

    async def GetSoftTargets(
        self, request: pb.SoftTargetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SoftTargetsResponse:
        try:
            return await self._answer(request, context.time_remaining(), "grpc")
        except TeacherError as error:
            await _abort(context, error)
            raise

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
