"""The edge engine over a real link: EdgeEngine / VerifierLink against `python -m
edgespec.cloud.server` subprocesses (the `servers` fixture), through the TCP link real_link.

Checked: greedy output equals the target alone (RTT 0 and 50 ms, k in {1, 4, 8}, several
prompts, stop tokens); sampled first tokens follow the target's distribution (chi-square, sparse
and dense draft probabilities); a verifier SIGKILLed mid-generation, a cut link and a blackholed
link (round deadline) all end in a reconnect and an unchanged output; TLS and the verifier's
block limit; refused credentials and unreachable verifiers end in clear errors. Every gRPC call
carries a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
import torch
from support.certs import self_signed_cert
from support.edge_runs import collect
from support.servers import VERIFIER_TOKEN
from support.stats import chi_square_p
from support.verifier_client import open_session

from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import logits_to_probs
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.records import TokensEvent
from edgespec.edge.recovery import EdgeError
from edgespec.edge.verifier_link import LinkError
from edgespec.linkemu import LinkEmulator, LinkProfile
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

# Server subprocesses (the `servers` fixture) take tens of seconds to start on a loaded machine.
pytestmark = pytest.mark.slow

DEADLINE_S = 30.0  # every client call in these tests carries this deadline
PROMPTS = (
    "The edge drafts a few tokens",
    "def verify(block):\n",
    [7, 200, 13, 42, 99, 150, 3],
)


@pytest.fixture(scope="module")
def real_link(servers) -> Iterator[LinkEmulator]:
    """The TCP link emulator in front of the 'main' verifier subprocess (RTT 0; tests set their own
    profile)."""
    host, port = servers["main"].address.rsplit(":", 1)
    emu = LinkEmulator(host, int(port), LinkProfile(rtt_ms=0)).start()
    yield emu
    emu.stop()


def make_engine(draft, verifiers, **link_kwargs) -> EdgeEngine:
    model, tokenizer = draft
    link_kwargs.setdefault("token", VERIFIER_TOKEN)
    link_kwargs.setdefault("round_timeout_s", DEADLINE_S)
    return EdgeEngine(
        model,
        tokenizer,
        verifiers,
        link_config=LinkConfig(**link_kwargs),
        config=EngineConfig(max_retries=6, backoff_initial_s=0.02),
    )


def reference(target: ModelRunner, tokenizer, prompt, params: SamplingParams) -> list[int]:
    ids = (
        tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if isinstance(prompt, str)
        else prompt
    )
    return generate_autoregressive(target, ids, params).tokens


async def run_collecting(engine: EdgeEngine, prompt, params, k, on_first_tokens=None):
    """Run one session; returns (tokens streamed, summary). Closes the engine."""
    try:
        summary = await collect(engine, prompt, params, on_first_tokens, k=k)
    finally:
        await engine.aclose()
    return summary.tokens, summary


# ---------------------------------------------------------------- greedy equality


@pytest.mark.parametrize("rtt_ms", [0, 50])
def test_greedy_output_equals_target_alone(rtt_ms, draft, target, real_link):
    real_link.set_profile(LinkProfile(rtt_ms=rtt_ms))
    tokenizer = draft[1]
    params = SamplingParams(max_new_tokens=16)

    async def body() -> None:
        engine = make_engine(draft, [real_link.address])
        try:
            for prompt in PROMPTS:
                expected = reference(target, tokenizer, prompt, params)
                for k in (1, 4, 8):
                    streamed: list[int] = []
                    summary = None
                    async for event in engine.generate(prompt, params, k=k, policy="fixed"):
                        if isinstance(event, TokensEvent):
                            streamed.extend(event.tokens)
                        else:
                            summary = event
                    assert summary is not None
                    assert summary.tokens == expected, (prompt, k)
                    assert streamed == expected
                    assert summary.finish_reason == "length"
                    assert summary.text == tokenizer.decode(expected)
                    stats = summary.stats
                    assert stats.reconnects == 0
                    assert max(stats.draft_lengths) <= k
                    assert stats.rounds == len(stats.draft_lengths) >= 16 / (k + 1)
                    assert stats.accepted + stats.rounds >= 16  # every output token verified
                    assert stats.bytes_sent > 0 and stats.bytes_received > 0
                    assert stats.verifier == real_link.address
                    # The emulator holds each direction rtt/2: a lower bound, never wall-clock.
                    assert stats.rtt_ms_mean >= 0.95 * rtt_ms
        finally:
            await engine.aclose()

    asyncio.run(body())


def test_stop_token_ends_output_like_target_alone(draft, target, real_link):
    real_link.set_profile(LinkProfile(rtt_ms=0))
    tokenizer = draft[1]
    prompt = PROMPTS[0]
    full = reference(target, tokenizer, prompt, SamplingParams(max_new_tokens=24))
    stop = full[9]
    params = SamplingParams(max_new_tokens=24, stop_token_ids=(stop,))
    expected = full[: full.index(stop) + 1]
    streamed, summary = asyncio.run(
        run_collecting(make_engine(draft, [real_link.address]), prompt, params, k=4)
    )
    assert summary.finish_reason == "stop"
    assert summary.tokens == streamed == expected


# ---------------------------------------------------------------- sampling in distribution


def _sample_first_tokens(draft, address, prompt_ids, params, runs, k, n_tokens):
    """The first `n_tokens` tokens of `runs` seeded sessions (seed = run index), 8 at a time."""

    async def body() -> list[list[int]]:
        engine = make_engine(draft, [address])
        gate = asyncio.Semaphore(8)

        async def one(seed: int) -> list[int]:
            async with gate:
                p = SamplingParams(**{**params, "seed": seed})
                summary = await engine.collect(prompt_ids, p, k=k)
                return summary.tokens[:n_tokens]

        try:
            return await asyncio.gather(*(one(s) for s in range(runs)))
        finally:
            await engine.aclose()

    return asyncio.run(body())


def test_sampled_tokens_follow_target_distribution_sparse_q(draft, target, real_link):
    """top_k=8: the draft sends sparse q. Token 1 and token 2 marginals against the exact ones."""
    real_link.set_profile(LinkProfile(rtt_ms=0))
    prompt = [1, 2, 3]
    params = {"temperature": 1.0, "top_k": 8, "max_new_tokens": 2, "sampler": "rejection"}
    sp = SamplingParams(**params)
    runs = 600
    samples = _sample_first_tokens(draft, real_link.address, prompt, params, runs, k=3, n_tokens=2)
    p1 = logits_to_probs(target.prefill(prompt), sp)  # (V,)
    p2 = torch.zeros_like(p1)  # marginal of token 2: sum over token 1
    for x1 in torch.nonzero(p1).flatten().tolist():
        p2 += p1[x1] * logits_to_probs(target.prefill([*prompt, x1]), sp)
    for i, probs in enumerate((p1, p2)):
        counts: dict[int, int] = {}
        for s in samples:
            counts[s[i]] = counts.get(s[i], 0) + 1
        assert set(counts) <= set(torch.nonzero(probs).flatten().tolist())
        assert chi_square_p(counts, probs, runs) > 1e-3, f"token {i + 1}"


def test_sampled_first_token_follows_target_distribution_dense_q(draft, target, real_link):
    """No truncation: the draft sends dense q (k, V) rows."""
    real_link.set_profile(LinkProfile(rtt_ms=0))
    prompt = [1, 2, 3]
    params = {"temperature": 1.5, "max_new_tokens": 3, "sampler": "rejection"}
    runs = 400
    samples = _sample_first_tokens(draft, real_link.address, prompt, params, runs, k=2, n_tokens=1)
    probs = logits_to_probs(target.prefill(prompt), SamplingParams(**params))  # (V,)
    counts: dict[int, int] = {}
    for (t,) in samples:
        counts[t] = counts.get(t, 0) + 1
    assert chi_square_p(counts, probs, runs) > 1e-3


# ---------------------------------------------------------------- failures


def test_verifier_killed_mid_generation_fails_over_to_next(draft, target, servers):
    victim, backup = servers["victim"], servers["main"]
    params = SamplingParams(max_new_tokens=40)
    prompt = PROMPTS[1]
    expected = reference(target, draft[1], prompt, params)
    engine = make_engine(draft, [victim.address, backup.address])
    streamed, summary = asyncio.run(
        run_collecting(engine, prompt, params, k=2, on_first_tokens=victim.kill)
    )
    assert victim.proc.returncode is not None  # it really died mid-generation
    assert summary.tokens == streamed == expected
    assert summary.stats.reconnects >= 1
    assert summary.stats.verifier == backup.address


def test_cut_link_reconnects_after_restore(draft, target, real_link):
    real_link.set_profile(LinkProfile(rtt_ms=0))
    params = SamplingParams(max_new_tokens=32)
    prompt = PROMPTS[0]
    expected = reference(target, draft[1], prompt, params)

    def cut() -> None:
        real_link.cut()
        asyncio.get_running_loop().call_later(0.3, real_link.restore)

    try:
        streamed, summary = asyncio.run(
            run_collecting(make_engine(draft, [real_link.address]), prompt, params, 4, cut)
        )
    finally:
        real_link.restore()
    assert summary.tokens == streamed == expected
    assert summary.stats.reconnects >= 1


def test_round_deadline_on_blackholed_link_fails_over(draft, target, servers):
    """A partition TCP does not notice: the round deadline fires and the next verifier takes over."""
    direct = servers["main"].address
    host, port = direct.rsplit(":", 1)
    params = SamplingParams(max_new_tokens=24)
    prompt = PROMPTS[2]
    expected = reference(target, draft[1], prompt, params)
    with LinkEmulator(host, int(port)) as emu:
        engine = make_engine(draft, [emu.address, direct], round_timeout_s=0.5)
        try:
            streamed, summary = asyncio.run(
                run_collecting(engine, prompt, params, 2, on_first_tokens=emu.blackhole)
            )
        finally:
            emu.restore()
    assert summary.tokens == streamed == expected
    assert summary.stats.reconnects >= 1
    assert summary.stats.verifier == direct


def test_tls_and_the_verifiers_block_limit(draft, target, tmp_path):
    """TLS + bearer token to an (in-process) verifier that takes at most 2 draft tokens a block."""
    from edgespec.cloud.service import serve
    from edgespec.cloud.verifier import VerifierEngine
    from edgespec.cloud.verifier_types import VerifierConfig
    from edgespec.serving.tls import TlsConfig

    cert, key = self_signed_cert(tmp_path)
    params = SamplingParams(max_new_tokens=12)
    prompt = PROMPTS[0]
    expected = reference(target, draft[1], prompt, params)

    async def body():
        verifier = VerifierEngine(target.model, VerifierConfig(max_block_tokens=2))
        running = await serve(verifier, token=VERIFIER_TOKEN, tls=TlsConfig(cert, key))
        try:
            engine = make_engine(
                draft,
                [f"127.0.0.1:{running.port}"],
                tls=TlsConfig(ca_cert=cert, server_name="localhost"),
            )
            return await run_collecting(engine, prompt, params, k=6)
        finally:
            await running.stop(0)

    streamed, summary = asyncio.run(body())
    assert summary.tokens == streamed == expected
    assert max(summary.stats.draft_lengths) <= 2


def test_refused_credentials_fail_fast_without_retries(draft, servers):
    engine = make_engine(draft, [servers["main"].address], token="wrong-token")
    with pytest.raises(EdgeError, match="UNAUTHENTICATED") as info:
        asyncio.run(run_collecting(engine, [1, 2, 3], SamplingParams(max_new_tokens=4), 2))
    assert info.value.code == "UNAVAILABLE"


def test_unreachable_verifiers_end_in_a_clear_error(draft):
    engine = EdgeEngine(
        draft[0],
        draft[1],
        ["127.0.0.1:1"],
        link_config=LinkConfig(open_timeout_s=2.0),
        config=EngineConfig(max_retries=2, backoff_initial_s=0.01),
    )
    with pytest.raises(EdgeError, match="after 3 attempts") as info:
        asyncio.run(run_collecting(engine, [1, 2, 3], SamplingParams(max_new_tokens=4), 2))
    assert info.value.code == "UNAVAILABLE"
    assert isinstance(info.value.__cause__, LinkError)


def test_a_verifier_server_announces_its_measured_idle_forward(servers) -> None:
    """`python -m edgespec.cloud.server` measures its forward alone at start-up and announces it
    at OpenSession: an edge's adaptive policy measures the verifier's load against it."""
    with grpc.insecure_channel(servers["main"].address) as channel:
        auth = (("authorization", f"Bearer {VERIFIER_TOKEN}"),)
        response = open_session(pb_grpc.VerifierStub(channel), metadata=auth)
    assert 0.0 < response.idle_forward_ms < 1000.0
