"""The orchestrator's bookkeeping: endpoints, their health and load, and session assignment.

A plain class with no Ray and no gRPC, so that every rule below is unit-testable; the
`OrchestratorActor` (``orchestrator/orchestrator_actor.py``) wraps one `Registry` and feeds it
registrations, health-check results (``orchestrator/health.py``) and the edges' assignment
requests.

Vocabulary:

- **endpoint**: one gRPC server of an actor: a *verifier* (cloud, target model) or an *edge*
  (draft model, what applications call). Identified by a stable ``endpoint_id`` (the actor's
  name), which survives actor restarts; its ``address`` (``host:port``) may change on a restart,
  and re-registering under the same id replaces it.
- **session**: one generation on an edge, identified by a ``session_key`` the edge chooses. It is
  *assigned* to one verifier at a time; the verifier's **load** is the number of sessions
  assigned to it.
- **available** verifier: healthy (its last health check answered SERVING) and not draining.

Rules:

- A new session goes to the least-loaded available verifier (ties: fewest sessions ever
  assigned, then endpoint id), so simultaneous sessions alternate between equal replicas.
- When a verifier becomes unhealthy or is drained, each of its sessions is *reassigned* at once
  to the least-loaded available verifier (if any): the registry records the move, and the
  edge's next request for that session (it reconnects after its stream broke, or when the
  drained verifier stops) gets the new verifier.
- An edge asking again for a session it already holds means its verifier failed it: the session
  moves to another available verifier (the failed one is avoided while another is available).
- An edge's sessions die with it: they are released when the edge registers again (its actor
  restarted) or has failed `edge_expiry_checks` health checks in a row, so that verifiers do not
  keep the load of sessions nobody will finish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from edgespec.core.validation import check_int

logger = logging.getLogger(__name__)

VERIFIER = "verifier"
EDGE = "edge"
KINDS = (VERIFIER, EDGE)

# Health states. UNKNOWN: registered, not checked yet (treated as healthy: an actor registers
# after its server has started). UNREACHABLE: the check itself failed (connection refused,
# deadline): the endpoint or its actor is down or restarting.
SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"
UNKNOWN = "UNKNOWN"
UNREACHABLE = "UNREACHABLE"
HEALTH_STATES = (SERVING, NOT_SERVING, UNKNOWN, UNREACHABLE)


class NoVerifierAvailable(Exception):
    """No verifier is registered, healthy and not draining."""


class NoEdgeAvailable(Exception):
    """No edge is registered and healthy."""


def _check_address(address: object) -> str:
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"address must be 'host:port', got {address!r}")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address must be 'host:port' with port in [1, 65535], got {address!r}")
    return address


@dataclass
class Endpoint:
    """One registered gRPC endpoint and what the registry knows about it."""

    endpoint_id: str  # stable: the actor's name; survives restarts
    kind: str  # VERIFIER or EDGE
    address: str  # host:port clients dial (the node's address, as Ray reports it)
    node_id: str = ""  # Ray node id of the actor
    node_ip: str = ""
    device: str = "cpu"  # where the model runs: "cpu" or "cuda:0"...
    pid: int = 0  # the actor's worker process
    registrations: int = 0  # 1 + restarts seen (each start of the actor registers once)
    registered_at: float = 0.0
    health: str = UNKNOWN
    last_check: float = 0.0  # time of the last health-check result (0 = never)
    consecutive_failures: int = 0  # health checks failed in a row
    draining: bool = False
    sessions: set[str] = field(default_factory=set)  # keys of sessions assigned here now
    total_assigned: int = 0  # sessions ever assigned here (incl. reassignments)
    reported: dict[str, Any] = field(default_factory=dict)  # the actor's own stats, if polled

    @property
    def healthy(self) -> bool:
        return self.health in (SERVING, UNKNOWN)

    @property
    def available(self) -> bool:
        """Accepts new sessions: healthy and not draining."""
        return self.healthy and not self.draining

    @property
    def load(self) -> int:
        return len(self.sessions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "endpoint_id": self.endpoint_id,
            "kind": self.kind,
            "address": self.address,
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "device": self.device,
            "pid": self.pid,
            "restarts": max(0, self.registrations - 1),
            "health": self.health,
            "draining": self.draining,
            "load": self.load,
            "total_assigned": self.total_assigned,
            "consecutive_failures": self.consecutive_failures,
            "reported": dict(self.reported),
        }


@dataclass
class SessionRecord:
    """One session's assignment."""

    session_key: str
    edge_id: str
    verifier_id: str
    started_at: float
    assignments: int = 1  # 1 + times the session moved to another verifier
    handed_out: str = ""  # verifier id the edge was last given (differs after a registry move)
    failed: set[str] = field(default_factory=set)  # verifiers that failed this session

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_key": self.session_key,
            "edge_id": self.edge_id,
            "verifier_id": self.verifier_id,
            "started_at": self.started_at,
            "reassignments": self.assignments - 1,
        }


@dataclass(frozen=True)
class Move:
    """A session reassigned from one verifier to another (to_id None: no verifier was left)."""

    session_key: str
    from_id: str
    to_id: str | None
    reason: str  # "unhealthy" | "drained" | "failed" | "unregistered"


class Registry:
    """Endpoints, health, load and session assignment (see the module docstring for the rules).

    Not thread-safe: one owner (the orchestrator actor's event loop) calls it. `clock` is
    injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.time, edge_expiry_checks: int = 3) -> None:
        self._clock = clock
        self.edge_expiry_checks = check_int("edge_expiry_checks", edge_expiry_checks, 1)
        self._endpoints: dict[str, Endpoint] = {}
        self._sessions: dict[str, SessionRecord] = {}
        self.moves: list[Move] = []  # every reassignment, oldest first (bounded)
        self._max_moves = 1000

    # ---- endpoints ----------------------------------------------------------------------------

    def register(
        self,
        endpoint_id: str,
        kind: str,
        address: str,
        *,
        node_id: str = "",
        node_ip: str = "",
        device: str = "cpu",
        pid: int = 0,
    ) -> Endpoint:
        """Add an endpoint, or replace the address of a known one (its actor restarted).

        A (re-)registered endpoint starts UNKNOWN (counted healthy: it registers once serving)
        and keeps its draining flag and its sessions' records; the sessions' edges reconnect to it
        or elsewhere as their streams tell them.
        """
        if not isinstance(endpoint_id, str) or not endpoint_id:
            raise ValueError(f"endpoint_id must be a non-empty str, got {endpoint_id!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        _check_address(address)
        now = self._clock()
        ep = self._endpoints.get(endpoint_id)
        if ep is None:
            ep = Endpoint(endpoint_id=endpoint_id, kind=kind, address=address)
            self._endpoints[endpoint_id] = ep
        elif ep.kind != kind:
            raise ValueError(f"kind of endpoint {endpoint_id!r} is {ep.kind!r}, got {kind!r}")
        if ep.registrations and ep.address != address:
            logger.info("%s %s moved from %s to %s", kind, endpoint_id, ep.address, address)
        if ep.registrations and kind == EDGE:
            self._release_edge_sessions(endpoint_id, "re-registered")
        ep.address = address
        ep.node_id, ep.node_ip, ep.device, ep.pid = node_id, node_ip, device, pid
        ep.registrations += 1
        ep.registered_at = now
        ep.health = UNKNOWN
        ep.consecutive_failures = 0
        ep.last_check = 0.0
        return ep

    def unregister(self, endpoint_id: str) -> list[Move]:
        """Forget an endpoint; a verifier's sessions are reassigned."""
        ep = self._get(endpoint_id)
        moves = self._evacuate(ep, "unregistered") if ep.kind == VERIFIER else []
        del self._endpoints[endpoint_id]
        return moves

    def endpoint(self, endpoint_id: str) -> Endpoint:
        return self._get(endpoint_id)

    def endpoints(self, kind: str | None = None) -> list[Endpoint]:
        """Registered endpoints (of `kind`, if given), sorted by id."""
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
        return sorted(
            (e for e in self._endpoints.values() if kind is None or e.kind == kind),
            key=lambda e: e.endpoint_id,
        )

    def _get(self, endpoint_id: str) -> Endpoint:
        ep = self._endpoints.get(endpoint_id)
        if ep is None:
            known = sorted(self._endpoints)
            raise KeyError(f"endpoint_id {endpoint_id!r} is not registered; known: {known}")
        return ep

    # ---- health and draining --------------------------------------------------------------------

    def set_health(self, endpoint_id: str, health: str) -> list[Move]:
        """Record a health-check result; a verifier turning unhealthy has its sessions moved."""
        if health not in HEALTH_STATES:
            raise ValueError(f"health must be one of {HEALTH_STATES}, got {health!r}")
        ep = self._get(endpoint_id)
        was_healthy = ep.healthy
        ep.health = health
        ep.last_check = self._clock()
        ep.consecutive_failures = 0 if ep.healthy else ep.consecutive_failures + 1
        if ep.kind == EDGE and ep.consecutive_failures == self.edge_expiry_checks:
            self._release_edge_sessions(endpoint_id, f"{health} {ep.consecutive_failures} times")
        if was_healthy and not ep.healthy:
            logger.warning("%s %s (%s) is %s", ep.kind, endpoint_id, ep.address, health)
            if ep.kind == VERIFIER:
                return self._evacuate(ep, "unhealthy")
        elif not was_healthy and ep.healthy:
            logger.info("%s %s (%s) is %s again", ep.kind, endpoint_id, ep.address, health)
        return []

    def drain(self, endpoint_id: str) -> list[Move]:
        """Stop assigning sessions to a verifier and move its current sessions elsewhere."""
        ep = self._get(endpoint_id)
        if ep.kind != VERIFIER:
            raise ValueError(f"only verifiers can be drained; {endpoint_id!r} is an {ep.kind}")
        ep.draining = True
        return self._evacuate(ep, "drained")

    def undrain(self, endpoint_id: str) -> None:
        """Let a drained verifier take new sessions again."""
        self._get(endpoint_id).draining = False

    # ---- sessions -------------------------------------------------------------------------------

    def assign(self, session_key: str, edge_id: str, exclude: Iterable[str] = ()) -> Endpoint:
        """The verifier a session should (re)connect to.

        A new key: the least-loaded available verifier. A known key: the edge asks again because
        its verifier failed the session (or the registry already moved it): if the session was
        moved since the edge last asked, the new verifier; otherwise the session moves to the
        least-loaded available verifier other than the one that failed, falling back to it when
        it is the only one left. `exclude`: verifier ids (or addresses) not to use if any other
        is available. Raises `NoVerifierAvailable`.
        """
        if not isinstance(session_key, str) or not session_key:
            raise ValueError(f"session_key must be a non-empty str, got {session_key!r}")
        avoid = set(exclude)
        rec = self._sessions.get(session_key)
        if rec is None:
            target = self._pick(avoid)
            rec = SessionRecord(session_key, edge_id, target.endpoint_id, self._clock())
            self._sessions[session_key] = rec
            self._attach(rec, target)
            rec.handed_out = target.endpoint_id
            return target
        current = self._endpoints.get(rec.verifier_id)
        if rec.verifier_id != rec.handed_out and current is not None and current.available:
            # Moved by the registry since the edge's last request: hand out the new verifier.
            rec.handed_out = current.endpoint_id
            return current
        # The edge asks again for the verifier it was given: that verifier failed the session.
        rec.failed.add(rec.handed_out)
        target = self._pick(avoid | rec.failed, fallback_avoid=avoid)
        if target.endpoint_id != rec.verifier_id:
            if current is not None:
                current.sessions.discard(session_key)
            self._record_move(Move(session_key, rec.verifier_id, target.endpoint_id, "failed"))
            rec.verifier_id = target.endpoint_id
            rec.assignments += 1
            self._attach(rec, target)
        rec.handed_out = target.endpoint_id
        return target

    def release(self, session_key: str) -> bool:
        """The session ended; returns whether it was known."""
        rec = self._sessions.pop(session_key, None)
        if rec is None:
            return False
        ep = self._endpoints.get(rec.verifier_id)
        if ep is not None:
            ep.sessions.discard(session_key)
        return True

    def sessions(self) -> list[SessionRecord]:
        return sorted(self._sessions.values(), key=lambda r: (r.started_at, r.session_key))

    def pick_edge(self) -> Endpoint:
        """The healthy edge with the fewest sessions (ties: endpoint id). Raises NoEdgeAvailable."""
        per_edge: dict[str, int] = {}
        for rec in self._sessions.values():
            per_edge[rec.edge_id] = per_edge.get(rec.edge_id, 0) + 1
        edges = [e for e in self.endpoints(EDGE) if e.healthy]
        if not edges:
            raise NoEdgeAvailable(f"no healthy edge among {len(self.endpoints(EDGE))} registered")
        return min(edges, key=lambda e: (per_edge.get(e.endpoint_id, 0), e.endpoint_id))

    def edge_loads(self) -> dict[str, int]:
        """Sessions per edge id (edges without sessions included)."""
        loads = {e.endpoint_id: 0 for e in self.endpoints(EDGE)}
        for rec in self._sessions.values():
            loads[rec.edge_id] = loads.get(rec.edge_id, 0) + 1
        return loads

    # ---- internals ------------------------------------------------------------------------------

    def _release_edge_sessions(self, edge_id: str, why: str) -> None:
        keys = [k for k, r in self._sessions.items() if r.edge_id == edge_id]
        for key in keys:
            self.release(key)
        if keys:
            logger.info("released %d sessions of edge %s (%s)", len(keys), edge_id, why)

    def _pick(self, avoid: set[str], fallback_avoid: set[str] | None = None) -> Endpoint:
        """Least-loaded available verifier not in `avoid` (ids or addresses); if none, retry
        with `fallback_avoid` (a verifier that failed is better than none)."""
        candidates = [e for e in self.endpoints(VERIFIER) if e.available]
        chosen = [e for e in candidates if e.endpoint_id not in avoid and e.address not in avoid]
        if not chosen and fallback_avoid is not None:
            chosen = [
                e
                for e in candidates
                if e.endpoint_id not in fallback_avoid and e.address not in fallback_avoid
            ]
        if not chosen:
            total = len(self.endpoints(VERIFIER))
            raise NoVerifierAvailable(
                f"no verifier available: {total} registered, {len(candidates)} healthy and "
                f"not draining, {len(candidates) - len(chosen)} of those excluded"
            )
        return min(chosen, key=lambda e: (e.load, e.total_assigned, e.endpoint_id))

    def _attach(self, rec: SessionRecord, ep: Endpoint) -> None:
        ep.sessions.add(rec.session_key)
        ep.total_assigned += 1

    def _evacuate(self, ep: Endpoint, reason: str) -> list[Move]:
        """Move every session of verifier `ep` to the least-loaded other available verifier."""
        moves = []
        for key in sorted(ep.sessions):
            rec = self._sessions[key]
            try:
                target = self._pick({ep.endpoint_id})
            except NoVerifierAvailable:
                moves.append(Move(key, ep.endpoint_id, None, reason))
                continue
            ep.sessions.discard(key)
            rec.verifier_id = target.endpoint_id
            rec.assignments += 1
            self._attach(rec, target)
            moves.append(Move(key, ep.endpoint_id, target.endpoint_id, reason))
        for move in moves:
            self._record_move(move)
        if moves:
            logger.info("moved %d sessions off %s (%s)", len(moves), ep.endpoint_id, reason)
        return moves

    def _record_move(self, move: Move) -> None:
        self.moves.append(move)
        if len(self.moves) > self._max_moves:
            del self.moves[: len(self.moves) - self._max_moves]

    def snapshot(self) -> dict[str, Any]:
        """Plain JSON-able view: endpoints (with load and health), sessions, recent moves."""
        return {
            "time": self._clock(),
            "verifiers": [e.to_dict() for e in self.endpoints(VERIFIER)],
            "edges": [
                {**e.to_dict(), "load": self.edge_loads().get(e.endpoint_id, 0)}
                for e in self.endpoints(EDGE)
            ],
            "sessions": [r.to_dict() for r in self.sessions()],
            "moves": [vars(m) for m in self.moves[-20:]],
        }
