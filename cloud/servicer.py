"""The Verifier gRPC servicer (grpc.aio): a thin shim over `cloud.verifier.VerifierEngine`.

Each RPC converts protobuf -> domain objects (`edgespec.protos.convert`), calls the engine, converts the
answer back. All engine calls, model work or not, run on ONE executor thread: the event loop
stays free for I/O, and the engine's sessions are only touched from there. Blocks go through the
batching verifier's `StepScheduler` (one forward per step for many sessions), or, with
``VerifierConfig.batching`` off, one block per forward, one session at a time.
Errors follow the convention written in edgespec.proto: `ServiceError` / `FieldError` ->
`context.abort(code, message)`, the message starting with the field at fault (named once) and
stating the allowed range, the field also in the trailing metadata ``edgespec-field`` (a
RESOURCE_EXHAUSTED's back-off hint in ``edgespec-retry-after-ms``; an evicted session's ABORTED
carries that hint and ``edgespec-evicted``); a request that cannot be
decoded -> INVALID_ARGUMENT (`edgespec.cloud.decoding`); anything unexpected -> INTERNAL, logged,
and on a VerifyStream the stream's session is closed. The service keeps serving either way.
STALE and REPLAYED blocks are verdict outcomes, not errors.

Nothing is left behind by a client that leaves: an OpenSession cancelled (or past its deadline)
while its prefill runs closes the session the worker opens; one still queued never runs. A
stream that merely ends or is cancelled keeps its session (the edge may reconnect and resend);
the edge closes it, or the idle reaper does. The ``active_sessions`` gauge is set from the
engine's own count after every change and every failure.

VerifyStream reads blocks as they arrive (a reader task stamps each arrival), so a pipelined edge
may send the next block while the previous one is verified: its ``queue_ms`` then counts the wait
since its arrival, including the previous block's forward. With the batching verifier the reader
also queues each block for a step at once (`edgespec.cloud.eager_blocks`), so the step after
the previous block's can start before that block's verdict is written. A decode block
(cloud-only streaming) is answered with one Verdict per token, each written as soon as its
forward is done.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, NoReturn, TypeVar

import grpc

from edgespec.cloud.batch_step import DecodeWork, PrefillWork, VerifyWork
from edgespec.cloud.decoding import Undecodable, as_arrived, read_blocks, stream_session
from edgespec.cloud.eager_blocks import EagerBlocks, Enqueued
from edgespec.cloud.step_scheduler import StepScheduler
from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import OpenResult, ServiceError, VerifyResult
from edgespec.protos.convert import (
    EVICTED_METADATA_KEY,
    FIELD_METADATA_KEY,
    RETRY_AFTER_METADATA_KEY,
    FieldError,
    block_from_proto,
    params_from_proto,
    verdict_to_proto,
)
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc
from edgespec.serving.verifier_metrics import VerifierMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Dense q of a 32-token block over a 128k vocabulary is 16 MiB; leave room above that.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# What a stream's reader hands its handler: a block queued on arrival, or one as it came with
# its arrival time; the error that broke the stream, or None for its clean end.
_Arrival = Enqueued | tuple[pb.DraftBlock, float] | BaseException | None

_OUTCOME_TO_PROTO = {"APPLIED": pb.Verdict.APPLIED, "REPLAYED": pb.Verdict.REPLAYED}


def result_to_proto(result: VerifyResult, queue_ms: float) -> pb.Verdict:
    """Engine `VerifyResult` -> wire Verdict (a STALE one carries only seq and committed_len)."""
    if result.verdict is None:
        return pb.Verdict(
            seq=result.seq,
            outcome=pb.Verdict.STALE,
            committed_len=result.committed_len,
            queue_ms=queue_ms,
        )
    msg = verdict_to_proto(result.verdict, _OUTCOME_TO_PROTO[result.outcome.value], queue_ms)
    msg.more = result.more
    return msg


class VerifierServicer(pb_grpc.VerifierServicer):
    """proto -> engine -> proto; model work on `executor` (which must have ONE thread)."""

    def __init__(
        self,
        engine: VerifierEngine,
        executor: ThreadPoolExecutor,
        metrics: VerifierMetrics | None = None,
        scheduler: StepScheduler | None = None,
    ) -> None:
        self.engine = engine
        self._executor = executor
        self.metrics = metrics
        self.scheduler = scheduler  # None: one block per forward (config.batching off)

    async def _fail(
        self, context: grpc.aio.ServicerContext, err: BaseException, note: str = ""
    ) -> NoReturn:
        """Count the failure (metrics), resync the session gauge (a failure may have closed a
        session) and abort the RPC with the status that fits `err` (`note` ends the message)."""
        if self.metrics is not None:
            self.metrics.observe_error(_status_of(err).name)
            self._sessions_changed()
        await _abort(context, err, note)

    def _observe(self, result: VerifyResult, drafted: int, queue_ms: float) -> None:
        if self.metrics is None:
            return
        verdict = result.verdict
        self.metrics.observe_block(
            outcome=result.outcome.name.lower(),
            drafted=drafted,
            accepted=verdict.accepted if verdict is not None else 0,
            verify_ms=verdict.verify_ms if verdict is not None else 0.0,
            queue_ms=queue_ms,
        )

    def _sessions_changed(self) -> None:
        """Set the gauge (and the eviction counters) from the engine's own counts (so they
        never drift from them)."""
        if self.metrics is not None:
            stats = self.engine.stats()
            self.metrics.sync_sessions(stats.sessions, stats.evicted, stats.resumed)

    async def _call(
        self,
        fn: Callable[..., T],
        *args: Any,
        since: float | None = None,
        orphaned: Callable[[T], None] | None = None,
    ) -> tuple[T, float]:
        """Run fn(*args) on the executor; returns its result and the queue wait in ms (from
        `since`, a perf_counter time such as the request's arrival, else from now).

        When the RPC is cancelled (client gone, deadline expired) while the job waits, the job
        does not run; while it runs, it finishes and `orphaned` (if given) receives its result,
        which nobody else will: e.g. a session opened for a client that has left.
        """
        submitted = time.perf_counter() if since is None else since
        started = submitted

        def job() -> T:
            nonlocal started
            started = time.perf_counter()
            return fn(*args)

        future = self._executor.submit(job)
        waited = asyncio.wrap_future(future)
        try:
            # shield: a cancelled RPC must not detach us from a job that is already running.
            result = await asyncio.shield(waited)
        except asyncio.CancelledError:
            # Nobody awaits `waited` now: retrieve its outcome so that asyncio logs no
            # "exception was never retrieved" for a job that failed after the cancel.
            waited.add_done_callback(lambda f: f.cancelled() or f.exception())
            if not future.cancel() and orphaned is not None:
                future.add_done_callback(functools.partial(_hand_over, orphaned))
            raise
        return result, (started - submitted) * 1e3

    async def _run(
        self, work: VerifyWork | DecodeWork, since: float | None = None
    ) -> tuple[VerifyResult, float]:
        """One block (or decode step): through the batching scheduler when there is one, else
        alone on the executor (the one-session-at-a-time reference)."""
        if self.scheduler is not None:
            return await self.scheduler.submit(work, since)
        if isinstance(work, VerifyWork):
            return await self._call(self.engine.verify, work.session_id, work.block, since=since)
        return await self._call(self.engine.decode_next, work.session_id, work.seq, since=since)

    def _close_orphan(self, opened: OpenResult) -> None:
        """Close a session whose OpenSession was cancelled (or failed) while it opened or
        prefilled (any thread)."""
        existed = self.engine.close_session(opened.session_id)
        logger.info("OpenSession cancelled while opening; closed session %s", opened.session_id)
        if self.metrics is not None:
            self.metrics.observe_session_opened(opened.prefill_ms)
            if existed:
                self.metrics.observe_session_closed("error")
            self._sessions_changed()

    async def OpenSession(
        self, request: pb.OpenSessionRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            if not request.HasField("params"):
                raise FieldError("params", "params must be set (max_new_tokens >= 1 at least)")
            params = params_from_proto(request.params)
            opened, _ = await self._call(
                functools.partial(
                    self.engine.open_session,
                    list(request.prefix_ids),
                    params,
                    generated=request.generated,
                    next_seq=request.next_seq,
                    model_id=request.model_id,
                    prefill=self.scheduler is None,
                ),
                orphaned=self._close_orphan,
            )
            if self.scheduler is not None and opened.committed_len > 1:
                opened = await self._prefill(self.scheduler, opened)
        except Exception as err:  # noqa: BLE001 - every failure becomes a status
            await self._fail(context, err)
        if self.metrics is not None:
            self.metrics.observe_session_opened(opened.prefill_ms)
            self._sessions_changed()
        return pb.OpenSessionResponse(
            session_id=opened.session_id,
            committed_len=opened.committed_len,
            max_block_tokens=opened.max_block_tokens,
            vocab_size=opened.vocab_size,
            model_id=opened.model_id,
            prefill_ms=opened.prefill_ms,
            compute_profile=opened.compute_profile,
            tree_blocks=opened.tree_blocks,
            block_alternatives=opened.block_alternatives,
            idle_forward_ms=opened.idle_forward_ms,
        )

    async def _prefill(self, scheduler: StepScheduler, opened: OpenResult) -> OpenResult:
        """Fill the cache of a session opened without prefill, in chunks batched with other
        sessions' work; a failure or a cancel closes the session (nothing left behind)."""
        started = time.perf_counter()
        chunk = self.engine.config.prefill_chunk_tokens
        try:
            left = 1
            while left:
                done, _ = await scheduler.submit(PrefillWork(opened.session_id, chunk))
                left = done.left
        except BaseException:
            self._close_orphan(opened)
            raise
        return replace(opened, prefill_ms=(time.perf_counter() - started) * 1e3)

    async def CloseSession(
        self, request: pb.CloseSessionRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            # On the event loop, not queued behind model work: the session table has its own
            # lock, and a forward already running for the session finishes on objects nobody
            # reaches any more. (Queued, a close under load missed its deadline and the session
            # stayed until the idle TTL.)
            existed = self.engine.close_session(request.session_id)
        except Exception as err:  # noqa: BLE001
            await self._fail(context, err)
        if existed and self.metrics is not None:
            self.metrics.observe_session_closed("closed")
            self._sessions_changed()
        return pb.CloseSessionResponse(existed=existed)

    async def VerifyStream(
        self,
        request_iterator: AsyncIterator[pb.DraftBlock | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.Verdict]:
        """One session per stream, named by the first block; verdicts in block order: one per
        block, or one per token for a decode block.

        A block that cannot be decoded ends the stream with INVALID_ARGUMENT. A verification
        that fails unexpectedly (INTERNAL) closes the stream's session: its state is undefined,
        and an edge that retries opens a new one.
        """
        session_id: str | None = None
        arrivals: asyncio.Queue[_Arrival] = asyncio.Queue()
        eager = EagerBlocks(self.scheduler) if self.scheduler is not None else None
        reader = asyncio.ensure_future(
            read_blocks(
                request_iterator, arrivals, eager.admit if eager is not None else as_arrived
            )
        )
        try:
            while True:
                item = await arrivals.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    await self._fail(context, item)
                try:
                    if isinstance(item, Enqueued):  # queued on arrival (`EagerBlocks`)
                        session_id, block = item.session_id, item.block
                        result, queue_ms = await item.ticket.result()
                    else:
                        msg, arrived = item
                        session_id = stream_session(session_id, msg)
                        block = block_from_proto(msg)
                        result, queue_ms = await self._run(VerifyWork(session_id, block), arrived)
                    verdict = result.verdict  # an APPLIED block's guess that was verified
                    choice = block.choices[verdict.alternative] if verdict is not None else block
                    self._observe(result, len(choice.tokens), queue_ms)
                    yield result_to_proto(result, queue_ms)
                    while result.more:
                        result, queue_ms = await self._run(DecodeWork(session_id, block.seq))
                        self._observe(result, 0, queue_ms)  # one token the verifier decoded alone
                        yield result_to_proto(result, queue_ms)
                    if eager is not None:
                        eager.handled(item)
                except Exception as err:  # noqa: BLE001
                    await self._fail_stream(context, err, session_id)
        finally:
            reader.cancel()
            if eager is not None:
                eager.cancel()

    async def _fail_stream(
        self, context: grpc.aio.ServicerContext, err: Exception, session_id: str | None
    ) -> NoReturn:
        """`_fail` for a block of the stream; an INTERNAL failure drops the stream's session
        first (the engine already closed it when its own work failed)."""
        note = ""
        if session_id and _status_of(err) == grpc.StatusCode.INTERNAL:
            closed_here, _ = await self._call(self.engine.close_session, session_id)
            if closed_here:
                note = f"; session {session_id} closed"
            if (closed_here or isinstance(err, ServiceError)) and self.metrics is not None:
                self.metrics.observe_session_closed("error")
        await self._fail(context, err, note)


def _hand_over(orphaned: Callable[[T], None], future: Future[T]) -> None:
    """Give a finished job's result to `orphaned` (a done callback; failures only logged)."""
    if future.cancelled() or future.exception() is not None:
        return
    try:
        orphaned(future.result())
    except Exception:  # noqa: BLE001 - a callback must not kill the worker thread
        logger.exception("cleanup after a cancelled RPC failed")


def _status_of(err: BaseException) -> grpc.StatusCode:
    """The status a failure maps to: the engine's own code, INVALID_ARGUMENT for a malformed
    message, INTERNAL for anything unexpected."""
    if isinstance(err, ServiceError):
        return grpc.StatusCode[err.code]
    if isinstance(err, FieldError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, err: BaseException, note: str = "") -> NoReturn:
    """End the RPC with the status `err` maps to (raises; never returns).

    The details are the error's message (which starts with the field at fault, named once) plus
    `note`; the field, when there is one, also travels as trailing metadata FIELD_METADATA_KEY
    (the convention written in edgespec.proto); a retry hint travels as RETRY_AFTER_METADATA_KEY.
    """
    code = _status_of(err)
    field = getattr(err, "field", None) if isinstance(err, (ServiceError, FieldError)) else None
    trailer: tuple[tuple[str, str], ...] = ((FIELD_METADATA_KEY, str(field)),) if field else ()
    if isinstance(err, ServiceError) and err.retry_after_ms is not None:
        trailer += ((RETRY_AFTER_METADATA_KEY, str(err.retry_after_ms)),)
    if isinstance(err, ServiceError) and err.evicted:
        trailer += ((EVICTED_METADATA_KEY, "1"),)
    if isinstance(err, ServiceError):
        await context.abort(code, err.message + note, trailing_metadata=trailer)
    if isinstance(err, FieldError):
        await context.abort(code, str(err) + note, trailing_metadata=trailer)
    logger.error("unexpected error in a Verifier RPC", exc_info=err)
    await context.abort(code, f"internal error: {type(err).__name__}: {err}{note}")
