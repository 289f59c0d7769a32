"""One step of the batching verifier: the ready work of many sessions, ONE target forward.

`run_step(engine, work)` takes a list of `Work` items (a draft block to verify, or the next
token of a cloud-only decode block), at most one per session, and

1. prepares each (`VerifierEngine.prepare` / `prepare_decode`): validation, STALE and REPLAYED
   answers, no model work; an item that fails here gets its own error, the others go on;
2. runs the prepared ones in ONE target forward (`edgespec.core.batch_forward.extend_batch`),
   each session with its own cache, positions and ragged feed (a token tree with tree
   attention, chains and prefill chunks causally); a session whose runner cannot
   be batched (a model with recurrent state) runs alone after it;
3. completes each session's verdict with that session's own acceptance rule
   (`VerifierEngine.complete` over its own logits rows: greedy, rejection, or whatever the
   session's `Verifier` applies).

Under an emulated compute profile the step is padded to the profile's batched-forward time
(`ComputeProfile.target_step_ms`: weights once, each session's KV, compute per fed token).

KV budget: before the forward, sessions are evicted if the step would take the caches past the
budget (`VerifierEngine.make_room`, "evict" admission only); an evicted session's item is
answered ServiceError ABORTED (evicted), and its edge reopens it.

Failures: a forward that raises closes every session in it (their caches are undefined) and
answers each with ServiceError INTERNAL, as a one-session forward does. The step never raises.
Model work: call from ONE thread (the engine's sessions are not thread-safe).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from edgespec.cloud.sessions import Session
from edgespec.cloud.verifier import PreparedBlock, VerifierEngine
from edgespec.cloud.verifier_types import INTERNAL, ServiceError, VerifyResult
from edgespec.core.batch_forward import extend_batch
from edgespec.core.profiles import pad_until
from edgespec.core.session import DraftBlock

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyWork:
    """Verify a draft block (or start a decode block) of a session."""

    session_id: str
    block: DraftBlock

    @property
    def feed_estimate(self) -> int:
        """Tokens the item will feed (for a step's token budget): its longest guess's."""
        return max(len(choice.tokens) for choice in self.block.choices) + 1


@dataclass(frozen=True)
class DecodeWork:
    """The next token of the session's decode block `seq` (its last result had ``more``)."""

    session_id: str
    seq: int

    feed_estimate = 1


@dataclass(frozen=True)
class PrefillWork:
    """The next chunk, at most `max_tokens`, of a session's prefix into its cache (a session
    opened with ``prefill=False``); answered with a `PrefillResult`."""

    session_id: str
    max_tokens: int

    @property
    def feed_estimate(self) -> int:
        return self.max_tokens


@dataclass(frozen=True)
class PrefillResult:
    """A prefill chunk done: `left` prefix tokens still to go (0: the session is ready)."""

    left: int


Work = VerifyWork | DecodeWork | PrefillWork
Outcome = VerifyResult | PrefillResult | ServiceError


@dataclass(frozen=True)
class _PrefillChunk:
    """A prepared `PrefillWork`: the tokens its forward feeds."""

    session: Session
    feed: list[int]


@dataclass(frozen=True)
class StepStats:
    """What one step did (for metrics): sessions and tokens in its forward, its time."""

    items: int  # work items answered
    sessions: int  # sessions in the forward (0: every item answered without one)
    fed_tokens: int  # tokens fed by the forward, all sessions together
    kv_tokens: int  # tokens cached before the forward, all sessions together
    forward_ms: float  # the forward (padding included)
    # the whole step's wall time (preparing, forward, acceptance), 0 when no forward ran
    step_ms: float = 0.0
    # an emulated profile's modelled time of the forward (the time it is padded to); 0 when
    # no forward ran or the profile is real
    modelled_ms: float = 0.0


def run_step(engine: VerifierEngine, work: Sequence[Work]) -> tuple[list[Outcome], StepStats]:
    """Answer every item of `work` (at most one per session) with one batched forward.

    Returns the outcomes in `work`'s order (a `VerifyResult` or `PrefillResult`, or the
    `ServiceError` that item raised) and the step's stats.
    """
    if len({item.session_id for item in work}) != len(work):
        raise ValueError("work must hold at most one item per session")
    step_started = time.perf_counter()
    outcomes: list[Outcome | None] = [None] * len(work)
    ready: list[tuple[int, PreparedBlock | _PrefillChunk]] = []
    for index, item in enumerate(work):
        try:
            with engine.closed_on_failure(item.session_id):
                prepared = _prepare(engine, item)
        except ServiceError as err:
            outcomes[index] = err
            continue
        if isinstance(prepared, (VerifyResult, PrefillResult)):
            outcomes[index] = prepared
        else:
            ready.append((index, prepared))
    ready = _make_room(engine, ready, outcomes)
    batched = [(i, p) for i, p in ready if p.session.verifier.runner.batchable]
    # Rows computed apart but charged to this step's modelled time (`ModelRunner.step_padded`).
    apart = [(i, p) for i, p in ready if p.session.verifier.runner.step_padded]
    in_step = batched + apart
    rows = [(p.session.verifier.runner.length, len(_feed(p))) for _, p in in_step]
    prefill_tokens = sum(len(p.feed) for _, p in in_step if isinstance(p, _PrefillChunk))
    started = time.perf_counter()
    logits = _forward(engine, [p for _, p in batched])
    apart_logits = [_forward_apart(engine, p) for _, p in apart]
    modelled_ms = 0.0
    if logits is not None or apart:
        profile = engine.compute_profile
        # A step with prefill chunks costs at least the profile's prefill time of their tokens.
        floor = profile.target_prefill.ms(prefill_tokens) if prefill_tokens else 0.0
        modelled_ms = max(profile.target_step_ms(rows), floor) if profile.emulated else 0.0
        pad_until(started, modelled_ms, engine.model.device)
    forward_ms = (time.perf_counter() - started) * 1e3
    for b, (index, prepared) in enumerate(batched):
        outcomes[index] = _complete(engine, prepared, logits[b] if logits is not None else None)
    for (index, prepared), result in zip(apart, apart_logits, strict=True):
        outcomes[index] = (
            result if isinstance(result, ServiceError) else (_complete(engine, prepared, result))
        )
    for index, prepared in ready:
        if outcomes[index] is None:  # not batchable: its own forward (recompute-mode runner)
            outcomes[index] = _complete(engine, prepared, None)
    stats = StepStats(
        items=len(work),
        sessions=len(in_step),
        fed_tokens=sum(n for _, n in rows),
        kv_tokens=sum(p for p, _ in rows),
        forward_ms=forward_ms if in_step else 0.0,
        step_ms=(time.perf_counter() - step_started) * 1e3 if in_step else 0.0,
        modelled_ms=modelled_ms,  # 0 unless a forward ran (`in_step` then holds it)
    )
    return [o for o in outcomes if o is not None], stats


def _make_room(
    engine: VerifierEngine,
    ready: list[tuple[int, PreparedBlock | _PrefillChunk]],
    outcomes: list[Outcome | None],
) -> list[tuple[int, PreparedBlock | _PrefillChunk]]:
    """Evict to keep the KV budget after this step's forward (`VerifierEngine.make_room`);
    an evicted session's item is answered with its ABORTED and leaves the step."""
    evicted = set(engine.make_room({p.session.id: len(_feed(p)) for _, p in ready}))
    if not evicted:
        return ready
    kept = []
    for index, prepared in ready:
        if prepared.session.id not in evicted:
            kept.append((index, prepared))
            continue
        try:
            engine.session(prepared.session.id)
        except ServiceError as err:  # the eviction's ABORTED
            outcomes[index] = err
        else:  # a broken invariant of ours: this item fails, the step goes on ("never raises")
            logger.error("evicted session %s is still open", prepared.session.id)
            outcomes[index] = ServiceError(INTERNAL, "the session's eviction failed")
    return kept


def _prepare(
    engine: VerifierEngine, item: Work
) -> PreparedBlock | _PrefillChunk | VerifyResult | PrefillResult:
    if isinstance(item, VerifyWork):
        return engine.prepare(item.session_id, item.block)
    if isinstance(item, DecodeWork):
        return engine.prepare_decode(item.session_id, item.seq)
    session = engine.session(item.session_id)
    verifier = session.verifier
    start, end = verifier.runner.length, verifier.committed_len - 1  # the cache's convention
    if start >= end:
        return PrefillResult(0)
    return _PrefillChunk(session, verifier.committed[start : min(end, start + item.max_tokens)])


def _feed(prepared: PreparedBlock | _PrefillChunk) -> list[int]:
    return prepared.feed if isinstance(prepared, _PrefillChunk) else prepared.pending.feed


def _parents(prepared: PreparedBlock | _PrefillChunk) -> list[int] | None:
    """A tree block's parents over its feed (tree attention in the step); None for a chain."""
    return None if isinstance(prepared, _PrefillChunk) else prepared.pending.parents


def _forward(
    engine: VerifierEngine, prepared: list[PreparedBlock | _PrefillChunk]
) -> list[Tensor] | None:
    """One forward over every prepared item; None if there is none or it failed (then every
    session in it is closed)."""
    if not prepared:
        return None
    runners = [p.session.verifier.runner for p in prepared]
    try:
        return extend_batch(runners, [_feed(p) for p in prepared], [_parents(p) for p in prepared])
    except Exception:
        ids = [p.session.id for p in prepared]
        logger.exception("batched target forward failed; closing sessions %s", ids)
        for sid in ids:
            engine.close_session(sid)
        return None


def _forward_apart(
    engine: VerifierEngine, prepared: PreparedBlock | _PrefillChunk
) -> Tensor | ServiceError:
    """The rows of one step-padded session, computed by its own runner (a prefill chunk's are
    not needed); a failure closes that session only."""
    if isinstance(prepared, PreparedBlock):
        try:
            return engine.run_forward(prepared)
        except ServiceError as err:
            return err
    try:
        with engine.closed_on_failure(prepared.session.id):
            return prepared.session.verifier.runner.extend(prepared.feed)
    except ServiceError as err:
        return err


def _complete(
    engine: VerifierEngine, prepared: PreparedBlock | _PrefillChunk, logits: Tensor | None
) -> Outcome:
    """The session's verdict over its own logits rows (None: its forward failed, or it runs
    alone here); a prefill chunk's logits are not needed."""
    session_id = prepared.session.id
    runner = prepared.session.verifier.runner
    if logits is None and runner.batchable:
        return ServiceError(INTERNAL, "batched target forward failed; session closed")
    try:
        with engine.closed_on_failure(session_id):
            if isinstance(prepared, _PrefillChunk):
                if logits is None:
                    runner.extend(prepared.feed)
                return PrefillResult(prepared.session.verifier.committed_len - 1 - runner.length)
            if logits is None:
                logits = engine.run_forward(prepared)
            return engine.complete(prepared, logits)
    except ServiceError as err:
        return err
