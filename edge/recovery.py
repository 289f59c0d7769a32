"""What the edge does when a link fails: reopen the session after a backoff, or give up.

The edge owns the committed tokens (`edgespec.core.session.Drafter`); the verifier's KV cache is
only a cache. When the link fails (verifier down, connection reset, stream broken, round deadline
passed, session reaped, or evicted to keep the verifier's KV budget), the session opens a new one
on the same or the next verifier with the committed prefix and resends the pending block: nothing
is lost and the output is unchanged. A verifier's back-off hint (RESOURCE_EXHAUSTED, or an
eviction's ABORTED) is waited for before the reopen; once a session has committed tokens such
refusals count against their own bound (`EngineConfig.max_resume_waits`), since the session
should be resumed rather than dropped while the verifier is merely full.
Greedy output and coupled sampling's are token-for-token what the target alone produces (coupled
noise is keyed by the seed and the absolute position, which a reopen keeps). With rejection
sampling, the new session's generator starts afresh (seeded from the session seed and the number
of tokens generated), so a reconnect changes which sample is drawn but not its distribution:
exactness in distribution holds because every round's randomness is independent of the outcome of
earlier ones.
"""

from __future__ import annotations

import asyncio
import logging

from edgespec.core.params import SamplingParams
from edgespec.edge.config import EngineConfig
from edgespec.edge.records import EdgeStats
from edgespec.edge.verifier_link import LinkError, SessionInfo, VerifierLink

logger = logging.getLogger(__name__)


class EdgeError(Exception):
    """Generation could not complete. `code` is a gRPC status name for the service to answer
    ('UNAVAILABLE', 'RESOURCE_EXHAUSTED', 'INVALID_ARGUMENT', 'FAILED_PRECONDITION', 'INTERNAL',
    ...); `retry_after_ms`, for RESOURCE_EXHAUSTED, how long a client should back off."""

    def __init__(self, code: str, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_ms = retry_after_ms


# The verifier's refusals of the request itself, passed on to the client as they are.
_PASSED_ON = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE", "FAILED_PRECONDITION"})
# The verifier failed by itself (its message says how): the client sees INTERNAL, not an outage.
_VERIFIER_FAILED = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS"})


def edge_code(verifier_code: str) -> str:
    """Status the edge answers for a verifier's non-retryable refusal."""
    if verifier_code in _PASSED_ON or verifier_code == "RESOURCE_EXHAUSTED":
        return verifier_code
    if verifier_code in _VERIFIER_FAILED:
        return "INTERNAL"
    # UNAUTHENTICATED / PERMISSION_DENIED etc.: the edge's own setup is wrong, not the caller's.
    return "UNAVAILABLE"


class Recovery:
    """Bounded retries with exponential backoff (`EngineConfig.max_retries`, `backoff_*_s`), and
    the check that an opened session fits the draft (`vocab_size`)."""

    def __init__(self, config: EngineConfig, vocab_size: int) -> None:
        self.config = config
        self.vocab_size = vocab_size

    async def after_failure(
        self, err: LinkError, attempts: int, stats: EdgeStats, what: str
    ) -> None:
        """Raise `EdgeError` when `err` is final or retries are spent; else back off.

        The error says what happened: a verifier's own failure is INTERNAL with its message, a
        full verifier (every attempt refused with RESOURCE_EXHAUSTED) is RESOURCE_EXHAUSTED with
        a retry hint, verifiers that cannot be reached are UNAVAILABLE. Opening a session, a full
        verifier is answered after these bounded retries (the client holds nothing yet and may
        retry later); a session evicted while it opened waits the verifier's hint first."""
        if not err.retryable:
            raise EdgeError(edge_code(err.code or "INTERNAL"), f"{what}: {err}") from err
        if attempts > self.config.max_retries:
            if err.code == "RESOURCE_EXHAUSTED":
                raise EdgeError(
                    "RESOURCE_EXHAUSTED",
                    f"{what}: every verifier tried is full ({attempts} attempts); retry later; "
                    f"last error: {err}",
                    retry_after_ms=self.retry_after_ms,
                ) from err
            raise EdgeError(
                "UNAVAILABLE",
                f"{what}: no verifier answered after {attempts} attempts; last error: {err}",
            ) from err
        stats.reconnects += 1
        delay = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2 ** (attempts - 1))
        if err.evicted:  # evicted while it opened: wait the verifier's hint
            stats.evictions += 1
            delay = max(delay, (err.retry_after_ms or 0) / 1e3)
        logger.warning(
            "%s failed (%s); reopening the session in %.2f s (attempt %d of %d)",
            what,
            err,
            delay,
            attempts + 1,
            self.config.max_retries + 1,
        )
        await asyncio.sleep(delay)

    async def wait_for_room(self, err: LinkError, waits: int, stats: EdgeStats, what: str) -> None:
        """A session with committed tokens was refused for room (evicted: ABORTED, or its
        reopen answered RESOURCE_EXHAUSTED), with a back-off hint: wait the hint and let the
        caller reopen. These waits count against `EngineConfig.max_resume_waits`, not
        `max_retries` (a full verifier is not a broken one); past it, `EdgeError`
        RESOURCE_EXHAUSTED with the hint."""
        if err.evicted:
            stats.evictions += 1
        if waits > self.config.max_resume_waits:
            raise EdgeError(
                "RESOURCE_EXHAUSTED",
                f"{what}: the verifier had no room to resume the session after {waits - 1} "
                f"waits; retry later; last error: {err}",
                retry_after_ms=self.retry_after_ms,
            ) from err
        stats.reconnects += 1
        delay = (err.retry_after_ms or 0) / 1e3
        logger.info(
            "%s: %s; reopening the session in %.2f s (wait %d of %d)",
            what,
            "evicted by the verifier" if err.evicted else f"{err.code}",
            delay,
            waits,
            self.config.max_resume_waits,
        )
        await asyncio.sleep(delay)

    @staticmethod
    def is_refusal(err: LinkError) -> bool:
        """`err` is the verifier asking for patience, not a failure: an eviction, or a full
        verifier, with a back-off hint (`wait_for_room` handles it)."""
        return err.retry_after_ms is not None and (err.evicted or err.code == "RESOURCE_EXHAUSTED")

    @property
    def retry_after_ms(self) -> int:
        """The back-off hint sent with RESOURCE_EXHAUSTED: the longest retry backoff, >= 1 ms."""
        return max(1, round(self.config.backoff_max_s * 1e3))

    def check_session(self, session: SessionInfo, params: SamplingParams) -> None:
        """Raise a final `LinkError` when rejection sampling (whose q rows must be as wide as p)
        would need one vocabulary and has two."""
        if not params.is_greedy and not params.is_coupled and session.vocab_size != self.vocab_size:
            raise LinkError(
                f"verifier {session.address} has vocab_size {session.vocab_size}, the draft "
                f"{self.vocab_size}: sampling needs one vocabulary",
                address=session.address,
                code=None,
                retryable=False,
            )

    async def open(
        self,
        link: VerifierLink,
        committed: list[int],
        params: SamplingParams,
        *,
        generated: int,
        next_seq: int,
        stats: EdgeStats,
    ) -> None:
        """Open the session on the link (retrying on the next verifiers like a round does)."""
        attempts = 0
        while True:
            attempts += 1
            try:
                session = await link.open(committed, params, generated=generated, next_seq=next_seq)
                self.check_session(session, params)
                return
            except LinkError as err:
                await self.after_failure(err, attempts, stats, "opening the session")
