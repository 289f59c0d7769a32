"""The edgespec client SDK: call an edge node's `Edge.Generate` from an application.

Two clients with the same surface:

- `Client` (blocking): ``with Client(addr) as c: c.generate(...)`` / ``for chunk in c.stream(...)``.
- `AsyncClient` (asyncio): ``async with AsyncClient(addr) as c: await c.generate(...)`` /
  ``async for chunk in c.stream(...)``.

Both send one `GenerateRequest` and read the server stream of newly committed tokens followed by
one `Summary`. `generate` returns the whole `Result`; `stream` yields a `TokenChunk` per batch
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

import logging
import math
import numbers
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc

from edgespec.core.params import SamplingParams
from edgespec.errors import EdgespecError, Internal, InvalidArgument, from_rpc_error
from edgespec.protos.convert import params_to_proto
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1
DEFAULT_TIMEOUT_S = 60.0


# ----------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings for the channel to the edge server (absent = plaintext).

    Example::

        tls = TlsConfig(ca_cert="certs/ca.pem", server_name="edge.local")
        client = Client("10.0.0.5:50051", tls=tls, token="s3cret")
    """

    ca_cert: str | Path | None = None  # PEM root(s) to trust; None = gRPC's default roots
    client_cert: str | Path | None = None  # PEM chain for mutual TLS (needs client_key)
    client_key: str | Path | None = None  # PEM private key for mutual TLS (needs client_cert)
    server_name: str | None = None  # name to check the server certificate against, if not the host

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError(
                "client_cert and client_key must be given together (mutual TLS), got "
                f"client_cert={self.client_cert!r}, client_key={self.client_key!r}"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the PEM files (read now: a missing file fails here)."""

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_cert),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return (
            []
            if self.server_name is None
            else [("grpc.ssl_target_name_override", self.server_name)]
        )


@dataclass
class TokenChunk:
    """Tokens the edge committed since the previous chunk, in order, and the text they add.

    The edge decodes incrementally: a character split across tokens is held back until it is
    complete, so a chunk's ``text`` may be empty, and the chunks' texts concatenate to a prefix
    of `Result.text` (shorter only when the output ends inside a character, which `Result.text`
    shows as U+FFFD). `Result.text` is the authoritative decoding of all the tokens.
    """

    ids: list[int]
    text: str


@dataclass
class GenerationStats:
    """How one generation went, as measured by the edge.

    Vocabulary as everywhere in edgespec: the edge drafts tokens in rounds; the verifier accepts
    a prefix of each block and adds one token of its own (recovered or bonus).
    """

    rounds: int = 0  # verification rounds (edge -> cloud -> edge round trips)
    drafted: int = 0  # draft tokens sent for verification
    accepted: int = 0  # draft tokens the verifier accepted
    acceptance_rate: float = 0.0  # accepted / drafted; 0.0 when nothing was drafted
    # acceptance_rate_per_position[i]: accepted / drafted among draft tokens at block position i
    acceptance_rate_per_position: list[float] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    draft_lengths: list[int] = field(default_factory=list)  # k of each round, in order
    rtt_ms: float = 0.0  # mean network time per round (round wall time minus verifier compute)
    time_to_first_token_ms: float = 0.0
    time_per_output_token_ms: float = 0.0
    bytes_sent: int = 0  # on the edge -> verifier link
    bytes_received: int = 0  # on the verifier -> edge link
    reconnects: int = 0  # verifier sessions reopened after a failure
    verifier: str = ""  # address of the verifier that finished the generation
    pipeline_hits: int = 0  # blocks drafted ahead (pipelined) that turned out live
    pipeline_misses: int = 0  # blocks drafted ahead that were discarded
    cloud_only_tokens: int = 0  # tokens the verifier decoded alone (cloud-only mode)

    @classmethod
    def from_proto(cls, stats: pb.GenerateStats) -> GenerationStats:
        """Build from the wire form, deriving the acceptance rates from the counts."""
        drafted_pp = list(stats.drafted_per_position)
        accepted_pp = list(stats.accepted_per_position)
        return cls(
            rounds=stats.rounds,
            drafted=stats.drafted,
            accepted=stats.accepted,
            acceptance_rate=stats.accepted / stats.drafted if stats.drafted else 0.0,
            acceptance_rate_per_position=[
                a / d if d else 0.0 for a, d in zip(accepted_pp, drafted_pp, strict=False)
            ],
            drafted_per_position=drafted_pp,
            accepted_per_position=accepted_pp,
            draft_lengths=list(stats.draft_lengths),
            rtt_ms=stats.rtt_ms_mean,
            time_to_first_token_ms=stats.time_to_first_token_ms,
            time_per_output_token_ms=stats.time_per_output_token_ms,
            bytes_sent=stats.bytes_sent,
            bytes_received=stats.bytes_received,
            reconnects=stats.reconnects,
            pipeline_hits=stats.pipeline_hits,
            pipeline_misses=stats.pipeline_misses,
            cloud_only_tokens=stats.cloud_only_tokens,
            verifier=stats.verifier,
        )


@dataclass
class Result:
    """A finished generation: the generated tokens (prompt excluded), their text, and stats.

    ``finish_reason`` is ``"stop"`` (a stop token was generated; it is included in
    ``token_ids``) or ``"length"`` (``max_new_tokens`` reached).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats


# ----------------------------------------------------------------------------- request building


def _check_timeout(name: str, value: object) -> float:
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidArgument(
            f"{name} must be a finite number of seconds > 0, got {value!r}", field=name
        )
    return float(value)


def build_request(
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    *,
    policy: str = "adaptive",
    draft_tokens: int = 0,
    pipelined: bool | None = None,
) -> pb.GenerateRequest:
    """The `GenerateRequest` for these arguments (what `Client.generate` sends).

    Checks only what the wire cannot carry (types, int32 range); value ranges are the server's
    to judge, and it answers `InvalidArgument` naming the field. `params=None` sends the
    `SamplingParams` defaults (greedy, 64 new tokens).

    Example::

        request = build_request([1, 2, 3], SamplingParams(max_new_tokens=8), policy="fixed",
                                draft_tokens=4)
    """
    if params is None:
        params = SamplingParams()
    elif not isinstance(params, SamplingParams):
        raise InvalidArgument(
            f"params must be an edgespec.SamplingParams, got {type(params).__name__}",
            field="params",
        )
    if not isinstance(policy, str):
        raise InvalidArgument(
            f"policy must be a str such as 'adaptive' or 'fixed', got {policy!r}", field="policy"
        )
    if not isinstance(draft_tokens, numbers.Integral) or isinstance(draft_tokens, bool):
        raise InvalidArgument(
            f"draft_tokens must be an int >= 0 (0 = server default), got {draft_tokens!r}",
            field="draft_tokens",
        )
    if not 0 <= draft_tokens <= INT32_MAX:
        raise InvalidArgument(
            f"draft_tokens must be an int in [0, {INT32_MAX}] (0 = server default), "
            f"got {draft_tokens}",
            field="draft_tokens",
        )
    if pipelined is not None and not isinstance(pipelined, bool):
        raise InvalidArgument(
            f"pipelined must be a bool or None (None = edge default), got {pipelined!r}",
            field="pipelined",
        )
    request = pb.GenerateRequest(
        params=params_to_proto(params), policy=policy, draft_tokens=int(draft_tokens)
    )
    if pipelined is not None:
        request.pipelined = pipelined
    if isinstance(prompt, str):
        request.prompt = prompt
        return request
    if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
        raise InvalidArgument(
            f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}",
            field="prompt",
        )
    for i, token in enumerate(prompt):
        if (
            not isinstance(token, numbers.Integral)
            or isinstance(token, bool)
            or not 0 <= token <= INT32_MAX
        ):
            raise InvalidArgument(
                f"prompt[{i}] must be a token id (int) in [0, {INT32_MAX}], got {token!r}",
                field=f"prompt[{i}]",
            )
    # Set through CopyFrom so the oneof says "prompt_ids" even for an empty list (which the
    # server then rejects by name, instead of seeing no prompt at all).
    request.prompt_ids.CopyFrom(pb.TokenIds(ids=[int(t) for t in prompt]))
    return request


class _Assembler:
    """Turns the response stream into chunks and the final `Result`, checking the protocol:
    token events, then exactly one summary whose token_ids are the chunks' ids, then the end."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.summary: pb.Summary | None = None

    def add(self, response: pb.GenerateResponse) -> TokenChunk | None:
        if self.summary is not None:
            raise Internal("protocol error: the server sent a message after the summary")
        event = response.WhichOneof("event")
        if event == "tokens":
            ids = list(response.tokens.ids)
            self.ids.extend(ids)
            return TokenChunk(ids=ids, text=response.text) if ids else None
        if event == "summary":
            self.summary = response.summary
            return None
        raise Internal("protocol error: the server sent a response with neither tokens nor summary")

    def finish(self) -> Result:
        summary = self.summary
        if summary is None:
            raise Internal("protocol error: the stream ended without a summary")
        if list(summary.token_ids) != self.ids:
            raise Internal(
                f"protocol error: the summary's {len(summary.token_ids)} token ids differ from "
                f"the {len(self.ids)} streamed ones"
            )
        return Result(
            text=summary.text,
            token_ids=list(summary.token_ids),
            finish_reason=summary.finish_reason,
            stats=GenerationStats.from_proto(summary.stats),
        )


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"Bearer {token}"),)


def _check_client_args(address: object, timeout: object, token: object, tls: object) -> float:
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"address must be a non-empty 'host:port' string, got {address!r}")
    if token is not None and (not isinstance(token, str) or not token or "\n" in token):
        raise ValueError("token must be None or a non-empty single-line string")
    if tls is not None and not isinstance(tls, TlsConfig):
        raise ValueError(f"tls must be None or an edgespec.TlsConfig, got {type(tls).__name__}")
    try:
        return _check_timeout("timeout", timeout)
    except InvalidArgument as err:
        raise ValueError(err.details) from None


class _StreamState:
    """What the sync and async streams share: the assembler, the result or error, done-ness."""

    def __init__(self) -> None:
        self._assembler = _Assembler()
        self._result: Result | None = None
        self._error: EdgespecError | None = None
        self._closed = False

    @property
    def done(self) -> bool:
        """True once the stream has ended: finished, failed or closed."""
        return self._result is not None or self._error is not None or self._closed

    @property
    def result(self) -> Result:
        """The final `Result`, available once the iteration has ended normally.

        Raises the stream's `EdgespecError` if it failed, and `RuntimeError` if the stream has
        not been read to the end (or was closed early).
        """
        if self._error is not None:
            raise self._error
        if self._result is None:
            if self._closed:
                raise RuntimeError("the stream was closed before it finished: no result")
            raise RuntimeError(
                "the stream has not finished: iterate it to the end before reading .result"
            )
        return self._result

    def _fail(self, err: EdgespecError) -> EdgespecError:
        self._error = err
        return err


# ----------------------------------------------------------------------------- blocking client


class GenerationStream(_StreamState, Iterator[TokenChunk]):
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
        tls: TLS settings; None = plaintext.

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
        self.timeout = _check_client_args(address, timeout, token, tls)
        self.address = address
        self._metadata = _metadata(token)
        if tls is None:
            self._channel = grpc.insecure_channel(address)
        else:
            self._channel = grpc.secure_channel(
                address, tls.credentials(), options=tls.channel_options()
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
        deadline = self.timeout if timeout is None else _check_timeout("timeout", timeout)
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
            policy: draft-length policy: ``"adaptive"``, ``"fixed"``, ``"heuristic"`` or
                ``"cloud_only"`` (the server validates the name).
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


# ----------------------------------------------------------------------------- asyncio client


class AsyncGenerationStream(_StreamState, AsyncIterator[TokenChunk]):
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
            if response is grpc.aio.EOF:
                try:
                    self._result = self._assembler.finish()
                except EdgespecError as err:
                    raise self._fail(err) from None
                break
            try:
                chunk = self._assembler.add(response)
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
        self.timeout = _check_client_args(address, timeout, token, tls)
        self.address = address
        self._metadata = _metadata(token)
        if tls is None:
            self._channel = grpc.aio.insecure_channel(address)
        else:
            self._channel = grpc.aio.secure_channel(
                address, tls.credentials(), options=tls.channel_options()
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
        """Start a generation; ``async for`` the returned stream (see `Client.generate` for
        the arguments). The call starts now, so its deadline counts from here.

        Example::

            stream = client.stream("hello")
            async for chunk in stream:
                ...
            print(stream.result.text)
        """
        request = build_request(
            prompt, params, policy=policy, draft_tokens=draft_tokens, pipelined=pipelined
        )
        deadline = self.timeout if timeout is None else _check_timeout("timeout", timeout)
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
        """Generate a continuation and return the finished `Result` (see `Client.generate`).

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
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


__all__ = [
    "AsyncClient",
    "AsyncGenerationStream",
    "Client",
    "GenerationStats",
    "GenerationStream",
    "Result",
    "TlsConfig",
    "TokenChunk",
    "build_request",
]
