"""Token trees over the real gRPC path: the edge engine grows trees, a batching Verifier server on
127.0.0.1 verifies them with tree attention, and the output is the target alone's.

Architectures: Llama, Mistral with a sliding window shorter than the generation, Gemma-3 (sliding
and full layers mixed) and GPT-2 (a
learned position table), random weights, the draft a noisy copy of the target. Policies "tree"
(fixed shape), "adaptive_tree" (the tree controller) and a scripted mix of trees, chains and
cloud-only chunks; greedy and coupled sampling (the same seed as the reference). Also: tree and
chain sessions batched together in the verifier's steps; pipelined trees (a tree or a chain
drafted ahead on a tree's guessed path, a tree ahead of a chain); rejection-sampling trees carry q per
node (coupled ones ids only); a verifier whose target cannot verify trees gets chains.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from support.edge_runs import ScriptedPolicy, collect
from support.servers import VerifierServerThread
from support.tiny_models import noisy_draft, tiny_model, tiny_tokenizer

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.policies import CLOUD_ONLY, SPECULATIVE, Decision
from edgespec.core.runner import ModelRunner
from edgespec.core.tree import TreeShape
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.records import SummaryEvent

PROMPTS = ([7, 200, 13, 42, 99, 150, 3, 60, 21], [5, 6, 7], [250, 17, 5, 88, 1])
NEW = 20
GREEDY = SamplingParams(max_new_tokens=NEW)
COUPLED = SamplingParams(temperature=1.0, max_new_tokens=NEW, seed=7)


class Pair:
    """A target/draft pair of one architecture with a batching Verifier server."""

    def __init__(self, arch: str) -> None:
        self.tokenizer = tiny_tokenizer()
        self.target = tiny_model(arch, len(self.tokenizer), head_scale=3.0)
        self.draft = noisy_draft(self.target, 0.3)
        self.runner = ModelRunner(self.target)
        self.server = VerifierServerThread(
            VerifierEngine(self.target, VerifierConfig(max_block_tokens=24))
        )

    def engine(self) -> EdgeEngine:
        return EdgeEngine(
            self.draft,
            self.tokenizer,
            [self.server.address],
            link_config=LinkConfig(round_timeout_s=30.0),
            config=EngineConfig(max_retries=0, link_memory=False),
        )

    def reference(self, prompt: list[int], params: SamplingParams) -> list[int]:
        return generate_autoregressive(self.runner, prompt, params).tokens


@pytest.fixture(scope="module", params=["llama", "mistral-sliding", "gemma3-hybrid", "gpt2"])
def pair(request) -> Iterator[Pair]:
    made = Pair(request.param)
    yield made
    made.server.stop()


def _tree_rounds(summary: SummaryEvent) -> int:
    return sum(r.tree is not None for r in summary.stats.round_records)


@pytest.mark.parametrize("params", [GREEDY, COUPLED], ids=["greedy", "coupled"])
def test_tree_policies_give_the_target_alone(pair, params):
    shape = TreeShape(nodes=12, depth=5, width=3)
    scripted = [
        Decision(SPECULATIVE, 5, tree=shape),
        Decision(SPECULATIVE, 3),
        Decision(CLOUD_ONLY, 0, stream_tokens=2),
        Decision(SPECULATIVE, 2, tree=TreeShape(nodes=4, depth=2, width=2)),
    ]

    async def body() -> None:
        engine = pair.engine()
        trees = accepted = 0
        try:
            for prompt in PROMPTS:
                expected = pair.reference(prompt, params)
                for policy in ("tree", "adaptive_tree", ScriptedPolicy(scripted)):
                    summary = await collect(engine, prompt, params, policy=policy)
                    assert summary.tokens == expected, (policy, prompt)
                    trees += _tree_rounds(summary)
                    accepted += summary.stats.accepted
        finally:
            await engine.aclose()
        assert trees >= 3 * len(PROMPTS)  # every policy ran trees, not chains only
        assert accepted > 0

    asyncio.run(body())


def test_pipelined_trees_give_the_target_alone(pair):
    """Pipelined, greedy and coupled: while a tree's verdict travels, a tree or a chain drafted
    on its guessed path goes ahead (and a tree after a chain); hits are used, misses answered
    STALE."""
    tree = TreeShape(nodes=10, depth=4, width=2)
    scripted = [Decision(SPECULATIVE, 4, tree=tree), Decision(SPECULATIVE, 3)]

    async def body() -> list[SummaryEvent]:
        engine = pair.engine()
        runs = []
        try:
            for params in (GREEDY, COUPLED):
                for prompt in PROMPTS:
                    expected = pair.reference(prompt, params)
                    for policy in ("tree", ScriptedPolicy(scripted)):
                        summary = await collect(
                            engine, prompt, params, policy=policy, pipelined=True
                        )
                        assert summary.tokens == expected, (policy, params, prompt)
                        runs.append(summary)
        finally:
            await engine.aclose()
        return runs

    runs = asyncio.run(body())
    kinds = set()  # (the block before was a tree, the block ahead is a tree)
    for summary in runs:
        records = summary.stats.round_records
        kinds |= {
            (a.tree is not None, b.tree is not None)
            for a, b in zip(records, records[1:], strict=False)
            if b.pipelined
        }
    assert {(True, True), (True, False), (False, True)} <= kinds
    assert sum(s.stats.pipeline_hits for s in runs) > 0
    assert sum(s.stats.pipeline_misses for s in runs) > 0

    async def waiting() -> SummaryEvent:
        engine = pair.engine()
        try:
            policy = ScriptedPolicy([Decision(SPECULATIVE, 4, tree=tree, ahead=False)])
            return await collect(engine, PROMPTS[0], GREEDY, policy=policy, pipelined=True)
        finally:
            await engine.aclose()

    # decisions that say drafting ahead does not pay wait for the verdict
    summary = asyncio.run(waiting())
    assert summary.tokens == pair.reference(PROMPTS[0], GREEDY)
    assert summary.stats.pipeline_hits == summary.stats.pipeline_misses == 0


def test_trees_and_chains_batched_together(pair):
    """Six sessions at once on the batching verifier: trees and chains, greedy and coupled."""
    runs = [
        (prompt, params, policy)
        for prompt in PROMPTS[:3]
        for params, policy in ((GREEDY, "tree"), (COUPLED, "fixed"))
    ]

    async def body() -> list[SummaryEvent]:
        engine = pair.engine()
        try:
            return await asyncio.gather(
                *(collect(engine, p, params, policy=policy, k=3) for p, params, policy in runs)
            )
        finally:
            await engine.aclose()

    summaries = asyncio.run(body())
    for (prompt, params, _), summary in zip(runs, summaries, strict=True):
        assert summary.tokens == pair.reference(prompt, params)
    assert sum(_tree_rounds(s) for s in summaries) > 0
    stats = pair.server.engine.stats()
    assert stats.sessions == 0 or stats.sessions <= len(runs)


def test_rejection_sampling_trees_carry_q(pair):
    """Rejection-sampling trees: every node's q travels (the walk's exactness is tested in
    tests/core/test_tree_rejection.py); a coupled tree of the same shape sends ids only."""
    rejection = SamplingParams(temperature=1.0, max_new_tokens=NEW, seed=3, sampler="rejection")

    async def body() -> tuple[SummaryEvent, SummaryEvent]:
        engine = pair.engine()
        try:
            a = await collect(engine, PROMPTS[0], rejection, policy="tree")
            b = await collect(engine, PROMPTS[0], COUPLED, policy="tree")
            return a, b
        finally:
            await engine.aclose()

    a, b = asyncio.run(body())
    assert len(a.tokens) == NEW and _tree_rounds(a) > 0 and _tree_rounds(b) > 0
    vocab = len(pair.tokenizer)
    assert a.stats.bytes_sent / a.stats.drafted > 4 * vocab / 2  # a q row per node
    assert b.stats.bytes_sent / b.stats.drafted < 16  # token ids and parents only


def test_a_verifier_without_trees_gets_chains(pair):
    engine_of_server = pair.server.engine
    engine_of_server.tree_blocks = False
    try:

        async def body() -> SummaryEvent:
            engine = pair.engine()
            try:
                return await collect(engine, PROMPTS[0], GREEDY, policy="adaptive_tree")
            finally:
                await engine.aclose()

        summary = asyncio.run(body())
    finally:
        engine_of_server.tree_blocks = True
    assert summary.tokens == pair.reference(PROMPTS[0], GREEDY)
    assert _tree_rounds(summary) == 0 and summary.stats.drafted > 0
