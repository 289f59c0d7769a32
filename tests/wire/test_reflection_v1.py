"""Server reflection as a v1-only tool (newer grpcurl) sees it, on a real edge and a real verifier
server on 127.0.0.1: `grpc.reflection.v1.ServerReflection` lists the services, and the file that
defines them has its package-relative name `edgespec/v1/edgespec.proto` (what another language's
tooling expects when it imports the .proto).

The v1 client is built here from its own descriptor (package grpc.reflection.v1), independent of
the server's v1alpha classes; v1alpha is checked alongside, as older tools still use it.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

from edgespec.cloud.service import serve as serve_verifier
from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.runner import ModelRunner
from edgespec.edge.records import TokensEvent
from edgespec.edge.service import serve as serve_edge

DEADLINE_S = 10.0
PROTO_FILE = "edgespec/v1/edgespec.proto"


def _v1_messages() -> tuple[type, type]:
    """(ServerReflectionRequest, ServerReflectionResponse) of package grpc.reflection.v1."""
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(".v1alpha.", ".v1.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(".v1alpha.", ".v1.")
            method.output_type = method.output_type.replace(".v1alpha.", ".v1.")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return tuple(  # type: ignore[return-value]
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.reflection.v1.{n}"))
        for n in ("ServerReflectionRequest", "ServerReflectionResponse")
    )


async def _ask(channel, version: str, requests, metadata=()) -> list:
    request_cls, response_cls = (
        _v1_messages()
        if version == "v1"
        else (v1alpha.ServerReflectionRequest, v1alpha.ServerReflectionResponse)
    )
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    stream = call(iter([request_cls(**r) for r in requests]), timeout=DEADLINE_S, metadata=metadata)
    return [r async for r in stream]


async def _discover(address: str, version: str, service: str, metadata=()) -> None:
    """List the services, then fetch the file defining `service`: grpcurl's `list` + `describe`."""
    async with grpc.aio.insecure_channel(address) as channel:
        (listed,) = await _ask(channel, version, [{"list_services": ""}], metadata)
        names = {s.name for s in listed.list_services_response.service}
        assert {service, "grpc.health.v1.Health"} <= names
        assert {"grpc.reflection.v1.ServerReflection"} <= names
        assert {"grpc.reflection.v1alpha.ServerReflection"} <= names
        (found,) = await _ask(channel, version, [{"file_containing_symbol": service}], metadata)
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in found.file_descriptor_response.file_descriptor_proto
        ]
        assert [f.name for f in files] == [PROTO_FILE]
        assert files[0].package == "edgespec.v1"
        (by_name,) = await _ask(channel, version, [{"file_by_filename": PROTO_FILE}], metadata)
        assert by_name.file_descriptor_response.file_descriptor_proto


class _NoEngine:
    async def generate(self, prompt, params, *, k, policy, pipelined):
        yield TokensEvent(tokens=[1], text="")

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_the_edge_and_the_verifier(tiny_pair, version) -> None:
    target = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model

    async def body() -> None:
        verifier = await serve_verifier(VerifierEngine(target, VerifierConfig()), token="t0k")
        edge = await serve_edge(_NoEngine(), token="edge-t0k")  # type: ignore[arg-type]
        try:
            # The edge answers reflection without its token; the verifier only with its own.
            await _discover(f"127.0.0.1:{edge.port}", version, "edgespec.v1.Edge")
            await _discover(
                verifier.address,
                version,
                "edgespec.v1.Verifier",
                (("authorization", "Bearer t0k"),),
            )
        finally:
            await edge.stop(grace=None)
            await verifier.stop(grace=None)

    asyncio.run(body())
