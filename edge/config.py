"""The edge's settings: `EngineConfig` (sessions, drafting, retries) and `LinkConfig` (how the
gRPC link reaches verifiers). Plain validated dataclasses, importable without a model."""

from __future__ import annotations

from dataclasses import dataclass

from edgespec.core.registry import policy_names
from edgespec.core.validation import check_float, check_int, check_positive
from edgespec.serving.tls import TlsConfig


@dataclass(frozen=True)
class EngineConfig:
    """Edge engine settings."""

    default_k: int = 4  # draft length when a request names none
    max_k: int = 32  # largest draft length a request may ask for
    # policy when a request names none: a name in `edgespec.core.registry.policy_names()`
    default_policy: str = "adaptive"
    # draft ahead while verdicts travel, when a request does not say: the edge would otherwise
    # idle for a round trip per round (latency bench: adaptive + pipelined beats adaptive alone at
    # every RTT); False saves the draft compute a missed guess wastes, for edges short of it
    pipelined: bool = True
    # Pipelined chains: besides the guess that the pending block is accepted whole, draft ahead
    # on up to this many guesses that its p-th token (p = 1, 2, ...) is rejected for the draft's
    # runner-up (`Drafter.propose_ahead`), all in the same draft forwards. 0: the single guess.
    ahead_branches: int = 3
    # Of those, the most likely (p = 1, 2, ...) that are sent with the main guess. Where the
    # verifier takes `DraftBlock.alternatives` (`SessionInfo.block_alternatives`) they travel in
    # the main guess's message, and the verifier applies the one that came true or answers
    # STALE once; otherwise each is a block of its own, answered STALE when it missed (a message
    # each way per guess). The others stay on the edge, and one that came true is sent when the
    # verdict shows it: its round saves the drafting, not the round trip. Measured (capacity
    # bench, 32 sessions, 20 ms, emulated h100-70b, two interleaved pairs): all 3 in one message
    # gave adaptive 1.118x and 1.002x fixed k = 4's replica tokens/s, 1 gave 1.061x and 0.938x
    # (hits 66% vs 42% of rounds); session 14, sending 3 as blocks of their own gave 0.98x
    # against 1.09x with 1.
    ahead_branches_sent: int = 3
    max_sessions: int = 64  # concurrent sessions; more answer RESOURCE_EXHAUSTED
    max_retries: int = 6  # reconnect attempts per round before giving up
    # Waits (each the verifier's retry hint) of a running session that the verifier evicted or
    # refused room to reopen, before giving up with RESOURCE_EXHAUSTED; reset by any verdict.
    max_resume_waits: int = 30
    backoff_initial_s: float = 0.02  # sleep before the 2nd attempt; doubles each time
    backoff_max_s: float = 1.0
    # Draft on the worker thread (True) or on the event loop (False: saves two thread switches
    # per round but stalls every other session's I/O while one drafts). None = auto: on the loop
    # while this is the engine's only session, on the worker thread when sessions overlap.
    draft_in_thread: bool | None = None
    add_special_tokens: bool = False  # when tokenizing a text prompt
    # write each finished generation's per-round trace (msgpack, edge/trace.py) into this folder
    trace_dir: str | None = None
    # Learn each link across sessions: every session's rounds (whatever its policy) update an
    # estimate per (verifier, sampling regime), and an adaptive session starts from it
    # (`edgespec.core.link_memory.PolicyMemory`) instead of from priors.
    link_memory: bool = True

    def __post_init__(self) -> None:
        limits = (
            ("default_k", 1),
            ("max_k", 1),
            ("max_sessions", 1),
            ("max_retries", 0),
            ("max_resume_waits", 0),
            ("ahead_branches", 0),
            ("ahead_branches_sent", 0),
        )
        for name, lo in limits:
            check_int(name, getattr(self, name), lo)
        check_int("default_k", self.default_k, 1, self.max_k)
        for name in ("backoff_initial_s", "backoff_max_s"):
            check_float(name, getattr(self, name), 0.0)
        if self.default_policy not in policy_names():
            raise ValueError(
                f"default_policy must be one of {policy_names()}, got {self.default_policy!r}"
            )
        for name in ("pipelined", "link_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class LinkConfig:
    """How the edge talks to verifiers over gRPC. Every call has a deadline; times in seconds."""

    token: str | None = None  # bearer token sent as `authorization: Bearer <token>` metadata
    # TLS to the verifiers, client side (the CA to trust, an optional server-name override, an
    # optional client certificate for mutual TLS); None = plaintext.
    tls: TlsConfig | None = None
    model_id: str = ""  # model the edge expects; "" = the verifier's only model
    open_timeout_s: float = 30.0  # OpenSession deadline (includes the verifier's prefill)
    round_timeout_s: float = 10.0  # one round: block written -> verdict read
    close_timeout_s: float = 2.0  # CloseSession deadline (best effort)
    # Deadline of the whole VerifyStream call; a longer session reopens transparently after it.
    stream_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("open_timeout_s", "round_timeout_s", "close_timeout_s", "stream_timeout_s"):
            check_positive(name, getattr(self, name))
        if self.token is not None and (not isinstance(self.token, str) or not self.token):
            raise ValueError(f"token must be a non-empty str or None, got {self.token!r}")
        if self.tls is not None and not isinstance(self.tls, TlsConfig):
            raise ValueError(f"tls must be a TlsConfig or None, got {type(self.tls).__name__}")
        if not isinstance(self.model_id, str):
            raise ValueError(f"model_id must be a str, got {self.model_id!r}")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()
