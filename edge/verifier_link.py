"""The edge's seam to a verifier: what a session loop needs of a link, whatever carries it.

`VerifierLink` is one session on one verifier at a time: `open` it with the committed prefix,
then each round `send`s a `DraftBlock` and `receive`s its verdict(s) as `Reply`s (one per block;
a cloud-only decode block is answered token by token, ``more`` set until the last). `verify` is
one whole round. Replies come in the order blocks were sent, so a caller may keep a block in
flight while it drafts the next (pipelining). After a `LinkError` the link must be `open`ed
again: the edge owns the committed tokens, so only it knows which prefix to reopen with.

`LinkFactory` makes one link per generation: `edgespec.edge.grpc_link.GrpcLinks` (the Verifier
gRPC service over a network) or `edgespec.edge.inprocess_link.InProcessLinks` (a verifier engine
in this process: the same rounds, no transport).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

from edgespec.core.params import SamplingParams
from edgespec.core.session import DraftBlock, Verdict
from edgespec.edge.round_timing import RoundTiming, round_timing

# Status names after which reopening the session (same or another verifier) may succeed: the
# connection or the verifier went away, a round's deadline passed, the session was reaped, or this
# verifier is full / has another model. Everything else would fail again: a bad request
# (INVALID_ARGUMENT, ...), bad credentials, and a verifier's own failure (INTERNAL, UNKNOWN), which
# is deterministic as far as the edge can tell (the same prefix fails the same forward again).
RETRYABLE_STATUSES = frozenset(
    {
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "CANCELLED",
        "ABORTED",
        "NOT_FOUND",
        "RESOURCE_EXHAUSTED",
    }
)


class LinkError(Exception):
    """A verifier call failed.

    `retryable`: reopening the session (same or another verifier) may succeed; False means the
    request itself is refused (bad input, bad credentials) and would fail again. `code` is the
    status name the verifier answered ('UNAVAILABLE', 'INVALID_ARGUMENT', ...: gRPC's names, for
    every transport), None for a protocol violation such as a stream that ended early.
    `retry_after_ms`: the verifier's back-off hint (a full verifier's RESOURCE_EXHAUSTED, an
    evicted session's ABORTED), None without one; `evicted`: the verifier evicted the session to
    keep its KV budget (reopen it with the committed prefix after the hint).
    """

    def __init__(
        self,
        message: str,
        *,
        address: str | None,
        code: str | None = None,
        retryable: bool = True,
        details: str = "",
        retry_after_ms: int | None = None,
        evicted: bool = False,
    ) -> None:
        super().__init__(message)
        self.address = address
        self.code = code
        self.retryable = retryable
        self.details = details
        self.retry_after_ms = retry_after_ms
        self.evicted = evicted


@dataclass(frozen=True)
class SessionInfo:
    """What opening a session answered."""

    address: str  # the verifier holding the session
    session_id: str
    committed_len: int
    max_block_tokens: int  # largest k the verifier accepts
    vocab_size: int
    model_id: str
    prefill_ms: float
    compute_profile: str = "real"  # the verifier's compute profile ("real" or an emulated one)
    tree_blocks: bool = False  # the verifier takes token trees (DraftBlock.parents)
    # the verifier takes several guesses in one message (`DraftBlock.alternatives`)
    block_alternatives: bool = False
    idle_forward_ms: float = 0.0  # its fixed cost of a forward alone (0: not announced)
    # opening's wall time less the verifier's prefill: one RTT sample; None when the call also
    # set up the connection (a fresh channel costs extra round trips)
    open_rtt_ms: float | None = None


@dataclass(frozen=True)
class Reply:
    """One verdict as `receive` read it."""

    seq: int  # seq of the block it answers
    outcome: str  # "APPLIED" | "REPLAYED" | "STALE"
    verdict: Verdict | None  # None for STALE
    more: bool  # more replies answer the same block (cloud-only streaming)
    committed_len: int  # the verifier's committed length after it
    verify_ms: float  # verifier compute for it
    queue_ms: float  # time its block waited at the verifier (since arrival) before the forward
    received: float  # time.perf_counter() when it was read
    bytes_received: int  # serialized size (0 where nothing is serialized)


class VerifierLink(abc.ABC):
    """One session on a verifier, one round at a time (see the module docstring).

    `session` is the open (or last) session, None before the first `open`.
    """

    session: SessionInfo | None

    @property
    @abc.abstractmethod
    def is_open(self) -> bool:
        """A session is open: blocks can be sent."""

    @property
    def address(self) -> str | None:
        """Address of the verifier holding the current (or last) session."""
        return self.session.address if self.session else None

    @property
    @abc.abstractmethod
    def bytes_sent(self) -> int:
        """Serialized bytes sent so far (blocks and session openings)."""

    @property
    @abc.abstractmethod
    def bytes_received(self) -> int:
        """Serialized bytes received so far (verdicts and session openings)."""

    @abc.abstractmethod
    async def open(
        self,
        prefix_ids: Sequence[int],
        params: SamplingParams,
        generated: int = 0,
        next_seq: int = 0,
    ) -> SessionInfo:
        """Open a session seeded with the committed prefix (on the next verifier, where there
        are several), abandoning any current one.

        `prefix_ids`: prompt + tokens generated so far (`generated` of them); `next_seq`: seq of
        the next block the edge will send. Raises `LinkError`.
        """

    @abc.abstractmethod
    async def send(self, block: DraftBlock) -> tuple[float, int]:
        """Send one block without waiting for its verdict; returns (time.perf_counter() at the
        send, serialized bytes). Raises `LinkError` (the link must then be reopened) and
        RuntimeError when no session is open."""

    @abc.abstractmethod
    async def receive(self) -> Reply:
        """The next reply (blocks are answered in the order sent), within the round deadline.
        STALE replies are returned, not raised: a pipelined edge expects them for blocks it
        dropped. Raises `LinkError` on a broken session or a malformed reply."""

    @abc.abstractmethod
    def protocol_error(self, message: str) -> LinkError:
        """A retryable `LinkError` for replies that make no sense to the caller (e.g. STALE for a
        live block); the session is abandoned."""

    @abc.abstractmethod
    async def ping(self) -> float | None:
        """One RTT sample to the session's verifier in ms, without touching its model; None when
        no session is open or the check fails (the rounds themselves report real failures)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """End the session (best effort)."""

    async def aclose(self) -> None:
        """`close`, and release whatever the link holds by itself."""
        await self.close()

    async def verify(self, block: DraftBlock) -> tuple[Verdict, RoundTiming]:
        """One round: send a (speculative) block and wait for its verdict.

        Returns the verdict (APPLIED or REPLAYED) and the round's timing. Raises `LinkError` on
        any failure, after which the link must be reopened; a STALE verdict is a `LinkError` too
        (the edge never drafts on a stale prefix, so it means the sides disagree: reopen).
        """
        t_sent, bytes_sent = await self.send(block)
        reply = await self.receive()
        if reply.verdict is None or reply.seq != block.seq or reply.more:
            raise self.protocol_error(
                f"verifier answered block seq={block.seq} base_len={block.base_len} with "
                f"{reply.outcome} seq={reply.seq} committed_len={reply.committed_len}"
            )
        return reply.verdict, round_timing(reply, t_sent, bytes_sent)


class LinkFactory(abc.ABC):
    """Makes the `VerifierLink` of each generation of an `EdgeEngine`.

    Call from one event loop at a time; `aclose` when the engine closes.
    """

    @abc.abstractmethod
    def new_link(self, session_key: str) -> VerifierLink:
        """A closed link for the generation `session_key` (unique per generation)."""

    def session_ended(self, session_key: str) -> None:  # noqa: B027 - optional hook
        """The generation `session_key` ended (finished, failed or cancelled)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what the factory holds (connections)."""
