"""The edge engine: drafts on the local draft model, verifies over the link, owns the output.

`EdgeEngine.generate` runs one session as an async generator of events: a `TokensEvent` each
time tokens are committed, then one `SummaryEvent`. A round is

    choose (the draft-length policy) -> draft k tokens -> one VerifyStream round trip
    -> apply the verdict (commit tokens, roll the draft cache back) -> yield the new tokens
    -> tell the policy what the round cost (`observation_from_record`).

Policies (`edgespec.core.registry`, by name: "fixed", "heuristic", "adaptive" (the default),
"cloud_only") decide per round between a speculative round of k draft tokens and cloud-only
decoding, where the verifier decodes alone and streams its tokens (a decode block: one verdict per
token, committed and yielded as each arrives). Consecutive cloud-only chunks are requested back to
back, the next sent while the current one streams, so the stream only pays an RTT when it starts.

Pipelined drafting (`pipelined=True`): after sending block n, while its verdict travels, the
engine drafts block n+1 on the guess that block n is accepted whole and that the verifier's bonus
token is the draft's own next token, and sends it at once (pipeline depth 1). On a hit the next
verdict is already on its way; on a miss the verifier answers the block STALE (its base_len or
anchor token does not match) and the engine drafts afresh from the committed tokens. Exactness is
unchanged (the argument is in `edgespec.core.session`'s docstring).

Link memory (`EngineConfig.link_memory`, on by default): the engine keeps, per (verifier
address, sampling regime), what its sessions learnt of the link: per-position acceptance, draft
and verifier step times, RTT, queueing, the cloud-only token time, and the mode and k the last
session ended in (`edgespec.core.link_memory.PolicyMemory`). Every session feeds it (an adaptive
policy directly, any other policy through a shadow adaptive learner that only observes), and an
adaptive session starts from it: it decides from its first round instead of spending warm-up
rounds on priors, which is most of a short generation at long RTTs. The RTT measured by each
OpenSession on an already connected channel is one more sample. Sessions with different
sampling settings do not share acceptance (greedy and T=1 accept differently); the last session
to finish writes the memory (concurrent sessions on one link see the same link).

The edge owns the committed tokens (`edgespec.core.session.Drafter`); the verifier's KV cache is only
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
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel

from edgespec.core.adaptive import AdaptivePolicy
from edgespec.core.drafter import Drafter
from edgespec.core.link_memory import PolicyMemory
from edgespec.core.params import SamplingParams
from edgespec.core.policies import CLOUD_ONLY, SPECULATIVE, Decision, DraftLengthPolicy
from edgespec.core.profiles import ComputeProfile, get_profile, make_runner
from edgespec.core.registry import PolicySpec, adaptive_policy, make_policy, policy_names
from edgespec.core.rejection import DraftProbs
from edgespec.core.runner import ModelRunner
from edgespec.core.session import DraftBlock
from edgespec.edge.link import (
    AddressProvider,
    ChannelPool,
    LinkConfig,
    LinkError,
    Reply,
    RoundTiming,
    SessionInfo,
    VerifierLink,
    make_address_provider,
    round_timing,
)
from edgespec.edge.records import (
    EdgeStats,
    GenerateEvent,
    RoundRecord,
    SummaryEvent,
    TokensEvent,
    observation_from_record,
)
from edgespec.edge.trace import write_trace
from edgespec.protos.convert import FieldError

logger = logging.getLogger(__name__)


class EdgeError(Exception):
    """Generation could not complete. `code` is a gRPC status name for the service to answer
    ('UNAVAILABLE', 'RESOURCE_EXHAUSTED', 'INVALID_ARGUMENT', 'FAILED_PRECONDITION', ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- engine


@dataclass(frozen=True)
class EngineConfig:
    """Edge engine settings."""

    default_k: int = 4  # draft length when a request names none
    max_k: int = 32  # largest draft length a request may ask for
    default_policy: str = "adaptive"  # policy when a request names none
    # draft ahead while verdicts travel, when a request does not say: the edge would otherwise
    # idle for a round trip per round (latency bench: adaptive + pipelined beats adaptive alone at
    # every RTT); False saves the draft compute a missed guess wastes, for edges short of it
    pipelined: bool = True
    max_sessions: int = 64  # concurrent sessions; more answer RESOURCE_EXHAUSTED
    max_retries: int = 6  # reconnect attempts per round before giving up
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
        for name, lo in (("default_k", 1), ("max_k", 1), ("max_sessions", 1), ("max_retries", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.default_k > self.max_k:
            raise ValueError(f"default_k must be <= max_k={self.max_k}, got {self.default_k}")
        for name in ("backoff_initial_s", "backoff_max_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if self.default_policy not in policy_names():
            raise ValueError(
                f"default_policy must be one of {policy_names()}, got {self.default_policy!r}"
            )
        for name in ("pipelined", "link_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


# distinct (verifier, sampling regime) links an engine remembers; the least recently used goes
LINK_MEMORY_SIZE = 256


def sampling_regime(params: SamplingParams) -> str:
    """The part of the sampling params that acceptance depends on: sessions sharing it (and a
    verifier) share a link memory."""
    if params.is_greedy:
        return "greedy"
    return f"t={params.temperature!r},top_k={params.top_k},top_p={params.top_p!r}"


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
    return replace(block, tokens=block.tokens[:k], draft_probs=q)


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
        compute_profile: ComputeProfile | str | None = None,
    ) -> None:
        """`compute_profile` (name or profile; None = "real") pads each draft forward to its
        modelled time (an emulated edge device); outputs are unchanged."""
        self.model = draft_model.eval() if device is None else draft_model.to(device).eval()
        self.compute_profile = get_profile(compute_profile or "real")
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
        # (verifier address, sampling regime) -> what sessions on it learnt, least recent first
        self._link_memory: OrderedDict[tuple[str, str], PolicyMemory] = OrderedDict()

    @classmethod
    def from_pretrained(
        cls,
        draft_path: str | Path,
        verifiers: AddressProvider,
        *,
        link_config: LinkConfig | None = None,
        config: EngineConfig | None = None,
        device: str | torch.device | None = None,
        compute_profile: ComputeProfile | str | None = None,
    ) -> EdgeEngine:
        """Load the draft model and its tokenizer from a local checkpoint folder."""
        from edgespec.core.models import load_tokenizer

        runner = ModelRunner.from_pretrained(draft_path, device=device)
        try:
            tokenizer = load_tokenizer(draft_path)
        except (OSError, ValueError) as err:
            logger.warning("no tokenizer in %s (%s): token-id prompts only", draft_path, err)
            tokenizer = None
        return cls(
            runner.model,
            tokenizer,
            verifiers,
            link_config=link_config,
            config=config,
            compute_profile=compute_profile,
        )

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
        self,
        policy: str | DraftLengthPolicy | None,
        k: int | None,
        pipelined: bool = False,
        memory: PolicyMemory | None = None,
    ) -> DraftLengthPolicy:
        """Resolve a policy name (None/'' = default) and draft length (None/0 = default) into a
        fresh policy (`edgespec.core.policies.DraftLengthPolicy`), handing it `memory` (see
        `PolicySpec`); a policy object is used as is.

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
            if policy not in policy_names():
                raise FieldError(
                    "policy", f"policy must be one of {policy_names()}, got {policy!r}"
                )
            spec = PolicySpec(k=k, max_k=self.config.max_k, pipelined=pipelined, memory=memory)
            return make_policy(policy, spec)
        if not isinstance(policy, DraftLengthPolicy):
            raise FieldError(
                "policy",
                f"policy must be a name in {policy_names()} or a DraftLengthPolicy, got "
                f"{type(policy).__name__}",
            )
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
        pipelined: bool | None = None,
    ) -> AsyncIterator[GenerateEvent]:
        """Generate for one prompt: yields `TokensEvent`s, then one `SummaryEvent`.

        `policy`: a name in `policy_names()` (None/'' = EngineConfig.default_policy) or a policy
        object; `k`: the draft length for "fixed", the starting one otherwise (None/0 = default);
        `pipelined`: draft ahead while verdicts travel (None = EngineConfig.pipelined).
        Raises `FieldError` (a ValueError naming the field) for a bad request before anything is
        yielded, `EdgeError` when the verifiers cannot complete the session (after bounded
        retries with backoff) or the engine is at `max_sessions`.
        """
        t_start = time.perf_counter()
        if not isinstance(params, SamplingParams):
            raise FieldError("params", f"params must be SamplingParams, got {type(params)}")
        if pipelined is None:
            pipelined = self.config.pipelined
        if not isinstance(pipelined, bool):
            raise FieldError("pipelined", f"pipelined must be a bool, got {pipelined!r}")
        prompt_ids = self.encode_prompt(prompt)
        self.make_policy(policy, k, pipelined)  # validated now; built once the link is known

        def build(memory: PolicyMemory | None) -> DraftLengthPolicy:
            return self.make_policy(policy, k, pipelined, memory)

        self._check_length(prompt_ids, params)
        if self.active_sessions >= self.config.max_sessions:
            raise EdgeError(
                "RESOURCE_EXHAUSTED",
                f"edge is serving max_sessions={self.config.max_sessions} sessions; retry later",
            )
        self.active_sessions += 1
        link = VerifierLink(self._session_addresses(), self.link_config, pool=self._get_pool())
        try:
            async for event in self._run(link, prompt_ids, params, build, pipelined, t_start):
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
        build: Callable[[PolicyMemory | None], DraftLengthPolicy],
        pipelined: bool,
        t_start: float,
    ) -> AsyncIterator[GenerateEvent]:
        stats = EdgeStats(pipelined=pipelined, compute_profile=self.compute_profile.name)
        # The verifier's prefill (behind a round trip) and the draft's prefill run concurrently.
        opening = asyncio.ensure_future(
            self._open(link, prompt_ids, params, generated=0, next_seq=0, stats=stats)
        )
        try:
            loop = asyncio.get_running_loop()
            runner = make_runner(self.model, self.compute_profile, "draft")
            drafter = await loop.run_in_executor(
                self._executor, Drafter, runner, prompt_ids, params
            )
            await opening
        finally:
            if not opening.done():
                opening.cancel()
            elif not opening.cancelled():
                opening.exception()  # mark it retrieved; the drafter's error (if any) wins
        key = (link.address or "", sampling_regime(params))
        memory = self._link_memory.get(key) if self.config.link_memory else None
        chooser = build(memory)
        learner = self._learner(chooser, memory, pipelined)
        stats.warm_start = isinstance(chooser, AdaptivePolicy) and chooser.warm
        if (
            learner is not None
            and link.session is not None
            and link.session.open_rtt_ms is not None
        ):
            learner.observe_rtt(link.session.open_rtt_ms)
        text = _TextStream(self.tokenizer)
        t_first = t_last = None
        n_first = 0
        session = _SessionLoop(
            self, link, drafter, params, chooser, pipelined, stats, t_start, learner
        )
        async for new in session.run():
            if new:
                t_last = time.perf_counter()
                if t_first is None:
                    t_first, n_first = t_last, len(new)
                yield TokensEvent(tokens=new, text=text.push(new))
        assert t_first is not None and t_last is not None and drafter.finish_reason is not None
        n = len(drafter.generated)
        stats.time_to_first_token_ms = (t_first - t_start) * 1e3
        stats.time_per_output_token_ms = (
            (t_last - t_first) * 1e3 / (n - n_first) if n > n_first else 0.0
        )
        stats.bytes_sent = link.bytes_sent
        stats.bytes_received = link.bytes_received
        stats.verifier = link.address or ""
        if link.session is not None:
            stats.verifier_compute_profile = link.session.compute_profile
        stats.policy = repr(chooser)
        if learner is not None and self.config.link_memory:
            self._remember((link.address or "", key[1]), learner.memory())
        tokens = list(drafter.generated)
        full_text = self.tokenizer.decode(tokens) if self.tokenizer is not None else ""
        if self.config.trace_dir is not None:
            self._write_trace(stats, params, drafter.finish_reason, len(tokens))
        yield SummaryEvent(
            finish_reason=drafter.finish_reason, tokens=tokens, text=full_text, stats=stats
        )

    def _learner(
        self, chooser: DraftLengthPolicy, memory: PolicyMemory | None, pipelined: bool
    ) -> AdaptivePolicy | None:
        """What learns the link during a session: the adaptive policy itself, or, for the link
        memory, a shadow one (its decisions unused) beside any other policy."""
        if isinstance(chooser, AdaptivePolicy):
            return chooser
        if not self.config.link_memory:
            return None
        spec = PolicySpec(self.config.default_k, self.config.max_k, pipelined, memory)
        return adaptive_policy(spec)

    def _remember(self, key: tuple[str, str], memory: PolicyMemory) -> None:
        if memory.empty:
            return
        self._link_memory[key] = memory
        self._link_memory.move_to_end(key)
        while len(self._link_memory) > LINK_MEMORY_SIZE:
            self._link_memory.popitem(last=False)

    def link_estimates(self) -> list[dict]:
        """What the engine believes of each link it remembers, most recent last: one dict per
        (verifier, sampling regime) with `PolicyMemory.summary`'s numbers."""
        return [
            {"verifier": verifier, "regime": regime, **memory.summary()}
            for (verifier, regime), memory in self._link_memory.items()
        ]

    def forget_links(self) -> None:
        """Drop what earlier sessions learnt of every link: the next sessions start cold."""
        self._link_memory.clear()

    def _write_trace(
        self, stats: EdgeStats, params: SamplingParams, finish_reason: str, n_tokens: int
    ) -> None:
        """One msgpack trace file per generation (a few hundred bytes per round); a failure to
        write is logged, never raised: the generation itself succeeded."""
        folder = Path(self.config.trace_dir)
        path = folder / f"trace-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.msgpack"
        meta = {
            "params": params.to_dict(),
            "finish_reason": finish_reason,
            "tokens": n_tokens,
            "policy": stats.policy,
            "verifier": stats.verifier,
        }
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_trace(path, stats.round_records, meta)
        except (OSError, TypeError, ValueError) as err:
            logger.warning("could not write the round trace %s: %s", path, err)

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
        pipelined: bool | None = None,
    ) -> SummaryEvent:
        """Run `generate` to the end and return its summary."""
        summary = None
        async for event in self.generate(prompt, params, k=k, policy=policy, pipelined=pipelined):
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


def _timed(fn: Callable, drafter: Drafter, n: int) -> tuple[DraftBlock | None, float, int]:
    """Run a drafting call; returns its block, its wall ms and the draft forwards it ran."""
    forwards = drafter.runner.forwards
    t0 = time.perf_counter()
    block = fn(n)
    return block, (time.perf_counter() - t0) * 1e3, drafter.runner.forwards - forwards


@dataclass
class _Sent:
    """What the session knows of a proposed block until its round is recorded."""

    block: DraftBlock
    k: int  # draft length chosen (0 for a decode block)
    draft_ms: float = 0.0
    draft_forwards: int = 0
    probe: bool = False
    ahead: bool = False  # drafted (or requested) ahead, while the previous block was in flight
    t_sent: float | None = None  # perf_counter of the write on the current stream
    bytes_sent: int = 0


class _SessionLoop:
    """The rounds of one session: policy decisions, drafting (ahead, when pipelined), sending,
    matching replies to blocks, reconnecting; yields each batch of newly committed tokens.

    Replies arrive in the order blocks were sent. A reply for a block the session dropped (a
    pipelined guess that missed) must be STALE and is skipped; anything else unexpected is a
    protocol error, handled like a broken link (reopen with the committed prefix).
    """

    def __init__(
        self,
        engine: EdgeEngine,
        link: VerifierLink,
        drafter: Drafter,
        params: SamplingParams,
        policy: DraftLengthPolicy,
        pipelined: bool,
        stats: EdgeStats,
        t_start: float,
        learner: AdaptivePolicy | None = None,
    ) -> None:
        self.engine = engine
        self.learner = learner  # observes every round too, unless it is the policy itself
        self._ping: asyncio.Future | None = None  # the RTT ping in flight (cloud-only streams)
        self.link = link
        self.drafter = drafter
        self.params = params
        self.policy = policy
        self.pipelined = pipelined
        self.stats = stats
        self.t_start = t_start
        self.blocks: dict[int, _Sent] = {}  # seq -> proposed block not yet recorded
        self.sent: set[int] = set()  # seqs written on the current stream
        self.dropped: set[int] = set()  # seqs written on the current stream, then dropped
        self.next_decision: Decision | None = None  # chosen ahead of time but not yet used
        self.failures = 0  # link failures since the last good reply (bounds the retries)
        self._round_failures = 0  # link failures during the current round
        self.last_end = time.perf_counter()  # when the previous round ended

    # ---- the loop ---------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[list[int]]:
        try:
            async for new in self._rounds():
                yield new
        finally:
            if self._ping is not None:
                self._ping.cancel()

    async def _rounds(self) -> AsyncIterator[list[int]]:
        d = self.drafter
        while not d.finished:
            if d.pending is None:
                decision, self.next_decision = self.next_decision, None
                if decision is None:
                    decision = self.policy.choose()
                if decision.mode == CLOUD_ONLY:
                    block = d.propose_decode(min(decision.stream_tokens, d.tokens_left))
                    self.blocks[block.seq] = _Sent(block, 0, probe=decision.probe)
                else:
                    k = self._clip_k(decision.k)
                    block, ms, forwards = await self.engine._compute(_timed, d.propose, d, k)
                    self.blocks[block.seq] = _Sent(block, k, ms, forwards, decision.probe)
            pending = d.pending
            assert pending is not None
            if pending.decode_tokens:
                async for new in self._decode_round(pending):
                    yield new
            else:
                yield await self._speculative_round(pending)

    def _clip_k(self, k: int) -> int:
        return self.engine._clip_k(k, self.link.session)

    async def _failed(self, err: LinkError, what: str) -> None:
        self.failures += 1
        self._round_failures += 1
        await self.engine._after_failure(err, self.failures, self.stats, what)

    # ---- speculative rounds -----------------------------------------------------------------

    async def _speculative_round(self, pending: DraftBlock) -> list[int]:
        d = self.drafter
        self._round_failures = 0
        while True:
            try:
                await self._ensure_sent(pending)
                if self.pipelined:
                    await self._send_ahead()
                reply = await self._receive_for(pending.seq)
                if reply.more:
                    raise self.link.protocol_error(
                        f"verifier streamed several verdicts for block seq={pending.seq}"
                    )
                break
            except LinkError as err:
                await self._failed(err, f"round seq={pending.seq}")
        assert reply.verdict is not None
        t0 = time.perf_counter()
        new = d.apply(reply.verdict)
        apply_ms = (time.perf_counter() - t0) * 1e3
        sent = self.blocks.pop(pending.seq)
        self._after_apply()
        assert sent.t_sent is not None
        self._record(
            RoundRecord(
                seq=pending.seq,
                k=sent.k,
                drafted=len(pending.tokens),
                accepted=reply.verdict.accepted,
                draft_ms=sent.draft_ms,
                round_ms=(reply.received - self.last_end) * 1e3,
                apply_ms=apply_ms,
                timing=round_timing(reply, sent.t_sent, sent.bytes_sent),
                attempts=1 + self._round_failures,
                mode=SPECULATIVE,
                tokens=reply.verdict.accepted + 1,
                pipelined=sent.ahead,
                probe=sent.probe,
                draft_forwards=sent.draft_forwards,
            ),
            reply,
        )
        return new

    async def _send_ahead(self) -> None:
        """Pipelining: draft the block after the pending one and send it (depth 1)."""
        d = self.drafter
        if self.next_decision is not None or d.ahead is not None or d.ahead_room() < 0:
            return
        decision = self.policy.choose()
        if decision.mode != SPECULATIVE:
            self.next_decision = decision  # taken when the pending round is over
            return
        k = self._clip_k(decision.k)
        block, ms, forwards = await self.engine._compute(_timed, d.propose_ahead, d, k)
        if block is None:  # the guessed bonus token is a stop token: nothing to draft
            self.next_decision = decision
            return
        self.blocks[block.seq] = _Sent(block, k, ms, forwards, decision.probe, ahead=True)
        await self._send(block)

    # ---- cloud-only streams -----------------------------------------------------------------

    async def _decode_round(self, pending: DraftBlock) -> AsyncIterator[list[int]]:
        """Stream the tokens of decode block `pending`, yielding each as it is committed, and
        record the stream as one round (also when the link breaks midway: the tokens already
        committed stay, and the next round reopens the session)."""
        d = self.drafter
        sent = self.blocks[pending.seq]
        self._start_ping()
        count = 0
        verify_ms = queue_ms = apply_ms = 0.0
        bytes_received = 0
        last: Reply | None = None
        self._round_failures = 0
        while d.pending is pending and not d.finished:
            try:
                await self._ensure_sent(pending)
                await self._send_decode_ahead()
                reply = await self._receive_for(pending.seq)
            except LinkError as err:
                await self._stream_broken(err, pending)
                break
            assert reply.verdict is not None
            t0 = time.perf_counter()
            new = d.apply(reply.verdict)
            apply_ms += (time.perf_counter() - t0) * 1e3
            count += 1
            verify_ms += reply.verify_ms
            # A block requested ahead waited at the verifier behind the stream before it: that
            # wait is the previous stream's time, not this one's.
            if count > 1 or not sent.ahead:
                queue_ms += reply.queue_ms
            bytes_received += reply.bytes_received
            last = reply
            yield new
            # Both sides end a stream by the same rules (n tokens, a stop token, max_new_tokens).
            if reply.more != (d.pending is pending and not d.finished):
                err = self.link.protocol_error(
                    f"the verifier's stream for block seq={pending.seq} disagrees on its length "
                    f"(token {count} of {pending.decode_tokens}, more={reply.more})"
                )
                await self._stream_broken(err, pending)
                break
        self.blocks.pop(pending.seq, None)
        self._after_apply()
        if last is None or sent.t_sent is None:
            return
        start = max(self.last_end, sent.t_sent)
        wall_ms = (last.received - start) * 1e3
        timing = RoundTiming(
            wall_ms=wall_ms,
            verify_ms=verify_ms,
            queue_ms=queue_ms,
            network_ms=wall_ms - verify_ms - queue_ms,
            bytes_sent=sent.bytes_sent,
            bytes_received=bytes_received,
        )
        self._record(
            RoundRecord(
                seq=pending.seq,
                k=0,
                drafted=0,
                accepted=0,
                draft_ms=0.0,
                round_ms=wall_ms,
                apply_ms=apply_ms,
                timing=timing,
                attempts=1 + self._round_failures,
                mode=CLOUD_ONLY,
                tokens=count,
                pipelined=sent.ahead,
                probe=sent.probe,
            ),
            last,
        )
        if self.learner is not None and not d.finished:
            # what the draft would have proposed for the streamed tokens (greedy only): the
            # acceptance estimate stays current without speculative probes
            matches = await self.engine._compute(d.shadow_matches)
            if matches:
                self.learner.observe_shadow(matches)

    def _start_ping(self) -> None:
        """Cloud-only streams carry no RTT samples: ping the verifier once per chunk (one ping
        in flight at most) so the learner sees the link improve and can go back to speculating."""
        if self.learner is None or self._ping is not None:
            return
        self._ping = asyncio.ensure_future(self.link.ping())
        self._ping.add_done_callback(self._pinged)

    def _pinged(self, task: asyncio.Future) -> None:
        self._ping = None
        if task.cancelled() or task.exception() is not None or task.result() is None:
            return
        assert self.learner is not None
        self.learner.observe_rtt(task.result())

    async def _stream_broken(self, err: LinkError, pending: DraftBlock) -> None:
        """Give up the rest of a cloud-only stream (the next round reopens the session)."""
        if self.drafter.pending is pending:
            self.drafter.abandon_decode()  # drops a chunk requested ahead too
        self._forget_unsent()
        live = self.drafter.pending
        self.blocks = {live.seq: self.blocks[live.seq]} if live is not None else {}
        await self._failed(err, f"cloud-only stream seq={pending.seq}")

    async def _send_decode_ahead(self) -> None:
        """Request the next cloud-only chunk while this one streams, if the policy wants one."""
        d = self.drafter
        if self.next_decision is not None or d.decode_ahead_room() < 1:
            return
        decision = self.policy.choose()
        if decision.mode != CLOUD_ONLY:
            self.next_decision = decision
            return
        block = d.propose_decode_ahead(decision.stream_tokens)
        if block is None:
            self.next_decision = decision
            return
        self.blocks[block.seq] = _Sent(block, 0, probe=decision.probe, ahead=True)
        await self._send(block)

    # ---- the stream ---------------------------------------------------------------------------

    async def _ensure_sent(self, pending: DraftBlock) -> None:
        """Open the session if the link is closed (the committed prefix seeds the verifier; a
        block drafted ahead is dropped, as it may not fit the new session) and send `pending`
        unless it is on the current stream already."""
        if not self.link.is_open:
            self._forget_unsent()
            session = await self.link.open(
                self.drafter.committed,
                self.params,
                generated=len(self.drafter.generated),
                next_seq=pending.seq,
            )
            self.engine._check_session(session, self.params)
        if pending.seq not in self.sent:
            await self._send(pending)

    def _forget_unsent(self) -> None:
        """After a broken stream: nothing is on the (next) stream; drop the block ahead."""
        dropped = self.drafter.drop_ahead()
        if dropped is not None:
            self.blocks.pop(dropped.seq, None)
        self.sent.clear()
        self.dropped.clear()

    async def _send(self, block: DraftBlock) -> None:
        session = self.link.session
        assert session is not None
        wire = block
        if len(block.tokens) > session.max_block_tokens:
            wire = _truncate_block(block, session.max_block_tokens)
        t_sent, nbytes = await self.link.send(wire)
        sent = self.blocks[block.seq]
        sent.t_sent, sent.bytes_sent = t_sent, nbytes
        self.sent.add(block.seq)

    async def _receive_for(self, seq: int) -> Reply:
        """The next reply for block `seq`, skipping STALE replies of dropped blocks."""
        while True:
            reply = await self.link.receive()
            if reply.seq == seq and reply.verdict is not None:
                self.failures = 0
                return reply
            if reply.seq in self.dropped and reply.outcome == "STALE":
                self.dropped.discard(reply.seq)
                self.sent.discard(reply.seq)
                continue
            raise self.link.protocol_error(
                f"verifier answered {reply.outcome} seq={reply.seq} "
                f"(committed_len={reply.committed_len}) while block seq={seq} awaited its verdict"
            )

    # ---- bookkeeping --------------------------------------------------------------------------

    def _after_apply(self) -> None:
        """Account for the block drafted ahead after `Drafter.apply`: used or dropped."""
        d = self.drafter
        if d.last_ahead_hit is True:
            if d.pending is not None and not d.pending.decode_tokens:
                self.stats.pipeline_hits += 1
        elif d.last_ahead_hit is False and d.dropped_ahead is not None:
            seq = d.dropped_ahead.seq
            self.blocks.pop(seq, None)
            if seq in self.sent:
                self.dropped.add(seq)  # its STALE reply is still to come
            if not d.dropped_ahead.decode_tokens:
                self.stats.pipeline_misses += 1

    def _record(self, record: RoundRecord, reply: Reply) -> None:
        now = time.perf_counter()
        record = replace(
            record,
            t_wall=time.time() - (now - reply.received),
            t_ms=(reply.received - self.t_start) * 1e3,
        )
        self.last_end = now
        self.stats.observe_round(record)
        obs = observation_from_record(record)
        if obs is not None:
            self.policy.observe(obs)
            if self.learner is not None and self.learner is not self.policy:
                self.learner.observe(obs)


def _edge_code(verifier_code: str) -> str:
    """Status the edge answers for a verifier's non-retryable refusal."""
    if verifier_code in ("INVALID_ARGUMENT", "OUT_OF_RANGE", "FAILED_PRECONDITION"):
        return verifier_code
    # UNAUTHENTICATED / PERMISSION_DENIED etc.: the edge's own setup is wrong, not the caller's.
    return "UNAVAILABLE"
