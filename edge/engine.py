"""The edge engine: drafts on the local draft model, verifies over the link, owns the output.

`EdgeEngine.generate` runs one session as an async generator of events: a `TokensEvent` each
time tokens are committed, then one `SummaryEvent`. A round is

    apply the last verdict (commit tokens, roll the draft cache back) -> yield the new tokens
    -> choose k (the policy seam) -> draft k tokens -> one VerifyStream round trip.

The edge owns the committed tokens (`speculative.session.Drafter`); the verifier's KV cache is only
a cache. When the link fails (verifier down, connection reset, stream broken, round deadline
passed, session reaped), the engine opens a new session on the same or the next verifier with
the committed prefix and resends the pending block: nothing is lost and the output is unchanged.
Greedy output is token-for-token what the target alone produces. With sampling, the new session's
generator starts afresh (seeded from the session seed and the number of tokens generated), so a
reconnect changes which sample is drawn but not its distribution: exactness in distribution holds
because every round's randomness is independent of the outcome of earlier ones.

Draft-model work runs on a single worker thread (one forward at a time; sessions interleave), so
the event loop keeps serving gRPC while a block is drafted. The exception, by default: while only
one session runs, its blocks are drafted on the event loop itself, which saves two thread
switches per round (`EngineConfig.draft_in_thread`). A session's draft prefill always runs on the
worker thread, concurrently with the verifier's prefill behind the OpenSession round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedModel

from edge.link import (
    AddressProvider,
    ChannelPool,
    LinkConfig,
    LinkError,
    RoundTiming,
    SessionInfo,
    VerifierLink,
    make_address_provider,
)
from protos.convert import FieldError
from speculative.params import SamplingParams
from speculative.rejection import DraftProbs
from speculative.runner import ModelRunner
from speculative.session import DraftBlock, Drafter, Verdict

logger = logging.getLogger(__name__)


class EdgeError(Exception):
    """Generation could not complete. `code` is a gRPC status name for the service to answer
    ('UNAVAILABLE', 'RESOURCE_EXHAUSTED', 'INVALID_ARGUMENT', 'FAILED_PRECONDITION', ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- draft-length policies


class DraftLengthPolicy(Protocol):
    """Chooses the draft length k of the next round from the session's stats so far.

    One instance per session (it may keep state). The engine clips the answer to
    [0, min(EngineConfig.max_k, verifier's max_block_tokens)].
    """

    name: str

    def choose_k(self, stats: EdgeStats) -> int: ...


@dataclass
class FixedK:
    """The same k every round."""

    k: int
    name: str = "fixed"

    def choose_k(self, stats: EdgeStats) -> int:
        return self.k


@dataclass
class CloudOnly:
    """k = 0: the verifier decodes one token per round, the edge only relays (a baseline)."""

    name: str = "cloud_only"

    def choose_k(self, stats: EdgeStats) -> int:
        return 0


# name -> factory(k) for policies selectable by name (GenerateRequest.policy). The adaptive
# controllers register themselves here later.
POLICIES: dict[str, Callable[[int], DraftLengthPolicy]] = {
    "fixed": FixedK,
    "cloud_only": lambda k: CloudOnly(),
}


def register_policy(name: str, factory: Callable[[int], DraftLengthPolicy]) -> None:
    """Make `factory(k)` selectable as policy `name` (k: the requested or default draft length)."""
    POLICIES[name] = factory


# ---------------------------------------------------------------- events and stats


@dataclass(frozen=True)
class RoundRecord:
    """One verification round as the edge saw it (milliseconds)."""

    seq: int
    k: int  # draft length the policy chose (after clipping)
    drafted: int  # draft tokens sent (k, or fewer near max_new_tokens or after a stop token)
    accepted: int
    draft_ms: float  # draft compute: Drafter.propose on the worker thread
    round_ms: float  # propose start -> verdict received, retries included
    apply_ms: float  # committing the verdict (Drafter.apply)
    timing: RoundTiming  # the successful attempt's link timing
    attempts: int  # 1 + retries this round needed

    @property
    def overhead_ms(self) -> float:
        """Framework time of the round: everything but draft and verifier compute."""
        return self.round_ms + self.apply_ms - self.draft_ms - self.timing.verify_ms


@dataclass
class EdgeStats:
    """Counters of one session (mirrors `GenerateStats` on the wire, plus per-round records)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    draft_lengths: list[int] = field(default_factory=list)  # draft tokens sent in each round
    time_to_first_token_ms: float = 0.0
    time_per_output_token_ms: float = 0.0
    bytes_sent: int = 0  # serialized bytes: blocks + OpenSession requests
    bytes_received: int = 0
    reconnects: int = 0  # sessions reopened after a link failure
    verifier: str = ""  # address of the verifier that finished the session
    round_records: list[RoundRecord] = field(default_factory=list)

    def observe_round(self, record: RoundRecord) -> None:
        self.rounds += 1
        self.drafted += record.drafted
        self.accepted += record.accepted
        self.draft_lengths.append(record.drafted)
        grow = record.drafted - len(self.drafted_per_position)
        if grow > 0:
            self.drafted_per_position.extend([0] * grow)
            self.accepted_per_position.extend([0] * grow)
        for i in range(record.drafted):
            self.drafted_per_position[i] += 1
        for i in range(record.accepted):
            self.accepted_per_position[i] += 1
        self.round_records.append(record)

    @property
    def rtt_ms_mean(self) -> float:
        """Mean network time per round (wall minus verifier compute and queueing)."""
        recs = self.round_records
        return sum(r.timing.network_ms for r in recs) / len(recs) if recs else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def to_dict(self) -> dict:
        """Plain JSON-able dict (round records flattened)."""
        d = asdict(self)
        d["rtt_ms_mean"] = self.rtt_ms_mean
        d["acceptance_rate"] = self.acceptance_rate
        return d


@dataclass(frozen=True)
class TokensEvent:
    """Newly committed tokens, in order, and their decoded text."""

    tokens: list[int]
    text: str


@dataclass(frozen=True)
class SummaryEvent:
    """Last event of a session."""

    finish_reason: str  # "stop" | "length"
    tokens: list[int]  # every generated token (prompt excluded)
    text: str
    stats: EdgeStats


GenerateEvent = TokensEvent | SummaryEvent


# ---------------------------------------------------------------- engine


@dataclass(frozen=True)
class EngineConfig:
    """Edge engine settings."""

    default_k: int = 4  # draft length when a request names none
    max_k: int = 32  # largest draft length a request may ask for
    default_policy: str = "fixed"  # policy when a request names none
    max_sessions: int = 64  # concurrent sessions; more answer RESOURCE_EXHAUSTED
    max_retries: int = 6  # reconnect attempts per round before giving up
    backoff_initial_s: float = 0.02  # sleep before the 2nd attempt; doubles each time
    backoff_max_s: float = 1.0
    # Draft on the worker thread (True) or on the event loop (False: saves two thread switches
    # per round but stalls every other session's I/O while one drafts). None = auto: on the loop
    # while this is the engine's only session, on the worker thread when sessions overlap.
    draft_in_thread: bool | None = None
    add_special_tokens: bool = False  # when tokenizing a text prompt

    def __post_init__(self) -> None:
        for name, lo in (("default_k", 0), ("max_k", 0), ("max_sessions", 1), ("max_retries", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.default_k > self.max_k:
            raise ValueError(f"default_k must be <= max_k={self.max_k}, got {self.default_k}")
        for name in ("backoff_initial_s", "backoff_max_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if self.default_policy not in POLICIES:
            raise ValueError(
                f"default_policy must be one of {sorted(POLICIES)}, got {self.default_policy!r}"
            )


class _TextStream:
    """Incremental detokenisation: the text each batch of new tokens adds.

    Decodes a short window of recent tokens and holds text back while it ends in an incomplete
    UTF-8 sequence (U+FFFD), so multi-byte characters split across tokens come out whole.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, new_ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.extend(new_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""


def _truncate_block(block: DraftBlock, k: int) -> DraftBlock:
    """The first k draft tokens of `block` (still a valid block: a prefix of a draft is one)."""
    q = block.draft_probs
    if q is not None:
        q = (
            DraftProbs.dense(q.probs[:k])
            if q.ids is None
            else DraftProbs.sparse(q.ids[:k], q.probs[:k])
        )
    return DraftBlock(
        seq=block.seq, base_len=block.base_len, tokens=block.tokens[:k], draft_probs=q
    )


class EdgeEngine:
    """Runs edge sessions: one shared draft model, one draft KV cache and one verifier session each.

    `verifiers`: a list of 'host:port' (each session starts with the first and moves on to the
    next one after a failure) or a callable returning the address to try next (shared by all
    sessions: an orchestrator decides). Channels are shared per address.
    Use from one event loop at a time; `aclose` when done.
    """

    def __init__(
        self,
        draft_model: PreTrainedModel,
        tokenizer,
        verifiers: AddressProvider,
        *,
        link_config: LinkConfig | None = None,
        config: EngineConfig | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.model = draft_model.eval() if device is None else draft_model.to(device).eval()
        self.tokenizer = tokenizer
        self.link_config = link_config if link_config is not None else LinkConfig()
        self.config = config if config is not None else EngineConfig()
        make_address_provider(verifiers)  # validate now, not at the first request
        self._verifiers = verifiers
        probe = ModelRunner(self.model)
        self.vocab_size = probe.vocab_size
        self.max_length = probe.max_length
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-draft")
        self._pool: ChannelPool | None = None
        self._pool_loop: asyncio.AbstractEventLoop | None = None
        self._background: set[asyncio.Task] = set()
        self.active_sessions = 0

    @classmethod
    def from_pretrained(
        cls,
        draft_path: str | Path,
        verifiers: AddressProvider,
        *,
        link_config: LinkConfig | None = None,
        config: EngineConfig | None = None,
        device: str | torch.device | None = None,
    ) -> EdgeEngine:
        """Load the draft model and its tokenizer from a local checkpoint folder."""
        from speculative.models import load_tokenizer

        runner = ModelRunner.from_pretrained(draft_path, device=device)
        try:
            tokenizer = load_tokenizer(draft_path)
        except (OSError, ValueError) as err:
            logger.warning("no tokenizer in %s (%s): token-id prompts only", draft_path, err)
            tokenizer = None
        return cls(runner.model, tokenizer, verifiers, link_config=link_config, config=config)

    # ---- request validation -----------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """Prompt text or token ids -> validated token ids. Raises `FieldError` ('prompt',
        'prompt_ids[i]')."""
        if isinstance(prompt, str):
            if not prompt:
                raise FieldError("prompt", "prompt must be a non-empty string, got ''")
            if self.tokenizer is None:
                raise FieldError("prompt", "prompt text needs a tokenizer; send prompt_ids")
            ids = list(
                self.tokenizer(prompt, add_special_tokens=self.config.add_special_tokens)[
                    "input_ids"
                ]
            )
            if not ids:
                raise FieldError("prompt", f"prompt must encode to >= 1 token, got {prompt!r}")
            return ids
        ids = list(prompt)
        if not ids:
            raise FieldError("prompt_ids", "prompt_ids must hold at least 1 token, got 0")
        vocab = self.vocab_size
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise FieldError(
                    f"prompt_ids[{i}]",
                    f"prompt_ids[{i}] must be a token id in [0, {vocab}), got {t!r}",
                )
        return ids

    def make_policy(
        self, policy: str | DraftLengthPolicy | None, k: int | None
    ) -> DraftLengthPolicy:
        """Resolve a policy name (None/'' = default) and draft length (None/0 = default).

        Raises `FieldError` naming 'policy' or 'draft_tokens'."""
        if k is None or k == 0:
            k = self.config.default_k
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.config.max_k:
            raise FieldError(
                "draft_tokens",
                f"draft_tokens must be an int in [0, {self.config.max_k}] (0 = default), got {k!r}",
            )
        if policy is None or policy == "":
            policy = self.config.default_policy
        if isinstance(policy, str):
            factory = POLICIES.get(policy)
            if factory is None:
                raise FieldError(
                    "policy", f"policy must be one of {sorted(POLICIES)}, got {policy!r}"
                )
            return factory(k)
        return policy

    def _check_length(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if self.max_length is None:
            return
        if len(prompt_ids) >= self.max_length:
            raise FieldError(
                "prompt",
                f"prompt must be shorter than the draft's {self.max_length} positions, "
                f"got {len(prompt_ids)} tokens",
            )
        room = self.max_length - len(prompt_ids)
        if params.max_new_tokens > room:
            raise FieldError(
                "params.max_new_tokens",
                f"params.max_new_tokens must be <= {room} for this {len(prompt_ids)}-token "
                f"prompt (draft max positions {self.max_length}), got {params.max_new_tokens}",
            )

    # ---- generation -------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        k: int | None = None,
        policy: str | DraftLengthPolicy | None = None,
    ) -> AsyncIterator[GenerateEvent]:
        """Generate for one prompt: yields `TokensEvent`s, then one `SummaryEvent`.

        Raises `FieldError` (a ValueError naming the field) for a bad request before anything is
        yielded, `EdgeError` when the verifiers cannot complete the session (after bounded
        retries with backoff) or the engine is at `max_sessions`.
        """
        t_start = time.perf_counter()
        if not isinstance(params, SamplingParams):
            raise FieldError("params", f"params must be SamplingParams, got {type(params)}")
        prompt_ids = self.encode_prompt(prompt)
        chooser = self.make_policy(policy, k)
        self._check_length(prompt_ids, params)
        if self.active_sessions >= self.config.max_sessions:
            raise EdgeError(
                "RESOURCE_EXHAUSTED",
                f"edge is serving max_sessions={self.config.max_sessions} sessions; retry later",
            )
        self.active_sessions += 1
        link = VerifierLink(self._session_addresses(), self.link_config, pool=self._get_pool())
        try:
            async for event in self._run(link, prompt_ids, params, chooser, t_start):
                yield event
        finally:
            self.active_sessions -= 1
            # Closing costs a round trip the caller need not wait for.
            self._spawn(link.aclose())

    async def _run(
        self,
        link: VerifierLink,
        prompt_ids: list[int],
        params: SamplingParams,
        chooser: DraftLengthPolicy,
        t_start: float,
    ) -> AsyncIterator[GenerateEvent]:
        stats = EdgeStats()
        # The verifier's prefill (behind a round trip) and the draft's prefill run concurrently.
        opening = asyncio.ensure_future(
            self._open(link, prompt_ids, params, generated=0, next_seq=0, stats=stats)
        )
        try:
            loop = asyncio.get_running_loop()
            drafter = await loop.run_in_executor(
                self._executor, Drafter, ModelRunner(self.model), prompt_ids, params
            )
            await opening
        finally:
            if not opening.done():
                opening.cancel()
            elif not opening.cancelled():
                opening.exception()  # mark it retrieved; the drafter's error (if any) wins
        text = _TextStream(self.tokenizer)
        t_first = t_last = None
        n_first = 0
        verdict: Verdict | None = None
        block: DraftBlock | None = None
        timing: RoundTiming | None = None
        apply_ms = 0.0
        draft_ms = round_ms = 0.0
        attempts = 0
        k = 0
        while True:
            if verdict is not None:
                assert block is not None and timing is not None
                t0 = time.perf_counter()
                new = drafter.apply(verdict)
                apply_ms = (time.perf_counter() - t0) * 1e3
                stats.observe_round(
                    RoundRecord(
                        seq=block.seq,
                        k=k,
                        drafted=len(block.tokens),
                        accepted=verdict.accepted,
                        draft_ms=draft_ms,
                        round_ms=round_ms,
                        apply_ms=apply_ms,
                        timing=timing,
                        attempts=attempts,
                    )
                )
                if new:
                    t_last = time.perf_counter()
                    if t_first is None:
                        t_first, n_first = t_last, len(new)
                    yield TokensEvent(tokens=new, text=text.push(new))
            if drafter.finished:
                break
            k = self._clip_k(chooser.choose_k(stats), link.session)
            t0 = time.perf_counter()
            block, draft_ms = await self._compute(_timed_propose, drafter, k)
            verdict, timing, attempts = await self._verify(link, drafter, block, params, stats)
            round_ms = (time.perf_counter() - t0) * 1e3
        assert t_first is not None and t_last is not None and drafter.finish_reason is not None
        n = len(drafter.generated)
        stats.time_to_first_token_ms = (t_first - t_start) * 1e3
        stats.time_per_output_token_ms = (
            (t_last - t_first) * 1e3 / (n - n_first) if n > n_first else 0.0
        )
        stats.bytes_sent = link.bytes_sent
        stats.bytes_received = link.bytes_received
        stats.verifier = link.address or ""
        tokens = list(drafter.generated)
        full_text = self.tokenizer.decode(tokens) if self.tokenizer is not None else ""
        yield SummaryEvent(
            finish_reason=drafter.finish_reason, tokens=tokens, text=full_text, stats=stats
        )

    async def _open(
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
                self._check_session(session, params)
                return
            except LinkError as err:
                await self._after_failure(err, attempts, stats, "opening the session")

    async def _verify(
        self,
        link: VerifierLink,
        drafter: Drafter,
        block: DraftBlock,
        params: SamplingParams,
        stats: EdgeStats,
    ) -> tuple[Verdict, RoundTiming, int]:
        """One round trip, reopening the session on retryable failures; returns the attempts."""
        attempts = 0
        while True:
            attempts += 1
            try:
                if not link.is_open:
                    # A reopen seeds the verifier with everything committed so far; the pending
                    # block then extends exactly that prefix and is verified there afresh.
                    session = await link.open(
                        drafter.committed,
                        params,
                        generated=len(drafter.generated),
                        next_seq=block.seq,
                    )
                    self._check_session(session, params)
                assert link.session is not None
                sent = block
                if len(block.tokens) > link.session.max_block_tokens:
                    sent = _truncate_block(block, link.session.max_block_tokens)
                verdict, timing = await link.verify(sent)
                return verdict, timing, attempts
            except LinkError as err:
                await self._after_failure(err, attempts, stats, f"round seq={block.seq}")

    async def _after_failure(
        self, err: LinkError, attempts: int, stats: EdgeStats, what: str
    ) -> None:
        """Raise `EdgeError` when `err` is final or retries are spent; else back off."""
        if not err.retryable:
            code = err.code.name if err.code is not None else "INTERNAL"
            raise EdgeError(_edge_code(code), str(err)) from err
        if attempts > self.config.max_retries:
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

    def _check_session(self, session: SessionInfo, params: SamplingParams) -> None:
        if not params.is_greedy and session.vocab_size != self.vocab_size:
            raise LinkError(
                f"verifier {session.address} has vocab_size {session.vocab_size}, the draft "
                f"{self.vocab_size}: sampling needs one vocabulary",
                address=session.address,
                code=None,
                retryable=False,
            )

    def _clip_k(self, k: int, session: SessionInfo | None) -> int:
        hi = self.config.max_k
        if session is not None:
            hi = min(hi, session.max_block_tokens)
        return max(0, min(int(k), hi))

    async def _compute(self, fn, *args):
        """Run draft-model work: on the worker thread, or inline (see EngineConfig)."""
        in_thread = self.config.draft_in_thread
        if in_thread is False or (in_thread is None and self.active_sessions <= 1):
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _session_addresses(self) -> AddressProvider:
        # A list gives each session its own cursor (primary first); a callable is shared.
        v = self._verifiers
        return v if callable(v) else list(v)

    def _get_pool(self) -> ChannelPool:
        loop = asyncio.get_running_loop()
        if self._pool is None or self._pool_loop is not loop:
            self._pool = ChannelPool(self.link_config)
            self._pool_loop = loop
        return self._pool

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def collect(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        k: int | None = None,
        policy: str | DraftLengthPolicy | None = None,
    ) -> SummaryEvent:
        """Run `generate` to the end and return its summary."""
        summary = None
        async for event in self.generate(prompt, params, k=k, policy=policy):
            if isinstance(event, SummaryEvent):
                summary = event
        assert summary is not None
        return summary

    async def aclose(self) -> None:
        """Finish background clean-up, close the channels and stop the worker thread."""
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        if self._pool is not None and self._pool_loop is asyncio.get_running_loop():
            await self._pool.close()
        self._pool = None
        self._executor.shutdown(wait=False)


def _timed_propose(drafter: Drafter, k: int) -> tuple[DraftBlock, float]:
    t0 = time.perf_counter()
    block = drafter.propose(k)
    return block, (time.perf_counter() - t0) * 1e3


def _edge_code(verifier_code: str) -> str:
    """Status the edge answers for a verifier's non-retryable refusal."""
    if verifier_code in ("INVALID_ARGUMENT", "OUT_OF_RANGE", "FAILED_PRECONDITION"):
        return verifier_code
    # UNAUTHENTICATED / PERMISSION_DENIED etc.: the edge's own setup is wrong, not the caller's.
    return "UNAVAILABLE"
