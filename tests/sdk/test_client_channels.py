"""The client SDK's channels: `AsyncClient` (streams, errors, concurrent calls on one client)
and TLS with a bearer token.

The SDK runs against a scripted `Edge` servicer (tests/support/servers.py) on a real grpc.aio
server on 127.0.0.1, so every conversion and error path goes through real gRPC."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from support.certs import self_signed_cert
from support.servers import CALL_TIMEOUT_S, ScriptedEdge, ScriptedEdgeServer

from edgespec import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    Result,
    SamplingParams,
    TlsConfig,
    Unavailable,
)

SECRET = "s3cret-token"


# ----------------------------------------------------------------------------- asyncio


def test_async_client_generate_stream_and_errors(edge):
    async def main() -> None:
        async with AsyncClient(edge.address, timeout=CALL_TIMEOUT_S) as client:
            result = await client.generate([1, 2, 3], SamplingParams(max_new_tokens=3))
            assert result.token_ids == [2, 3, 4] and result.finish_reason == "length"
            assert result.stats.acceptance_rate == 6 / 8

            async with client.stream([5, 6, 7]) as stream:
                chunks = [chunk async for chunk in stream]
            assert [t for c in chunks for t in c.ids] == stream.result.token_ids == [6, 7, 8]

            with pytest.raises(InvalidArgument) as info:
                await client.generate("x", policy="invalid")
            assert info.value.field == "params.temperature"

            with pytest.raises(DeadlineExceeded):
                await client.generate([1], timeout=0.5, policy="stall")

            stream = client.stream([1, 2, 3, 4], policy="drop")
            assert (await stream.__anext__()).ids == [2, 3]
            with pytest.raises(Unavailable):
                await stream.__anext__()

            with pytest.raises(Internal, match="without a summary"):
                await client.generate([1], policy="no_summary")

    asyncio.run(main())
    assert edge.servicer.cancelled.is_set() and not edge.servicer.stall_finished.is_set()


def test_async_concurrent_calls_share_one_client(edge):
    async def main() -> list[Result]:
        async with AsyncClient(edge.address, timeout=CALL_TIMEOUT_S) as client:
            return await asyncio.gather(
                *(client.generate([i, i + 1], SamplingParams(max_new_tokens=2)) for i in range(4))
            )

    results = asyncio.run(main())
    assert [r.token_ids for r in results] == [[i + 1, i + 2] for i in range(4)]


# ----------------------------------------------------------------------------- TLS


def test_tls_channel(tmp_path):
    pytest.importorskip("cryptography", reason="building a test certificate needs cryptography")
    cert_path, key_path = self_signed_cert(tmp_path)
    credentials = grpc.ssl_server_credentials([(key_path.read_bytes(), cert_path.read_bytes())])
    server = ScriptedEdgeServer(ScriptedEdge(token=SECRET), credentials)
    try:
        tls = TlsConfig(ca_cert=cert_path, server_name="localhost")
        with Client(server.address, timeout=CALL_TIMEOUT_S, token=SECRET, tls=tls) as client:
            assert client.generate([1], SamplingParams(max_new_tokens=1)).token_ids == [2]
        # A plaintext client cannot talk to the TLS server.
        with (
            Client(server.address, timeout=CALL_TIMEOUT_S, token=SECRET) as client,
            pytest.raises(Unavailable),
        ):
            client.generate([1])
    finally:
        server.stop()
