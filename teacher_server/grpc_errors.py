"""The gRPC error path: one interceptor turns every `TeacherError` into its status, for all services.

A handler (of `distill.v1.TeacherService`, `inference.GRPCInferenceService`, or the token check)
raises `protocol.errors.TeacherError`; `ErrorInterceptor` answers with the error's gRPC status and
message, and its code and field as trailing metadata (`error-code`, `error-field`), so no handler
catches errors only to report them. Other exceptions pass through to grpc, which answers UNKNOWN.

`DecodeErrorInterceptor` parses unary requests itself, so that bytes that are not the method's
message get INVALID_ARGUMENT naming `body` instead of grpc's bare UNKNOWN. (A stream's messages are
parsed by grpc before any handler runs; a corrupt one still ends that stream.)

Order on the server: `ErrorInterceptor`, the token check, `DecodeErrorInterceptor`: a call without
the token is refused as UNAUTHENTICATED whatever its body holds.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from protocol.errors import InvalidArgument, TeacherError


async def _abort(context: grpc.aio.ServicerContext, error: TeacherError) -> NoReturn:
    context.set_trailing_metadata(error.grpc_trailing_metadata())
    await context.abort(error.grpc_status, error.message)
    raise AssertionError("unreachable: abort raises")


class _Undecodable:
    """Stands in for a request whose bytes did not parse; its handler raises `error`."""

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


Behaviour = Callable[[Any, grpc.aio.ServicerContext], Any]


def _unary_response(behaviour: Behaviour) -> Behaviour:
    """`behaviour`, a coroutine function, with its `TeacherError`s turned into the status."""

    async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except TeacherError as error:
            await _abort(context, error)

    return answer


def _streaming_response(behaviour: Behaviour) -> Behaviour:
    """`behaviour`, a response-streaming handler, with its `TeacherError`s turned into the status."""
    if not inspect.isasyncgenfunction(behaviour):
        return _unary_response(behaviour)  # a coroutine that writes with `context.write`

    async def answer(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            # closed with this generator, so the handler's own clean-up runs when grpc ends it
            async with contextlib.aclosing(behaviour(request, context)) as responses:
                async for response in responses:
                    yield response
        except TeacherError as error:
            await _abort(context, error)

    return answer


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Every `TeacherError` a handler raises becomes its gRPC status, message and metadata.

    Put it first: the handlers of the interceptors after it (the token check) are wrapped too."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        methods = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.request_streaming and handler.response_streaming:
            behaviour = _streaming_response(handler.stream_stream)
            return grpc.stream_stream_rpc_method_handler(behaviour, **methods)
        if handler.request_streaming:
            behaviour = _unary_response(handler.stream_unary)
            return grpc.stream_unary_rpc_method_handler(behaviour, **methods)
        if handler.response_streaming:
            behaviour = _streaming_response(handler.unary_stream)
            return grpc.unary_stream_rpc_method_handler(behaviour, **methods)
        return grpc.unary_unary_rpc_method_handler(_unary_response(handler.unary_unary), **methods)


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """Unparseable unary requests raise INVALID_ARGUMENT (field `body`), like every other bad
    input. Put it last, after the token check."""

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
                raise request.error
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            behaviour,  # type: ignore[arg-type]
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
