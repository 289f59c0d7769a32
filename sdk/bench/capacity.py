"""Capacity of ONE verifier replica against N edges: `edgespec bench capacity`.

For every RTT, method and session count N, N greedy sessions start together, each from its own
emulated edge device: its own `EdgeEngine` (its own draft thread, so draft forwards of different
sessions never queue behind each other) behind its own link emulator (a TCP proxy with the
RTT, run by this process, whose interpreter is otherwise idle during a measurement; at RTT 0 it
connects directly). The edges live in `edge_processes` worker processes (spawned once for the
whole run), so the edge side is not one Python thread either (the padding sleeps of different
sessions overlap). Before each measurement the sessions run their generations once, unmeasured
(the memo pass, `CapacityConfig.memo_pass`), then start together.
Under an emulated profile the real draft compute is shared too (see below), so that N emulated
edge devices do not queue on the host's cores; under ``real`` every session's draft runs for
real on those cores. One verifier subprocess serves them all: the
batching verifier, or with ``--no-batching`` the one-session-at-a-time verifier (the reference
row). Under an emulated compute profile (default ``h100-70b``) every forward is padded to its
modelled time: the draft's per forward, the batching verifier's per step by the batch roofline
(`edgespec.core.profiles.BatchRoofline`); tokens are real.

Methods: ``cloud_only`` (the verifier decodes alone, batched with the others: the baseline a
user would otherwise run), ``fixed_k{k}`` (edgespec, one row per ``--k``), ``adaptive`` (the
adaptive policy, pipelined), ``tree_n16_d6_w2``, ``adaptive_tree`` and
``adaptive_tree_unpipelined`` (token trees of one shape, and the tree controller, pipelined or
not; opt-in by those names, the first as ``tree``), and ``fixed_k{k}_serial``
and ``cloud_only_serial`` (fixed k, and cloud-only decoding, against the one-at-a-time verifier;
with ``serial``), and ``cloud_sd_k{k}`` (cloud-side speculative decoding, opt-in ``cloud_sd``:
the draft beside the target on the verifier's GPU, under the profile's cloud-draft variant,
e.g. ``h100-70b-cloud-draft``: each step also pays the batched draft forwards of its sessions'
blocks, and the sessions' edges draft for free at RTT 0, as if on the verifier, with the
verifier waiting for their turnaround through this host's edge processes as if in lockstep
(``--batch-return-fraction 1``); a row's
``rtt_ms`` is then that of the other rows it is compared with). Prompts: the benchmark prompts
(`BENCH_PROMPTS`) in turn; every output is compared with the target alone's
(``altered_outputs``). Each speculative row also carries the analytic estimate of cloud-side
speculative decoding at its k and acceptance (``cloud_sd_analytic_tokens_per_s``,
`cloud_sd_bound`).

Edge devices under an emulated profile: see `edgespec.bench.emulated_edge` (each session drafts
on its own thread, padded to the modelled draft time; the real draft forward of a token prefix
runs once per worker process and is shared by its sessions; tokens unchanged; before a method
that grows token trees, each worker computes every greedy tree's rows ahead, once:
`CapacityConfig.tree_fill`). The JSON says so (``edge_emulation``). ``--no-draft-memo`` runs
every session's draft forwards for real.

Overload (``--kv-budget-tokens``): the verifier gets a KV budget, measured under each admission
mode of ``--kv-admission`` (one verifier each: "reserve" refuses what would not fit at its
longest, "evict" admits by what sessions hold and evicts the newest when a step would pass the
budget, `VerifierConfig.kv_admission`; "none" runs the same load without the budget, the
reference). A client refused RESOURCE_EXHAUSTED retries after the
hint (bounded). Each row then says the sessions offered and completed, the RESOURCE_EXHAUSTED
answers and retries, the verifier's evictions and resumes, errors and altered outputs.

Per row: replica tokens/s (all tokens / the wall time from the common start to the last end),
per-session tokens/s (median, p10, and their sum: the replica's rate were each session to keep
its own, not set by the last one to end), TTFT median, the verifier queue time per block (median
over blocks), mean sessions and tokens per target forward (from the verifier's Prometheus metrics),
and the row's analytic estimate (`capacity_bound`: the roofline, with every round committing
the row's measured mean tokens per round, 1 + acceptance_rate x mean_k, and every session's
rounds in one step; an estimate rather than a strict bound).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache, partial
from itertools import pairwise, product
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from edgespec.bench.emulated_edge import (
    GIL_SWITCH_S,
    LogitsMemo,
    MemoStats,
    fill_token_trees,
    runner_factory,
)
from edgespec.bench.processes import verifier_process
from edgespec.cloud.verifier_types import KV_ADMISSIONS, VerifierConfig
from edgespec.core.adaptive import AdaptiveConfig
from edgespec.core.demo_pair import BENCH_PROMPTS
from edgespec.core.models import load_tokenizer
from edgespec.core.params import SamplingParams
from edgespec.core.policies import FixedTreePolicy
from edgespec.core.profiles import PaddedRunner, cloud_draft_profile, get_profile
from edgespec.core.registry import make_policy
from edgespec.core.tree import TreeShape
from edgespec.core.tree_policy import TreePolicy
from edgespec.core.validation import check_int, check_prob
from edgespec.linkemu import LinkEmulator, LinkProfile

logger = logging.getLogger(__name__)

PROMPT_LEN = 24  # KV tokens per session assumed by the analytic estimate (prompts are ~10-30)
START_DELAY_S = 1.0  # workers get the common start time this far ahead
_MEMO_FIELDS = tuple(MemoStats.__dataclass_fields__)
_STEP_METRICS = (
    "edgespec_verifier_batch_size_",
    "edgespec_verifier_forward_tokens_",
    "edgespec_verifier_verify_seconds_",
    "edgespec_verifier_step_seconds_",
)
_MODELLED_STEPS = "edgespec_verifier_modelled_step_seconds_total"
_ADMISSION_METRICS = ("edgespec_verifier_evictions_total", "edgespec_verifier_resumes_total")
_ERRORS = "edgespec_verifier_errors_total"
# Warm-up generations per session at most, for its link memory to rest on enough rounds.
_WARMUP_GENERATIONS = 4
NO_BUDGET = "none"  # a `kv_admissions` entry: the verifier without the KV budget (reference)
LINK_MEMORY_MODES = ("warm", "cold")
ADAPTIVE_POLICIES = ("adaptive", "adaptive_tree")  # the policies that read a link memory


@dataclass(frozen=True)
class CapacityConfig:
    """One capacity run (validated on construction, ValueError naming the field)."""

    sessions: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    rtts_ms: tuple[float, ...] = (20.0, 50.0)
    ks: tuple[int, ...] = (4,)  # fixed draft lengths measured (best reported)
    methods: tuple[str, ...] = ("cloud_only", "fixed", "adaptive", "serial")
    max_new_tokens: int = 48
    compute_profile: str = "h100-70b"
    edge_processes: int = 4
    timeout_s: float = 300.0
    batch_max_sessions: int = 64
    # Emulated edge devices share each worker's draft forwards (`edgespec.bench.emulated_edge`):
    # only under an emulated profile; False runs every session's draft forwards for real.
    memo_drafts: bool = True
    # The batching verifier's target is emulated (`edgespec.bench.emulated_verifier`): rows of
    # the prompts' greedy paths computed ahead, each step charged the roofline's time; only
    # under an emulated profile. False runs every target forward for real (a step then takes
    # max(modelled, real) time).
    emulate_target: bool = True
    # torch intra-op threads of the verifier and of each edge worker: 1, since on a shared
    # host a parallel region waits for its slowest (descheduled) thread (a 5-token forward of
    # the demo target measured 750 ms with 2 threads on a loaded 2-core host, 19 ms with 1).
    threads: int = 1
    # Overload: the verifier's KV budget (None: none), measured under each admission mode of
    # `kv_admissions` (one verifier each; see `VerifierConfig.kv_admission`; "none": the same
    # verifier without the budget, the reference in the same run), and the retry
    # hint it sends. A session refused RESOURCE_EXHAUSTED is retried by its client after the
    # hint, at most `client_retries` times (counted in the row).
    kv_budget_tokens: int | None = None
    kv_admissions: tuple[str, ...] = ("reserve",)
    retry_after_ms: int = 250
    client_retries: int = 40
    # What the adaptive methods' edges know of their link when the measured sessions start:
    # "warm" (each edge first runs one unmeasured generation of another benchmark prompt, all of
    # them together, so its link memory holds what sessions on a loaded verifier learnt: a
    # deployed edge's steady state), or "cold" (its first session ever).
    link_memory: str = "warm"
    # The "tree" method's shapes, (nodes, depth, width) each, measured as tree_n{n}_d{d}_w{w}.
    tree_shapes: tuple[tuple[int, int, int], ...] = ((16, 6, 2),)
    # Where the sessions' emulated links run: False (default) in this (parent) process, whose
    # interpreter does nothing else during a measurement; True beside each session's edge in its
    # worker process (the earlier layout, kept for comparison), where a packet due for delivery
    # waits for the GIL while the worker's other sessions draft, so methods that draft more (trees,
    # drafting ahead) saw a longer link than the profile's RTT.
    links_in_workers: bool = False
    # Before each measurement every session runs its generation once, unmeasured, with what its
    # edge learnt restored afterwards: it teaches nothing, but fills each worker's draft memo with
    # the rows the measured sessions will ask for. Without it those rows are computed by real
    # forwards during the measurement, and on this host's two cores a method that drafts many
    # distinct rows (adaptive trees: 1,200-1,400 real forwards per 32 sessions) starved its own
    # emulated devices (draft overrun 1.2-1.7x the profile's time). Emulated draft memo only.
    memo_pass: bool = True
    # Before a method that grows token trees runs, each worker computes every row a greedy tree
    # of its widths can ask for at any committed prefix of the references
    # (`emulated_edge.fill_token_trees`, ~15 s of host time per worker, once per process). The
    # memo pass cannot cover them for the tree controller, whose shapes depend on timings: its
    # measured sessions still ran 174-187 real draft forwards (5-6 s of host time in a 17 s
    # measurement, session 16). Emulated draft memo only.
    tree_fill: bool = True
    # Held concurrency: each of the N session slots runs this many generations back to back,
    # generation g of slot i on benchmark prompt (i + g) mod the prompts' count, so that with a
    # multiple of the 4 prompts every slot generates every prompt text equally often. 1: N
    # sessions start together and each runs once (the burst). The replica's tokens/s is then
    # what it serves to N concurrent users, not set by which text the last session drew:
    # speculation's rate varies with the text (chains of a hard text end ~20% later), and
    # batched cloud-only decoding's does not.
    generations: int = 1
    # The verifier's `batch_group_horizon` (None: its default; see `cloud.step_scheduler`).
    batch_group_horizon: float | None = None
    batch_overlap: bool = True  # the verifier's `batch_overlap`
    # The edges' `EngineConfig.ahead_branches` (None: its default): guesses besides the main
    # one that pipelined chains draft ahead on.
    ahead_branches: int | None = None
    ahead_branches_sent: int | None = None  # likewise `EngineConfig.ahead_branches_sent`

    def __post_init__(self) -> None:
        check_int("generations", self.generations, 1)
        for name in ("ahead_branches", "ahead_branches_sent"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 0)
        if self.batch_group_horizon is not None:  # the verifier's own check
            VerifierConfig(batch_group_horizon=self.batch_group_horizon)
        for n in self.sessions:
            check_int("sessions", n, 1)
        for k in self.ks:
            check_int("k", k, 1)
        known = {
            "cloud_only",
            "fixed",
            "adaptive",
            "adaptive_unpipelined",
            "serial",
            "tree",
            "adaptive_tree",
            "adaptive_tree_unpipelined",
            "cloud_sd",
        }
        if not set(self.methods) <= known or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {sorted(known)}")
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("edge_processes", self.edge_processes, 1)
        check_int("threads", self.threads, 1)
        get_profile(self.compute_profile)
        if "cloud_sd" in self.methods and cloud_draft_profile(self.compute_profile) is None:
            raise ValueError(
                f"methods: cloud_sd needs a compute profile with a cloud-draft variant "
                f"(h100-70b), got {self.compute_profile!r}"
            )
        if self.kv_budget_tokens is not None:
            check_int("kv_budget_tokens", self.kv_budget_tokens, 1)
        admissions = (*KV_ADMISSIONS, NO_BUDGET)
        if not self.kv_admissions or not set(self.kv_admissions) <= set(admissions):
            raise ValueError(f"kv_admissions must be a non-empty subset of {admissions}")
        check_int("retry_after_ms", self.retry_after_ms, 1)
        check_int("client_retries", self.client_retries, 0)
        if not self.tree_shapes:
            raise ValueError("tree_shapes must hold at least one (nodes, depth, width)")
        for shape in self.tree_shapes:
            if len(shape) != 3:
                raise ValueError(f"tree_shapes: each must be (nodes, depth, width), got {shape!r}")
            TreeShape(*shape)  # validates each field, naming it
        if not isinstance(self.memo_pass, bool):
            raise ValueError(f"memo_pass must be a bool, got {self.memo_pass!r}")
        if not isinstance(self.tree_fill, bool):
            raise ValueError(f"tree_fill must be a bool, got {self.tree_fill!r}")
        if not isinstance(self.links_in_workers, bool):
            raise ValueError(f"links_in_workers must be a bool, got {self.links_in_workers!r}")
        if self.link_memory not in LINK_MEMORY_MODES:
            raise ValueError(
                f"link_memory must be one of {LINK_MEMORY_MODES}, got {self.link_memory!r}"
            )


@dataclass(frozen=True)
class _Job:
    """What one worker process runs: its share of one measurement's sessions."""

    draft: str
    verifier: str
    rtt_ms: float
    compute_profile: str
    policy: str
    k: int
    pipelined: bool
    prompts: list[tuple[int, list[int]]]  # (index, token ids) of each session's prompt
    max_new_tokens: int
    start_at: float  # time.time() at which every session starts
    timeout_s: float
    threads: int = 1  # torch intra-op threads in the worker
    memo: bool = True  # emulated edge devices share draft forwards (`emulated_edge`)
    client_retries: int = 0  # a session refused RESOURCE_EXHAUSTED is retried this often
    # Warm link memory: per session the prompt of its unmeasured warm-up generation, and two
    # barriers shared with the other workers and the parent (after the warm-ups, the parent
    # reads the verifier's counters between them); the measured sessions start on the second.
    warmups: list[list[int]] | None = None
    barriers: tuple[Any, Any] | None = None
    tree: tuple[int, int, int] | None = None  # the "tree" policy's (nodes, depth, width)
    # every prompt followed by its greedy reference output: what the sessions will commit, so
    # the emulated edges skip draft rows no walk can accept (`LogitsMemo.add_references`)
    references: list[list[int]] | None = None
    reference_starts: list[int] | None = None  # per reference: its prompt's length
    tree_fill: bool = False  # compute token trees' rows ahead (`CapacityConfig.tree_fill`)
    # per session of `prompts`, the address of its emulated link (run by the parent); None: each
    # session starts its own link in this worker (`CapacityConfig.links_in_workers`)
    links: list[str] | None = None
    memo_pass: bool = False  # the sessions run once unmeasured first (`CapacityConfig.memo_pass`)
    # per session of `prompts`, the (index, token ids) of its later generations, run back to
    # back after its first on the same edge (`CapacityConfig.generations`)
    later: list[list[tuple[int, list[int]]]] | None = None
    ahead_branches: int | None = None  # the edges' EngineConfig.ahead_branches (None: default)
    ahead_branches_sent: int | None = None  # likewise ahead_branches_sent

    def make_policy(self) -> Any:
        """What the edge engine is asked to run: the policy's name, or for a fixed tree
        shape the policy object (`FixedTreePolicy`)."""
        if self.tree is None:
            return self.policy
        nodes, depth, width = self.tree
        return FixedTreePolicy(nodes, depth, width)


@dataclass
class _SessionRecord:
    tokens: list[int]
    start: float
    first: float
    end: float
    drafted: int
    accepted: int
    rounds: int
    queue_ms: list[float] = field(default_factory=list)
    # per round: where its time went (edge draft, verifier compute, link), and its wall time
    draft_ms: list[float] = field(default_factory=list)
    verify_ms: list[float] = field(default_factory=list)
    network_ms: list[float] = field(default_factory=list)
    round_ms: list[float] = field(default_factory=list)
    ks: list[int] = field(default_factory=list)  # per round: k drafted, 0 for cloud-only
    # per speculative round: the tree's levels (0: a chain), and whether its block was drafted
    # ahead during the round before it and used (a pipeline hit)
    levels: list[int] = field(default_factory=list)
    nodes: list[int] = field(default_factory=list)  # per speculative round: tokens drafted
    spec_round_ms: list[float] = field(default_factory=list)  # per speculative round: wall ms
    hits: list[bool] = field(default_factory=list)
    # per speculative round: (queue, verify, network, draft) ms and the tokens it committed
    spec_parts: list[tuple[float, float, float, float, int]] = field(default_factory=list)
    error: str = ""
    prompt_index: int = 0
    refused: int = 0  # RESOURCE_EXHAUSTED answers its client got
    retries: int = 0  # attempts its client made after a RESOURCE_EXHAUSTED
    lost: int = 0  # attempts refused after streaming tokens (the client restarted from 0)
    evictions: int = 0  # times the verifier evicted it (its edge resumed it)
    warm_start: bool = False  # its adaptive policy started from the link's memory
    slot: int = 0  # the session slot (its first generation's prompt index) that ran it
    generation: int = 0  # which of its slot's back-to-back generations it was


@lru_cache(maxsize=2)
def _draft_model(path: str):  # one load per worker process
    from edgespec.core.runner import ModelRunner

    return ModelRunner.from_pretrained(path, device="cpu").model


@lru_cache(maxsize=2)
def _draft_memo(path: str) -> LogitsMemo:  # one per worker process and draft model
    return LogitsMemo()


_FILLED: set[tuple[Any, ...]] = set()  # (draft, references, widths, depth) filled in this process


def _tree_widths(job: _Job) -> tuple[tuple[int, ...], int] | None:
    """The (widths, deepest levels) of the token trees the job's policy can grow (None: it
    grows none)."""
    if job.tree is not None:
        return (job.tree[2],), job.tree[1]
    policy = make_policy(job.policy)  # as the sessions' edges build it, by its registry name
    if not isinstance(policy, TreePolicy):
        return None
    shapes = policy.tree_config.shapes  # the shapes it searches
    return tuple(sorted({s.width for s in shapes})), max(s.depth for s in shapes)


def _fill_trees(job: _Job) -> None:
    """`fill_token_trees` for the job's policy, once per process and draft (greedy sessions)."""
    grown = _tree_widths(job)
    if grown is None or job.references is None or job.reference_starts is None:
        return
    refs = dict(zip(map(tuple, job.references), job.reference_starts, strict=True))
    key = (job.draft, tuple(refs), *grown)
    if key in _FILLED:
        return
    t0 = time.perf_counter()
    widths, depth = grown
    forwards = fill_token_trees(
        _draft_memo(job.draft),
        _draft_model(job.draft),
        list(refs),
        list(refs.values()),
        widths,
        depth,
    )
    _FILLED.add(key)
    logger.info(
        "token trees of widths %s, %d levels: %d draft forwards ahead in %.1f s",
        widths,
        depth,
        forwards,
        time.perf_counter() - t0,
    )


def _run_job(job: _Job) -> dict[str, Any]:
    """Worker process entry: run the job's sessions concurrently, each its own edge; returns
    their records and what the process's draft memo did during the job."""
    import torch

    torch.set_num_threads(job.threads)
    sys.setswitchinterval(GIL_SWITCH_S)  # many emulated devices share this process
    memo = _draft_memo(job.draft)
    if job.references:
        memo.add_references(job.references)
    records, draft_ms, before = asyncio.run(_sessions(job))
    after = memo.stats()
    return {
        "records": [asdict(r) for r in records],
        "memo": {name: getattr(after, name) - getattr(before, name) for name in _MEMO_FIELDS},
        "draft_ms": draft_ms,
    }


async def _sessions(job: _Job) -> tuple[list[_SessionRecord], tuple[float, float], MemoStats]:
    """The job's sessions' records, the (modelled, wall) ms of their emulated draft forwards,
    summed (0, 0 when the draft is not emulated through the memo), and the process's draft memo
    counts when the measured sessions started."""
    from edgespec.edge.config import EngineConfig, LinkConfig
    from edgespec.edge.engine import EdgeEngine
    from edgespec.edge.records import SummaryEvent, TokensEvent
    from edgespec.edge.recovery import EdgeError

    model = _draft_model(job.draft)
    memo_factory = runner_factory(job.compute_profile, _draft_memo(job.draft)) if job.memo else None
    if job.tree_fill and memo_factory is not None:  # before anything of the job starts
        _fill_trees(job)
    runners: list[PaddedRunner] = []  # the draft runners of the measured sessions

    def factory(model: Any) -> PaddedRunner | Any:
        assert memo_factory is not None
        runner = memo_factory(model)
        if isinstance(runner, PaddedRunner):
            runners.append(runner)
        return runner

    edge_config = EngineConfig(max_k=16, link_memory=job.warmups is not None)
    if job.ahead_branches is not None:
        edge_config = replace(edge_config, ahead_branches=job.ahead_branches)
    if job.ahead_branches_sent is not None:
        edge_config = replace(edge_config, ahead_branches_sent=job.ahead_branches_sent)
    host, port = job.verifier.rsplit(":", 1)
    with ExitStack() as stack:
        engines = []
        for i in range(len(job.prompts)):  # one device per session: own link, thread, engine
            address = job.verifier  # RTT 0 (drafts beside the verifier): no proxy in between
            if job.links is not None:
                address = job.links[i]
            elif job.rtt_ms > 0:
                emu = LinkEmulator(host, int(port), LinkProfile(rtt_ms=job.rtt_ms)).start()
                stack.callback(emu.stop)
                address = emu.address
            engine = EdgeEngine(
                model,
                None,
                [address],
                link_config=LinkConfig(round_timeout_s=job.timeout_s),
                # Draft on the engine's own thread even with one session: inline, the
                # modelled draft time would be slept on the worker's event loop, and the sessions
                # of one worker would wait for each other's (emulated) devices.
                config=replace(edge_config, draft_in_thread=True),
                compute_profile=job.compute_profile,
                runner_factory=factory if memo_factory is not None else None,
            )
            engines.append(engine)
        params = SamplingParams(max_new_tokens=job.max_new_tokens)

        def schedule(slot: int) -> list[tuple[int, list[int]]]:
            """The (prompt index, token ids) of each generation of session `slot`."""
            return [job.prompts[slot]] + (job.later[slot] if job.later is not None else [])

        async def one(engine: EdgeEngine, slot: int) -> list[_SessionRecord]:
            """Session `slot`'s generations, back to back on its edge: one record each."""
            records = []
            for generation, (index, prompt) in enumerate(schedule(slot)):
                rec = await run(engine, prompt)
                rec.prompt_index, rec.generation = index, generation
                rec.slot = job.prompts[slot][0]
                records.append(rec)
            return records

        async def run(engine: EdgeEngine, prompt: list[int]) -> _SessionRecord:
            """One session as a client sees it: refused RESOURCE_EXHAUSTED, it retries after
            the hint (bounded); its times count from its first attempt."""
            start = time.time()
            refused = retries = lost = 0
            while True:
                rec = await attempt(engine, prompt, start)
                if isinstance(rec, tuple):
                    err, streamed = rec
                    refused += err.code == "RESOURCE_EXHAUSTED"
                    lost += streamed
                    if err.code == "RESOURCE_EXHAUSTED" and retries < job.client_retries:
                        retries += 1
                        await asyncio.sleep((err.retry_after_ms or 1000) / 1e3)
                        continue
                    rec = _SessionRecord([], start, 0.0, time.time(), 0, 0, 0, error=repr(err))
                rec.refused, rec.retries, rec.lost = refused, retries, lost
                return rec

        async def attempt(
            engine: EdgeEngine, prompt: list[int], start: float
        ) -> _SessionRecord | tuple[EdgeError, bool]:
            """One generation: its record, or the edge's error and whether tokens had come."""
            first = 0.0
            tokens: list[int] = []
            try:
                async for event in engine.generate(
                    prompt, params, k=job.k, policy=job.make_policy(), pipelined=job.pipelined
                ):
                    if isinstance(event, TokensEvent):
                        first = first or time.time()
                        tokens.extend(event.tokens)
                    elif isinstance(event, SummaryEvent):
                        st = event.stats
                        rec = _SessionRecord(
                            tokens, start, first, time.time(), st.drafted, st.accepted, st.rounds
                        )
                        rounds = st.round_records
                        rec.queue_ms = [r.timing.queue_ms for r in rounds]
                        rec.draft_ms = [r.draft_ms for r in rounds]
                        rec.verify_ms = [r.timing.verify_ms for r in rounds]
                        rec.network_ms = [r.timing.network_ms for r in rounds]
                        rec.round_ms = [r.round_ms for r in rounds]
                        rec.ks = [r.k if r.mode == "speculative" else 0 for r in rounds]
                        spec = [r for r in rounds if r.mode == "speculative"]
                        rec.levels = [r.tree.levels if r.tree is not None else 0 for r in spec]
                        rec.nodes = [r.drafted for r in spec]
                        rec.hits = [r.pipelined for r in spec]
                        rec.spec_round_ms = [r.round_ms for r in spec]
                        rec.spec_parts = [
                            (
                                r.timing.queue_ms,
                                r.timing.verify_ms,
                                r.timing.network_ms,
                                r.draft_ms,
                                r.tokens,
                            )
                            for r in spec
                        ]
                        rec.evictions = st.evictions
                        rec.warm_start = st.warm_start
                        return rec
            except EdgeError as err:
                return err, bool(tokens)
            except Exception as err:  # noqa: BLE001 - a failed session is a result of the run
                return _SessionRecord(tokens, start, first, time.time(), 0, 0, 0, error=repr(err))
            return _SessionRecord(tokens, start, first, time.time(), 0, 0, 0, error="no summary")

        async def warm_up(engine: EdgeEngine, prompt: list[int]) -> int:
            """One unmeasured generation: what it learns of the link stays in the engine.
            Returns its speculative rounds (0 if it failed)."""
            rounds = 0
            try:
                async for event in engine.generate(
                    prompt, params, k=job.k, policy=job.make_policy(), pipelined=job.pipelined
                ):
                    if isinstance(event, SummaryEvent):
                        rounds = sum(1 for k in event.stats.draft_lengths if k > 0)
            except Exception as err:  # noqa: BLE001 - the session then starts colder, not lost
                logger.warning("warm-up generation failed: %r", err)
            return rounds

        async def warm_link(engine: EdgeEngine, prompt: list[int]) -> None:
            """Warm-up generations until the link memory rests on the rounds an adaptive
            policy needs to start warm (`AdaptiveConfig.warmup_rounds`; short generations
            make few rounds each), at most `_WARMUP_GENERATIONS`."""
            rounds = 0
            for _ in range(_WARMUP_GENERATIONS):
                rounds += await warm_up(engine, prompt)
                if rounds >= AdaptiveConfig().warmup_rounds:
                    return

        async def memo_pass(prompts: list[list[list[int]]]) -> None:
            """Each session's `prompts` run once, unmeasured: their draft rows land in the
            memo, and whatever the edges learn from them is forgotten again."""
            kept = [engine.link_memory() for engine in engines]

            async def generations(slot: int) -> None:
                for prompt in prompts[slot]:
                    await warm_up(engines[slot], prompt)

            await asyncio.gather(*(generations(slot) for slot in range(len(engines))))
            for engine, memory in zip(engines, kept, strict=True):
                engine.restore_link_memory(memory)

        memo_pass_on = job.memo_pass and memo_factory is not None
        await asyncio.sleep(max(0.0, job.start_at - time.time()))
        if job.warmups is not None:
            if memo_pass_on:
                # The warm-up's rows too: computed during it, by real forwards on this host's
                # cores, they made its draft forwards 1.5-2x the modelled device's, and the
                # link memory carried that time per forward into the measured sessions (their
                # estimate started at 13 ms against 7 realized, and took the whole generation
                # to come down), pricing every draft level too dear.
                await memo_pass([[p] for p in job.warmups])
            await asyncio.gather(
                *(warm_link(e, p) for e, p in zip(engines, job.warmups, strict=True))
            )
        if memo_pass_on:
            await memo_pass([[p for _, p in schedule(slot)] for slot in range(len(engines))])
        if job.barriers is not None:
            for barrier in job.barriers:  # then the parent reads the counters; then all start
                await asyncio.to_thread(barrier.wait, job.timeout_s)
        runners.clear()
        memo_before = _draft_memo(job.draft).stats()
        try:
            slots = await asyncio.gather(*(one(e, slot) for slot, e in enumerate(engines)))
            draft = (sum(r.modelled_ms for r in runners), sum(r.wall_ms for r in runners))
            return [rec for records in slots for rec in records], draft, memo_before
        finally:
            for engine in engines:
                await engine.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    """The verifier's counters: batch_size, forward_tokens, verify_seconds and step_seconds
    sums and counts, the modelled step time, evictions, resumes, and RESOURCE_EXHAUSTED
    answers (``_ADMISSION_METRICS``)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            step = sample.name.startswith(_STEP_METRICS)
            if (step and sample.name.endswith(("_sum", "_count"))) or (
                sample.name in _ADMISSION_METRICS or sample.name == _MODELLED_STEPS
            ):
                out[sample.name] = sample.value
            elif sample.name == _ERRORS and sample.labels.get("code") == "RESOURCE_EXHAUSTED":
                out[_ERRORS] = sample.value
    return out


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> int:
    return round(after.get(name, 0.0) - before.get(name, 0.0))


def _per_forward(before: dict, after: dict, name: str) -> float | None:
    count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
    total = after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)
    return total / count if count else None


def capacity_bound(
    method: str, sessions: int, rtt_ms: float, k: float, acceptance: float, profile_name: str
) -> float:
    """Analytic replica tokens/s of `method` under the profile: each session runs rounds of
    k draft forwards + RTT + one verifier step, committing 1 + acceptance * k tokens (the
    accepted draft tokens plus the verifier's own; `acceptance` is accepted per DRAFTED token,
    a row's ``acceptance_rate``, so this is the measured mean per round whatever the
    per-position acceptance; treating it as an independent per-token alpha in `expected_tokens`
    would undercount: 0.55 per drafted token at k = 4 is 3.2 tokens per round, not 2.1); the
    verifier runs one step per round for all N sessions together (batched: the roofline over N
    rows of k+1 tokens) or one forward per block (serial). Cloud-only: N sessions' decode tokens
    in one step each, no RTT per token. KV reads are counted at the prompt length (a lower
    bound on them)."""
    profile = get_profile(profile_name)
    ctx = PROMPT_LEN
    if method == "cloud_only":
        step = profile.target_step_ms([(ctx, 1)] * sessions) or profile.target.ms(1)
        return sessions * 1e3 / step if step else float("inf")
    if method == "cloud_only_serial":  # one token per forward, whatever the sessions
        return 1e3 / profile.target.ms(1)
    e = _tokens_per_round(acceptance, k)
    draft_ms = k * profile.draft.ms(1)
    if method.endswith("_serial"):
        verify = profile.target.ms(round(k) + 1)
        per_session = draft_ms + rtt_ms + verify
        return min(sessions * e * 1e3 / per_session, e * 1e3 / verify) if verify else 0.0
    step = profile.target_step_ms([(ctx, round(k) + 1)] * sessions)
    return sessions * e * 1e3 / (draft_ms + rtt_ms + step)


def cloud_sd_bound(sessions: int, k: int, acceptance: float, profile_name: str) -> float | None:
    """Analytic replica tokens/s of cloud-side speculative decoding under the profile's
    cloud-draft variant (`cloud_draft_profile`): per round, k batched draft forwards over the N
    sessions (one token each) then one batched target forward over N rows of k+1 tokens, all
    on the verifier, no RTT per round; 1 + acceptance * k tokens per round (`acceptance` per
    drafted token, as in `capacity_bound`). None when the profile has no such variant."""
    variant = cloud_draft_profile(profile_name)
    if variant is None or k < 1:
        return None
    step = get_profile(variant).target_step_ms([(PROMPT_LEN, k + 1)] * sessions)
    return sessions * _tokens_per_round(acceptance, k) * 1e3 / step


def row_estimates(
    method: str,
    sessions: int,
    rtt_ms: float,
    k: int,
    mean_k: float,
    acceptance: float,
    profile_name: str,
) -> tuple[float | None, float | None]:
    """A row's analytic figures from its measured k and acceptance: (its own estimate,
    `capacity_bound` or for cloud_sd rows `cloud_sd_bound`; cloud-side speculative decoding's at
    the row's k). None where the model does not apply: a real profile (no modelled times),
    token trees (the chain model does not describe them; their drafted count is their nodes)."""
    chains = "tree" not in method
    if method.startswith("cloud_sd"):
        bound = cloud_sd_bound(sessions, k, acceptance, profile_name)
        return bound, bound
    bound = (
        capacity_bound(method, sessions, rtt_ms, mean_k, acceptance, profile_name)
        if get_profile(profile_name).emulated and chains
        else None
    )
    cloud_sd = (
        cloud_sd_bound(sessions, round(mean_k), acceptance, profile_name)
        if mean_k >= 1 and chains and not method.endswith("_serial")
        else None
    )
    return bound, cloud_sd


def _tokens_per_round(acceptance: float, k: float) -> float:
    """Mean tokens one round commits: k drafted, `acceptance` of them accepted (per drafted
    token), plus the verifier's own."""
    return 1.0 + check_prob("acceptance", acceptance) * k if k >= 1 else 1.0


def _row(
    method, sessions, rtt_ms, k, records, before, after, profile_name, expected
) -> dict[str, Any]:
    ok = [r for r in records if not r.error]
    altered = sum(1 for r in ok if r.tokens != expected[r.prompt_index])
    t0 = min(r.start for r in records)
    wall = max(r.end for r in records) - t0
    tokens = sum(len(r.tokens) for r in ok)
    rates = sorted(len(r.tokens) / (r.end - r.start) for r in ok if r.end > r.start)
    # per session slot: its tokens over the time from its first start to its last end
    slots: dict[int, list[_SessionRecord]] = {}
    for r in ok:
        slots.setdefault(r.slot, []).append(r)
    slot_rates = [
        sum(len(r.tokens) for r in rs) / span
        for rs in slots.values()
        if (span := max(r.end for r in rs) - min(r.start for r in rs)) > 0
    ]
    queue = [q for r in ok for q in r.queue_ms]
    drafted = sum(r.drafted for r in ok)
    rounds = sum(r.rounds for r in ok)
    acceptance = sum(r.accepted for r in ok) / drafted if drafted else 0.0
    mean_k = drafted / rounds if rounds else 0.0
    replica = tokens / wall if wall > 0 else 0.0
    batch = _per_forward(before, after, "edgespec_verifier_batch_size")
    per_forward = _per_forward(before, after, "edgespec_verifier_forward_tokens")
    verify_s = _per_forward(before, after, "edgespec_verifier_verify_seconds")
    step_s = _per_forward(before, after, "edgespec_verifier_step_seconds")
    steps = _delta(before, after, "edgespec_verifier_step_seconds_count")
    modelled_s = after.get(_MODELLED_STEPS, 0.0) - before.get(_MODELLED_STEPS, 0.0)
    modelled = modelled_s * 1e3 / steps if steps and modelled_s > 0 else None
    bound, cloud_sd_estimate = row_estimates(
        method, sessions, rtt_ms, k, mean_k, acceptance, profile_name
    )
    return {
        "method": method,
        "sessions": sessions,
        "rtt_ms": rtt_ms,
        "k": k,
        "replica_tokens_per_s": replica,
        "session_tokens_per_s_median": statistics.median(rates) if rates else 0.0,
        "session_tokens_per_s_p10": rates[int(0.1 * (len(rates) - 1))] if rates else 0.0,
        # the replica's rate if every session slot kept running at its own rate (a replica
        # whose sessions come and go): unlike replica_tokens_per_s, not set by the last to end
        "session_tokens_per_s_sum": sum(slot_rates),
        # back-to-back generations per session slot (`CapacityConfig.generations`); per-session
        # figures (rates, TTFT, errors) are per generation
        "generations": max((r.generation for r in records), default=0) + 1,
        "ttft_ms_median": statistics.median((r.first - r.start) * 1e3 for r in ok) if ok else 0.0,
        "queue_ms_median": statistics.median(queue) if queue else 0.0,
        "mean_batch_sessions": batch,
        "mean_tokens_per_forward": per_forward,
        # the verifier's time per block (or decoded token), its steps' mean wall time and
        # their mean modelled time (each step's own, as padded to): verify_overrun above 1 says
        # the host's work in a step (preparing, forward, acceptance) outlasted the modelled GPU
        # (padding only ever adds time). Until session 13 the modelled time was that of one
        # step of the row's mean shape, which the roofline's max makes too low for rows whose
        # steps vary in size (trees: overruns of 1.2-1.45 that were not the host's).
        "verify_ms_mean": verify_s * 1e3 if verify_s is not None else None,
        "step_ms_mean": step_s * 1e3 if step_s is not None else None,
        "modelled_step_ms": modelled,
        "verify_overrun": step_s * 1e3 / modelled if step_s is not None and modelled else None,
        "acceptance_rate": acceptance,
        "mean_k": mean_k,
        "analytic_bound_tokens_per_s": bound,
        # what cloud-side speculative decoding would give at this row's k and acceptance
        # (analytic, `cloud_sd_bound`; the cloud_sd_k{k} rows measure it)
        "cloud_sd_analytic_tokens_per_s": cloud_sd_estimate,
        "vs_bound": replica / bound if bound else None,
        "errors": len(records) - len(ok),
        "altered_outputs": altered,  # outputs different from the target alone (greedy)
        # admission under the KV budget: sessions offered, RESOURCE_EXHAUSTED answers their
        # clients got (each followed by a retry, but for a session that then gave up), the
        # verifier's refused OpenSessions (the edges' own retries included), its evictions and
        # resumes, the edges' evictions seen, attempts refused after streaming tokens
        "sessions_offered": len(records),
        "sessions_completed": len(ok),
        "resource_exhausted_answers": sum(r.refused for r in records),
        "client_retries": sum(r.retries for r in records),
        "verifier_refused_opens": _delta(before, after, _ERRORS),
        "evictions": _delta(before, after, _ADMISSION_METRICS[0]),
        "resumes": _delta(before, after, _ADMISSION_METRICS[1]),
        "edge_evictions": sum(r.evictions for r in ok),
        "lost_partial_outputs": sum(r.lost for r in records),
        "tokens": tokens,
        "wall_s": wall,
        # share of rounds decoded cloud-only (adaptive), and k over the speculative ones
        "cloud_only_round_share": _share([k == 0 for r in ok for k in r.ks]),
        "speculative_k_mean": _mean([k for r in ok for k in r.ks if k > 0]),
        # the shapes the sessions ran: the share of speculative rounds that were trees, a
        # tree's mean levels and nodes (drafted), and the share of rounds drafted ahead and used
        "tree_round_share": _share([n > 0 for r in ok for n in r.levels]),
        "tree_levels_mean": _mean([n for r in ok for n in r.levels if n > 0]),
        "tree_nodes_mean": _mean(
            [k for r in ok for k, n in zip(r.nodes, r.levels, strict=True) if n > 0]
        ),
        "pipeline_hit_share": _share([h for r in ok for h in r.hits]),
        # the share of speculative rounds (after a session's first) of another kind, tree or
        # chain, than the round before (each switch drafts a fresh block), and per kind its
        # rounds' mean wall ms, committed tokens and pipeline hit share
        "kind_switch_share": _share(
            [(a > 0) != (b > 0) for r in ok for a, b in pairwise(r.levels)]
        ),
        "tree_rounds": _kind_rounds(ok, tree=True),
        "chain_rounds": _kind_rounds(ok, tree=False),
        # mean wall time of speculative rounds whose block was drafted ahead and used, and of
        # the others (fresh blocks)
        "hit_round_ms_mean": _mean(
            [ms for r in ok for ms, h in zip(r.spec_round_ms, r.hits, strict=True) if h]
        ),
        "fresh_round_ms_mean": _mean(
            [ms for r in ok for ms, h in zip(r.spec_round_ms, r.hits, strict=True) if not h]
        ),
        # means over the speculative rounds drafted ahead and used (hit) and the others
        # (fresh): where their time went and the tokens they committed
        "hit_round_parts": _round_parts(ok, True),
        "fresh_round_parts": _round_parts(ok, False),
        # medians over every round of every session: where a round's time went
        **{
            f"round_{part}_median": _median([v for r in ok for v in getattr(r, part)])
            for part in ("draft_ms", "verify_ms", "network_ms", "round_ms")
        },
    }


def _kind_rounds(records: list[_SessionRecord], tree: bool) -> dict[str, float] | None:
    """Mean wall ms, committed tokens and pipeline hit share of the speculative rounds that
    were (`tree`) or were not token trees; None when there were none."""
    rounds = [
        (ms, parts[4], hit)
        for r in records
        for ms, parts, hit, levels in zip(
            r.spec_round_ms, r.spec_parts, r.hits, r.levels, strict=True
        )
        if (levels > 0) == tree
    ]
    if not rounds:
        return None
    return {
        "rounds": len(rounds),
        "round_ms": statistics.fmean(ms for ms, _, _ in rounds),
        "tokens": statistics.fmean(tokens for _, tokens, _ in rounds),
        "hit_share": statistics.fmean(float(hit) for _, _, hit in rounds),
    }


def _round_parts(records: list[_SessionRecord], hit: bool) -> dict[str, float] | None:
    """Mean queue, verify, network and draft ms and tokens of the speculative rounds that
    were (`hit`) or were not pipeline hits; None when there were none."""
    parts = [p for r in records for p, h in zip(r.spec_parts, r.hits, strict=True) if h == hit]
    if not parts:
        return None
    names = ("queue_ms", "verify_ms", "network_ms", "draft_ms", "tokens")
    return {name: statistics.fmean(p[i] for p in parts) for i, name in enumerate(names)}


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _mean(values: list[int] | list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


BATCHED, SERIAL, CLOUD_SD = "batched", "serial", "cloud_sd"  # the verifiers of a run


def _profile_of(kind: str, config: CapacityConfig) -> str:
    """The compute profile of the verifier `kind` and its sessions' edges: cloud-side
    speculative decoding runs the configured profile's cloud-draft variant."""
    if kind == CLOUD_SD:
        variant = cloud_draft_profile(config.compute_profile)
        assert variant is not None  # checked by CapacityConfig
        return variant
    return config.compute_profile


_Method = tuple[str, str, int, bool, str, tuple[int, int, int] | None]


def _methods(config: CapacityConfig) -> list[_Method]:
    """(name, policy, k, pipelined, verifier: "batched", "serial" or "cloud_sd", the fixed
    tree's (nodes, depth, width) or None) of every method measured."""
    out: list[_Method] = []
    if "cloud_only" in config.methods:
        out.append(("cloud_only", "cloud_only", 0, False, BATCHED, None))
        if "serial" in config.methods:  # the one-at-a-time verifier decoding alone
            out.append(("cloud_only_serial", "cloud_only", 0, False, SERIAL, None))
    for k in config.ks:
        if "fixed" in config.methods:
            out.append((f"fixed_k{k}", "fixed", k, False, BATCHED, None))
        if "serial" in config.methods:
            out.append((f"fixed_k{k}_serial", "fixed", k, False, SERIAL, None))
        if "cloud_sd" in config.methods:  # the draft beside the target, on the verifier
            out.append((f"cloud_sd_k{k}", "fixed", k, False, CLOUD_SD, None))
    if "adaptive" in config.methods:
        out.append(("adaptive", "adaptive", 0, True, BATCHED, None))
    if "adaptive_unpipelined" in config.methods:
        out.append(("adaptive_unpipelined", "adaptive", 0, False, BATCHED, None))
    if "tree" in config.methods:  # token trees of each configured shape
        for n, d, w in config.tree_shapes:
            out.append((f"tree_n{n}_d{d}_w{w}", "tree", 0, False, BATCHED, (n, d, w)))
    if "adaptive_tree" in config.methods:
        out.append(("adaptive_tree", "adaptive_tree", 0, True, BATCHED, None))
    if "adaptive_tree_unpipelined" in config.methods:
        out.append(("adaptive_tree_unpipelined", "adaptive_tree", 0, False, BATCHED, None))
    return out


def _measure(
    pool: ProcessPoolExecutor,
    template: _Job,
    prompts: list[list[int]],
    workers: int,
    scrape: Callable[[], dict[str, float]],
    manager: Any | None = None,
    warm: bool = False,
    links_in_workers: bool = False,
    *,
    rotation: list[list[int]],
    generations: int = 1,
) -> tuple[list[_SessionRecord], dict[str, int], dict[str, float]]:
    """Run one session per prompt, all starting together, spread over the workers; returns
    their records, the workers' draft memo counts (`MemoStats` fields, summed) and `scrape()`
    taken just before the measured sessions start. With `manager` (a multiprocessing manager)
    the workers start the measured sessions together after what comes first: with `warm`, an
    unmeasured warm-up generation of the next prompt in turn per session, with its link memory
    on (`CapacityConfig.link_memory` "warm"); with the template's `memo_pass`, the memo pass.
    The sessions' links run in this process unless `links_in_workers`. With `generations` > 1
    session i runs that many generations back to back, generation g on prompt
    ``rotation[(i + g) % len(rotation)]`` (`CapacityConfig.generations`); one record each."""
    start_at = time.time() + START_DELAY_S + 0.2 * len(prompts) / workers
    indexed = list(enumerate(prompts))
    shares = [indexed[w::workers] for w in range(workers) if indexed[w::workers]]
    barriers = None
    if manager is not None:
        barriers = (manager.Barrier(len(shares) + 1), manager.Barrier(len(shares) + 1))
    with ExitStack() as stack:
        links = None  # per prompt: its session's emulated link, run by this process
        if template.rtt_ms > 0 and not links_in_workers:
            host, port = template.verifier.rsplit(":", 1)
            link = LinkProfile(rtt_ms=template.rtt_ms)
            links = [
                stack.enter_context(LinkEmulator(host, int(port), link)).address for _ in prompts
            ]
        jobs = [
            replace(
                template,
                prompts=share,
                start_at=start_at,
                warmups=[prompts[(i + 1) % len(prompts)] for i, _ in share] if warm else None,
                barriers=barriers,
                links=None if links is None else [links[i] for i, _ in share],
                later=_later(share, rotation, generations),
            )
            for share in shares
        ]
        return _run_jobs(pool, jobs, barriers, scrape, template.timeout_s)


def _later(
    share: list[tuple[int, list[int]]], rotation: list[list[int]], generations: int
) -> list[list[tuple[int, list[int]]]] | None:
    """Per session (index i, prompt) of `share`, its generations after the first: generation g
    on ``rotation[(i + g) % len(rotation)]``, with that index (None: one generation each)."""
    if generations == 1:
        return None
    n = len(rotation)
    return [
        [(j, rotation[j]) for j in ((i + g) % n for g in range(1, generations))] for i, _ in share
    ]


def _run_jobs(
    pool: ProcessPoolExecutor,
    jobs: list[_Job],
    barriers: tuple[Any, Any] | None,
    scrape: Callable[[], dict[str, float]],
    timeout_s: float,
) -> tuple[list[_SessionRecord], dict[str, int], dict[str, float]]:
    """`_measure`'s jobs run, one per worker, `scrape()` taken between the `barriers`."""
    futures = [pool.submit(_run_job, job) for job in jobs]
    if barriers is None:
        before = scrape()
    else:
        barriers[0].wait(timeout_s)
        before = scrape()
        barriers[1].wait(timeout_s)
    parts = [f.result() for f in futures]
    memo = {name: sum(p["memo"][name] for p in parts) for name in _MEMO_FIELDS}
    modelled, wall = (sum(p["draft_ms"][i] for p in parts) for i in (0, 1))
    memo["draft_overrun"] = wall / modelled if modelled else None
    return [_SessionRecord(**r) for p in parts for r in p["records"]], memo, before


def _reference(target: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The target alone's greedy output of every prompt (what every session must produce)."""
    from edgespec.core.generate import generate_autoregressive
    from edgespec.core.runner import ModelRunner

    runner = ModelRunner.from_pretrained(target, device="cpu")
    params = SamplingParams(max_new_tokens=max_new_tokens)
    outputs: dict[tuple[int, ...], list[int]] = {}  # prompts repeat: each distinct one once
    for p in prompts:
        if tuple(p) not in outputs:
            outputs[tuple(p)] = generate_autoregressive(runner, p, params).tokens
    return [outputs[tuple(p)] for p in prompts]


def run_capacity_bench(config: CapacityConfig, target: Path, draft: Path) -> dict[str, Any]:
    """Measure every (RTT, method, N) of `config`; returns the JSON-ready result (``rows``)."""

    # held concurrency rotates through every benchmark prompt; a burst needs one per session
    rotated = len(BENCH_PROMPTS) if config.generations > 1 else 1
    prompts = _prompts(target, max(*config.sessions, rotated))
    expected = _reference(target, prompts, config.max_new_tokens)
    # greedy sessions commit exactly these (checked: `altered_outputs`)
    references = [p + e for p, e in zip(prompts, expected, strict=True)]
    rows: list[dict[str, Any]] = []
    started = time.time()
    ctx = get_context("spawn")
    emulated_target = config.emulate_target and get_profile(config.compute_profile).emulated
    workdir = tempfile.TemporaryDirectory(prefix="edgespec-capacity-")
    oracle_file = Path(workdir.name) / "oracle.json"
    spec = {"prompts": prompts, "max_new_tokens": config.max_new_tokens}
    oracle_file.write_text(json.dumps(spec))
    with ProcessPoolExecutor(config.edge_processes, mp_context=ctx) as pool, ExitStack() as stack:
        stack.enter_context(workdir)
        manager = stack.enter_context(ctx.Manager())  # the warm-up barriers' owner
        verifiers = {}
        for kind in sorted({m[4] for m in _methods(config)}):
            for admission in config.kv_admissions:
                port = _free_port()
                args = ["--compute-profile", _profile_of(kind, config), "--metrics-port", str(port)]
                args += ["--max-sessions", str(max(config.sessions)), "--max-block-tokens", "16"]
                args += ["--batch-max-sessions", str(config.batch_max_sessions)]
                if config.batch_group_horizon is not None:
                    args += ["--batch-group-horizon", str(config.batch_group_horizon)]
                if not config.batch_overlap:
                    args += ["--no-batch-overlap"]
                if kind == CLOUD_SD:
                    # Cloud-side drafting runs every session's draft and verify in one
                    # iteration; here each session's turnaround goes through its own edge
                    # process (~10-25 ms on this host), which a step must wait for to batch them.
                    args += ["--batch-return-fraction", "1.0"]
                args += ["--no-batching"] if kind == SERIAL else []
                if config.kv_budget_tokens is not None and admission != NO_BUDGET:
                    args += ["--kv-budget-tokens", str(config.kv_budget_tokens)]
                    args += ["--kv-admission", admission]
                    args += ["--retry-after-ms", str(config.retry_after_ms)]
                oracle = oracle_file if kind != SERIAL and emulated_target else None
                process = verifier_process(target, config.threads, 180.0, args, oracle_file=oracle)
                verifiers[kind, admission] = (stack.enter_context(process), port)
        # Warm-up (not recorded): every worker loads the draft, the verifiers run a first step.
        for (kind, _), (address, _) in verifiers.items():
            warm = _Job(
                str(draft),
                address,
                0.0,
                _profile_of(kind, config),
                "fixed",
                2,
                False,
                [(0, prompts[0])],
                4,
                time.time(),
                config.timeout_s,
                config.threads,
            )
            list(pool.map(_run_job, [warm] * config.edge_processes))
        for rtt, (name, policy, k, pipelined, kind, tree), admission, n in product(
            config.rtts_ms, _methods(config), config.kv_admissions, config.sessions
        ):
            address, port = verifiers[kind, admission]
            profile_name = _profile_of(kind, config)
            template = _Job(
                str(draft),
                address,
                0.0 if kind == CLOUD_SD else rtt,  # the draft sits beside the verifier
                profile_name,
                policy,
                k,
                pipelined,
                [],
                config.max_new_tokens,
                0.0,
                config.timeout_s,
                config.threads,
                config.memo_drafts,
                config.client_retries,
                tree=tree,
                references=references,
                reference_starts=[len(p) for p in prompts],
                tree_fill=config.tree_fill and config.memo_drafts,
                memo_pass=config.memo_pass and config.memo_drafts,
                ahead_branches=config.ahead_branches,
                ahead_branches_sent=config.ahead_branches_sent,
            )
            warmed = config.link_memory == "warm" and policy in ADAPTIVE_POLICIES
            records, memo, before = _measure(
                pool,
                template,
                prompts[:n],
                config.edge_processes,
                partial(_scrape, port),
                manager if warmed or template.memo_pass else None,
                warmed,
                config.links_in_workers,
                rotation=prompts,
                generations=config.generations,
            )
            after = _scrape(port)
            row = _row(name, n, rtt, k, records, before, after, profile_name, expected)
            row["link_memory"] = config.link_memory if policy in ADAPTIVE_POLICIES else None
            row["warm_sessions"] = sum(r.warm_start for r in records)
            budgeted = config.kv_budget_tokens is not None
            row["kv_budget_tokens"] = config.kv_budget_tokens if admission != NO_BUDGET else None
            row["kv_admission"] = admission if budgeted else None
            # draft forwards the sessions asked for / ran for real (None: no memo)
            shared = memo["forwards"] > 0
            row["draft_forwards"] = memo["forwards"] if shared else None
            row["draft_real_forwards"] = memo["real_forwards"] if shared else None
            # draft rows no walk could accept, served by a live prefix's row (no forward)
            row["draft_stand_in_rows"] = memo["stand_ins"] if shared else None
            # the host time those real forwards took (ms, all sessions) and the committed tokens
            # they refed to bring a lagging real cache to the prefix
            row["draft_real_forward_ms"] = round(memo["real_ms"], 1) if shared else None
            row["draft_catchup_tokens"] = memo["catchup_tokens"] if shared else None
            # the emulated edge devices' draft forwards: wall time over modelled time (above 1,
            # this host's draft compute or sleeps made them slower than the modelled device)
            row["edge_draft_overrun"] = memo["draft_overrun"]
            rows.append(row)
            logger.info("%s N=%d rtt=%g: %.1f tokens/s", name, n, rtt, row["replica_tokens_per_s"])
    profile = get_profile(config.compute_profile)
    return {
        "config": asdict(config),
        "profiles": {"compute": profile.to_dict(), "compute_emulated": profile.emulated},
        "target": str(target),
        "draft": str(draft),
        "edge_emulation": _edge_emulation(config),
        "verifier_emulation": _verifier_emulation(config),
        "rows": rows,
        "wall_s": time.time() - started,
    }


def _edge_emulation(config: CapacityConfig) -> str:
    """How the run's edge devices are emulated (written to the JSON with the figures)."""
    profile = get_profile(config.compute_profile)
    if not profile.emulated:
        return (
            "none: every session's draft forwards run for real on this host "
            f"({config.edge_processes} worker processes sharing its cores)"
        )
    shared = (
        "the real draft forward of each distinct token prefix is computed once per worker "
        "process and its logits shared by every session with that prefix "
        "(edgespec.bench.emulated_edge.MemoRunner; tokens unchanged)"
        + (
            "; before a method that grows token trees, each worker computes once the rows of "
            "every greedy tree of its widths at every prefix of every reference "
            "(fill_token_trees), outside the measurement"
            if config.tree_fill
            else ""
        )
        if config.memo_drafts
        else "every session runs its own real draft forwards"
    )
    return (
        f"EMULATED edge devices: each session drafts on its own thread and each draft forward "
        f"takes at least the {profile.name} profile's modelled draft time (slept, overlapping "
        f"across sessions); {shared}"
    )


def _verifier_emulation(config: CapacityConfig) -> str:
    """How the run's batching verifier emulates its GPU (written to the JSON with the figures)."""
    profile = get_profile(config.compute_profile)
    if not profile.emulated:
        return "none: every target forward runs for real on this host"
    if not config.emulate_target:
        return (
            f"each batched step is padded to the {profile.name} profile's modelled forward; "
            "the real target forwards run on this host (slower steps overrun the model)"
        )
    return (
        f"EMULATED cloud GPU: each batched step takes the {profile.name} profile's modelled "
        "forward over all its sessions; the target's rows along each prompt's greedy "
        "continuation are computed ahead by the real target, as the target alone generates, "
        "and served to the verifier (edgespec.bench.emulated_verifier: greedy acceptance reads "
        "no other row; every output compared with the target alone); the one-at-a-time "
        "verifier runs its real forwards, padded per forward"
    )


def _prompts(target: Path, n: int) -> list[list[int]]:
    """`n` prompts: the benchmark prompts (`BENCH_PROMPTS`, text the demo pair was trained on,
    so acceptance is what a user would see) in the target's tokenizer, in turn."""
    tokenizer = load_tokenizer(target)
    ids = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in BENCH_PROMPTS]
    return [ids[i % len(ids)] for i in range(n)]


def print_summary(result: dict[str, Any]) -> None:
    """One line per row on stdout."""
    for r in result["rows"]:
        batch, bound = r["mean_batch_sessions"], r["analytic_bound_tokens_per_s"]
        print(
            f"{r['method']:>20} N={r['sessions']:<3} rtt={r['rtt_ms']:>4g} ms "
            f"replica {r['replica_tokens_per_s']:7.1f} tok/s  session p50 "
            f"{r['session_tokens_per_s_median']:6.1f}  ttft {r['ttft_ms_median']:6.1f} ms  "
            f"batch {batch if batch is None else round(batch, 1)}  bound "
            f"{'-' if bound is None else round(bound, 1)}  errors {r['errors']}  altered "
            f"{r['altered_outputs']}"
        )
        if r.get("kv_admission"):
            print(
                f"{'':>20} kv {r['kv_admission']} budget {r['kv_budget_tokens'] or '-'}: offered "
                f"{r['sessions_offered']} completed {r['sessions_completed']}  "
                f"RESOURCE_EXHAUSTED {r['resource_exhausted_answers']} (client retries "
                f"{r['client_retries']}, verifier refused opens {r['verifier_refused_opens']})  "
                f"evictions {r['evictions']} resumes {r['resumes']}  lost partial "
                f"{r['lost_partial_outputs']}"
            )
