"""Tests for `edgespec.serving.auth` and `edgespec.serving.tls`, through the Edge server.

The verifier's side of both (health exempt, reflection behind the token, TLS + token) is in
tests/test_cloud_service.py; here the edge's: health *and* reflection answer without a token,
Generate needs it; and the TLS config's server and client sides, mutual TLS included.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.certs import self_signed_cert

from edgespec.edge.records import TokensEvent
from edgespec.edge.service import serve
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc
from edgespec.serving.auth import (
    EDGE_EXEMPT,
    UNAUTHENTICATED_DETAILS,
    VERIFIER_EXEMPT,
    BearerTokenInterceptor,
)
from edgespec.serving.tls import TlsConfig

TOKEN = "edge-s3cret"
DEADLINE_S = 10.0


class FakeEngine:
    """Stands in for `EdgeEngine`: every generation commits token 7, then ends."""

    async def generate(self, prompt, params, *, k, policy, pipelined):
        yield TokensEvent(tokens=[7], text="x")

    async def aclose(self) -> None:
        pass


def _request() -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=[1, 2]))


async def _generate(channel: grpc.aio.Channel, metadata=()) -> list[pb.GenerateResponse]:
    call = pb_grpc.EdgeStub(channel).Generate(_request(), timeout=DEADLINE_S, metadata=metadata)
    return [response async for response in call]


def test_interceptor_needs_a_token() -> None:
    with pytest.raises(ValueError, match="token"):
        BearerTokenInterceptor("", VERIFIER_EXEMPT)
    assert VERIFIER_EXEMPT == ("/grpc.health.v1.Health/",)
    assert set(EDGE_EXEMPT) == {"/grpc.health.v1.Health/", "/grpc.reflection."}


@pytest.mark.parametrize(
    "metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]
)
def test_edge_refuses_generate_without_the_token_but_health_and_reflection_answer(metadata) -> None:
    async def body() -> None:
        running = await serve(FakeEngine(), token=TOKEN)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _generate(channel, metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert info.value.details() == UNAUTHENTICATED_DETAILS
                good = await _generate(channel, (("authorization", f"Bearer {TOKEN}"),))
                assert [list(r.tokens.ids) for r in good] == [[7]]
                health = health_pb2_grpc.HealthStub(channel)
                status = await health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
                assert status.status == health_pb2.HealthCheckResponse.SERVING
                # Reflection is exempt on the edge (unlike the verifier's).
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                responses = stub.ServerReflectionInfo(iter([request]), timeout=DEADLINE_S)
                names = [s.name async for r in responses for s in r.list_services_response.service]
                assert "edgespec.v1.Edge" in names
        finally:
            await running.stop(grace=None)

    asyncio.run(body())


def test_tls_config_pairs_cert_and_key() -> None:
    with pytest.raises(ValueError, match="cert and key must be given together"):
        TlsConfig(key="key.pem")
    with pytest.raises(ValueError, match="needs cert and key"):
        TlsConfig(ca_cert=b"pem").server_credentials()
    with pytest.raises(ValueError, match="server_name"):
        TlsConfig(server_name="")
    assert TlsConfig().channel_options() == []
    assert TlsConfig(server_name="edge.local").channel_options() == [
        ("grpc.ssl_target_name_override", "edge.local")
    ]


def test_tls_server_and_client_sides_and_mutual_tls(tmp_path) -> None:
    pytest.importorskip("cryptography", reason="building a test certificate needs cryptography")
    cert, key = self_signed_cert(tmp_path)
    (tmp_path / "other").mkdir()
    other_cert, other_key = self_signed_cert(tmp_path / "other")
    auth = (("authorization", f"Bearer {TOKEN}"),)

    async def call(port: int, client: TlsConfig) -> list[pb.GenerateResponse]:
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{port}", client.channel_credentials(), options=client.channel_options()
        ) as channel:
            return await _generate(channel, auth)

    async def body() -> None:
        # Server TLS; the client trusts its certificate (given as a path, or as PEM bytes).
        running = await serve(FakeEngine(), token=TOKEN, tls=TlsConfig(cert, key))
        try:
            assert await call(running.port, TlsConfig(ca_cert=cert, server_name="localhost"))
            pem = cert.read_bytes()
            assert await call(running.port, TlsConfig(ca_cert=pem, server_name="localhost"))
        finally:
            await running.stop(grace=None)
        # Mutual TLS: the server requires a client certificate signed by its ca_cert.
        running = await serve(
            FakeEngine(), token=TOKEN, tls=TlsConfig(cert, key, ca_cert=other_cert)
        )
        try:
            client = TlsConfig(other_cert, other_key, ca_cert=cert, server_name="localhost")
            assert await call(running.port, client)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(running.port, TlsConfig(ca_cert=cert, server_name="localhost"))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await running.stop(grace=None)

    asyncio.run(body())
