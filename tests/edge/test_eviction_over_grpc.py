"""Sessions evicted under the verifier's KV budget and resumed by their edges, over real gRPC.

A Verifier server on 127.0.0.1 admitting by what sessions hold (`kv_admission` "evict") with a
KV budget that holds fewer sessions than are offered at their full length; several edges (one
`EdgeEngine` each) run concurrent sessions (fixed k, adaptive pipelined, cloud-only streams).
Sessions are evicted as they grow, told so (ABORTED, evicted, retry hint), and reopened by their
edges with the committed prefix. Shown: every greedy output is the target alone's, every coupled
sampling output the target alone's with its seed, a sliding-window (Mistral) target included;
evictions and resumes happened; the service keeps serving; no session is left behind.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from prometheus_client import CollectorRegistry
from support.edge_runs import collect
from support.reliability_stack import wait_until
from support.servers import VerifierServerThread
from support.tiny_models import tiny_model, tiny_tokenizer

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.records import EdgeStats
from edgespec.edge.recovery import EdgeError, Recovery
from edgespec.edge.verifier_link import LinkError
from edgespec.serving.verifier_metrics import VerifierMetrics

EDGES = 3
SESSIONS_PER_EDGE = 2
NEW = 24
BLOCK = 8
# Edges wait the verifier's hint (50 ms) between reopens: bounded, with room for a crowded host.
EDGE_CONFIG = EngineConfig(
    max_retries=40, backoff_max_s=0.2, max_resume_waits=400, link_memory=False
)
POLICIES = (("fixed", 4, False), ("adaptive", None, True), ("cloud_only", None, False))


def _budget(prompts: list[list[int]]) -> int:
    """Room for the longest session at full length plus a little: every session is admitted
    at its prompt, but fewer than half of them fit once they have grown."""
    return max(len(p) for p in prompts) + NEW + BLOCK + 16


def _overload(target, draft, prompts, params_of) -> tuple[list, VerifierEngine, CollectorRegistry]:
    """Run one session per prompt, spread over EDGES edges, all at once; returns the
    summaries in prompt order, the verifier engine and its metrics registry."""
    config = VerifierConfig(
        max_block_tokens=BLOCK,
        kv_budget_tokens=_budget(prompts),
        kv_admission="evict",
        retry_after_ms=50,
    )
    registry = CollectorRegistry()
    server = VerifierServerThread(VerifierEngine(target, config), metrics=VerifierMetrics(registry))

    async def body() -> list:
        engines = [
            EdgeEngine(
                draft,
                None,
                [server.address],
                link_config=LinkConfig(round_timeout_s=60.0, open_timeout_s=60.0),
                config=EDGE_CONFIG,
            )
            for _ in range(EDGES)
        ]
        try:
            runs = []
            for i, prompt in enumerate(prompts):
                policy, k, pipelined = POLICIES[i % len(POLICIES)]
                engine = engines[i % EDGES]
                runs.append(
                    collect(engine, prompt, params_of(i), policy=policy, k=k, pipelined=pipelined)
                )
            return list(await asyncio.gather(*runs))
        finally:
            for engine in engines:
                await engine.aclose()

    try:
        summaries = asyncio.run(body())
        engine = server.engine
        # No session left behind: every edge closed its own (the evicted ones were dropped).
        assert wait_until(lambda: engine.stats().sessions == 0, 10.0), engine.stats()
        return summaries, engine, registry
    finally:
        server.stop()


def _prompts(n: int, vocab: int, seed: int, lo: int = 4, hi: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _check_evicted_and_resumed(summaries, engine: VerifierEngine, registry) -> None:
    stats = engine.stats()
    assert stats.evicted > 0 and stats.resumed > 0, stats
    assert sum(s.stats.evictions for s in summaries) > 0
    assert registry.get_sample_value("edgespec_verifier_evictions_total") == stats.evicted
    assert registry.get_sample_value("edgespec_verifier_resumes_total") == stats.resumed
    assert registry.get_sample_value("edgespec_verifier_active_sessions") == 0
    assert not registry.get_sample_value("edgespec_verifier_errors_total", {"code": "INTERNAL"})


def test_greedy_sessions_evicted_and_resumed_equal_the_target_alone(tiny_pair, draft, target):
    prompts = _prompts(EDGES * SESSIONS_PER_EDGE, 300, seed=3)
    params = SamplingParams(max_new_tokens=NEW)
    summaries, engine, registry = _overload(target.model, draft[0], prompts, lambda i: params)
    for prompt, summary in zip(prompts, summaries, strict=True):
        assert summary.tokens == generate_autoregressive(target, prompt, params).tokens
    _check_evicted_and_resumed(summaries, engine, registry)


def test_coupled_sampling_across_an_eviction_keeps_its_seed(tiny_pair, draft, target):
    prompts = _prompts(EDGES * SESSIONS_PER_EDGE, 300, seed=4)

    def params_of(i: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, max_new_tokens=NEW, seed=100 + i)

    summaries, engine, registry = _overload(target.model, draft[0], prompts, params_of)
    for i, (prompt, summary) in enumerate(zip(prompts, summaries, strict=True)):
        assert summary.tokens == generate_autoregressive(target, prompt, params_of(i)).tokens
    _check_evicted_and_resumed(summaries, engine, registry)


@pytest.mark.slow
def test_sliding_window_target_across_an_eviction() -> None:
    """Mistral with a sliding window of 8: prompts and generations longer than the window."""
    tokenizer = tiny_tokenizer()
    target = tiny_model("mistral-sliding", len(tokenizer), random_head=True)
    draft = tiny_model("mistral-sliding", len(tokenizer), seed=1, random_head=True)
    prompts = _prompts(4, len(tokenizer), seed=5, lo=12, hi=20)
    params = SamplingParams(max_new_tokens=NEW)
    with torch.no_grad():
        summaries, engine, registry = _overload(target, draft, prompts, lambda i: params)
    runner = ModelRunner(target)
    for prompt, summary in zip(prompts, summaries, strict=True):
        assert summary.tokens == generate_autoregressive(runner, prompt, params).tokens
    _check_evicted_and_resumed(summaries, engine, registry)


def test_waits_for_room_are_bounded_and_counted() -> None:
    """A resuming session waits the verifier's hint per refusal, at most max_resume_waits."""
    recovery = Recovery(EngineConfig(max_resume_waits=2), vocab_size=300)
    evicted = LinkError("evicted", address="v", code="ABORTED", retry_after_ms=1, evicted=True)
    full = LinkError("full", address="v", code="RESOURCE_EXHAUSTED", retry_after_ms=1)
    broken = LinkError("reset", address="v", code="UNAVAILABLE")
    assert Recovery.is_refusal(evicted) and Recovery.is_refusal(full)
    assert not Recovery.is_refusal(broken)
    stats = EdgeStats()

    async def body() -> None:
        await recovery.wait_for_room(evicted, 1, stats, "round")
        await recovery.wait_for_room(full, 2, stats, "round")
        with pytest.raises(EdgeError) as info:
            await recovery.wait_for_room(full, 3, stats, "round")
        assert info.value.code == "RESOURCE_EXHAUSTED" and info.value.retry_after_ms

    asyncio.run(body())
    assert stats.evictions == 1 and stats.reconnects == 2
