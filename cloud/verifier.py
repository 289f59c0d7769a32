"""The verifier engine: one target model, many edge sessions, no gRPC.

`VerifierEngine` is what `cloud.service` wraps (and what tests build directly); its config,
errors and results are in `edgespec.cloud.verifier_types`, its session table in
`edgespec.cloud.sessions`. It loads the target once; each session gets its own `ModelRunner`
over that same model object (its own KV cache) and a `edgespec.core.session.Verifier` that owns
the session's committed length and last verdict. Bad input raises `ServiceError` carrying a
grpc-agnostic status code name and the field at fault; a stale or resent block is not an error
but a `VerifyResult` outcome.

One block is verified in three steps, `prepare` (validate, detect stale/resent blocks; no model
work) -> `run_forward` (the target forward) -> `complete` (acceptance, commit); the batching
verifier (`edgespec.cloud.batch_step`) runs many sessions' prepared blocks in one forward.

Cloud-only streaming: a block with no draft tokens and ``decode_tokens = n`` is verified like a
k = 0 block (its first token), and its result has ``more`` set while tokens remain; each further
token is one `decode_next` call (prepare/forward/complete of a one-position step), so a service
can stream each verdict as soon as it is produced and other sessions' blocks interleave. The
stream ends after n tokens, after a stop token, or at max_new_tokens.

Pipelined blocks carry an ``anchor_token`` (after a tree, with the guessed path before it,
``anchor_prefix``): one whose anchor is not how the session's committed tokens end is STALE (no
forward), exactly like one drafted on another committed length.

KV budget (`VerifierConfig.kv_budget_tokens`): "reserve" admission refuses a session whose most
would not fit; "evict" admits by what sessions hold and, before each forward (`make_room`),
evicts the most recently admitted sessions when the caches would pass the budget; an evicted
session's next block is answered ABORTED (evicted, with a retry hint) and its edge reopens it
with its committed prefix (`edgespec.cloud.eviction` has the rules).

A `ComputeProfile` (edgespec.core.profiles) other than "real" pads every target forward to its
modelled time (emulated deployments); outputs are unchanged. Threading: the session table is
guarded by its lock; model work runs on ONE thread (a session's runner is not thread-safe).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedModel

from edgespec.cloud.kv_budget import kv_budget_tokens
from edgespec.cloud.sessions import Session, SessionTable
from edgespec.cloud.verifier_types import (
    FAILED_PRECONDITION,
    INTERNAL,
    NOT_FOUND,
    EngineStats,
    OpenResult,
    Outcome,
    ServiceError,
    VerifierConfig,
    VerifyResult,
    invalid,
    probs_error,
)
from edgespec.core.params import SamplingParams
from edgespec.core.profiles import (
    ComputeProfile,
    get_profile,
    make_runner,
    measure_idle_forward_ms,
)
from edgespec.core.runner import ModelRunner
from edgespec.core.session import DraftBlock, StaleBlockError, derive_seed
from edgespec.core.validation import check_int, is_int
from edgespec.core.verifier import PendingVerify, Verifier

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedBlock:
    """A validated block ready for the target forward: `prepare`'s output, `complete`'s input."""

    session: Session
    pending: PendingVerify  # holds `feed`: the tokens the forward appends to the session's cache


class VerifierEngine:
    """One target model shared by all sessions; per session its own KV cache and verifier state.

    Greedy sessions (temperature 0) may send draft probs: they are validated, then ignored, since
    a greedy target's verdict does not depend on q. Rejection sampling sessions must send them
    with every non-empty block (q one-hot is only right for a deterministic draft, and a missing
    q is far more often a client bug than a greedy drafter); coupled sampling sessions must not.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        config: VerifierConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        compute_profile: ComputeProfile | str | None = None,
        runner_factory: Callable[[PreTrainedModel], ModelRunner] | None = None,
    ) -> None:
        """Wrap a loaded causal LM. `clock` (seconds) drives idle expiry; tests may inject one.
        `compute_profile` (name or profile; None = "real") pads each target forward.
        `runner_factory` builds each session's runner over the model (default: `make_runner`
        under the profile); benchmarks use it to emulate the target (see
        `edgespec.bench.emulated_verifier`)."""
        self.config = config if config is not None else VerifierConfig()
        self.compute_profile = get_profile(compute_profile or "real")
        self._runner_factory = runner_factory or (
            lambda model: make_runner(model, self.compute_profile, "target")
        )
        if self.config.device is not None:
            model = model.to(self.config.device)
        self.model = model.eval()
        probe = ModelRunner(self.model)
        self.vocab_size: int = probe.vocab_size
        self.max_length: int | None = probe.max_length  # model positions; None = unbounded
        # Token trees need a cache compacted to the accepted path (`ModelRunner.keep_nodes`).
        self.tree_blocks: bool = probe.batchable
        # Blocks may carry other guesses (`DraftBlock.alternatives`); announced at open.
        self.block_alternatives = True
        # What a forward costs with nobody else in it (sessions learn the load against it): the
        # emulated profile's fixed cost, else 0 (unknown) until `calibrate_idle_forward`.
        self.idle_forward_ms: float = (
            self.compute_profile.target.base_ms if self.compute_profile.emulated else 0.0
        )
        limit = self.max_length - 1 if self.max_length is not None else None
        prefix_limit = self.config.max_prefix_tokens
        if prefix_limit is None:
            prefix_limit = limit if limit is not None else 1 << 30
        elif limit is not None and prefix_limit > limit:
            raise ValueError(
                f"max_prefix_tokens must be <= {limit} (the model's max positions "
                f"{self.max_length} - 1, leaving room for 1 new token), got {prefix_limit}"
            )
        self.max_prefix_tokens: int = prefix_limit
        c = self.config
        if c.kv_budget_bytes is not None or c.kv_memory_fraction is not None:
            # in tokens from now on: what admission counts
            budget = kv_budget_tokens(self.model, c.kv_budget_bytes, c.kv_memory_fraction)
            self.config = replace(
                c, kv_budget_tokens=budget, kv_budget_bytes=None, kv_memory_fraction=None
            )
        self.model_id = self.config.model_id
        self._clock = clock
        self._sessions = SessionTable(
            self.config.max_sessions,
            self.config.session_idle_ttl_s,
            clock,
            self.config.kv_budget_tokens,
            self.config.retry_after_ms,
        )

    def calibrate_idle_forward(self) -> float:
        """Measure the fixed cost of a forward with nothing else in it (a one-token forward
        after a short context, `measure_idle_forward_ms`) and announce it to sessions opened
        from now on; an emulated profile's is kept (its padding is the model's cost). For a
        server's start-up, before it takes sessions: it runs the model."""
        if not self.compute_profile.emulated:
            self.idle_forward_ms = measure_idle_forward_ms(ModelRunner(self.model))
            logger.info("idle forward: %.2f ms", self.idle_forward_ms)
        return self.idle_forward_ms

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: VerifierConfig | None = None,
        dtype: torch.dtype | None = None,
        compute_profile: ComputeProfile | str | None = None,
        runner_factory: Callable[[PreTrainedModel], ModelRunner] | None = None,
    ) -> VerifierEngine:
        """Load the target from a local checkpoint folder (offline; float32 on CPU)."""
        config = config if config is not None else VerifierConfig()
        runner = ModelRunner.from_pretrained(path, device=config.device, dtype=dtype)
        if not config.model_id:
            config = replace(config, model_id=Path(path).name)
        return cls(
            runner.model, config, compute_profile=compute_profile, runner_factory=runner_factory
        )

    # ------------------------------------------------------------------ sessions

    def open_session(
        self,
        prefix_ids: Sequence[int],
        params: SamplingParams,
        generated: int = 0,
        next_seq: int = 0,
        model_id: str = "",
        prefill: bool = True,
    ) -> OpenResult:
        """Open a session on the committed prefix (prompt + `generated` tokens already generated)
        and prefill the target's cache with it (`prefill=False`: leave that to the batching
        verifier's `PrefillWork` steps, in chunks). `next_seq`: seq of the first block to come (a
        reopen continues the edge's numbering). `model_id` "" matches any model.

        Raises ServiceError: NOT_FOUND (model_id), INVALID_ARGUMENT (prefix_ids, params (incl.
        stop_token_ids outside the vocabulary), generated, next_seq), RESOURCE_EXHAUSTED
        (max_sessions open, or kv_budget_tokens short, even after reaping; with a retry hint).
        """
        if model_id and self.model_id and model_id != self.model_id:
            raise ServiceError(
                NOT_FOUND,
                f"model_id {model_id!r} is not served here; this verifier serves "
                f"{self.model_id!r} (or send model_id '')",
                "model_id",
            )
        if not isinstance(params, SamplingParams):
            raise invalid("params", f"params must be a SamplingParams, got {type(params)}")
        prefix = list(prefix_ids)
        self._check_ids("prefix_ids", prefix)
        self._check_ids("params.stop_token_ids", params.stop_token_ids)
        if not prefix:
            raise invalid("prefix_ids", "prefix_ids must hold at least 1 token, got 0")
        if len(prefix) > self.max_prefix_tokens:
            raise invalid(
                "prefix_ids",
                f"prefix_ids must hold at most {self.max_prefix_tokens} tokens, got {len(prefix)}",
            )
        most = min(len(prefix) - 1, params.max_new_tokens - 1)
        if not is_int(generated) or not 0 <= generated <= most:
            raise invalid(
                "generated",
                f"generated must be an int in [0, {most}] (at least 1 prompt token, fewer than "
                f"params.max_new_tokens={params.max_new_tokens}), got {generated!r}",
            )
        try:
            check_int("next_seq", next_seq, 0)
        except ValueError as err:
            raise invalid("next_seq", str(err)) from None
        prompt_len = len(prefix) - generated
        if self.max_length is not None and prompt_len + params.max_new_tokens > self.max_length:
            raise invalid(
                "params.max_new_tokens",
                f"params.max_new_tokens must be <= {self.max_length - prompt_len} for a prompt "
                f"of {prompt_len} tokens (the target holds {self.max_length} positions), "
                f"got {params.max_new_tokens}",
            )
        if generated and params.seed is not None and not params.is_coupled:
            # A reopen must not replay the random stream of the session's start: derive a fresh,
            # still deterministic, seed from the position the session resumes at. (Coupled noise
            # is a function of the absolute position already: a reopen keeps the seed.)
            params = replace(params, seed=derive_seed(params.seed, f"resume@{generated}"))
        kv_tokens = prompt_len + params.max_new_tokens + self.config.max_block_tokens
        rank, evictions, opening = 0, 0, 0
        if self.evicts:
            opening = len(prefix) + self.config.max_block_tokens
            rank, evictions = self._sessions.admit(prefix, self.config.max_block_tokens, kv_tokens)
            kv_tokens = 0  # counted by what the session holds, not reserved
        else:
            self._sessions.reserve(kv_tokens)
        try:
            started = time.perf_counter()
            runner = self._runner_factory(self.model)
            verifier = Verifier(runner, prefix, params, prefill=prefill)
            prefill_ms = (time.perf_counter() - started) * 1e3
        except BaseException:
            self._sessions.unreserve(kv_tokens, opening)
            raise
        session = Session(
            id=secrets.token_hex(8),
            verifier=verifier,
            params=params,
            open_len=len(prefix),
            generated_at_open=generated,
            next_seq=next_seq,
            last_used=self._clock(),
            kv_reserved=kv_tokens,
            rank=rank,
            evictions=evictions,
        )
        self._sessions.add(
            session, forwards=1 if prefill and len(prefix) > 1 else 0, opening=opening
        )
        logger.debug("opened session %s: %d prefix tokens", session.id, len(prefix))
        return OpenResult(
            session_id=session.id,
            committed_len=verifier.committed_len,
            max_block_tokens=self.config.max_block_tokens,
            vocab_size=self.vocab_size,
            model_id=self.model_id,
            prefill_ms=prefill_ms,
            compute_profile=self.compute_profile.name,
            tree_blocks=self.tree_blocks,
            block_alternatives=self.block_alternatives,
            resumed=evictions > 0,
            idle_forward_ms=self.idle_forward_ms,
        )

    @property
    def evicts(self) -> bool:
        """Sessions are admitted by what they hold and evicted to keep the KV budget
        (`VerifierConfig.kv_admission` "evict" with a budget)."""
        return self.config.kv_admission == "evict" and self.config.kv_budget_tokens is not None

    def make_room(self, feeds: Mapping[str, int]) -> list[str]:
        """Before a forward that feeds `feeds` (session id -> tokens): when evicting, evict
        sessions (most recently admitted first, never the oldest) until the caches fit the KV
        budget after it; returns the evicted ids (`SessionTable.make_room`). Model thread only."""
        return self._sessions.make_room(feeds) if self.evicts else []

    def close_session(self, session_id: str) -> bool:
        """Drop a session and its cache; returns whether it existed."""
        return self._sessions.close(session_id)

    def reap_idle(self, now: float | None = None) -> list[str]:
        """Close sessions idle longer than session_idle_ttl_s at `now` (engine clock; default
        now); returns their ids."""
        return self._sessions.reap_idle(now)

    def kv_tokens(self) -> int:
        """KV tokens held in all sessions' caches now (sessions reserve against kv_budget_tokens)."""
        return self._sessions.kv_tokens()

    def stats(self) -> EngineStats:
        """A snapshot of the counters."""
        return self._sessions.stats()

    @property
    def open_sessions(self) -> int:
        """Sessions open or opening (`stats().sessions`, read without a snapshot)."""
        return self._sessions.open_count

    def committed(self, session_id: str) -> list[int]:
        """A copy of the session's committed tokens (raises ServiceError NOT_FOUND)."""
        return self.session(session_id).verifier.committed

    # ------------------------------------------------------------------ verification

    def verify(self, session_id: str, block: DraftBlock) -> VerifyResult:
        """Verify one block of the session: `prepare` -> `run_forward` -> `complete`.

        Raises ServiceError: NOT_FOUND (session_id), INVALID_ARGUMENT (tokens, probs, seq),
        FAILED_PRECONDITION (max_new_tokens already generated), INTERNAL (the forward or any
        other step failed unexpectedly; the session is closed, as its state is then undefined).
        """
        with self.closed_on_failure(session_id):
            prepared = self.prepare(session_id, block)
            if isinstance(prepared, VerifyResult):
                return prepared
            self._make_room_for(prepared)
            return self.complete(prepared, self.run_forward(prepared))

    def prepare(self, session_id: str, block: DraftBlock) -> PreparedBlock | VerifyResult:
        """Validate `block` against its session; no model work.

        Returns a `VerifyResult` right away for a STALE or REPLAYED block, else the
        `PreparedBlock` to run. Raises ServiceError as `verify` does.
        """
        session = self.session(session_id)
        if not isinstance(block, DraftBlock):
            raise invalid("block", f"block must be a DraftBlock, got {type(block)}")
        for i, choice in enumerate(block.choices):
            self._check_choice(session, choice, f"alternatives[{i - 1}]." if i else "")
        verifier = session.verifier
        last = verifier.last_verdict
        if last is None and block.seq < session.next_seq:
            return self._stale(session, block)
        try:
            pending = verifier.prepare(block)
        except StaleBlockError:
            return self._stale(session, block)
        except ValueError as err:  # the one check left to it: a seq reused by another block
            raise invalid(
                "seq", f"{err}: seq must be new, or the last block's to resend it"
            ) from err
        if pending is None:
            self._sessions.count(replayed=1)
            assert last is not None  # prepare only reports a resend after a verdict
            return VerifyResult(Outcome.REPLAYED, block.seq, verifier.committed_len, last)
        left = session.tokens_left
        if left <= 0:
            raise ServiceError(
                FAILED_PRECONDITION,
                f"session {session.id} has generated params.max_new_tokens="
                f"{session.params.max_new_tokens} tokens; no block can be verified",
            )
        chosen = pending.block  # the alternative the committed prefix picked, if any
        if chosen.depth > left - 1:
            field, what = ("tokens", "draft tokens")
            if chosen.parents is not None:
                field, what = ("parents", "levels of tree nodes")
            if pending.alternative:
                field = f"alternatives[{pending.alternative - 1}].{field}"
            raise invalid(
                field,
                f"{field} must hold at most {left - 1} {what} here: {left} more tokens reach "
                f"max_new_tokens and the verdict adds 1, got {chosen.depth}",
            )
        if block.decode_tokens > left:
            raise invalid(
                "decode_tokens",
                f"decode_tokens must be in [0, {left}] here ({left} more tokens reach "
                f"max_new_tokens), got {block.decode_tokens}",
            )
        return PreparedBlock(session=session, pending=pending)

    def decode_next(self, session_id: str, seq: int) -> VerifyResult:
        """The next token of the session's decode block `seq` (whose last result had ``more``):
        one target forward; the result has ``more`` while tokens remain.

        Raises ServiceError: NOT_FOUND (session_id), FAILED_PRECONDITION (block `seq` is not a
        decode block with tokens left), INTERNAL (a step failed unexpectedly; the session is
        closed).
        """
        with self.closed_on_failure(session_id):
            prepared = self.prepare_decode(session_id, seq)
            self._make_room_for(prepared)
            return self.complete(prepared, self.run_forward(prepared))

    def prepare_decode(self, session_id: str, seq: int) -> PreparedBlock:
        """The next one-position step of the session's decode block `seq`; no model work.
        Raises ServiceError as `decode_next` does."""
        session = self.session(session_id)
        last = session.verifier.last_verdict
        if session.decode_left <= 0 or last is None or last.seq != seq:
            raise ServiceError(
                FAILED_PRECONDITION,
                f"seq {seq} is not a decode block with tokens left in session {session.id}",
                "seq",
            )
        return PreparedBlock(session=session, pending=session.verifier.continue_decode())

    def verify_stream(self, session_id: str, block: DraftBlock) -> Iterator[VerifyResult]:
        """`verify`, then `decode_next` while the result has ``more``: every result of a block
        (one for a speculative block, up to decode_tokens for a decode block)."""
        result = self.verify(session_id, block)
        yield result
        while result.more:
            result = self.decode_next(session_id, block.seq)
            yield result

    def run_forward(self, prepared: PreparedBlock) -> Tensor:
        """The target forward over the block: logits (len(pending.feed), V) float32.

        On failure the session is closed (its cache is undefined) and ServiceError INTERNAL
        is raised.
        """
        try:
            return prepared.session.verifier.forward(prepared.pending)  # (n, V)
        except Exception as err:
            logger.exception("target forward failed in session %s", prepared.session.id)
            self.close_session(prepared.session.id)
            raise ServiceError(
                INTERNAL, f"target forward failed ({type(err).__name__}); session closed"
            ) from err

    def complete(self, prepared: PreparedBlock, logits: Tensor) -> VerifyResult:
        """Acceptance over the block's logits (len(pending.feed), V); commits, returns the verdict."""
        session = prepared.session
        block = prepared.pending.block
        first = session.verifier.last_verdict is None or (
            session.verifier.last_verdict.seq != block.seq
        )
        verdict = session.verifier.complete(prepared.pending, logits)
        session.last_used = self._clock()
        if block.decode_tokens:
            left = block.decode_tokens if first else session.decode_left
            left -= 1
            stop = verdict.token in session.params.stop_token_ids
            session.decode_left = 0 if stop or session.tokens_left <= 0 else left
        else:
            session.decode_left = 0
        self._sessions.count(
            applied=1, forwards=1, drafted=len(block.tokens), accepted=verdict.accepted
        )
        return VerifyResult(
            Outcome.APPLIED,
            verdict.seq,
            verdict.committed_len,
            verdict,
            more=session.decode_left > 0,
        )

    # ------------------------------------------------------------------ helpers

    def session(self, session_id: str) -> Session:
        """The open session (marked used now); ServiceError NOT_FOUND if none."""
        return self._sessions.get(session_id)

    @contextmanager
    def closed_on_failure(self, session_id: str) -> Iterator[None]:
        """Pass ServiceErrors through; on any other exception close the session (its state is
        undefined after a half-done step) and raise ServiceError INTERNAL saying so."""
        try:
            yield
        except ServiceError:
            raise
        except Exception as err:
            logger.exception("verification failed in session %s", session_id)
            self.close_session(session_id)
            raise ServiceError(
                INTERNAL,
                f"verification failed ({type(err).__name__}: {err}); session closed",
            ) from err

    def _check_choice(self, session: Session, choice: DraftBlock, at: str) -> None:
        """ServiceError unless `choice` (the block or one of its alternatives, whose fields are
        named with prefix `at`) is well formed for the session: its size, ids, tree and q."""
        tokens = choice.tokens
        k = len(tokens)
        limit = self.config.max_block_tokens
        if k > limit:
            raise invalid(
                f"{at}tokens",
                f"{at}tokens must hold at most max_block_tokens={limit} draft tokens, got {k}",
            )
        self._check_ids(f"{at}tokens", tokens)
        if choice.parents is not None:
            self._check_tree()
        q = choice.draft_probs
        if q is not None and session.params.is_coupled:
            raise invalid(
                f"{at}probs",
                f"{at}probs must be absent in a coupled sampling session (params.sampler "
                "coupled): the verdict depends on the draft tokens alone",
            )
        if q is not None:
            try:
                q.validate(k, self.vocab_size)
            except ValueError as err:
                raise probs_error(err, at) from err
        elif k and not session.params.is_greedy and not session.params.is_coupled:
            raise invalid(
                f"{at}probs",
                f"{at}probs must be set for a rejection sampling session (temperature "
                f"{session.params.temperature} > 0): the distribution each draft token was "
                "drawn from, dense (k, V) or sparse",
            )

    def _check_tree(self) -> None:
        """A tree block needs a target whose cache keeps per-node entries (`tree_blocks`):
        FAILED_PRECONDITION "parents" otherwise."""
        if not self.tree_blocks:
            raise ServiceError(
                FAILED_PRECONDITION,
                f"parents must be empty: this verifier's target ({self.model_id or 'model'}) "
                "cannot verify token trees (its cache cannot be compacted to a path)",
                "parents",
            )

    def _make_room_for(self, prepared: PreparedBlock) -> None:
        """`make_room` for one session's forward; raises its ABORTED if it is the one evicted."""
        sid = prepared.session.id
        if sid in self.make_room({sid: len(prepared.pending.feed)}):
            self.session(sid)  # raises the eviction's ABORTED

    def _stale(self, session: Session, block: DraftBlock) -> VerifyResult:
        self._sessions.count(stale=1)
        return VerifyResult(Outcome.STALE, block.seq, session.verifier.committed_len, None)

    def _check_ids(self, name: str, ids: Sequence[int]) -> None:
        """Every id an int in [0, vocab_size), else ServiceError naming ``name[i]``."""
        vocab = self.vocab_size
        for i, t in enumerate(ids):
            if not is_int(t) or not 0 <= t < vocab:
                raise invalid(
                    f"{name}[{i}]", f"{name}[{i}] must be a token id in [0, {vocab}), got {t!r}"
                )
