"""The emulated cloud GPU of the capacity benchmark (`edgespec.bench.emulated_verifier`): the
greedy oracle's rows equal a plain runner's along the greedy path, and a batching Verifier server
whose sessions take them gives the target alone's output over gRPC, chains, trees and cloud-only
decoding batched together, reading no row off the greedy path.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from support.edge_runs import collect
from support.servers import VerifierServerThread
from support.tiny_models import noisy_draft, tiny_model, tiny_tokenizer

from edgespec.bench.emulated_verifier import GreedyOracle, GreedyOracleRunner, target_runner_factory
from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.profiles import BatchRoofline, ComputeProfile
from edgespec.core.runner import ModelRunner
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine

# Emulated with a batched forward of a few ms: the tests are about tokens and accounting.
PROFILE = ComputeProfile(
    name="test-emulated",
    emulated=True,
    target_batch=BatchRoofline(overhead_ms=2.0),
)
PROMPTS = ([7, 200, 13, 42, 99, 150, 3, 60, 21], [5, 6, 7], [7, 200, 13, 42, 99, 150, 3, 60, 21])
NEW = 20


def test_oracle_rows_are_the_target_alones_along_the_greedy_path() -> None:
    """A chain, a rollback, a tree and its kept path, on and off the greedy path: on-path rows
    equal a plain runner's, off-path rows are NaN, and the bookkeeping is a plain runner's."""
    model = tiny_model("llama", 300)
    prompt = [5, 17, 42, 7]
    path = generate_autoregressive(ModelRunner(model), prompt, SamplingParams(max_new_tokens=8))
    g = path.tokens
    oracle = GreedyOracle([prompt], 8, 2)
    plain, runner = ModelRunner(model), GreedyOracleRunner(model, oracle)
    assert runner.step_padded and not runner.batchable
    for r in (plain, runner):
        r.prefill(prompt[:-1])
    wrong = (g[1] + 1) % 300
    steps: list[tuple[str, tuple, int]] = [  # op, args, rows on the greedy path
        ("extend", ([prompt[-1], g[0], wrong, 9],), 2),
        ("rollback", (len(prompt) + 1,), 0),
        ("extend", ([g[1], g[2]],), 2),
        ("tree", ([g[3], wrong, g[4], 50], [-1, -1, 0, 2]), 2),
        ("keep", (len(prompt) + 3, [0, 2]), 0),
        ("extend", ([g[5]],), 1),
    ]
    for op, args, on_path in steps:
        outs = []
        for r in (plain, runner):
            if op == "extend":
                outs.append(r.extend(*args))
            elif op == "tree":
                outs.append(r.extend_tree(*args))
            elif op == "keep":
                r.keep_nodes(*args)
            else:
                r.rollback(*args)
        assert plain.length == runner.length, op
        if outs:
            known = ~outs[1].isnan().any(-1)
            assert int(known.sum()) == on_path, op
            torch.testing.assert_close(outs[0][known], outs[1][known], rtol=1e-4, atol=1e-4)
    assert oracle.served > 0 and oracle.off_path > 0


def test_the_real_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="emulated"):
        target_runner_factory("real", GreedyOracle([[1, 2]], 4, 0))


def test_emulated_verifier_gives_the_target_alone_over_grpc() -> None:
    """Nine sessions at once (chains, trees, cloud-only) against a batching Verifier whose
    sessions all take the oracle's rows: the target alone's output, no row read off the path."""
    tokenizer = tiny_tokenizer()
    target = tiny_model("llama", len(tokenizer), head_scale=3.0)
    draft = noisy_draft(target, 0.3)
    oracle = GreedyOracle(PROMPTS, NEW, 25)
    engine = VerifierEngine(
        target,
        VerifierConfig(max_block_tokens=24),
        compute_profile=PROFILE,
        runner_factory=target_runner_factory(PROFILE, oracle),
    )
    server = VerifierServerThread(engine)
    params = SamplingParams(max_new_tokens=NEW)
    runs = [(p, policy) for p in PROMPTS for policy in ("fixed", "tree", "cloud_only")]

    async def body() -> list:
        edge = EdgeEngine(
            draft,
            tokenizer,
            [server.address],
            link_config=LinkConfig(round_timeout_s=30.0),
            config=EngineConfig(max_retries=0, link_memory=False),
        )
        try:
            return await asyncio.gather(
                *(collect(edge, p, params, policy=policy, k=3) for p, policy in runs)
            )
        finally:
            await edge.aclose()

    try:
        summaries = asyncio.run(body())
        reference = ModelRunner(target)
        for (prompt, policy), summary in zip(runs, summaries, strict=True):
            expected = generate_autoregressive(reference, prompt, params).tokens
            assert summary.tokens == expected, policy
        assert any(r.tree is not None for s in summaries for r in s.stats.round_records)
        assert oracle.served > 0 and oracle.off_path > 0  # rejected drafts were not read
        assert engine.stats().sessions == 0
    finally:
        server.stop()
