"""The verifier engine's session table: open sessions, their idle expiry, the engine's counters.

One lock guards the table and the counters; every method may be called from any thread. A
session's own state (its runner and verifier) is not guarded here: the engine touches it from
one thread only (see `edgespec.cloud.verifier`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from edgespec.cloud.verifier_types import NOT_FOUND, RESOURCE_EXHAUSTED, EngineStats, ServiceError
from edgespec.core.params import SamplingParams
from edgespec.core.verifier import Verifier

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """One edge session on the verifier: its target state and where it stands."""

    id: str
    verifier: Verifier
    params: SamplingParams
    open_len: int  # committed length at open
    generated_at_open: int  # tokens of the prefix that were generated (the rest is prompt)
    next_seq: int  # blocks with a lower seq are stale until the first verdict
    last_used: float  # engine clock
    decode_left: int = 0  # tokens the last (decode) block still streams
    kv_reserved: int = 0  # KV tokens reserved against the table's budget (its most ever)

    @property
    def tokens_left(self) -> int:
        """Tokens max_new_tokens still allows (prompt excluded)."""
        generated = self.generated_at_open + self.verifier.committed_len - self.open_len
        return self.params.max_new_tokens - generated


class SessionTable:
    """At most `max_sessions` open sessions by id; a session unused for `idle_ttl_s` seconds of
    `clock` is closed by `reap_idle`. Also holds the engine's `EngineStats` counters.

    Opening is two steps, so that the (slow) prefill runs outside the lock: `reserve` a slot,
    then `add` the session, or `unreserve` if building it failed.
    """

    def __init__(
        self,
        max_sessions: int,
        idle_ttl_s: float,
        clock: Callable[[], float],
        kv_budget_tokens: int | None = None,
        retry_after_ms: int = 1000,
    ) -> None:
        """`kv_budget_tokens`: KV tokens all sessions may reserve together (None: no budget);
        `retry_after_ms`: the hint a refused open carries."""
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self.clock = clock
        self.kv_budget_tokens = kv_budget_tokens
        self.retry_after_ms = retry_after_ms
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._stats = EngineStats()
        self._kv_reserved = 0

    def reserve(self, kv_tokens: int = 0) -> None:
        """Count a session about to open against max_sessions and the KV budget (`kv_tokens`:
        the most its cache will ever hold), reaping idle sessions first if either is full.

        Admission reserves a session's worst case, so a running session never has to be
        evicted to make room for another's growth. Raises ServiceError RESOURCE_EXHAUSTED (with
        a retry hint) when a slot or the budget is still short.
        """
        for attempt in range(2):
            with self._lock:
                slot = self._stats.sessions < self.max_sessions
                budget = self.kv_budget_tokens
                fits = budget is None or self._kv_reserved + kv_tokens <= budget
                if slot and fits:
                    self._stats.sessions += 1
                    self._kv_reserved += kv_tokens
                    return
            if attempt == 0:
                self.reap_idle()
        if not slot:
            message = f"this verifier already holds max_sessions={self.max_sessions} sessions"
        else:
            message = (
                f"this verifier's KV budget of kv_budget_tokens={budget} tokens has "
                f"{budget - self._kv_reserved if budget is not None else 0} left; the session "
                f"needs {kv_tokens} (prompt + max_new_tokens + max_block_tokens)"
            )
        self._stats.refused += 1
        raise ServiceError(
            RESOURCE_EXHAUSTED,
            message + "; retry later or use another verifier",
            retry_after_ms=self.retry_after_ms,
        )

    @property
    def open_count(self) -> int:
        """Sessions open or opening, as `stats().sessions` counts them, without a snapshot (the
        step scheduler asks before every step it may start)."""
        return self._stats.sessions

    def unreserve(self, kv_tokens: int = 0) -> None:
        """Give back what `reserve` took for a session that did not open."""
        with self._lock:
            self._stats.sessions -= 1
            self._kv_reserved -= kv_tokens

    @property
    def kv_reserved(self) -> int:
        """KV tokens reserved by open sessions."""
        return self._kv_reserved

    def kv_tokens(self) -> int:
        """KV tokens held in the open sessions' caches now."""
        with self._lock:
            sessions = list(self._sessions.values())
        return sum(s.verifier.runner.length for s in sessions)

    def add(self, session: Session, forwards: int) -> None:
        """Enter a session opened on a reserved slot (`forwards`: the forwards its prefill ran)."""
        with self._lock:
            self._sessions[session.id] = session
            self._stats.opened += 1
            self._stats.forwards += forwards

    def get(self, session_id: str) -> Session:
        """The open session `session_id`, marked used now; ServiceError NOT_FOUND if none."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise ServiceError(
                NOT_FOUND,
                f"session_id {session_id!r} is not open here (closed, expired after "
                f"{self.idle_ttl_s:g} s idle, or opened on another verifier); "
                "reopen it with OpenSession",
                "session_id",
            )
        session.last_used = self.clock()
        return session

    def close(self, session_id: str) -> bool:
        """Drop a session and its cache; returns whether it existed."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
            existed = session is not None
            if session is not None:
                self._kv_reserved -= session.kv_reserved
                self._stats.sessions -= 1
                self._stats.closed += 1
        return existed

    def reap_idle(self, now: float | None = None) -> list[str]:
        """Close every session idle for longer than idle_ttl_s; returns their ids.

        `now` is a time on the table's clock (default: the clock now).
        """
        now = self.clock() if now is None else now
        deadline = now - self.idle_ttl_s
        with self._lock:
            expired = [sid for sid, s in self._sessions.items() if s.last_used < deadline]
            for sid in expired:
                self._kv_reserved -= self._sessions.pop(sid).kv_reserved
            self._stats.sessions -= len(expired)
            self._stats.reaped += len(expired)
        if expired:
            logger.info("closed %d idle session(s)", len(expired))
        return expired

    def count(self, **increments: int) -> None:
        """Add to the named `EngineStats` counters, e.g. ``count(applied=1, forwards=1)``."""
        with self._lock:
            for name, n in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + n)

    def stats(self) -> EngineStats:
        """A snapshot of the counters."""
        with self._lock:
            return replace(self._stats)
