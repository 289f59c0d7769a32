"""The edge's gRPC client of the Verifier service: one persistent VerifyStream per session.

`GrpcVerifierLink` (a `VerifierLink`) opens a session on a verifier (`OpenSession` with the
committed prefix), keeps ONE bidirectional `VerifyStream` open for it, and turns each round into
a write of one `DraftBlock` and a read of its `Verdict`. Nothing else happens per round: no new
call, no channel lookup, no extra serialisation (byte counts come from the serializer itself),
one timer for the round's deadline.

Failures surface as `LinkError`, whose `retryable` flag tells the caller (the `EdgeEngine`)
whether reopening the session, on this or on the next verifier, can help. The link never retries
by itself. Addresses come from an `edgespec.edge.addresses` provider or assigner: each `open`
after a failure asks for the next one. `GrpcLinks` is the engine's `LinkFactory` over gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, cast

import grpc
from grpc_health.v1 import health_pb2

from edgespec.core.params import SamplingParams
from edgespec.core.session import DraftBlock
from edgespec.edge.addresses import (
    AddressProvider,
    VerifierAssigner,
    make_address_provider,
    session_addresses,
)
from edgespec.edge.channels import ChannelPool, LoopPool
from edgespec.edge.config import LinkConfig
from edgespec.edge.grpc_codes import CONNECTION_CODES, RETRYABLE_CODES
from edgespec.edge.verifier_link import LinkError, LinkFactory, Reply, SessionInfo, VerifierLink
from edgespec.protos.convert import (
    EVICTED_METADATA_KEY,
    RETRY_AFTER_METADATA_KEY,
    block_to_proto,
    params_to_proto,
    verdict_from_proto,
)
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

VERIFY_STREAM_METHOD = "/edgespec.v1.Verifier/VerifyStream"
_WRITE_FAILED = "the stream ended while a block was written"
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc's type stubs


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


class GrpcVerifierLink(VerifierLink):
    """Client of one session on a Verifier, over one persistent `VerifyStream`.

    Use::

        link = GrpcVerifierLink(["10.0.0.5:50051", "10.0.0.6:50051"], LinkConfig(token="t"))
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
        addresses: AddressProvider | Callable[[], Awaitable[str]],
        config: LinkConfig | None = None,
        *,
        pool: ChannelPool | None = None,
    ) -> None:
        self.config = config if config is not None else (pool.config if pool else LinkConfig())
        # A callable may answer asynchronously (a per-session assigner); a list is checked here.
        self._next_address: Callable[[], str | Awaitable[str]] = (
            addresses if callable(addresses) else make_address_provider(addresses)
        )
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
        # The current stream's last write, until it is known to have completed, and the read of
        # its next reply, posted when a block is written (see `send`).
        self._write: asyncio.Future | None = None
        self._read: asyncio.Future | None = None

    # ---- state ------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._call is not None

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
        if inspect.isawaitable(address):  # a per-session assigner answers asynchronously
            address = await address
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
        opening = asyncio.ensure_future(
            stub.OpenSession(request, timeout=self.config.open_timeout_s, metadata=self._metadata)
        )
        try:
            # shield: when our caller is cancelled (the client went away) the call goes on, and
            # the session it opens is closed, not left to the verifier's idle TTL.
            response = await asyncio.shield(opening)
        except asyncio.CancelledError:
            self._in_background(self._close_when_opened(opening, address, channel))
            raise
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
            tree_blocks=response.tree_blocks,
            block_alternatives=response.block_alternatives,
            idle_forward_ms=response.idle_forward_ms,
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
        # No request iterator: the call is written to (`write`) as blocks are drafted.
        self._call = method(timeout=self.config.stream_timeout_s, metadata=self._metadata)  # type: ignore[call-arg]
        self._stream_named = False
        logger.debug(
            "session %s open on %s at committed_len %d (prefill %.1f ms)",
            response.session_id,
            address,
            response.committed_len,
            response.prefill_ms,
        )
        return self.session

    async def send(self, block: DraftBlock) -> tuple[float, int]:
        """Write one block on the session's stream without waiting for its verdict.

        The write is handed to grpc, not waited for: grpc reports a write complete through its
        threads and the event loop (~0.25 ms here), and the caller's next step (drafting
        ahead, reading the verdict) need not wait for that. The next `send` waits for it first
        (grpc takes one write at a time), and a write that failed fails that `send`, or the
        pending read, whichever comes first.

        Returns (time.perf_counter() at the write, serialized bytes). Raises `LinkError` (the link
        must then be reopened).
        """
        call, session = self._call, self.session
        if call is None or session is None:
            raise RuntimeError("link is not open; call open() first")
        # The verifier learns the session from the stream's first block; later blocks omit it.
        request = block_to_proto(block, "" if self._stream_named else session.session_id)
        self._stream_named = True
        await self._last_write_done()
        # A status the verifier sent while this block was drafted (the loop may have been busy)
        # lands first: a write on an ended call would fail locally and hide that status.
        await asyncio.sleep(0)
        if call.done():
            code, details = await self._final_status(call)
            raise self._stream_failure(
                f"VerifyStream failed: {code.name}: {details}",
                code,
                details,
                await call.trailing_metadata(),
            )
        t_sent = time.perf_counter()
        write = self._write = asyncio.ensure_future(call.write(request))
        write.add_done_callback(_retrieve)  # its failure is the stream's, reported as such
        if self._read is None:
            # A reply is due: its read is posted now, so that one which arrives while the loop
            # is busy (drafting ahead) is taken by grpc's threads meanwhile, and `receive` finds
            # it done instead of starting the read then.
            self._read = asyncio.ensure_future(call.read())
            self._read.add_done_callback(_retrieve)
        # One loop turn runs the write's first step: it serializes the block and hands it to
        # grpc core, which sends it from there, whatever the loop does next.
        await asyncio.sleep(0)
        if write.done():
            await self._last_write_done()
        return t_sent, self._counter.last_sent

    async def _last_write_done(self) -> None:
        """Wait for the stream's last write to complete; `LinkError` if it failed."""
        if await self._write_failed():
            raise self._stream_failure(_WRITE_FAILED, None)

    async def _write_failed(self) -> bool:
        """Wait for the stream's last write (if any) and say whether it failed.

        A write fails when the call ended under it: the verifier answered a status (its last
        reply failed), or the connection broke. grpc then replaces the call's status with a
        local INTERNAL ("Internal error from Core"), the read's too, so which one is unknown:
        the failure is retryable, like a broken stream; the caller retries without writing
        ahead, so a deterministic failure then shows its own status."""
        write, self._write = self._write, None
        if write is None:
            return False
        try:
            await write
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return True
        return False

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
            read, self._read = self._read, None
            message: object = await (read if read is not None else call.read())
        except asyncio.CancelledError:
            if not self._expired:
                raise  # our caller was cancelled: not a link failure
            raise self._stream_failure(
                f"no verdict within the round deadline {self.config.round_timeout_s:g} s",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from None
        except grpc.aio.AioRpcError as err:
            if await self._write_failed():  # grpc's status then says nothing of the cause
                raise self._stream_failure(_WRITE_FAILED, None) from None
            raise self._rpc_failure("VerifyStream", session.address, self._channel, err) from err
        finally:
            timer.cancel()
        received = time.perf_counter()
        if message is _EOF:
            code, details = await self._final_status(call)
            raise self._stream_failure(
                f"stream ended before a verdict: {code.name} {details}",
                code,
                details,
                await call.trailing_metadata(),
            )
        response = cast(pb.Verdict, message)
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
        # A read posted ahead is left to fail with the call (cancelling it would cancel the call
        # before the verifier is asked to end the stream itself).
        write, self._write, self._read = self._write, None, None
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            if write is not None:
                await write
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

    async def _final_status(self, call: grpc.aio.StreamStreamCall) -> tuple[grpc.StatusCode, str]:
        """The status of a call that has ended."""
        return await call.code(), (await call.details()) or ""

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

    async def _close_when_opened(
        self, opening: asyncio.Future, address: str, channel: grpc.aio.Channel
    ) -> None:
        """Close the session of an OpenSession whose caller was cancelled, once it answers."""
        try:
            response = await opening
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            return  # nothing opened (or the loop is closing)
        session = SessionInfo(
            address=address,
            session_id=response.session_id,
            committed_len=response.committed_len,
            max_block_tokens=response.max_block_tokens,
            vocab_size=response.vocab_size,
            model_id=response.model_id,
            prefill_ms=response.prefill_ms,
        )
        await self._close_session(channel, session)

    def _abandon(self, *, discard_channel: bool) -> None:
        """Drop the current stream and close its session in the background, whatever the
        failure: the verifier may live and would otherwise hold the session until its idle TTL.
        With `discard_channel` (the connection is suspect) the CloseSession goes over a fresh
        channel to the same address; either way it is bounded by `close_timeout_s`."""
        call, session, channel = self._call, self.session, self._channel
        self._call = None
        self._channel = None
        for pending in (self._write, self._read):
            if pending is not None:
                pending.cancel()
        self._write = self._read = None
        if call is not None:
            call.cancel()
        if channel is not None and session is not None:
            if discard_channel:
                self._pool.discard(session.address, channel)
                channel = self._pool.get(session.address)
            self._in_background(self._close_session(channel, session))

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run clean-up `coro` as a task that `aclose` waits for."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _stream_failure(
        self,
        message: str,
        code: grpc.StatusCode | None,
        details: str = "",
        trailers: grpc.aio.Metadata | None = None,
    ) -> LinkError:
        address = self.address
        retryable = code is None or code in RETRYABLE_CODES
        self._abandon(discard_channel=code in CONNECTION_CODES)
        logger.info("verifier %s: %s", address, message)
        retry_after_ms, evicted = _back_off(trailers)
        return LinkError(
            f"verifier {address}: {message}",
            address=address,
            code=code.name if code is not None else None,
            retryable=retryable,
            details=details,
            retry_after_ms=retry_after_ms,
            evicted=evicted,
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
            if channel is not None and code in CONNECTION_CODES:
                self._pool.discard(address, channel)
        else:
            self._abandon(discard_channel=code in CONNECTION_CODES)
        logger.info("verifier %s: %s failed: %s %s", address, rpc, code.name, details)
        retry_after_ms, evicted = _back_off(err.trailing_metadata())
        return LinkError(
            f"verifier {address}: {rpc} failed: {code.name}: {details}",
            address=address,
            code=code.name,
            retryable=code in RETRYABLE_CODES,
            details=details,
            retry_after_ms=retry_after_ms,
            evicted=evicted,
        )


def _retrieve(op: asyncio.Future) -> None:
    """Mark a stream write's or read's failure as seen (asyncio logs unretrieved ones): a write's
    is reported by the next `send` or by the pending read, which fails with the stream; a read's
    by `receive`, or by nothing when the stream was abandoned first."""
    if not op.cancelled():
        op.exception()


def _back_off(trailers: Any) -> tuple[int | None, bool]:
    """A failed call's back-off hint in ms (None without one) and whether the verifier evicted
    the session, from its trailing metadata (None or absent keys: neither)."""
    hint, evicted = None, False
    for key, value in trailers or ():
        if key == RETRY_AFTER_METADATA_KEY:
            with contextlib.suppress(ValueError):
                hint = max(int(value), 0)
        elif key == EVICTED_METADATA_KEY:
            evicted = value == "1"
    return hint, evicted


class GrpcLinks(LinkFactory):
    """One `GrpcVerifierLink` per generation, sharing one channel per verifier address.

    `verifiers`: a list of 'host:port' (each session starts with the first and moves on to the
    next one after a failure), a callable returning the address to try next (shared by all
    sessions), or a `VerifierAssigner` (asked per session, and told when the session ends).
    """

    def __init__(
        self, verifiers: AddressProvider | VerifierAssigner, config: LinkConfig | None = None
    ) -> None:
        if not isinstance(verifiers, VerifierAssigner):
            make_address_provider(verifiers)  # validate now, not at the first request
        self.verifiers = verifiers
        self.config = config if config is not None else LinkConfig()
        self._pools = LoopPool(self.config)

    def new_link(self, session_key: str) -> GrpcVerifierLink:
        addresses = session_addresses(self.verifiers, session_key)
        return GrpcVerifierLink(addresses, self.config, pool=self._pools.get())

    def session_ended(self, session_key: str) -> None:
        if isinstance(self.verifiers, VerifierAssigner):
            self.verifiers.release(session_key)

    async def aclose(self) -> None:
        await self._pools.close()
