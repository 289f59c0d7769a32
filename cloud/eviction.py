"""Eviction under a KV budget (`VerifierConfig.kv_admission` "evict"): who is evicted, and who
is admitted first afterwards. Pure bookkeeping; `edgespec.cloud.sessions` calls it under its lock.

Ranks. Every admitted session gets a rank, its admission order. A session reopened after an
eviction keeps the rank of its first admission: the verifier recognises the reopen by its
prefix, which is exactly the committed tokens the evicted session held (the edge owns them and
reopens with them; see `edgespec.edge.recovery`), so no protocol field is needed. A reopen that
is not recognised (its prefix differs, or the record has expired) is simply a new session.

Victims. When a step would take the caches past the budget, sessions that have finished (their
edges only have yet to close them) are dropped first; then the sessions with the highest rank
(the most recently admitted) are evicted first, until the step fits, as vLLM's recompute
preemption does: the newest session has the least work to redo, and the oldest one always runs.
The session with the lowest rank is never evicted (admission guarantees that it fits the budget
on its own). No starvation: the oldest session runs every step until it finishes, so every
session becomes the oldest after finitely many others have finished, and runs to its end.

Resume first, oldest first. While an evicted session's edge is expected back (within `hold_s`
of its eviction, of its edge learning of it, or of its last refused reopen), a new session is
refused (RESOURCE_EXHAUSTED with a retry hint), and so is the reopen of any evicted session but
the lowest-ranked one waited for: room goes to evicted sessions in their admission order, so an
evicted session waits for a bounded number of others (those admitted before it) and not for
newcomers. An edge that never comes back stops holding anything up after `hold_s`; its record
is dropped with the idle sessions (`expire`), or when `capacity` newer ones are kept.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass


def prefix_key(prefix: Sequence[int]) -> bytes:
    """A digest of a token prefix (the key a reopen is recognised by)."""
    return hashlib.blake2b(array("q", prefix).tobytes(), digest_size=16).digest()


@dataclass
class Evicted:
    """An evicted session: what its reopen must match, the rank it keeps, when it was last
    heard of (its eviction, its edge told of it, or a refused reopen; the table's clock)."""

    session_id: str
    key: bytes  # prefix_key of its committed tokens at eviction
    rank: int
    seen: float
    evictions: int = 1  # times this session (across reopens) has been evicted


class EvictionLedger:
    """Ranks of admitted sessions and the records of evicted ones (at most `capacity` of each
    kind, oldest dropped first). Sessions with the same committed tokens (the same prompt and
    greedy output) have equal keys: a reopen resumes the lowest-ranked of them, which is the
    one whose turn it is anyway. Not thread-safe: the caller holds its lock."""

    def __init__(self, hold_s: float, capacity: int) -> None:
        """`hold_s`: how long an evicted session's reopen is waited for before others are
        admitted again; `capacity`: records kept at most."""
        self.hold_s = hold_s
        self.capacity = capacity
        self._next_rank = 0
        self._by_id: OrderedDict[str, Evicted] = OrderedDict()  # until its edge closes it
        self._waiting: list[Evicted] = []  # until reopened (or expired), oldest eviction first

    def new_rank(self) -> int:
        """The rank of a session admitted now (increasing)."""
        self._next_rank += 1
        return self._next_rank

    def record(
        self, session_id: str, committed: Sequence[int], rank: int, evictions: int, now: float
    ) -> Evicted:
        """Remember a session evicted at `now` with its committed tokens."""
        entry = Evicted(session_id, prefix_key(committed), rank, now, evictions)
        self._by_id[session_id] = entry
        self._waiting.append(entry)
        while len(self._by_id) > self.capacity:
            self._by_id.popitem(last=False)
        del self._waiting[: max(len(self._waiting) - self.capacity, 0)]
        return entry

    def by_id(self, session_id: str) -> Evicted | None:
        """The record of an evicted session id (its stream's next block is told so)."""
        return self._by_id.get(session_id)

    def forget_id(self, session_id: str) -> None:
        """The edge has closed the evicted session id; its reopen is still recognised."""
        self._by_id.pop(session_id, None)

    def match(self, prefix: Sequence[int]) -> Evicted | None:
        """The evicted session a reopen with `prefix` resumes, if any (not consumed): of those
        with these committed tokens, the lowest-ranked."""
        key = prefix_key(prefix)
        return min((e for e in self._waiting if e.key == key), key=_rank, default=None)

    def resumed(self, entry: Evicted) -> None:
        """The reopen of `entry` was admitted."""
        self._waiting = [e for e in self._waiting if e is not entry]

    def waiting(self, now: float) -> list[Evicted]:
        """Evicted sessions whose reopen is still waited for at `now` (heard of within
        `hold_s`), lowest rank (first admitted) first: the order their reopens are admitted
        in. Older records no longer hold anyone up, but a late reopen still matches them."""
        return sorted((e for e in self._waiting if now - e.seen <= self.hold_s), key=_rank)

    def expire(self, before: float) -> None:
        """Drop every record last heard of before `before` (the idle TTL's reaping)."""
        for sid in [sid for sid, e in self._by_id.items() if e.seen < before]:
            del self._by_id[sid]
        self._waiting = [e for e in self._waiting if e.seen >= before]


def _rank(entry: Evicted) -> int:
    return entry.rank


def choose_victims(
    held: Mapping[str, tuple[int, int]], excess: int, finished: Set[str] = frozenset()
) -> list[str]:
    """The sessions to evict to free at least `excess` KV tokens: `held` maps a session id to
    (its rank, the tokens evicting it frees). Sessions in `finished` (nothing left to verify:
    their edges only have to close them) go first, at no cost to anyone; then the highest rank
    first, never the lowest-ranked unfinished session (which may leave the excess uncovered:
    the caller's admission rules prevent that)."""
    if excess <= 0:
        return []
    done = [sid for sid in held if sid in finished]
    running = sorted((sid for sid in held if sid not in finished), key=lambda sid: held[sid][0])
    order = done + running[:0:-1]  # the finished, then the newest first, never the oldest
    victims: list[str] = []
    freed = 0
    for sid in order:
        if freed >= excess:
            break
        victims.append(sid)
        freed += held[sid][1]
    return victims
