"""The verifier engine's session table: open sessions, their idle expiry, the engine's counters.

One lock guards the table and the counters; every method may be called from any thread. A
session's own state (its runner and verifier) is not guarded here: the engine touches it from
one thread only (see `edgespec.cloud.verifier`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from edgespec.cloud.eviction import EvictionLedger, choose_victims
from edgespec.cloud.verifier_types import (
    ABORTED,
    NOT_FOUND,
    RESOURCE_EXHAUSTED,
    EngineStats,
    ServiceError,
)
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
    rank: int = 0  # admission order ("evict" mode: the highest is evicted first)
    evictions: int = 0  # times it was evicted before this (re)open

    @property
    def finished(self) -> bool:
        """Nothing is left to verify: max_new_tokens reached, or a stop token committed (its
        edge has stopped and only has to close it)."""
        if self.tokens_left <= 0:
            return True
        last = self.verifier.last_verdict
        return last is not None and last.token in self.params.stop_token_ids

    @property
    def kv_held(self) -> int:
        """KV tokens its cache holds, or will once its prefix is filled in."""
        return max(self.verifier.runner.length, self.verifier.committed_len)

    @property
    def tokens_left(self) -> int:
        """Tokens max_new_tokens still allows (prompt excluded)."""
        generated = self.generated_at_open + self.verifier.committed_len - self.open_len
        return self.params.max_new_tokens - generated


class SessionTable:
    """At most `max_sessions` open sessions by id; a session unused for `idle_ttl_s` seconds of
    `clock` is closed by `reap_idle`. Also holds the engine's `EngineStats` counters.

    Opening is two steps, so that the (slow) prefill runs outside the lock: `reserve` (or, when
    admitting by what sessions hold, `admit`) a slot, then `add` the session, or `unreserve` if
    building it failed.
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
        `retry_after_ms`: the hint a refused open (and an evicted session) carries."""
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self.clock = clock
        self.kv_budget_tokens = kv_budget_tokens
        self.retry_after_ms = retry_after_ms
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._stats = EngineStats()
        self._kv_reserved = 0
        self._kv_opening = 0  # "evict" mode: claims of sessions admitted but not added yet
        # An evicted session's reopen is waited for four retry hints after its edge learns of
        # the eviction (each refused reopen renews that).
        self._evicted = EvictionLedger(4 * retry_after_ms / 1e3, 4 * max_sessions)

    def reserve(self, kv_tokens: int = 0) -> None:
        """Count a session about to open against max_sessions and the KV budget (`kv_tokens`:
        the most its cache will ever hold), reaping idle sessions first if either is full.

        Admission reserves a session's worst case, so a running session never has to be
        evicted to make room for another's growth. Finished sessions make room first
        (`reclaim_finished`). Raises ServiceError RESOURCE_EXHAUSTED (with
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
                self.reclaim_finished()
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

    def admit(self, prefix: Sequence[int], headroom: int, most: int) -> tuple[int, int]:
        """Admit a session by what the open ones hold ("evict" mode): it fits when their KV
        tokens (`Session.kv_held`), the claims of sessions still opening, its `prefix` and
        `headroom` (one block) fit the budget, and it is its turn: no evicted session is waited
        for, or it resumes the first admitted of those (see `edgespec.cloud.eviction`). `most`: the most its cache will ever hold, which
        must fit the budget on its own. Returns (its rank, the evictions of the session it
        resumes; 0 for a new session); `add` it with ``opening = len(prefix) + headroom``, or `unreserve` that.

        Raises ServiceError RESOURCE_EXHAUSTED (with a retry hint) when it does not fit.
        """
        budget = self.kv_budget_tokens
        assert budget is not None
        claim = len(prefix) + headroom
        for attempt in range(2):
            with self._lock:
                now = self.clock()
                entry = self._evicted.match(prefix)
                slot = self._stats.sessions < self.max_sessions
                held = sum(s.kv_held for s in self._sessions.values()) + self._kv_opening
                fits = held + claim <= budget and most <= budget
                waiting = self._evicted.waiting(now)
                turn = not waiting or (entry is not None and entry.rank <= waiting[0].rank)
                if slot and fits and turn:
                    self._stats.sessions += 1
                    self._kv_opening += claim
                    if entry is None:
                        return self._evicted.new_rank(), 0
                    self._evicted.resumed(entry)
                    self._stats.resumed += 1
                    return entry.rank, entry.evictions
                if entry is not None:
                    entry.seen = now  # its edge is still there: keep waiting for it
            if attempt == 0 and not (slot and fits):
                self.reclaim_finished()
                self.reap_idle()
            elif attempt == 0:
                break
        if not slot:
            message = f"this verifier already holds max_sessions={self.max_sessions} sessions"
        elif most > budget:
            message = (
                f"this verifier's KV budget of kv_budget_tokens={budget} tokens is smaller than "
                f"the session's most, {most} (prompt + max_new_tokens + max_block_tokens)"
            )
        elif not fits:
            message = (
                f"this verifier's KV budget of kv_budget_tokens={budget} tokens has "
                f"{max(budget - held, 0)} left; the session needs {claim} now (prefix + "
                "max_block_tokens)"
            )
        else:
            message = (
                f"{len(waiting)} evicted session(s) are resumed first, in their admission order"
            )
        with self._lock:
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

    def unreserve(self, kv_tokens: int = 0, opening: int = 0) -> None:
        """Give back what `reserve` (`kv_tokens`) or `admit` (`opening`) took for a session
        that did not open."""
        with self._lock:
            self._stats.sessions -= 1
            self._kv_reserved -= kv_tokens
            self._kv_opening -= opening

    def make_room(self, feeds: Mapping[str, int]) -> list[str]:
        """Before a step ("evict" mode): evict sessions until the caches, grown by `feeds`
        (session id -> tokens the step feeds it), fit the budget; returns the evicted ids,
        most recently admitted first (`edgespec.cloud.eviction.choose_victims`). Their caches
        are dropped here; their next block is answered ABORTED (`get`). Finished sessions are
        dropped first, as if closed, and not returned (`EngineStats.reclaimed`)."""
        budget = self.kv_budget_tokens
        if budget is None:
            return []
        with self._lock:
            held = {
                sid: (s.rank, s.verifier.runner.length + feeds.get(sid, 0))
                for sid, s in self._sessions.items()
            }
            excess = sum(n for _, n in held.values()) + self._kv_opening - budget
            finished = {sid for sid, s in self._sessions.items() if s.finished}
            victims = choose_victims(held, excess, finished)
            now = self.clock()
            for sid in victims:
                session = self._sessions.pop(sid)
                self._kv_reserved -= session.kv_reserved
                if sid in finished:  # dropped like a close: nobody will resume it
                    self._stats.reclaimed += 1
                    continue
                self._evicted.record(
                    sid, session.verifier.committed, session.rank, session.evictions + 1, now
                )
                self._stats.evicted += 1
            self._stats.sessions -= len(victims)
        if victims:
            logger.info("evicted %d session(s) to keep the KV budget: %s", len(victims), victims)
        return [sid for sid in victims if sid not in finished]

    @property
    def kv_reserved(self) -> int:
        """KV tokens reserved by open sessions."""
        return self._kv_reserved

    def kv_tokens(self) -> int:
        """KV tokens held in the open sessions' caches now."""
        with self._lock:
            sessions = list(self._sessions.values())
        return sum(s.verifier.runner.length for s in sessions)

    def add(self, session: Session, forwards: int, opening: int = 0) -> None:
        """Enter a session opened on a reserved slot (`forwards`: the forwards its prefill ran;
        `opening`: the claim `admit` took, now counted by the session itself)."""
        with self._lock:
            self._sessions[session.id] = session
            self._kv_opening -= opening
            self._stats.opened += 1
            self._stats.forwards += forwards

    def get(self, session_id: str) -> Session:
        """The open session `session_id`, marked used now; ServiceError NOT_FOUND if none."""
        with self._lock:
            session = self._sessions.get(session_id)
            evicted = self._evicted.by_id(session_id) if session is None else None
            if evicted is not None:  # its edge learns it now: wait for its reopen from now
                evicted.seen = self.clock()
        if evicted is not None:
            raise ServiceError(
                ABORTED,
                f"session_id {session_id!r} was evicted to keep this verifier's KV budget "
                f"(eviction {evicted.evictions} of this session); reopen it with its committed "
                f"prefix after the retry hint, {self.retry_after_ms} ms",
                "session_id",
                retry_after_ms=self.retry_after_ms,
                evicted=True,
            )
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
            self._evicted.forget_id(session_id)
            if session is not None:
                self._kv_reserved -= session.kv_reserved
                self._stats.sessions -= 1
                self._stats.closed += 1
        return existed

    def reclaim_finished(self) -> list[str]:
        """Drop every finished session (nothing left to verify; its edge has only to close it),
        as a close would; returns their ids (`EngineStats.reclaimed`).

        Admission calls it when short of a slot or budget: an edge closes a session after its
        last verdict, in the background, and its next session's open can arrive first. Without
        this, a verifier at max_sessions refused that open for a slot nobody would use again. A
        close that comes later finds nothing (`existed` false), and an edge that lost the last
        verdict reopens with its committed prefix, as after any NOT_FOUND.
        """
        with self._lock:
            done = [sid for sid, s in self._sessions.items() if s.finished]
            for sid in done:
                self._kv_reserved -= self._sessions.pop(sid).kv_reserved
            self._stats.sessions -= len(done)
            self._stats.reclaimed += len(done)
        if done:
            logger.debug("reclaimed %d finished session(s) for an open", len(done))
        return done

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
            self._evicted.expire(deadline)
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
