"""The edge engine against a verifier engine in the same process (`InProcessLinks`): the same
session loop as over gRPC (policies, pipelining, cloud-only streams, recovery) with no transport,
so a distributed round can be stepped through in one process."""

from __future__ import annotations

import asyncio

import pytest

from edgespec.cloud.verifier import VerifierConfig, VerifierEngine
from edgespec.core.drafter import Drafter
from edgespec.core.generate import generate_autoregressive
from edgespec.core.models import load_tokenizer
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.edge.config import EngineConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.inprocess_link import InProcessLinks, InProcessVerifierLink
from edgespec.edge.recovery import EdgeError
from edgespec.edge.verifier_link import LinkError

PROMPT = [250, 17, 5, 88]  # the target continues it without repeating one token
MAX_NEW = 32


@pytest.fixture(scope="module")
def draft(tiny_pair):
    """(draft model, tokenizer)."""
    model = ModelRunner.from_pretrained(tiny_pair.draft_dir, device="cpu").model
    return model, load_tokenizer(tiny_pair.draft_dir)


@pytest.fixture(scope="module")
def target(tiny_pair) -> ModelRunner:
    return ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu")


@pytest.fixture()
def verifier(target) -> VerifierEngine:
    """A fresh verifier engine over the target's (shared, read-only) weights."""
    return VerifierEngine(target.model, VerifierConfig(max_block_tokens=16))


def reference(target: ModelRunner, params: SamplingParams) -> list[int]:
    return generate_autoregressive(target, PROMPT, params).tokens


def make_engine(draft, links) -> EdgeEngine:
    model, tokenizer = draft
    return EdgeEngine(model, tokenizer, links, config=EngineConfig(backoff_initial_s=0.0))


async def collect(engine: EdgeEngine, **kwargs):
    try:
        return await engine.collect(PROMPT, SamplingParams(max_new_tokens=MAX_NEW), **kwargs)
    finally:
        await engine.aclose()


@pytest.mark.parametrize(
    ("policy", "k", "pipelined"),
    [("fixed", 4, False), ("fixed", 3, True), ("adaptive", None, True), ("cloud_only", None, True)],
)
def test_greedy_output_equals_target_alone(draft, target, verifier, policy, k, pipelined):
    engine = make_engine(draft, InProcessLinks(verifier))
    summary = asyncio.run(collect(engine, policy=policy, k=k, pipelined=pipelined))
    assert summary.tokens == reference(target, SamplingParams(max_new_tokens=MAX_NEW))
    assert summary.stats.verifier == "in-process" and summary.stats.reconnects == 0
    if policy == "fixed":
        assert summary.stats.drafted > 0 and max(summary.stats.draft_lengths) <= k
    # every session the edge opened was closed on the verifier
    assert verifier.stats().sessions == 0 and verifier.stats().opened >= 1


class DropsSessions:
    """A verifier that loses its sessions every `every` verify calls (as a restarted verifier,
    or one that reaped them): the edge must reopen with its committed prefix."""

    def __init__(self, engine: VerifierEngine, every: int) -> None:
        self.engine = engine
        self.every = every
        self.calls = 0

    def open_session(self, *args, **kwargs):
        return self.engine.open_session(*args, **kwargs)

    def verify(self, session_id, block):
        self.calls += 1
        if self.calls % self.every == 0:
            self.engine.close_session(session_id)
        return self.engine.verify(session_id, block)

    def decode_next(self, session_id, seq):
        return self.engine.decode_next(session_id, seq)

    def close_session(self, session_id):
        return self.engine.close_session(session_id)


def test_lost_sessions_are_reopened_and_output_is_unchanged(draft, target, verifier):
    engine = make_engine(draft, InProcessLinks(DropsSessions(verifier, every=3)))
    summary = asyncio.run(collect(engine, policy="fixed", k=2, pipelined=False))
    assert summary.tokens == reference(target, SamplingParams(max_new_tokens=MAX_NEW))
    assert summary.stats.reconnects >= 2


def test_a_refusal_is_final(draft, target, verifier):
    """A verifier's refusal becomes a LinkError with its status name: NOT_FOUND is retried (until
    the attempts are spent), INVALID_ARGUMENT is final."""
    named = VerifierEngine(target.model, VerifierConfig(model_id="target"))
    engine = make_engine(draft, InProcessLinks(named, model_id="another-model"))
    with pytest.raises(EdgeError) as info:
        asyncio.run(collect(engine))
    # NOT_FOUND (no such model) is retryable: the edge tries every attempt, then gives up
    assert info.value.code == "UNAVAILABLE"
    link = InProcessVerifierLink(verifier)
    params = SamplingParams(max_new_tokens=MAX_NEW)

    async def too_long() -> None:
        await link.open(PROMPT, params)
        drafter = Drafter(ModelRunner(draft[0]), PROMPT, params)
        await link.verify(drafter.propose(20))  # the verifier takes blocks of 16 at most

    with pytest.raises(LinkError) as refused:
        asyncio.run(too_long())
    assert refused.value.code == "INVALID_ARGUMENT" and not refused.value.retryable
    assert not link.is_open and verifier.stats().sessions == 0


def test_one_round_by_hand(draft, target, verifier):
    """A distributed round, step by step, in one process: draft a block on the edge's drafter,
    verify it on the verifier engine through the link, apply the verdict."""
    params = SamplingParams(max_new_tokens=MAX_NEW)
    drafter = Drafter(ModelRunner(draft[0]), PROMPT, params)
    link = InProcessVerifierLink(verifier)

    async def one_round():
        session = await link.open(drafter.committed, params)
        block = drafter.propose(4)  # the edge drafts k=4 tokens on its committed prefix
        verdict, timing = await link.verify(block)  # the verifier accepts a prefix of them
        new = drafter.apply(verdict)  # commit the accepted tokens and the verifier's token
        await link.aclose()
        return session, block, verdict, timing, new

    session, block, verdict, timing, new = asyncio.run(one_round())
    assert session.committed_len == len(PROMPT) and block.base_len == len(PROMPT)
    assert new == list(block.tokens[: verdict.accepted]) + [verdict.token]
    assert new == reference(target, params)[: len(new)]
    assert verdict.committed_len == len(PROMPT) + len(new) == len(drafter.committed)
    assert timing.bytes_sent == 0 and timing.wall_ms >= timing.verify_ms >= 0.0
    assert verifier.stats().sessions == 0


def test_an_unknown_default_policy_is_refused_when_the_engine_is_built(draft, verifier):
    with pytest.raises(ValueError, match="default_policy must be one of"):
        EdgeEngine(
            draft[0], draft[1], InProcessLinks(verifier), config=EngineConfig(default_policy="nope")
        )
