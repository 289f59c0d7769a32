"""Coupled sampling over the real gRPC path: token for token the target alone with the same seed.

A GPT-2 and a Llama pair (random weights; the draft a noisy copy of the target, sharing its
tokenizer), a Verifier server on 127.0.0.1 and the edge engine. Every policy (fixed k = 1, 4, 8,
heuristic, adaptive, cloud-only), pipelining on and off, temperature 0.7 / 1.0 / 1.3, top-k 20 and
top-p 0.9: the output equals `generate_autoregressive` with that seed. Also: the same seeded
adaptive request repeated gives the same output; an unseeded request gets a seed in its summary
that reproduces it; a verifier process killed mid-generation changes nothing; blocks carry token
ids only (bytes compared with rejection sampling on the same request).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest
from support.edge_runs import collect
from support.servers import ServerProcess, VerifierServerThread
from support.tiny_models import noisy_draft, tiny_model, tiny_tokenizer

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.records import SummaryEvent

PROMPT = [7, 200, 13, 42, 99, 150, 3, 60, 21]
NEW = 24
PARAMS = {
    "t0.7": SamplingParams(temperature=0.7, max_new_tokens=NEW, seed=11),
    "t1.0": SamplingParams(temperature=1.0, max_new_tokens=NEW, seed=2**64 - 2),
    "t1.3": SamplingParams(temperature=1.3, max_new_tokens=NEW, seed=3),
    "topk20": SamplingParams(temperature=1.0, top_k=20, max_new_tokens=NEW, seed=4),
    "topp0.9": SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=NEW, seed=5),
}
POLICIES = (
    ("fixed", 1),
    ("fixed", 4),
    ("fixed", 8),
    ("heuristic", None),
    ("adaptive", None),
    ("cloud_only", None),
)


class Pair:
    """A target/draft pair of one architecture, saved to folders, with a Verifier server."""

    def __init__(self, arch: str, folder) -> None:
        self.tokenizer = tiny_tokenizer()
        self.target = tiny_model(arch, len(self.tokenizer), head_scale=3.0)
        self.draft = noisy_draft(self.target, 0.3)
        self.target_dir = folder / "target"
        self.target.save_pretrained(self.target_dir)
        self.tokenizer.save_pretrained(self.target_dir)
        self.runner = ModelRunner(self.target)
        self.server = VerifierServerThread(
            VerifierEngine(self.target, VerifierConfig(max_block_tokens=16))
        )

    def engine(self, addresses: list[str] | None = None, max_retries: int = 0) -> EdgeEngine:
        return EdgeEngine(
            self.draft,
            self.tokenizer,
            addresses or [self.server.address],
            link_config=LinkConfig(round_timeout_s=30.0),
            config=EngineConfig(max_retries=max_retries, backoff_initial_s=0.02, link_memory=False),
        )

    def reference(self, params: SamplingParams) -> list[int]:
        return generate_autoregressive(self.runner, PROMPT, params).tokens


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tmp_path_factory) -> Iterator[Pair]:
    made = Pair(request.param, tmp_path_factory.mktemp(request.param))
    yield made
    made.server.stop()


async def _generate(engine: EdgeEngine, params: SamplingParams, on_first=None, **kwargs):
    return await collect(engine, PROMPT, params, on_first, **kwargs)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_every_policy_gives_the_target_alone(pair, name):
    params = PARAMS[name]
    expected = pair.reference(params)
    assert len(expected) == NEW

    async def body() -> None:
        engine = pair.engine()
        accepted = 0
        try:
            for policy, k in POLICIES:
                for pipelined in (False, True):
                    summary = await _generate(
                        engine, params, policy=policy, k=k, pipelined=pipelined
                    )
                    where = f"{policy} k={k} pipelined={pipelined}"
                    assert summary.tokens == expected, where
                    assert summary.seed == params.seed
                    accepted += summary.stats.accepted
        finally:
            await engine.aclose()
        assert accepted > 0  # the draft's coupled proposals were accepted: not cloud-only alone

    asyncio.run(body())


def test_repeated_adaptive_requests_give_one_output(pair):
    params = PARAMS["t1.0"]

    async def body() -> list[list[int]]:
        engine = pair.engine()
        try:
            return [(await _generate(engine, params, policy="adaptive")).tokens for _ in range(4)]
        finally:
            await engine.aclose()

    outputs = asyncio.run(body())
    assert all(out == pair.reference(params) for out in outputs)


def test_unseeded_request_reports_the_seed_that_reproduces_it(pair):
    params = SamplingParams(temperature=1.0, max_new_tokens=12)

    async def body() -> list[SummaryEvent]:
        engine = pair.engine()
        try:
            return [await _generate(engine, params, policy="fixed", k=3) for _ in range(3)]
        finally:
            await engine.aclose()

    summaries = asyncio.run(body())
    seeds = {s.seed for s in summaries}
    assert None not in seeds and len(seeds) == 3  # a fresh seed each time
    for s in summaries:
        assert s.tokens == pair.reference(dataclasses.replace(params, seed=s.seed))


def test_verifier_killed_mid_generation(pair, tmp_path):
    """The first verifier is a process killed after the first tokens; the session reopens on the
    second with the committed prefix, and the output is still the target alone's."""
    params = dataclasses.replace(PARAMS["t1.3"], max_new_tokens=40)
    victim = ServerProcess(
        ["edgespec.cloud.server", "--target", str(pair.target_dir)], tmp_path / "victim.log"
    )
    try:
        victim_address = victim.wait_listening()
        engine = pair.engine([victim_address, pair.server.address], max_retries=6)

        async def body() -> SummaryEvent:
            try:
                return await _generate(engine, params, on_first=victim.kill, policy="fixed", k=2)
            finally:
                await engine.aclose()

        summary = asyncio.run(body())
    finally:
        victim.stop()
    assert victim.proc.returncode is not None  # it really died
    assert summary.stats.reconnects >= 1 and summary.stats.verifier == pair.server.address
    assert summary.tokens == pair.reference(params)


def test_coupled_blocks_carry_token_ids_only(pair):
    """The same request, coupled vs rejection (dense q): bytes the edge sent per drafted token."""
    coupled = PARAMS["t1.0"]
    rejection = dataclasses.replace(coupled, sampler="rejection")

    async def body() -> tuple[SummaryEvent, SummaryEvent]:
        engine = pair.engine()
        try:
            a = await _generate(engine, coupled, policy="fixed", k=4, pipelined=False)
            b = await _generate(engine, rejection, policy="fixed", k=4, pipelined=False)
            return a, b
        finally:
            await engine.aclose()

    a, b = asyncio.run(body())
    per_a = a.stats.bytes_sent / a.stats.drafted
    per_b = b.stats.bytes_sent / b.stats.drafted
    vocab = len(pair.tokenizer)
    assert per_b > 2 * vocab  # dense q: a float or more per token id per draft token
    assert per_a < 40  # a token id and a share of the block header
