"""gRPC server reflection: grpcurl-style tools can list the services and describe the methods."""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def test_reflection_lists_and_describes_the_services(teacher) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(teacher.grpc_address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"distill.v1.TeacherService", "inference.GRPCInferenceService"} <= services
        assert (
            "grpc.health.v1.Health" in services
            or "grpc.reflection.v1alpha.ServerReflection" in services
        )
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(database)
        service = pool.FindServiceByName("distill.v1.TeacherService")
        methods = {method.name for method in service.methods}
        assert {
            "ListModels",
            "GetModelInfo",
            "GetSoftTargets",
            "StreamSoftTargets",
            "ReloadModel",
        } <= methods
        request = pool.FindMessageTypeByName("distill.v1.SoftTargetsRequest")
        assert "temperature" in request.fields_by_name and "batch_id" in request.fields_by_name
