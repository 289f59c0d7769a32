"""The edge engine: drafts on the local draft model, verifies through a link, owns the output.

`EdgeEngine.generate` runs one session as an async generator of events: a `TokensEvent` each
time tokens are committed, then one `SummaryEvent`. The rounds themselves (policy decisions,
drafting, pipelining, cloud-only streams) are `edgespec.edge.session_loop.SessionLoop`'s; link
failures are recovered from by `edgespec.edge.recovery`; what sessions learn of each link is kept
across sessions by `edgespec.edge.link_memory`. Greedy output is token-for-token what the target
alone produces, whatever the link does.

Policies (`edgespec.core.policies`, built by name through `edgespec.core.registry`: "fixed",
"heuristic", "adaptive" (the default), "cloud_only", "tree", "adaptive_tree") decide per round
between a speculative round (k draft tokens, or a token tree) and cloud-only decoding;
`edgespec.core.registry.register_policy` adds one.

The verifier is reached through a `LinkFactory` (`edgespec.edge.verifier_link`): gRPC
(`edgespec.edge.grpc_link.GrpcLinks`, from addresses or a per-session assigner) or a verifier
engine in this process (`edgespec.edge.inprocess_link.InProcessLinks`).

Draft-model work runs on a single worker thread (one forward at a time; sessions interleave), so
the event loop keeps serving gRPC while a block is drafted. The exception, by default: while only
one session runs, its blocks are drafted on the event loop itself, which saves two thread
switches per round (`EngineConfig.draft_in_thread`). A session's draft prefill always runs on the
worker thread, concurrently with the verifier's prefill behind the session opening.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from edgespec.core.adaptive import AdaptivePolicy
from edgespec.core.drafter import Drafter
from edgespec.core.link_memory import PolicyMemory
from edgespec.core.params import SamplingParams
from edgespec.core.policies import DraftLengthPolicy
from edgespec.core.profiles import ComputeProfile, get_profile, make_runner
from edgespec.core.registry import PolicySpec, adaptive_policy, make_policy, policy_names
from edgespec.core.runner import ModelRunner
from edgespec.core.tree_policy import TreePolicy
from edgespec.edge.addresses import AddressProvider, VerifierAssigner
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.detokenize import TextStream
from edgespec.edge.grpc_link import GrpcLinks
from edgespec.edge.link_memory import LinkMemory, sampling_regime
from edgespec.edge.prompts import check_length, check_stop_ids, encode_prompt
from edgespec.edge.records import EdgeStats, GenerateEvent, SummaryEvent, TokensEvent
from edgespec.edge.recovery import EdgeError, Recovery
from edgespec.edge.session_loop import SessionLoop
from edgespec.edge.trace import write_generation_trace
from edgespec.edge.verifier_link import LinkFactory, SessionInfo, VerifierLink
from edgespec.protos.convert import FieldError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- engine


def _idle_forward_ms(session: SessionInfo | None) -> float | None:
    """The fixed cost of one forward of the session's verifier with nothing else to do: what it
    announces (measured at its start, or its emulated profile's), else, from a verifier that
    does not announce it, its emulated compute profile's; None when neither is known."""
    if session is None:
        return None
    if session.idle_forward_ms > 0:
        return session.idle_forward_ms
    try:
        profile = get_profile(session.compute_profile)
    except ValueError:  # a profile this edge does not know
        return None
    return profile.target.base_ms if profile.emulated else None


class EdgeEngine:
    """Runs edge sessions: one shared draft model, one draft KV cache and one verifier session each.

    `verifiers`: a list of 'host:port' (each session starts with the first and moves on to the
    next one after a failure), a callable returning the address to try next (shared by all
    sessions), or a `VerifierAssigner` (asked per session, and told when it ends: an
    orchestrator decides), all over gRPC with `link_config` and one channel per address; or any
    `LinkFactory`, e.g. `InProcessLinks(verifier_engine)`.
    Use from one event loop at a time; `aclose` when done.
    """

    def __init__(
        self,
        draft_model: PreTrainedModel,
        tokenizer: Any,
        verifiers: AddressProvider | VerifierAssigner | LinkFactory,
        *,
        link_config: LinkConfig | None = None,
        config: EngineConfig | None = None,
        device: str | torch.device | None = None,
        compute_profile: ComputeProfile | str | None = None,
        runner_factory: Callable[[PreTrainedModel], ModelRunner] | None = None,
    ) -> None:
        """`compute_profile` (name or profile; None = "real") pads each draft forward to its
        modelled time (an emulated edge device); outputs are unchanged. `runner_factory` (None:
        `make_runner` with the profile) builds each session's draft runner from the draft model:
        benchmarks use it to emulate edge devices (`edgespec.bench.emulated_edge`)."""
        self.model = draft_model.eval() if device is None else draft_model.to(device).eval()
        self.compute_profile = get_profile(compute_profile or "real")
        self._runner_factory = runner_factory
        self.tokenizer = tokenizer
        self.link_config = link_config if link_config is not None else LinkConfig()
        self.config = config if config is not None else EngineConfig()
        self.links: LinkFactory = (
            verifiers
            if isinstance(verifiers, LinkFactory)
            else GrpcLinks(verifiers, self.link_config)  # validates the addresses now
        )
        probe = ModelRunner(self.model)
        self.vocab_size = probe.vocab_size
        self.max_length = probe.max_length
        self.recovery = Recovery(self.config, self.vocab_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-draft")
        self._background: set[asyncio.Task] = set()
        self.active_sessions = 0
        self._link_memory = LinkMemory()  # what sessions learnt of each link

    @classmethod
    def from_pretrained(
        cls,
        draft_path: str | Path,
        verifiers: AddressProvider | VerifierAssigner | LinkFactory,
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
        return encode_prompt(
            prompt, self.tokenizer, self.vocab_size, self.config.add_special_tokens
        )

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
            spec = PolicySpec(
                k=k,
                max_k=self.config.max_k,
                pipelined=pipelined,
                memory=memory,
                ahead_branches=self._branches_sent,
            )
            return make_policy(policy, spec)
        if not isinstance(policy, DraftLengthPolicy):
            raise FieldError(
                "policy",
                f"policy must be a name in {policy_names()} or a DraftLengthPolicy, got "
                f"{type(policy).__name__}",
            )
        return policy

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        k: int | None = None,
        policy: str | DraftLengthPolicy | None = None,
        pipelined: bool | None = None,
    ) -> AsyncGenerator[GenerateEvent, None]:
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
        # Every sampled output can be reproduced: a seed is drawn when the request has none
        # and reported in the summary.
        params = params.with_seed()
        if pipelined is None:
            pipelined = self.config.pipelined
        if not isinstance(pipelined, bool):
            raise FieldError("pipelined", f"pipelined must be a bool, got {pipelined!r}")
        prompt_ids = self.encode_prompt(prompt)
        self.make_policy(policy, k, pipelined)  # validated now; built once the link is known

        def build(memory: PolicyMemory | None) -> DraftLengthPolicy:
            return self.make_policy(policy, k, pipelined, memory)

        check_length(prompt_ids, params, self.max_length)
        check_stop_ids(params, self.vocab_size)
        if self.active_sessions >= self.config.max_sessions:
            raise EdgeError(
                "RESOURCE_EXHAUSTED",
                f"edge is serving max_sessions={self.config.max_sessions} sessions; retry later",
                retry_after_ms=self.recovery.retry_after_ms,
            )
        self.active_sessions += 1
        session_key = uuid.uuid4().hex[:12]
        link = self.links.new_link(session_key)
        try:
            async for event in self._run(link, prompt_ids, params, build, pipelined, t_start):
                yield event
        finally:
            self.active_sessions -= 1
            # Closing costs a round trip the caller need not wait for.
            self._spawn(link.aclose())
            self.links.session_ended(session_key)

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
            self.recovery.open(link, prompt_ids, params, generated=0, next_seq=0, stats=stats)
        )
        try:
            loop = asyncio.get_running_loop()
            runner = (
                self._runner_factory(self.model)
                if self._runner_factory is not None
                else make_runner(self.model, self.compute_profile, "draft")
            )
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
        if isinstance(chooser, TreePolicy) and link.session is not None:
            chooser.limit_nodes(link.session.max_block_tokens)  # trees bigger are sent cut
        idle_ms = _idle_forward_ms(link.session)
        if learner is not None and idle_ms is not None:
            learner.observe_verifier_idle(idle_ms)
        text = TextStream(self.tokenizer)
        t_first = t_last = None
        n_first = 0
        session = SessionLoop(
            link,
            drafter,
            params,
            chooser,
            pipelined,
            stats,
            t_start,
            compute=self._compute,
            recovery=self.recovery,
            max_k=self.config.max_k,
            learner=learner,
            ahead_branches=self.config.ahead_branches,
            ahead_branches_sent=self.config.ahead_branches_sent,
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
            self._link_memory.remember((link.address or "", key[1]), learner.memory())
        tokens = list(drafter.generated)
        full_text = self.tokenizer.decode(tokens) if self.tokenizer is not None else ""
        if self.config.trace_dir is not None:
            write_generation_trace(
                self.config.trace_dir, stats, params, drafter.finish_reason, len(tokens)
            )
        yield SummaryEvent(
            finish_reason=drafter.finish_reason,
            tokens=tokens,
            text=full_text,
            stats=stats,
            seed=params.seed,
        )

    @property
    def _branches_sent(self) -> int:
        """The branches ahead that go out with the main guess: what the policies price as
        pipeline hits (a branch kept on the edge saves its round's drafting only)."""
        return min(self.config.ahead_branches, self.config.ahead_branches_sent)

    def _learner(
        self, chooser: DraftLengthPolicy, memory: PolicyMemory | None, pipelined: bool
    ) -> AdaptivePolicy | None:
        """What learns the link during a session: the adaptive policy itself, or, for the link
        memory, a shadow one (its decisions unused) beside any other policy."""
        if isinstance(chooser, AdaptivePolicy):
            return chooser
        if not self.config.link_memory:
            return None
        spec = PolicySpec(
            self.config.default_k,
            self.config.max_k,
            pipelined,
            memory,
            ahead_branches=self._branches_sent,
        )
        return adaptive_policy(spec)

    def link_estimates(self) -> list[dict]:
        """What the engine believes of each link it remembers, most recent last: one dict per
        (verifier, sampling regime) with `PolicyMemory.summary`'s numbers."""
        return self._link_memory.estimates()

    def link_memory(self) -> LinkMemory:
        """A copy of what the engine remembers of its links (`restore_link_memory` puts it
        back): e.g. to run sessions that must not teach the next ones anything."""
        return copy.deepcopy(self._link_memory)

    def restore_link_memory(self, memory: LinkMemory) -> None:
        """Remember exactly `memory` (a `link_memory` copy) of the links from now on."""
        self._link_memory = copy.deepcopy(memory)

    def forget_links(self) -> None:
        """Drop what earlier sessions learnt of every link: the next sessions start cold."""
        self._link_memory.clear()

    async def _compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run draft-model work: on the worker thread, or inline (see EngineConfig)."""
        in_thread = self.config.draft_in_thread
        if in_thread is False or (in_thread is None and self.active_sessions <= 1):
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
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
        """Finish background clean-up, close the links' connections and stop the worker thread."""
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        await self.links.aclose()
        self._executor.shutdown(wait=False)
