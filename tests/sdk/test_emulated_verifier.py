"""The emulated cloud GPU of the capacity benchmark (`edgespec.bench.emulated_verifier`): memoized
target rows equal a plain runner's, and a batching Verifier server whose sessions use them gives
the target alone's output over gRPC, chains, trees and cloud-only decoding batched together, while
each step is charged the modelled batched forward.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from support.edge_runs import collect
from support.servers import VerifierServerThread
from support.tiny_models import noisy_draft, tiny_model, tiny_tokenizer

from edgespec.bench.emulated_edge import LogitsMemo
from edgespec.bench.emulated_verifier import TargetMemoRunner, target_runner_factory
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


def test_memoized_rows_equal_a_plain_runners() -> None:
    """extend, rollback, a tree and keeping its path, then extend again: the same rows as a
    plain runner, whether the memo is cold (real forwards) or warm (a second runner)."""
    model = tiny_model("llama", 300)
    memo = LogitsMemo()
    for _ in range(2):  # cold, then every row from the memo
        plain, memo_runner = ModelRunner(model), TargetMemoRunner(model, PROFILE, memo)
        assert memo_runner.step_padded and not memo_runner.batchable
        for runner in (plain, memo_runner):
            runner.prefill([5, 17, 42, 7])
        steps: list[tuple[str, tuple]] = [
            ("extend", ([99, 3, 8],)),
            ("rollback", (5,)),
            ("extend", ([11, 12],)),
            ("tree", ([12, 40, 41, 50], [-1, 0, 0, 1])),
            ("keep", (7, [0, 1, 3])),
            ("extend", ([77],)),
        ]
        for op, args in steps:
            outs = []
            for runner in (plain, memo_runner):
                if op == "extend":
                    outs.append(runner.extend(*args))
                elif op == "tree":
                    outs.append(runner.extend_tree(*args))
                elif op == "keep":
                    runner.keep_nodes(*args)
                else:
                    runner.rollback(*args)
            assert plain.length == memo_runner.length, op
            if outs:
                torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    stats = memo.stats()
    assert stats.hits > 0 and stats.misses > 0


def test_the_real_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="emulated"):
        target_runner_factory("real", LogitsMemo())


def test_emulated_verifier_gives_the_target_alone_over_grpc() -> None:
    """Nine sessions at once (chains, trees, cloud-only; prompts repeated, so rows are shared)
    against a batching Verifier whose sessions all take memoized rows."""
    tokenizer = tiny_tokenizer()
    target = tiny_model("llama", len(tokenizer), head_scale=3.0)
    draft = noisy_draft(target, 0.3)
    memo = LogitsMemo()
    engine = VerifierEngine(
        target,
        VerifierConfig(max_block_tokens=24),
        compute_profile=PROFILE,
        runner_factory=target_runner_factory(PROFILE, memo),
    )
    server = VerifierServerThread(engine)
    params = SamplingParams(max_new_tokens=20)
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
        stats = memo.stats()
        assert stats.hits > 0  # the repeated prompt's rows were shared
        assert engine.stats().sessions == 0
    finally:
        server.stop()
