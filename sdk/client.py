"""The blocking client of an edge node's `Edge.Generate`: `Client` and its `GenerationStream`.

`AsyncClient` (edgespec.async_client) has the same surface for asyncio. Both send one
`GenerateRequest` and read the server stream of newly committed tokens followed by one
`Summary`. `generate` returns the whole `Result`; `stream` yields a `TokenChunk` per batch
of committed tokens as it arrives, and once the iteration has ended the stream object's
``.result`` holds the same `Result` that `generate` would have returned.

Every call has a deadline: the ``timeout`` (seconds) of the call, else the client's; it bounds
the whole stream, not each message. Failures raise the typed errors of `edgespec.errors`.

Example::

    from edgespec import Client, SamplingParams

    with Client("127.0.0.1:50051", timeout=30.0) as client:
        result = client.generate("def read_config(path):\\n", SamplingParams(max_new_tokens=32))
        print(result.text, result.stats.acceptance_rate)

        with client.stream([12, 7, 99], policy="fixed", draft_tokens=4) as stream:
            for chunk in stream:
                print(chunk.text, end="", flush=True)
        print(stream.result.finish_reason)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType

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


class GenerationStream(StreamState, Iterator[TokenChunk]):
    """A running `Generate` call: iterate it for `TokenChunk`s, then read `.result`.

    Use it as a context manager (or call `close`) when you may stop early: that cancels the
    call on the server instead of leaving it to run until its deadline.

    Example::

        with client.stream("Once upon", SamplingParams(max_new_tokens=20)) as stream:
            for chunk in stream:
                print(chunk.text, end="")
        print(stream.result.stats.rounds)
    """

    def __init__(self, call: Iterator[pb.GenerateResponse]) -> None:
        super().__init__()
        self._call = call

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> TokenChunk:
        while not self.done:
            try:
                response = next(self._call)
            except StopIteration:
                try:
                    self._result = self._assembler.finish()
                except EdgespecError as err:
                    raise self._fail(err) from None
                break
            except grpc.RpcError as rpc_err:
                raise self._fail(from_rpc_error(rpc_err)) from rpc_err
            try:
                chunk = self._assembler.add(response)
            except EdgespecError as err:
                self.close()
                raise self._fail(err) from None
            if chunk is not None:
                return chunk
        raise StopIteration

    def close(self) -> None:
        """Cancel the call if it is still running (idempotent)."""
        if not self.done:
            self._closed = True
        cancel = getattr(self._call, "cancel", None)
        if cancel is not None:
            cancel()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Client:
    """Blocking client of an edge node's `Edge` service.

    Args:
        address: ``"host:port"`` of the edge server.
        timeout: default deadline of each call in seconds (the whole stream), > 0.
        token: bearer token sent as ``authorization: Bearer <token>`` metadata, if the server
            requires one.
        tls: TLS settings (`edgespec.TlsConfig`: ``ca_cert`` to trust, ``server_name`` to
            check, ``cert`` + ``key`` for mutual TLS); None = plaintext.

    The channel connects lazily and is closed by `close` or on leaving the ``with`` block. A
    `Client` is safe to share between threads.

    Example::

        with Client("127.0.0.1:50051") as client:
            result = client.generate([15, 4, 92], SamplingParams(max_new_tokens=16))
            assert result.finish_reason in ("stop", "length")
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
            self._channel = grpc.insecure_channel(address)
        else:
            self._channel = grpc.secure_channel(
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
    ) -> GenerationStream:
        """Start a generation and return its `GenerationStream` of `TokenChunk`s.

        Arguments as for `generate`. Argument type errors raise `InvalidArgument` here; server
        errors (including a bad value the server rejects) raise from the iteration.

        Example::

            stream = client.stream("hello", SamplingParams(max_new_tokens=8))
            ids = [t for chunk in stream for t in chunk.ids]
            assert ids == stream.result.token_ids
        """
        request = build_request(
            prompt, params, policy=policy, draft_tokens=draft_tokens, pipelined=pipelined
        )
        deadline = self.timeout if timeout is None else check_timeout("timeout", timeout)
        call = self._stub.Generate(request, timeout=deadline, metadata=self._metadata)
        return GenerationStream(call)

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        policy: str = "adaptive",
        draft_tokens: int = 0,
        pipelined: bool | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Generate a continuation of `prompt` and return the finished `Result`.

        Args:
            prompt: text (tokenized by the edge's tokenizer) or token ids.
            params: sampling parameters; None = `SamplingParams()` (greedy, 64 new tokens).
            policy: draft-length policy: ``"adaptive"``, ``"fixed"``, ``"heuristic"``,
                ``"cloud_only"``, ``"tree"`` (token trees of one shape) or ``"adaptive_tree"``
                (the adaptive policy choosing token-tree shapes too); the server validates it.
            draft_tokens: k for ``"fixed"``, the starting k otherwise; 0 = the server's default.
            pipelined: draft the next block while a verdict is in flight (True/False);
                None = the edge's default.
            timeout: deadline for the whole call in seconds; None = the client's ``timeout``.

        Raises:
            InvalidArgument: a bad argument (``.field`` names it), locally or from the server.
            DeadlineExceeded: the deadline passed.
            Unavailable, Unauthenticated, ResourceExhausted, NotFound, Internal, EdgespecError.

        Example::

            result = client.generate("def f(x):", SamplingParams(max_new_tokens=32),
                                     policy="fixed", draft_tokens=4, timeout=10.0)
            print(result.text, result.stats.acceptance_rate)
        """
        with self.stream(
            prompt,
            params,
            policy=policy,
            draft_tokens=draft_tokens,
            pipelined=pipelined,
            timeout=timeout,
        ) as stream:
            for _ in stream:
                pass
            return stream.result

    def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
