"""The edge's client of the Verifier service: one persistent VerifyStream per session.

`VerifierLink` opens a session on a verifier (`OpenSession` with the committed prefix), keeps ONE
bidirectional `VerifyStream` open for it, and turns each round into a write of one `DraftBlock` and
a read of its `Verdict`. Nothing else happens per round: no new call, no channel lookup, no extra
serialisation (byte counts come from the serializer itself), one timer for the round's deadline.
`verify` is that round; `send` and `receive` are its halves, for a caller that keeps more than one
block in flight (pipelined drafting) or reads several verdicts per block (cloud-only streaming,
where each `Reply` has ``more`` set until the last).

Failures surface as `LinkError`, whose `retryable` flag tells the caller (the `EdgeEngine`) whether
reopening the session, on this or on the next verifier, can help. The link never retries by itself:
the edge owns the committed tokens, so only the engine knows which prefix to reopen with.

Addresses come from a provider: a list (tried in order, wrapping around: each `open` after a failure
moves on to the next address) or a callable that returns the next address to try (an orchestrator
can pick a live verifier there).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from edgespec.core.params import SamplingParams
from edgespec.core.session import DraftBlock, Verdict
from edgespec.protos.convert import block_to_proto, params_to_proto, verdict_from_proto
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

VERIFY_STREAM_METHOD = "/edgespec.v1.Verifier/VerifyStream"

# Dense draft probs are k * V float32: k=32 drafts over a 150k vocabulary is ~19 MB, beyond gRPC's
# 4 MiB default. The verifier must accept as much (its own server option).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Status codes after which reopening the session (same or another verifier) may succeed: the
# connection or the verifier failed, the session was reaped, or this verifier is full / has
# another model. Everything else (INVALID_ARGUMENT, UNAUTHENTICATED, ...) would fail again.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# Codes that say the connection itself is suspect: the channel is replaced by a fresh one.
_CONNECTION_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)

AddressProvider = Sequence[str] | Callable[[], str]


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


@dataclass(frozen=True)
class LinkConfig:
    """How the edge talks to verifiers. Every call has a deadline; all times in seconds."""

    token: str | None = None  # bearer token sent as `authorization: Bearer <token>` metadata
    # TLS: PEM root certificate(s) to trust (bytes, or a path to a PEM file); None = plaintext.
    tls_root_cert: bytes | str | Path | None = None
    tls_server_name: str | None = None  # override the name checked in the server's certificate
    model_id: str = ""  # model the edge expects; "" = the verifier's only model
    open_timeout_s: float = 30.0  # OpenSession deadline (includes the verifier's prefill)
    round_timeout_s: float = 10.0  # one round: block written -> verdict read
    close_timeout_s: float = 2.0  # CloseSession deadline (best effort)
    # Deadline of the whole VerifyStream call; a longer session reopens transparently after it.
    stream_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("open_timeout_s", "round_timeout_s", "close_timeout_s", "stream_timeout_s"):
            _check_positive(name, getattr(self, name))
        if self.token is not None and (not isinstance(self.token, str) or not self.token):
            raise ValueError(f"token must be a non-empty str or None, got {self.token!r}")
        if not isinstance(self.model_id, str):
            raise ValueError(f"model_id must be a str, got {self.model_id!r}")

    def root_cert_bytes(self) -> bytes | None:
        """The PEM root certificate(s), read from the file when given as a path."""
        cert = self.tls_root_cert
        if cert is None or isinstance(cert, bytes):
            return cert
        return Path(cert).read_bytes()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


@dataclass(frozen=True)
class SessionInfo:
    """What `OpenSession` answered."""

    address: str  # the verifier holding the session
    session_id: str
    committed_len: int
    max_block_tokens: int  # largest k the verifier accepts
    vocab_size: int
    model_id: str
    prefill_ms: float
    compute_profile: str = "real"  # the verifier's compute profile ("real" or an emulated one)
    # OpenSession's wall time less the verifier's prefill: one RTT sample; None when the call
    # also set up the connection (a fresh channel costs extra round trips)
    open_rtt_ms: float | None = None


@dataclass(frozen=True)
class Reply:
    """One Verdict message as `receive` read it."""

    seq: int  # seq of the block it answers
    outcome: str  # "APPLIED" | "REPLAYED" | "STALE"
    verdict: Verdict | None  # None for STALE
    more: bool  # more replies answer the same block (cloud-only streaming)
    committed_len: int  # the verifier's committed length after it
    verify_ms: float  # verifier compute for it
    queue_ms: float  # time its block waited at the verifier (since arrival) before the forward
    received: float  # time.perf_counter() when it was read
    bytes_received: int  # serialized size


@dataclass(frozen=True)
class RoundTiming:
    """Where the time of one round went, seen from the edge (milliseconds) and its bytes.

    network_ms = wall_ms - verify_ms - queue_ms: the wire both ways plus both sides' gRPC and
    (de)serialisation. Bytes are serialized message sizes (gRPC/HTTP2 framing not included).
    """

    wall_ms: float  # block written -> verdict read
    verify_ms: float  # verifier compute (forward + sampling), as reported by the verifier
    queue_ms: float  # time the block waited on the verifier before its forward
    network_ms: float
    bytes_sent: int
    bytes_received: int
    replayed: bool = False  # the verifier answered with the stored verdict of a resent block


def round_timing(reply: Reply, t_sent: float, bytes_sent: int) -> RoundTiming:
    """The `RoundTiming` of a block sent at `t_sent` (perf_counter) and answered by `reply`."""
    wall_ms = (reply.received - t_sent) * 1e3
    return RoundTiming(
        wall_ms=wall_ms,
        verify_ms=reply.verify_ms,
        queue_ms=reply.queue_ms,
        network_ms=wall_ms - reply.verify_ms - reply.queue_ms,
        bytes_sent=bytes_sent,
        bytes_received=reply.bytes_received,
        replayed=reply.outcome == "REPLAYED",
    )


class LinkError(Exception):
    """A verifier call failed.

    `retryable`: reopening the session (same or another verifier) may succeed; False means the
    request itself is refused (bad input, bad credentials) and would fail again. `code` is the gRPC
    status (None for a protocol violation such as a stream that ended early).
    """

    def __init__(
        self,
        message: str,
        *,
        address: str | None,
        code: grpc.StatusCode | None = None,
        retryable: bool = True,
        details: str = "",
    ) -> None:
        super().__init__(message)
        self.address = address
        self.code = code
        self.retryable = retryable
        self.details = details


def make_address_provider(addresses: AddressProvider) -> Callable[[], str]:
    """A callable returning the next verifier address to try.

    A sequence yields its addresses in order, wrapping around (primary first, then failovers);
    a callable is returned unchanged.
    """
    if callable(addresses):
        return addresses
    if isinstance(addresses, str) or not addresses:
        raise ValueError(
            f"addresses must be a non-empty list of 'host:port' or a callable, got {addresses!r}"
        )
    for i, a in enumerate(addresses):
        if not isinstance(a, str) or ":" not in a:
            raise ValueError(f"addresses[{i}] must be 'host:port', got {a!r}")
    cycle = itertools.cycle(list(addresses))
    return lambda: next(cycle)


class ChannelPool:
    """One gRPC channel (one HTTP/2 connection) per verifier address, shared by sessions.

    A channel that failed at the connection level is `discard`ed: new sessions get a fresh one,
    and the old one is closed in the background after a grace period for its other streams.
    Must be used from one event loop.
    """

    def __init__(self, config: LinkConfig | None = None) -> None:
        self.config = config if config is not None else LinkConfig()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task] = set()
        self._options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if self.config.tls_server_name:
            self._options.append(("grpc.ssl_target_name_override", self.config.tls_server_name))

    def has(self, address: str) -> bool:
        """A channel to `address` exists (and has most likely connected already)."""
        return address in self._channels

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            root = self.config.root_cert_bytes()
            if root is not None:
                creds = grpc.ssl_channel_credentials(root_certificates=root)
                channel = grpc.aio.secure_channel(address, creds, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
        return channel

    def discard(self, address: str, channel: grpc.aio.Channel) -> None:
        """Stop handing out `channel`; close it once its other calls had a chance to finish."""
        if self._channels.get(address) is channel:
            del self._channels[address]
        grace = self.config.round_timeout_s
        task = asyncio.get_running_loop().create_task(channel.close(grace=grace))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every channel now (cancels their calls)."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
        for task in list(self._closing):
            task.cancel()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class _ByteCounter:
    """Serializer/deserializer pair that records the size of every message it handles."""

    __slots__ = ("sent", "received", "last_sent", "last_received")

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.last_sent = 0
        self.last_received = 0

    def serialize(self, msg: pb.DraftBlock) -> bytes:
        data = msg.SerializeToString()
        self.last_sent = len(data)
        self.sent += len(data)
        return data

    def deserialize(self, data: bytes) -> pb.Verdict:
        self.last_received = len(data)
        self.received += len(data)
        return pb.Verdict.FromString(data)


class VerifierLink:
    """Client of one session on a Verifier, over one persistent `VerifyStream`.

    Use::

        link = VerifierLink(["10.0.0.5:50051", "10.0.0.6:50051"], LinkConfig(token="t"))
        info = await link.open(prompt_ids, params)
        verdict, timing = await link.verify(block)   # one round; raises LinkError on failure
        ...
        await link.aclose()

    After a `LinkError`, call `open` again (with the committed prefix and the seq of the block to
    resend): it abandons the broken session and opens a new one on the next address. One round at
    a time: `verify` must not be called concurrently on one link.
    """

    def __init__(
        self,
        addresses: AddressProvider,
        config: LinkConfig | None = None,
        *,
        pool: ChannelPool | None = None,
    ) -> None:
        self.config = config if config is not None else (pool.config if pool else LinkConfig())
        self._next_address = make_address_provider(addresses)
        self._owns_pool = pool is None
        self._pool = pool if pool is not None else ChannelPool(self.config)
        self._metadata = self.config.metadata()
        self._counter = _ByteCounter()
        self._open_bytes_sent = 0
        self._open_bytes_received = 0
        self.session: SessionInfo | None = None
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._expired = False
        self._stream_named = False  # the current stream's first block (naming the session) sent
        self._background: set[asyncio.Task] = set()

    # ---- state ------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._call is not None

    @property
    def address(self) -> str | None:
        """Address of the verifier holding the current (or last) session."""
        return self.session.address if self.session else None

    @property
    def bytes_sent(self) -> int:
        """Serialized bytes sent so far: blocks plus OpenSession requests."""
        return self._counter.sent + self._open_bytes_sent

    @property
    def bytes_received(self) -> int:
        """Serialized bytes received so far: verdicts plus OpenSession responses."""
        return self._counter.received + self._open_bytes_received

    # ---- session ----------------------------------------------------------------------------

    async def open(
        self,
        prefix_ids: Sequence[int],
        params: SamplingParams,
        generated: int = 0,
        next_seq: int = 0,
    ) -> SessionInfo:
        """Open a session on the next address, seeded with the committed prefix.

        `prefix_ids`: prompt + tokens generated so far (`generated` of them); `next_seq`: seq of
        the next block the edge will send. Abandons any current session first. Raises `LinkError`.
        """
        self._abandon(discard_channel=False)
        address = self._next_address()
        reused = self._pool.has(address)
        channel = self._pool.get(address)
        request = pb.OpenSessionRequest(
            prefix_ids=prefix_ids,
            params=params_to_proto(params),
            model_id=self.config.model_id,
            generated=generated,
            next_seq=next_seq,
        )
        stub = pb_grpc.VerifierStub(channel)
        t0 = time.perf_counter()
        try:
            response = await stub.OpenSession(
                request, timeout=self.config.open_timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as err:
            raise self._rpc_failure("OpenSession", address, channel, err) from err
        open_ms = (time.perf_counter() - t0) * 1e3
        self._open_bytes_sent += request.ByteSize()
        self._open_bytes_received += response.ByteSize()
        self.session = SessionInfo(
            address=address,
            session_id=response.session_id,
            committed_len=response.committed_len,
            max_block_tokens=response.max_block_tokens,
            vocab_size=response.vocab_size,
            model_id=response.model_id,
            prefill_ms=response.prefill_ms,
            compute_profile=response.compute_profile or "real",
            open_rtt_ms=max(open_ms - response.prefill_ms, 0.0) if reused else None,
        )
        self._channel = channel
        if response.committed_len != len(prefix_ids):
            self._abandon(discard_channel=False)
            raise LinkError(
                f"verifier {address} opened the session at committed_len "
                f"{response.committed_len}, expected {len(prefix_ids)}",
                address=address,
            )
        method = channel.stream_stream(
            VERIFY_STREAM_METHOD,
            request_serializer=self._counter.serialize,
            response_deserializer=self._counter.deserialize,
        )
        self._call = method(timeout=self.config.stream_timeout_s, metadata=self._metadata)
        self._stream_named = False
        logger.debug(
            "session %s open on %s at committed_len %d (prefill %.1f ms)",
            response.session_id,
            address,
            response.committed_len,
            response.prefill_ms,
        )
        return self.session

    async def verify(self, block: DraftBlock) -> tuple[Verdict, RoundTiming]:
        """Send one block on the session's stream and wait for its verdict (per-round deadline).

        Returns the verdict (APPLIED or REPLAYED) and the round's timing. Raises `LinkError` on
        any failure, after which the link must be reopened; a STALE verdict is a `LinkError` too
        (the edge never drafts on a stale prefix, so it means the sides disagree: reopen).
        For one-verdict blocks only (not decode blocks).
        """
        t_sent, bytes_sent = await self.send(block)
        reply = await self.receive()
        if reply.verdict is None or reply.seq != block.seq or reply.more:
            raise self._stream_failure(
                f"verifier answered block seq={block.seq} base_len={block.base_len} with "
                f"{reply.outcome} seq={reply.seq} committed_len={reply.committed_len}",
                None,
            )
        return reply.verdict, round_timing(reply, t_sent, bytes_sent)

    async def send(self, block: DraftBlock) -> tuple[float, int]:
        """Write one block on the session's stream without waiting for its verdict.

        Returns (time.perf_counter() at the write, serialized bytes). Raises `LinkError` (the link
        must then be reopened).
        """
        call, session = self._call, self.session
        if call is None or session is None:
            raise RuntimeError("link is not open; call open() first")
        # The verifier learns the session from the stream's first block; later blocks omit it.
        request = block_to_proto(block, "" if self._stream_named else session.session_id)
        self._stream_named = True
        t_sent = time.perf_counter()
        try:
            await call.write(request)
        except grpc.aio.AioRpcError as err:
            raise self._rpc_failure("VerifyStream", session.address, self._channel, err) from err
        except asyncio.InvalidStateError:
            # Writing to a call that already ended: its status says why.
            code = await call.code()
            details = await call.details()
            raise self._stream_failure(f"stream ended: {details}", code, details) from None
        return t_sent, self._counter.last_sent

    async def receive(self) -> Reply:
        """Read the next Verdict of the stream (blocks are answered in the order sent), within
        the round deadline. STALE replies are returned, not raised: a pipelined edge expects
        them for blocks it dropped. Raises `LinkError` on a broken stream or a malformed reply.
        """
        call, session = self._call, self.session
        if call is None or session is None:
            raise RuntimeError("link is not open; call open() first")
        self._expired = False
        loop = asyncio.get_running_loop()
        # One timer per read; on expiry the call is cancelled, which fails the pending read.
        timer = loop.call_later(self.config.round_timeout_s, self._expire, call)
        try:
            response = await call.read()
        except asyncio.CancelledError:
            if not self._expired:
                raise  # our caller was cancelled: not a link failure
            raise self._stream_failure(
                f"no verdict within the round deadline {self.config.round_timeout_s:g} s",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from None
        except grpc.aio.AioRpcError as err:
            raise self._rpc_failure("VerifyStream", session.address, self._channel, err) from err
        finally:
            timer.cancel()
        received = time.perf_counter()
        if response is grpc.aio.EOF:
            code = await call.code()
            details = await call.details()
            raise self._stream_failure(
                f"stream ended before a verdict: {code.name} {details}", code, details
            )
        verdict = None
        if response.outcome == pb.Verdict.STALE:
            outcome = "STALE"
        else:
            try:
                verdict = verdict_from_proto(response)
            except ValueError as err:
                raise self._stream_failure(f"malformed verdict: {err}", None) from err
            outcome = "REPLAYED" if response.outcome == pb.Verdict.REPLAYED else "APPLIED"
        return Reply(
            seq=response.seq,
            outcome=outcome,
            verdict=verdict,
            more=response.more,
            committed_len=response.committed_len,
            verify_ms=response.verify_ms,
            queue_ms=response.queue_ms,
            received=received,
            bytes_received=self._counter.last_received,
        )

    def protocol_error(self, message: str) -> LinkError:
        """A `LinkError` for replies that make no sense to the caller (e.g. STALE for a live
        block): the stream is abandoned, the error is retryable (reopen the session)."""
        return self._stream_failure(message, None)

    async def ping(self) -> float | None:
        """One RTT sample on the session's connection: a grpc.health.v1 Check (the verifier
        answers it without touching the model) timed from send to answer, in ms. None when no
        session is open or the check fails; the stream itself reports real failures."""
        channel = self._channel
        if channel is None:
            return None
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        t0 = time.perf_counter()
        try:
            await check(
                health_pb2.HealthCheckRequest(),
                timeout=self.config.round_timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as err:
            logger.debug("ping %s failed: %s", self.address, err.code().name)
            return None
        return (time.perf_counter() - t0) * 1e3

    async def close(self) -> None:
        """End the session: half-close the stream and ask the verifier to drop it (best effort)."""
        call, session, channel = self._call, self.session, self._channel
        self._call = None
        self._channel = None
        if call is None or session is None or channel is None:
            return
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.done_writing()
        # CloseSession first, so the verifier ends the stream itself; then drop what is left.
        await self._close_session(channel, session)
        call.cancel()

    async def aclose(self) -> None:
        """`close`, wait for background clean-up, and close the channels if the link owns them."""
        await self.close()
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        if self._owns_pool:
            await self._pool.close()

    # ---- internals ----------------------------------------------------------------------------

    def _expire(self, call: grpc.aio.StreamStreamCall) -> None:
        self._expired = True
        call.cancel()

    async def _close_session(self, channel: grpc.aio.Channel, session: SessionInfo) -> None:
        stub = pb_grpc.VerifierStub(channel)
        try:
            await stub.CloseSession(
                pb.CloseSessionRequest(session_id=session.session_id),
                timeout=self.config.close_timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as err:
            logger.debug(
                "CloseSession %s on %s failed: %s",
                session.session_id,
                session.address,
                err.code().name,
            )

    def _abandon(self, *, discard_channel: bool) -> None:
        """Drop the current stream; close its session in the background (the verifier may live)."""
        call, session, channel = self._call, self.session, self._channel
        self._call = None
        self._channel = None
        if call is not None:
            call.cancel()
        if channel is not None and session is not None:
            if discard_channel:
                self._pool.discard(session.address, channel)
                # The session (if its verifier lives) is reaped by its idle TTL.
            else:
                task = asyncio.get_running_loop().create_task(self._close_session(channel, session))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    def _stream_failure(
        self, message: str, code: grpc.StatusCode | None, details: str = ""
    ) -> LinkError:
        address = self.address
        retryable = code is None or code in RETRYABLE_CODES
        self._abandon(discard_channel=code in _CONNECTION_CODES)
        logger.info("verifier %s: %s", address, message)
        return LinkError(
            f"verifier {address}: {message}",
            address=address,
            code=code,
            retryable=retryable,
            details=details,
        )

    def _rpc_failure(
        self,
        rpc: str,
        address: str,
        channel: grpc.aio.Channel | None,
        err: grpc.aio.AioRpcError,
    ) -> LinkError:
        code = err.code()
        details = err.details() or ""
        if rpc == "OpenSession":
            if channel is not None and code in _CONNECTION_CODES:
                self._pool.discard(address, channel)
        else:
            self._abandon(discard_channel=code in _CONNECTION_CODES)
        logger.info("verifier %s: %s failed: %s %s", address, rpc, code.name, details)
        return LinkError(
            f"verifier {address}: {rpc} failed: {code.name}: {details}",
            address=address,
            code=code,
            retryable=code in RETRYABLE_CODES,
            details=details,
        )
