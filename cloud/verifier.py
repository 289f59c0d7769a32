"""The verifier engine: one target model, many edge sessions, no gRPC.

`VerifierEngine` is what `cloud.service` wraps (and what tests build directly). It loads the
target once; each session gets its own `ModelRunner` over that same model object (its own KV
cache) and a `edgespec.core.session.Verifier` that owns the session's committed length and last
verdict. Bad input raises `ServiceError` carrying a grpc-agnostic status code name and the field
at fault; a stale or resent block is not an error but a `VerifyResult` outcome.

One block is verified in three steps, `prepare` (validate, detect stale/resent blocks; no model
work) -> `run_forward` (the target forward) -> `complete` (acceptance, commit), so that a later
batcher can gather prepared blocks of many sessions into a single forward pass.

Cloud-only streaming: a block with no draft tokens and ``decode_tokens = n`` is verified like a
k = 0 block (its first token), and its result has ``more`` set while tokens remain; each further
token is one `decode_next` call (prepare/forward/complete of a one-position step), so a service
can stream each verdict as soon as it is produced and other sessions' blocks interleave. The
stream ends after n tokens, after a stop token, or at max_new_tokens.

Pipelined blocks carry an ``anchor_token``: one whose anchor is not the session's last committed
token is STALE (no forward), exactly like one drafted on another committed length.

A `ComputeProfile` (edgespec.core.profiles) other than "real" pads every target forward to its
modelled time (emulated deployments); outputs are unchanged.

Threading: the session table is guarded by a lock; model work is meant to run on ONE thread (the
service uses a single-thread executor), as a session's runner is not thread-safe.
"""

from __future__ import annotations

import enum
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedModel

from edgespec.core.params import SamplingParams
from edgespec.core.profiles import ComputeProfile, get_profile, make_runner
from edgespec.core.runner import ModelRunner
from edgespec.core.session import DraftBlock, StaleBlockError, Verdict, derive_seed
from edgespec.core.verifier import PendingVerify, Verifier

logger = logging.getLogger(__name__)

INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
INTERNAL = "INTERNAL"
_CODES = frozenset((INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, INTERNAL))


class ServiceError(Exception):
    """A request the engine refuses. `code` is a gRPC status code name (transport-agnostic here):
    INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, FAILED_PRECONDITION or INTERNAL. `field` is
    the request field at fault (e.g. ``tokens[1]``), or None. The message names the field, the
    bad value and the allowed range."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        if code not in _CODES:
            raise ValueError(f"code must be one of {sorted(_CODES)}, got {code!r}")
        super().__init__(message)
        self.code = code
        self.field = field
        self.message = message


def _invalid(field_name: str, message: str) -> ServiceError:
    return ServiceError(INVALID_ARGUMENT, message, field_name)


class Outcome(enum.Enum):
    """What happened to a block (the wire's Verdict.Outcome)."""

    APPLIED = "APPLIED"  # verified and committed
    REPLAYED = "REPLAYED"  # the block of the last verdict was resent: same verdict, applied once
    STALE = "STALE"  # drafted on another prefix (or older than the last block): nothing applied


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class VerifierConfig:
    """Limits of one verifier replica. Validated on construction (ValueError naming the field)."""

    model_id: str = ""  # name the edge may ask for in OpenSession; "" = no name check
    max_sessions: int = 64  # open sessions at most (each holds a KV cache)
    max_block_tokens: int = 32  # largest k accepted per block
    # Longest committed prefix OpenSession accepts; None = the model's max positions - 1.
    # Whatever it is, prompt + max_new_tokens must also fit the model's positions.
    max_prefix_tokens: int | None = None
    session_idle_ttl_s: float = 300.0  # a session idle this long is closed by reap_idle
    device: str | None = None  # where the model runs; None = leave the model where it is

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str):
            raise ValueError(f"model_id must be a str, got {self.model_id!r}")
        for name, value in (
            ("max_sessions", self.max_sessions),
            ("max_block_tokens", self.max_block_tokens),
        ):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_prefix_tokens is not None and (
            not _is_int(self.max_prefix_tokens) or self.max_prefix_tokens < 1
        ):
            raise ValueError(
                f"max_prefix_tokens must be None or an int >= 1, got {self.max_prefix_tokens!r}"
            )
        ttl = self.session_idle_ttl_s
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            raise ValueError(f"session_idle_ttl_s must be a number > 0, got {ttl!r}")
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


@dataclass
class _Session:
    id: str
    verifier: Verifier
    params: SamplingParams
    open_len: int  # committed length at open
    generated_at_open: int  # tokens of the prefix that were generated (the rest is prompt)
    next_seq: int  # blocks with a lower seq are stale until the first verdict
    last_used: float  # engine clock
    decode_left: int = 0  # tokens the last (decode) block still streams

    @property
    def tokens_left(self) -> int:
        """Tokens max_new_tokens still allows (prompt excluded)."""
        generated = self.generated_at_open + self.verifier.committed_len - self.open_len
        return self.params.max_new_tokens - generated


@dataclass(frozen=True)
class PreparedBlock:
    """A validated block ready for the target forward: `prepare`'s output, `complete`'s input."""

    session: _Session
    pending: PendingVerify  # holds `feed`: the tokens the forward appends to the session's cache


class VerifierEngine:
    """One target model shared by all sessions; per session its own KV cache and verifier state.

    Greedy sessions (temperature 0) may send draft probs: they are validated, then ignored, since
    a greedy target's verdict does not depend on q. Sampling sessions must send them with every
    non-empty block (q one-hot is only right for a deterministic draft, and a missing q is far
    more often a client bug than a greedy drafter).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        config: VerifierConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        compute_profile: ComputeProfile | str | None = None,
    ) -> None:
        """Wrap a loaded causal LM. `clock` (seconds) drives idle expiry; tests may inject one.
        `compute_profile` (name or profile; None = "real") pads each target forward."""
        self.config = config if config is not None else VerifierConfig()
        self.compute_profile = get_profile(compute_profile or "real")
        if self.config.device is not None:
            model = model.to(self.config.device)
        self.model = model.eval()
        probe = ModelRunner(self.model)
        self.vocab_size: int = probe.vocab_size
        self.max_length: int | None = probe.max_length  # model positions; None = unbounded
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
        self.model_id = self.config.model_id
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._stats = EngineStats()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: VerifierConfig | None = None,
        dtype: torch.dtype | None = None,
        compute_profile: ComputeProfile | str | None = None,
    ) -> VerifierEngine:
        """Load the target from a local checkpoint folder (offline; float32 on CPU)."""
        config = config if config is not None else VerifierConfig()
        runner = ModelRunner.from_pretrained(path, device=config.device, dtype=dtype)
        if not config.model_id:
            config = replace(config, model_id=Path(path).name)
        return cls(runner.model, config, compute_profile=compute_profile)

    # ------------------------------------------------------------------ sessions

    def open_session(
        self,
        prefix_ids: Sequence[int],
        params: SamplingParams,
        generated: int = 0,
        next_seq: int = 0,
        model_id: str = "",
    ) -> OpenResult:
        """Open a session on the committed prefix (prompt + `generated` tokens already generated)
        and prefill the target's cache with it. `next_seq`: seq of the first block to come (a
        reopen continues the edge's numbering). `model_id` "" matches any model.

        Raises ServiceError: NOT_FOUND (model_id), INVALID_ARGUMENT (prefix_ids, params,
        generated, next_seq), RESOURCE_EXHAUSTED (max_sessions open, even after reaping).
        """
        if model_id and self.model_id and model_id != self.model_id:
            raise ServiceError(
                NOT_FOUND,
                f"model_id {model_id!r} is not served here; this verifier serves "
                f"{self.model_id!r} (or send model_id '')",
                "model_id",
            )
        if not isinstance(params, SamplingParams):
            raise _invalid("params", f"params must be a SamplingParams, got {type(params)}")
        prefix = list(prefix_ids)
        self._check_ids("prefix_ids", prefix)
        if not prefix:
            raise _invalid("prefix_ids", "prefix_ids must hold at least 1 token, got 0")
        if len(prefix) > self.max_prefix_tokens:
            raise _invalid(
                "prefix_ids",
                f"prefix_ids must hold at most {self.max_prefix_tokens} tokens, got {len(prefix)}",
            )
        most = min(len(prefix) - 1, params.max_new_tokens - 1)
        if not _is_int(generated) or not 0 <= generated <= most:
            raise _invalid(
                "generated",
                f"generated must be an int in [0, {most}] (at least 1 prompt token, fewer than "
                f"params.max_new_tokens={params.max_new_tokens}), got {generated!r}",
            )
        if not _is_int(next_seq) or next_seq < 0:
            raise _invalid("next_seq", f"next_seq must be an int >= 0, got {next_seq!r}")
        prompt_len = len(prefix) - generated
        if self.max_length is not None and prompt_len + params.max_new_tokens > self.max_length:
            raise _invalid(
                "params.max_new_tokens",
                f"params.max_new_tokens must be <= {self.max_length - prompt_len} for a prompt "
                f"of {prompt_len} tokens (the target holds {self.max_length} positions), "
                f"got {params.max_new_tokens}",
            )
        if generated and params.seed is not None:
            # A reopen must not replay the random stream of the session's start: derive a fresh,
            # still deterministic, seed from the position the session resumes at.
            params = replace(params, seed=derive_seed(params.seed, f"resume@{generated}"))
        self._reserve_slot()
        try:
            started = time.perf_counter()
            runner = make_runner(self.model, self.compute_profile, "target")
            verifier = Verifier(runner, prefix, params)
            prefill_ms = (time.perf_counter() - started) * 1e3
        except BaseException:
            with self._lock:
                self._stats.sessions -= 1
            raise
        session = _Session(
            id=secrets.token_hex(8),
            verifier=verifier,
            params=params,
            open_len=len(prefix),
            generated_at_open=generated,
            next_seq=next_seq,
            last_used=self._clock(),
        )
        with self._lock:
            self._sessions[session.id] = session
            self._stats.opened += 1
            self._stats.forwards += 1 if len(prefix) > 1 else 0
        logger.debug("opened session %s: %d prefix tokens", session.id, len(prefix))
        return OpenResult(
            session_id=session.id,
            committed_len=verifier.committed_len,
            max_block_tokens=self.config.max_block_tokens,
            vocab_size=self.vocab_size,
            model_id=self.model_id,
            prefill_ms=prefill_ms,
            compute_profile=self.compute_profile.name,
        )

    def _reserve_slot(self) -> None:
        """Count a session about to open against max_sessions (reaping idle ones if full)."""
        for attempt in range(2):
            with self._lock:
                if self._stats.sessions < self.config.max_sessions:
                    self._stats.sessions += 1
                    return
            if attempt == 0:
                self.reap_idle()
        raise ServiceError(
            RESOURCE_EXHAUSTED,
            f"this verifier already holds max_sessions={self.config.max_sessions} sessions; "
            "retry later or use another verifier",
        )

    def close_session(self, session_id: str) -> bool:
        """Drop a session and its cache; returns whether it existed."""
        with self._lock:
            existed = self._sessions.pop(session_id, None) is not None
            if existed:
                self._stats.sessions -= 1
                self._stats.closed += 1
        return existed

    def reap_idle(self, now: float | None = None) -> list[str]:
        """Close every session idle for longer than session_idle_ttl_s; returns their ids.

        `now` is a time on the engine clock (default: the clock now).
        """
        now = self._clock() if now is None else now
        deadline = now - self.config.session_idle_ttl_s
        with self._lock:
            expired = [sid for sid, s in self._sessions.items() if s.last_used < deadline]
            for sid in expired:
                del self._sessions[sid]
            self._stats.sessions -= len(expired)
            self._stats.reaped += len(expired)
        if expired:
            logger.info("closed %d idle session(s)", len(expired))
        return expired

    def stats(self) -> EngineStats:
        """A snapshot of the counters."""
        with self._lock:
            return replace(self._stats)

    def committed(self, session_id: str) -> list[int]:
        """A copy of the session's committed tokens (raises ServiceError NOT_FOUND)."""
        return self._session(session_id).verifier.committed

    # ------------------------------------------------------------------ verification

    def verify(self, session_id: str, block: DraftBlock) -> VerifyResult:
        """Verify one block of the session: `prepare` -> `run_forward` -> `complete`.

        Raises ServiceError: NOT_FOUND (session_id), INVALID_ARGUMENT (tokens, probs, seq),
        FAILED_PRECONDITION (max_new_tokens already generated), INTERNAL (the forward failed;
        the session is closed, as its cache is then undefined).
        """
        prepared = self.prepare(session_id, block)
        if isinstance(prepared, VerifyResult):
            return prepared
        return self.complete(prepared, self.run_forward(prepared))

    def prepare(self, session_id: str, block: DraftBlock) -> PreparedBlock | VerifyResult:
        """Validate `block` against its session; no model work.

        Returns a `VerifyResult` right away for a STALE or REPLAYED block, else the
        `PreparedBlock` to run. Raises ServiceError as `verify` does.
        """
        session = self._session(session_id)
        if not isinstance(block, DraftBlock):
            raise _invalid("block", f"block must be a DraftBlock, got {type(block)}")
        tokens = block.tokens
        k = len(tokens)
        limit = self.config.max_block_tokens
        if k > limit:
            raise _invalid(
                "tokens", f"tokens must hold at most max_block_tokens={limit} draft tokens, got {k}"
            )
        self._check_ids("tokens", tokens)
        q = block.draft_probs
        if q is not None:
            try:
                q.validate(k, self.vocab_size)
            except ValueError as err:
                raise _invalid("probs", f"probs: {err}") from err
        elif k and not session.params.is_greedy:
            raise _invalid(
                "probs",
                "probs must be set for a sampling session (temperature "
                f"{session.params.temperature} > 0): the distribution each draft token was "
                "drawn from, dense (k, V) or sparse",
            )
        verifier = session.verifier
        last = verifier.last_verdict
        if last is None and block.seq < session.next_seq:
            return self._stale(session, block)
        try:
            pending = verifier.prepare(block)
        except StaleBlockError:
            return self._stale(session, block)
        except ValueError as err:  # the one check left to it: a seq reused by another block
            raise _invalid("seq", f"seq: {err}") from err
        if pending is None:
            with self._lock:
                self._stats.replayed += 1
            assert last is not None  # prepare only reports a resend after a verdict
            return VerifyResult(Outcome.REPLAYED, block.seq, verifier.committed_len, last)
        left = session.tokens_left
        if left <= 0:
            raise ServiceError(
                FAILED_PRECONDITION,
                f"session {session.id} has generated params.max_new_tokens="
                f"{session.params.max_new_tokens} tokens; no block can be verified",
            )
        if k > left - 1:
            raise _invalid(
                "tokens",
                f"tokens must hold at most {left - 1} draft tokens here: {left} more tokens "
                f"reach max_new_tokens and the verdict adds 1, got {k}",
            )
        if block.decode_tokens > left:
            raise _invalid(
                "decode_tokens",
                f"decode_tokens must be in [0, {left}] here ({left} more tokens reach "
                f"max_new_tokens), got {block.decode_tokens}",
            )
        return PreparedBlock(session=session, pending=pending)

    def decode_next(self, session_id: str, seq: int) -> VerifyResult:
        """The next token of the session's decode block `seq` (whose last result had ``more``):
        one target forward; the result has ``more`` while tokens remain.

        Raises ServiceError: NOT_FOUND (session_id), FAILED_PRECONDITION (block `seq` is not a
        decode block with tokens left), INTERNAL (the forward failed; the session is closed).
        """
        session = self._session(session_id)
        last = session.verifier.last_verdict
        if session.decode_left <= 0 or last is None or last.seq != seq:
            raise ServiceError(
                FAILED_PRECONDITION,
                f"seq {seq} is not a decode block with tokens left in session {session.id}",
                "seq",
            )
        prepared = PreparedBlock(session=session, pending=session.verifier.continue_decode())
        return self.complete(prepared, self.run_forward(prepared))

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
            return prepared.session.verifier.runner.extend(prepared.pending.feed)  # (n, V)
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
        with self._lock:
            self._stats.applied += 1
            self._stats.forwards += 1
            self._stats.drafted += len(prepared.pending.block.tokens)
            self._stats.accepted += verdict.accepted
        return VerifyResult(
            Outcome.APPLIED,
            verdict.seq,
            verdict.committed_len,
            verdict,
            more=session.decode_left > 0,
        )

    # ------------------------------------------------------------------ helpers

    def _session(self, session_id: str) -> _Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise ServiceError(
                NOT_FOUND,
                f"session_id {session_id!r} is not open here (closed, expired after "
                f"{self.config.session_idle_ttl_s:g} s idle, or opened on another verifier); "
                "reopen it with OpenSession",
                "session_id",
            )
        session.last_used = self._clock()
        return session

    def _stale(self, session: _Session, block: DraftBlock) -> VerifyResult:
        with self._lock:
            self._stats.stale += 1
        return VerifyResult(Outcome.STALE, block.seq, session.verifier.committed_len, None)

    def _check_ids(self, name: str, ids: Sequence[int]) -> None:
        """Every id an int in [0, vocab_size), else ServiceError naming ``name[i]``."""
        vocab = self.vocab_size
        for i, t in enumerate(ids):
            if not _is_int(t) or not 0 <= t < vocab:
                raise _invalid(
                    f"{name}[{i}]", f"{name}[{i}] must be a token id in [0, {vocab}), got {t!r}"
                )
