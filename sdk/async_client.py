"""The asyncio client of an edge node's `Edge.Generate`: `AsyncClient` and its
`AsyncGenerationStream`, with the surface of the blocking `edgespec.client.Client`.

Example::

    from edgespec import AsyncClient, SamplingParams

    async with AsyncClient("127.0.0.1:50051", timeout=30.0) as client:
        result = await client.generate("hello", SamplingParams(max_new_tokens=16))
        async with client.stream([12, 7, 99], policy="fixed", draft_tokens=4) as stream:
            async for chunk in stream:
                print(chunk.text, end="", flush=True)
        print(stream.result.finish_reason)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import cast

import grpc

from edgespec.core.params import SamplingParams
from edgespec.errors import EdgespecError, from_rpc_error
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc
from edgespec.request import (
    DEFAULT_TIMEOUT_S,
    auth_metadata,
    build_request,
    check_client_args,
    check_timeout,
)
from edgespec.results import Result, StreamState, TokenChunk
from edgespec.serving.tls import TlsConfig


class AsyncGenerationStream(StreamState, AsyncIterator[TokenChunk]):
    """A running `Generate` call for asyncio: ``async for`` it, then read `.result`.

    Use ``async with`` (or `close`) when you may stop early, to cancel the call on the server.

    Example::

        async with client.stream("Once upon", SamplingParams(max_new_tokens=20)) as stream:
            async for chunk in stream:
                print(chunk.text, end="")
        print(stream.result.finish_reason)
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        super().__init__()
        self._call = call

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> TokenChunk:
        while not self.done:
            try:
                response = await self._call.read()
            except grpc.RpcError as rpc_err:
                raise self._fail(from_rpc_error(rpc_err)) from rpc_err
            if response is grpc.aio.EOF:  # type: ignore[attr-defined]  # the stubs lack EOF
                try:
                    self._result = self._assembler.finish()
                except EdgespecError as err:
                    raise self._fail(err) from None
                break
            try:
                chunk = self._assembler.add(cast(pb.GenerateResponse, response))
            except EdgespecError as err:
                self.close()
                raise self._fail(err) from None
            if chunk is not None:
                return chunk
        raise StopAsyncIteration

    def close(self) -> None:
        """Cancel the call if it is still running (idempotent)."""
        if not self.done:
            self._closed = True
        self._call.cancel()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient:
    """asyncio client of an edge node's `Edge` service; the same surface as `Client`.

    Construct it inside the event loop that will use it (the channel belongs to that loop).
    Many calls may run concurrently on one `AsyncClient`.

    Example::

        async with AsyncClient("127.0.0.1:50051", timeout=30.0) as client:
            result = await client.generate("hello", SamplingParams(max_new_tokens=16))
            async for chunk in client.stream([1, 2, 3]):
                print(chunk.ids)
    """

    def __init__(
        self,
        address: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self.timeout = check_client_args(address, timeout, token, tls)
        self.address = address
        self._metadata = auth_metadata(token)
        if tls is None:
            self._channel = grpc.aio.insecure_channel(address)
        else:
            self._channel = grpc.aio.secure_channel(
                address, tls.channel_credentials(), options=tls.channel_options()
            )
        self._stub = pb_grpc.EdgeStub(self._channel)

    def stream(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        policy: str = "adaptive",
        draft_tokens: int = 0,
        pipelined: bool | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerationStream:
        """Start a generation; ``async for`` the returned stream (arguments as for
        `edgespec.client.Client.generate`). The call starts now, so its deadline counts from here.

        Example::

            stream = client.stream("hello")
            async for chunk in stream:
                ...
            print(stream.result.text)
        """
        request = build_request(
            prompt, params, policy=policy, draft_tokens=draft_tokens, pipelined=pipelined
        )
        deadline = self.timeout if timeout is None else check_timeout("timeout", timeout)
        call = self._stub.Generate(request, timeout=deadline, metadata=self._metadata)
        return AsyncGenerationStream(call)

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        policy: str = "adaptive",
        draft_tokens: int = 0,
        pipelined: bool | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Generate a continuation and return the finished `Result` (arguments as for
        `edgespec.client.Client.generate`).

        Example::

            result = await client.generate([5, 6, 7], SamplingParams(max_new_tokens=8))
        """
        async with self.stream(
            prompt,
            params,
            policy=policy,
            draft_tokens=draft_tokens,
            pipelined=pipelined,
            timeout=timeout,
        ) as stream:
            async for _ in stream:
                pass
            return stream.result

    async def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        await self._channel.close(None)  # None: cancel running calls now, no grace period

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
