"""What the edge does when a link fails: reopen the session after a backoff, or give up.

The edge owns the committed tokens (`edgespec.core.session.Drafter`); the verifier's KV cache is
only a cache. When the link fails (verifier down, connection reset, stream broken, round deadline
passed, session reaped), the session opens a new one on the same or the next verifier with the
committed prefix and resends the pending block: nothing is lost and the output is unchanged.
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
        a retry hint, verifiers that cannot be reached are UNAVAILABLE."""
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
        logger.warning(
            "%s failed (%s); reopening the session in %.2f s (attempt %d of %d)",
            what,
            err,
            delay,
            attempts + 1,
            self.config.max_retries + 1,
        )
        await asyncio.sleep(delay)

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
