"""The verifier engine's contract, without the engine: its limits (`VerifierConfig`), the
error it raises (`ServiceError` with a grpc-agnostic status code name), and what it answers
(`OpenResult`, `VerifyResult` with its `Outcome`, `EngineStats`).

Kept apart from `edgespec.cloud.verifier` (the engine) so that the session table and the
service read these types without the model code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from edgespec.core.session import Verdict
from edgespec.core.validation import check_float, check_int, check_ms, check_positive

INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
INTERNAL = "INTERNAL"
# A session evicted to keep the KV budget (`VerifierConfig.kv_admission` "evict"): its edge
# reopens it with its committed prefix (gRPC: "the client should retry at a higher level").
ABORTED = "ABORTED"
_CODES = frozenset(
    (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, INTERNAL, ABORTED)
)
KV_ADMISSIONS = ("reserve", "evict")


class ServiceError(Exception):
    """A request the engine refuses. `code` is a gRPC status code name (transport-agnostic here):
    INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, INTERNAL or ABORTED
    (the session was evicted: `evicted` set). `field` is the request field at fault (e.g.
    ``tokens[1]``), or None. The message names the field, the bad value and the allowed range."""

    def __init__(
        self,
        code: str,
        message: str,
        field: str | None = None,
        retry_after_ms: int | None = None,
        evicted: bool = False,
    ) -> None:
        if code not in _CODES:
            raise ValueError(f"code must be one of {sorted(_CODES)}, got {code!r}")
        super().__init__(message)
        self.code = code
        self.field = field
        self.message = message
        self.retry_after_ms = retry_after_ms  # RESOURCE_EXHAUSTED: back off this long, if set
        self.evicted = evicted  # ABORTED: the session was evicted (reopen it after the hint)


def invalid(field_name: str, message: str) -> ServiceError:
    """An INVALID_ARGUMENT `ServiceError` naming `field_name`."""
    return ServiceError(INVALID_ARGUMENT, message, field_name)


class Outcome(enum.Enum):
    """What happened to a block (the wire's Verdict.Outcome)."""

    APPLIED = "APPLIED"  # verified and committed
    REPLAYED = "REPLAYED"  # the block of the last verdict was resent: same verdict, applied once
    STALE = "STALE"  # drafted on another prefix (or older than the last block): nothing applied


@dataclass(frozen=True)
class VerifierConfig:
    """Limits of one verifier replica. Validated on construction (ValueError naming the field)."""

    model_id: str = ""  # name the edge may ask for in OpenSession; "" = no name check
    max_sessions: int = 64  # open sessions at most (each holds a KV cache)
    max_block_tokens: int = 64  # largest block accepted: k draft tokens, or tree nodes
    # Longest committed prefix OpenSession accepts; None = the model's max positions - 1.
    # Whatever it is, prompt + max_new_tokens must also fit the model's positions.
    max_prefix_tokens: int | None = None
    session_idle_ttl_s: float = 300.0  # a session idle this long is closed by reap_idle
    device: str | None = None  # where the model runs; None = leave the model where it is
    # The batching verifier (cloud.step_scheduler): one target forward per step for the ready
    # work of many sessions. False: one block per forward, one session at a time (the
    # reference the benchmarks compare against).
    batching: bool = True
    batch_max_sessions: int = 64  # sessions in one step's forward at most
    batch_max_tokens: int = 2048  # tokens fed by one step at most (its first item always runs)
    # How long an idle scheduler waits after the first ready item for others to join its step.
    batch_window_ms: float = 1.0
    # After a step, the scheduler may wait for sessions of that step that come back within
    # this fraction of the step's time after their answers (edges beside the verifier, e.g.
    # cloud-side drafting), so they share the next step instead of each starting its own; the
    # wait costs the others at most that fraction of a step. 0: never wait.
    batch_return_fraction: float = 0.25
    # Before a step, wait (at most this many steps' time) for sessions expected back soon when
    # that serves more sessions per unit of verifier time (`cloud.step_scheduler`: steps
    # grouped by expected returns); never while a session drafting ahead or a cloud-only
    # stream has work queued. 0: start as soon as the verifier is free. Default 1 since
    # session 13: fixed-k chains at 32 sessions gained 7-11% and pipelined adaptive edges
    # kept their rate once their blocks were never held back (experiments/results/capacity/
    # group_ab/NOTES.md).
    batch_group_horizon: float = 1.0
    # Start the next step before answering the callers of the one that ended, when it would
    # start without waiting anyway (`cloud.step_scheduler`: overlap). False: after them.
    batch_overlap: bool = True
    # A new session's prefix enters its cache in steps of at most this many tokens, batched
    # with other sessions' work, so that a long prompt does not stall them.
    prefill_chunk_tokens: int = 256
    # KV tokens all sessions may hold together (None: no budget; max_sessions alone bounds
    # memory). How OpenSession admits against it, `kv_admission`:
    # - "reserve": a session reserves its most (prompt + max_new_tokens + max_block_tokens);
    #   OpenSession answers RESOURCE_EXHAUSTED past the budget; nobody is ever evicted.
    # - "evict": a session is admitted by what the open sessions hold now (their committed
    #   tokens) plus its prefix and one block of headroom, so more sessions run at once; a step
    #   that would take the caches past the budget first evicts sessions, most recently
    #   admitted first (a resumed session keeps its first admission's rank; the oldest is never
    #   evicted), whose edges get ABORTED (evicted) and reopen with their committed prefix.
    #   Reopens of evicted sessions are admitted before new sessions (see `cloud.eviction`).
    kv_budget_tokens: int | None = None
    # The same budget given as bytes of KV cache, or as a fraction of the memory free on the
    # model's device once the model is loaded (a GPU's free memory, a host's available memory):
    # `VerifierEngine` turns either into kv_budget_tokens (`cloud.kv_budget`). One of the three
    # at most.
    kv_budget_bytes: int | None = None
    kv_memory_fraction: float | None = None
    kv_admission: str = "reserve"
    # The back-off hint a refused OpenSession (RESOURCE_EXHAUSTED) and an evicted session's
    # block (ABORTED) carry.
    retry_after_ms: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str):
            raise ValueError(f"model_id must be a str, got {self.model_id!r}")
        check_int("max_sessions", self.max_sessions, 1)
        check_int("max_block_tokens", self.max_block_tokens, 1)
        if self.max_prefix_tokens is not None:
            check_int("max_prefix_tokens", self.max_prefix_tokens, 1)
        check_positive("session_idle_ttl_s", self.session_idle_ttl_s)
        for name in ("batching", "batch_overlap"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_int("batch_max_sessions", self.batch_max_sessions, 1)
        check_int("batch_max_tokens", self.batch_max_tokens, 1)
        check_ms("batch_window_ms", self.batch_window_ms)
        check_float("batch_return_fraction", self.batch_return_fraction, 0, 1)
        check_float("batch_group_horizon", self.batch_group_horizon, 0, 4)
        check_int("prefill_chunk_tokens", self.prefill_chunk_tokens, 1)
        if self.kv_budget_tokens is not None:
            check_int("kv_budget_tokens", self.kv_budget_tokens, 1)
        if self.kv_budget_bytes is not None:
            check_int("kv_budget_bytes", self.kv_budget_bytes, 1)
        if self.kv_memory_fraction is not None:
            check_float("kv_memory_fraction", self.kv_memory_fraction, 0, 1, lo_open=True)
        given = [
            name
            for name in ("kv_budget_tokens", "kv_budget_bytes", "kv_memory_fraction")
            if getattr(self, name) is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give one KV budget at most: {' and '.join(given)} are both set")
        check_int("retry_after_ms", self.retry_after_ms, 1)
        if self.kv_admission not in KV_ADMISSIONS:
            raise ValueError(
                f"kv_admission must be one of {KV_ADMISSIONS}, got {self.kv_admission!r}"
            )
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(f"device must be None or a str such as 'cpu', got {self.device!r}")


@dataclass(frozen=True)
class OpenResult:
    """A session opened by `VerifierEngine.open_session`."""

    session_id: str
    committed_len: int  # = len(prefix_ids)
    max_block_tokens: int  # largest k this verifier accepts
    vocab_size: int  # width of the target's logits
    model_id: str
    prefill_ms: float  # target prefill of the prefix
    compute_profile: str = "real"  # the engine's compute profile (emulated ones pad forwards)
    tree_blocks: bool = False  # the verifier takes token trees (blocks with parents)
    block_alternatives: bool = False  # the verifier takes `DraftBlock.alternatives`
    resumed: bool = False  # the reopen of a session this verifier evicted
    # the fixed cost of a forward with no other session in it (`VerifierEngine.idle_forward_ms`)
    idle_forward_ms: float = 0.0


@dataclass(frozen=True)
class VerifyResult:
    """The answer to one block. `verdict` is None for STALE (nothing applied)."""

    outcome: Outcome
    seq: int  # seq of the block answered
    committed_len: int  # the session's committed length after this block
    verdict: Verdict | None
    more: bool = False  # a decode block with tokens still to stream: call decode_next


@dataclass
class EngineStats:
    """Counters since the engine started."""

    sessions: int = 0  # open now
    opened: int = 0
    closed: int = 0  # by close_session
    reaped: int = 0  # by reap_idle
    applied: int = 0  # blocks verified and committed
    replayed: int = 0
    stale: int = 0
    drafted: int = 0  # draft tokens in applied blocks
    accepted: int = 0  # of which accepted
    forwards: int = 0  # target forward passes (prefills + blocks)
    refused: int = 0  # OpenSessions refused (max_sessions or KV budget)
    evicted: int = 0  # sessions evicted to keep the KV budget (kv_admission "evict")
    resumed: int = 0  # evicted sessions reopened with their committed prefix
    reclaimed: int = 0  # finished sessions dropped for room before their edges closed them


def probs_error(err: ValueError, at: str = "") -> ServiceError:
    """`DraftProbs.validate`'s error in wire terms: ``draft_probs.probs`` is the field ``probs``
    (dense or sparse), ``draft_probs.ids`` is ``probs.sparse.ids``; `at` prefixes both (an
    alternative's fields: ``alternatives[i].``)."""
    text = (
        str(err)
        .replace("draft_probs.probs", f"{at}probs")
        .replace("draft_probs.ids", f"{at}probs.sparse.ids")
    )
    ids = f"{at}probs.sparse.ids"
    return invalid(ids if text.startswith(ids) else f"{at}probs", text)
