"""Draft-length policies in the edge engine over real gRPC: a Verifier server in this process
(`grpc_verifier`), the edge engine in the test's loop, the TCP link emulator between them at
20 ms RTT.

Checked: greedy output equals the target alone under every policy, with and without pipelined
drafting, and under a scripted policy that mixes speculative rounds and cloud-only chunks;
cloud-only streams one verdict per token and keep the link estimates current; link memory
carries across sessions; sampled tokens 1-3 (token 3 from a pipelined block whenever the guess
held) follow the target's distribution (chi-square); a cut link during pipelined and cloud-only
rounds reconnects; a msgpack round trace is written per generation and reads back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import torch
from support.edge_runs import ScriptedPolicy
from support.stats import chi_square_p

from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.policies import (
    CLOUD_ONLY,
    SPECULATIVE,
    CloudOnlyPolicy,
    Decision,
)
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import logits_to_probs
from edgespec.core.session import DraftBlock
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.grpc_link import GrpcVerifierLink
from edgespec.edge.records import SummaryEvent, TokensEvent
from edgespec.linkemu import LinkEmulator, LinkProfile

DEADLINE_S = 30.0
RTT_MS = 20.0
PROMPTS = ([7, 200, 13, 42, 99, 150, 3], [1, 2, 3], [250, 17, 5, 88])


@pytest.fixture(scope="module")
def link_20ms(grpc_verifier) -> Iterator[LinkEmulator]:
    """The TCP link emulator at RTT_MS in front of the in-process verifier."""
    host, port = grpc_verifier.address.rsplit(":", 1)
    emu = LinkEmulator(host, int(port), LinkProfile(rtt_ms=RTT_MS)).start()
    yield emu
    emu.stop()


def make_engine(
    draft,
    address: str,
    max_retries: int = 2,
    trace_dir: str | None = None,
    link_memory: bool = True,
    ahead_branches: int = 0,
    ahead_branches_sent: int = 0,
) -> EdgeEngine:
    model, tokenizer = draft
    return EdgeEngine(
        model,
        tokenizer,
        [address],
        link_config=LinkConfig(round_timeout_s=DEADLINE_S),
        config=EngineConfig(
            max_retries=max_retries,
            backoff_initial_s=0.02,
            trace_dir=trace_dir,
            link_memory=link_memory,
            ahead_branches=ahead_branches,
            ahead_branches_sent=ahead_branches_sent,
        ),
    )


def reference(target: ModelRunner, prompt: list[int], params: SamplingParams) -> list[int]:
    return generate_autoregressive(target, prompt, params).tokens


async def run_one(engine: EdgeEngine, prompt, params, **kwargs):
    """(tokens streamed, number of TokensEvents, summary) of one generation."""
    streamed: list[int] = []
    events = 0
    summary = None
    async for event in engine.generate(prompt, params, **kwargs):
        if isinstance(event, TokensEvent):
            streamed.extend(event.tokens)
            events += 1
        else:
            assert isinstance(event, SummaryEvent)
            summary = event
    assert summary is not None
    return streamed, events, summary


# ---------------------------------------------------------------- greedy equality over gRPC


@pytest.mark.parametrize(
    ("policy", "pipelined"),
    [
        ("adaptive", False),
        ("heuristic", False),
        ("cloud_only", False),
        ("adaptive", True),
        ("fixed", True),
    ],
)
def test_greedy_equals_target_alone_under_each_policy(policy, pipelined, draft, target, link_20ms):
    params = SamplingParams(max_new_tokens=24)

    async def body() -> None:
        engine = make_engine(draft, link_20ms.address)
        hits = drafted_ahead = 0
        try:
            for i, prompt in enumerate(PROMPTS):
                expected = reference(target, prompt, params)
                streamed, events, summary = await run_one(
                    engine, prompt, params, k=3, policy=policy, pipelined=pipelined
                )
                assert summary.tokens == streamed == expected, (policy, pipelined, prompt)
                stats = summary.stats
                # every session teaches the engine the link; adaptive ones start from it
                assert stats.warm_start == (policy == "adaptive" and i > 0)
                hits += stats.pipeline_hits
                assert stats.reconnects == 0
                records = stats.round_records
                assert all(r.t_wall > 0 and r.t_ms > 0 for r in records)
                assert [r.t_ms for r in records] == sorted(r.t_ms for r in records)
                assert all(r.commit_ms > 0 for r in records)
                # round cycles tile the session: verdict to verdict is one round's commit and
                # the next one's round (which starts where the commit ends, the record)
                for a, b in zip(records, records[1:], strict=False):
                    if b.mode == SPECULATIVE:
                        assert b.t_ms - a.t_ms == pytest.approx(a.commit_ms + b.round_ms)
                # drafting ahead happens while a verdict is due, only when pipelined, and the
                # round spans it (it ran between the block's send and the verdict's read)
                ahead = [r for r in records if r.ahead_draft_ms > 0]
                assert pipelined or not ahead
                drafted_ahead += len(ahead)
                assert all(r.ahead_draft_ms < min(r.timing.wall_ms, r.round_ms) for r in ahead)
                if policy == "cloud_only":
                    # One stream for the whole generation, one verdict (and event) per token.
                    assert stats.rounds == 1 and records[0].mode == CLOUD_ONLY
                    assert stats.cloud_only_tokens == len(expected) == events
                    assert stats.drafted == 0
                    assert records[0].network_ms >= 0.9 * RTT_MS  # the stream's one RTT
                else:
                    spec = [r for r in records if r.mode == SPECULATIVE]
                    if policy != "adaptive":  # adaptive may switch to cloud-only when it is faster
                        assert len(spec) == len(records)
                    assert stats.accepted + len(spec) + stats.cloud_only_tokens >= len(expected)
                    assert all(r.network_ms >= 0.9 * RTT_MS for r in spec)
                if pipelined:
                    assert stats.pipelined
                    assert stats.pipeline_hits == sum(
                        r.pipelined for r in records if r.mode == SPECULATIVE
                    )
                else:
                    assert stats.pipeline_hits == stats.pipeline_misses == 0
            if pipelined:  # (a warm session may finish in a round or two: no hit needed)
                assert hits > 0 and drafted_ahead > 0
        finally:
            await engine.aclose()

    asyncio.run(body())


@pytest.mark.parametrize(
    "params",
    [SamplingParams(max_new_tokens=24), SamplingParams(temperature=1.0, seed=3, max_new_tokens=24)],
    ids=["greedy", "coupled"],
)
def test_branches_ahead_over_grpc_give_the_target_alone(
    params, draft, target, grpc_verifier, link_20ms
):
    """Pipelined chains with branches ahead (`EngineConfig.ahead_branches`): the branches sent
    with the main guess (`ahead_branches_sent`) go in the same message, as its alternatives,
    where the verifier announces `block_alternatives` (it applies the guess that came true, and
    answers STALE once when none did), as blocks of their own otherwise (a STALE answer per
    guess that missed); one kept on the edge is sent when the verdict shows it right. Either
    way the output is the target alone's, with more hits than the main guess alone gets on the
    same prompts."""
    server = grpc_verifier.engine

    async def run(branches: int, sent: int) -> tuple[int, int]:
        """(pipeline hits, STALE answers) over PROMPTS."""
        engine = make_engine(
            draft, link_20ms.address, ahead_branches=branches, ahead_branches_sent=sent
        )
        hits, stale = 0, server.stats().stale
        try:
            for prompt in PROMPTS:
                expected = reference(target, prompt, params)
                streamed, _, summary = await run_one(
                    engine, prompt, params, k=3, policy="fixed", pipelined=True
                )
                assert summary.tokens == streamed == expected, (branches, sent, prompt)
                assert summary.stats.reconnects == 0
                hits += summary.stats.pipeline_hits
        finally:
            await engine.aclose()
        return hits, server.stats().stale - stale

    try:
        alone, _ = asyncio.run(run(0, 0))
        together, stale_together = asyncio.run(run(4, 4))  # every branch sent, one message
        kept, _ = asyncio.run(run(4, 0))  # every branch kept until its verdict
        server.block_alternatives = False
        apart, stale_apart = asyncio.run(run(4, 4))  # every branch sent, a message each
    finally:
        server.block_alternatives = True
    assert alone < min(together, kept, apart)
    assert stale_together < stale_apart


def test_link_memory_across_sessions(draft, target, link_20ms):
    """Every session teaches the engine its link (a fixed-k one through a shadow learner); an
    adaptive session on the same verifier and sampling regime starts from it, another regime or
    a forgotten link starts cold, and the output stays the target's either way."""
    greedy = SamplingParams(max_new_tokens=16)
    sampled = SamplingParams(temperature=1.0, top_k=8, max_new_tokens=16, seed=5)

    async def body() -> None:
        engine = make_engine(draft, link_20ms.address)
        try:
            first = (await engine.collect(PROMPTS[0], greedy, k=3, policy="fixed")).stats
            assert not first.warm_start  # fixed never reads the memory; it still fills it
            memory = engine._link_memory[(first.verifier, "greedy")]
            assert memory.speculative_rounds == first.rounds and memory.rtt.value >= 0.9 * RTT_MS

            warm = await engine.collect(PROMPTS[1], greedy, policy="adaptive")
            assert warm.stats.warm_start
            assert warm.tokens == reference(target, PROMPTS[1], greedy)
            after = engine._link_memory[(first.verifier, "greedy")]
            # (on these tiny CPU models the target alone is fast: it may stream cloud-only)
            seen = after.speculative_rounds + after.cloud_only_steps
            learnt = [  # rounds a policy can learn from (not the draftless last one)
                r
                for r in first.round_records + warm.stats.round_records
                if r.mode == CLOUD_ONLY or r.drafted >= 1
            ]
            assert seen == len(learnt)

            other = await engine.collect(PROMPTS[1], sampled, policy="adaptive")
            assert not other.stats.warm_start  # acceptance under sampling is another matter
            assert {key[1] for key in engine._link_memory} == {
                "greedy",
                "coupled:t=1.0,top_k=8,top_p=1.0",
            }

            # a copy put back: what sessions taught the engine since is gone again
            kept = engine.link_memory()
            await engine.collect(PROMPTS[0], greedy, k=3, policy="fixed")
            key = (first.verifier, "greedy")
            rounds = kept[key].speculative_rounds + kept[key].cloud_only_steps
            taught = engine._link_memory[key]
            assert taught.speculative_rounds + taught.cloud_only_steps > rounds
            engine.restore_link_memory(kept)
            assert engine.link_estimates() == kept.estimates()

            engine.forget_links()
            cold = await engine.collect(PROMPTS[1], greedy, policy="adaptive")
            assert not cold.stats.warm_start and cold.tokens == warm.tokens
        finally:
            await engine.aclose()

    asyncio.run(body())


def test_open_session_measures_the_rtt_on_a_connected_channel(link_20ms):
    """OpenSession's wall time less the verifier's prefill is an RTT sample, except on a fresh
    channel (whose connection setup costs extra round trips)."""

    async def body() -> tuple:
        link = GrpcVerifierLink([link_20ms.address], LinkConfig(round_timeout_s=DEADLINE_S))
        try:
            fresh = await link.open(PROMPTS[0], SamplingParams(max_new_tokens=4))
            again = await link.open(PROMPTS[0], SamplingParams(max_new_tokens=4))
            return fresh, again
        finally:
            await link.aclose()

    fresh, again = asyncio.run(body())
    assert fresh.open_rtt_ms is None
    # at least the emulated round trip (the prefill is taken out); the bound above only rules out
    # nonsense on a loaded machine
    assert again.open_rtt_ms is not None and RTT_MS * 0.9 <= again.open_rtt_ms < RTT_MS + 1000


def test_a_reply_is_read_from_the_write_on_and_close_ends_a_session_with_its_read_posted(
    target, grpc_verifier
):
    """`send` posts the read of the reply it makes due, so a verdict that arrives while the
    event loop is busy (an edge drafting ahead on it) is taken by grpc's threads meanwhile; the
    verdict is the same, and a session closed with a read still posted leaves nothing behind."""
    prompt = PROMPTS[0]
    greedy = reference(target, prompt, SamplingParams(max_new_tokens=2))

    async def body() -> tuple:
        link = GrpcVerifierLink([grpc_verifier.address], LinkConfig(round_timeout_s=DEADLINE_S))
        try:
            await link.open(prompt, SamplingParams(max_new_tokens=8))
            # the target's own next token: accepted, plus a bonus token
            await link.send(DraftBlock(seq=0, base_len=len(prompt), tokens=(greedy[0],)))
            assert link._read is not None  # posted with the write
            time.sleep(0.3)  # the loop blocked, as by drafting ahead: grpc reads meanwhile
            reply = await link.receive()
            await link.send(DraftBlock(seq=1, base_len=len(prompt) + 2, tokens=(1,)))
            opened = grpc_verifier.engine.stats().sessions
        finally:
            await link.aclose()  # the second reply never read: its read is still posted
        return reply, opened

    before = grpc_verifier.engine.stats()
    reply, opened = asyncio.run(body())
    assert reply.seq == 0 and reply.outcome == "APPLIED"
    assert reply.verdict is not None and reply.verdict.accepted == 1
    assert reply.verdict.token == greedy[1]  # the bonus: the target's next token
    assert opened == before.sessions + 1
    after = grpc_verifier.engine.stats()
    assert after.sessions == before.sessions and after.closed == before.closed + 1


def test_cloud_only_streams_keep_the_link_estimates_current(draft, link_20ms):
    """While the cloud decodes alone the edge still learns: greedy streams give shadow acceptance
    (what the draft would have proposed), a ping per chunk gives RTT samples."""
    params = SamplingParams(max_new_tokens=40)

    async def body():
        engine = make_engine(draft, link_20ms.address)
        try:
            chunks = CloudOnlyPolicy(stream_tokens=8)  # as adaptive streams: chunk by chunk
            summary = await engine.collect(PROMPTS[0], params, policy=chunks)
            assert summary.stats.drafted == 0 and summary.stats.cloud_only_tokens == 40
            memory = engine._link_memory[(summary.stats.verifier, "greedy")]
            link = GrpcVerifierLink([link_20ms.address], LinkConfig(round_timeout_s=DEADLINE_S))
            try:
                assert await link.ping() is None  # no session, no connection to time
                await link.open(PROMPTS[0], params)
                rtt = await link.ping()
            finally:
                await link.aclose()
            return memory, rtt
        finally:
            await engine.aclose()

    memory, rtt = asyncio.run(body())
    assert memory.speculative_rounds == 0  # no round was ever sent ...
    assert memory.accept.trials >= 10  # ... yet acceptance was observed (shadow rounds)
    assert memory.rtt.value is not None and 0.9 * RTT_MS <= memory.rtt.value < RTT_MS + 1000
    assert rtt is not None and 0.9 * RTT_MS <= rtt < RTT_MS + 1000


def test_mixed_speculative_and_cloud_only_rounds_with_pipelining(draft, target, link_20ms):
    """A policy switching modes every round: decode chunks requested back to back, pipelined
    blocks after them, stop tokens; the output stays the target's."""
    prompt = PROMPTS[1]
    full = reference(target, prompt, SamplingParams(max_new_tokens=40))
    stop = max(set(full), key=full.index)  # the token first seen latest in the output
    assert full.index(stop) >= 8, "the test needs several rounds before the stop token"
    params = SamplingParams(max_new_tokens=40, stop_token_ids=(stop,))
    expected = full[: full.index(stop) + 1]
    script = [
        Decision(SPECULATIVE, 3),
        Decision(CLOUD_ONLY, 0, stream_tokens=3),
        Decision(CLOUD_ONLY, 0, stream_tokens=2),
        Decision(SPECULATIVE, 2),
        Decision(SPECULATIVE, 4),
    ]

    async def body():
        engine = make_engine(draft, link_20ms.address)
        try:
            policy = ScriptedPolicy(script)
            result = await run_one(engine, prompt, params, policy=policy, pipelined=True)
            return result, policy
        finally:
            await engine.aclose()

    (streamed, _, summary), policy = asyncio.run(body())
    assert summary.tokens == streamed == expected
    assert summary.finish_reason == "stop"
    modes = {r.mode for r in summary.stats.round_records}
    assert modes == {SPECULATIVE, CLOUD_ONLY}
    assert summary.stats.cloud_only_tokens > 0
    # Every recorded round reached the policy (cloud-only ones as cloud-only observations).
    assert any(o.cloud_only for o in policy.observed)
    assert len(policy.observed) == summary.stats.rounds
    # Each decision was told the tokens left: max_new_tokens less what was committed by then.
    told = [t for t in policy.told if t is not None]
    assert len(told) == len(policy.told) and told[0] == 40 and all(1 <= t <= 40 for t in told)
    assert told == sorted(told, reverse=True) and told[-1] < 40 - len(expected) // 2


# ---------------------------------------------------------------- sampling with pipelining


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["rejection", "coupled"])
def test_sampling_with_adaptive_and_pipelining_follows_target_distribution(
    draft, target, grpc_verifier, sampler
):
    """Tokens 1, 2 and 3 of 360 seeded runs (k = 1 to start: block 0 yields tokens 1-2, and the
    block drafted ahead yields token 3 whenever its guess of token 2 held) against the exact
    marginals of the target alone (top_k = 8 keeps them cheap to compute). Without link memory,
    so that every run starts at k = 1 (a warm start would begin at the k learnt so far)."""
    prompt = [1, 2, 3]
    sp = SamplingParams(temperature=1.0, top_k=8, max_new_tokens=4)
    runs = 360

    async def body():
        engine = make_engine(draft, grpc_verifier.address, link_memory=False)
        gate = asyncio.Semaphore(8)

        async def one(seed: int):
            async with gate:
                p = SamplingParams(
                    temperature=1.0, top_k=8, max_new_tokens=4, seed=seed, sampler=sampler
                )
                summary = await engine.collect(prompt, p, k=1, policy="adaptive", pipelined=True)
                return summary.tokens[:3], summary.stats.pipeline_hits

        try:
            return await asyncio.gather(*(one(s) for s in range(runs)))
        finally:
            await engine.aclose()

    results = asyncio.run(body())
    assert sum(hits for _, hits in results) > runs // 4  # the pipelined path really ran
    p1 = logits_to_probs(target.prefill(prompt), sp)  # (V,)
    p2 = torch.zeros_like(p1)
    p3 = torch.zeros_like(p1)
    for x1 in torch.nonzero(p1).flatten().tolist():
        q2 = logits_to_probs(target.prefill([*prompt, x1]), sp)  # (V,)
        p2 += p1[x1] * q2
        for x2 in torch.nonzero(q2).flatten().tolist():
            q3 = logits_to_probs(target.prefill([*prompt, x1, x2]), sp)  # (V,)
            p3 += p1[x1] * q2[x2] * q3
    for i, probs in enumerate((p1, p2, p3)):
        counts: dict[int, int] = {}
        for tokens, _ in results:
            counts[tokens[i]] = counts.get(tokens[i], 0) + 1
        assert set(counts) <= set(torch.nonzero(probs).flatten().tolist())
        assert chi_square_p(counts, probs, runs) > 1e-3, f"token {i + 1}"


def test_cut_link_during_pipelined_and_cloud_only_rounds_reconnects(draft, target, link_20ms):
    """A link cut while blocks are in flight ahead (and while a cloud-only chunk streams): the
    session reopens with the committed prefix, drops what was drafted ahead, output unchanged."""
    params = SamplingParams(max_new_tokens=40)
    prompt = PROMPTS[1]
    expected = reference(target, prompt, params)
    script = [Decision(SPECULATIVE, 3), Decision(SPECULATIVE, 2), Decision(CLOUD_ONLY, 0, 4)]

    async def body():
        engine = make_engine(draft, link_20ms.address, max_retries=6)  # outlasts the 0.3 s cut
        streamed: list[int] = []
        summary = None
        try:
            gen = engine.generate(prompt, params, policy=ScriptedPolicy(script), pipelined=True)
            async for event in gen:
                if isinstance(event, TokensEvent):
                    if not streamed:
                        link_20ms.cut()
                        asyncio.get_running_loop().call_later(0.3, link_20ms.restore)
                    streamed.extend(event.tokens)
                else:
                    summary = event
        finally:
            link_20ms.restore()
            await engine.aclose()
        return streamed, summary

    streamed, summary = asyncio.run(body())
    assert summary is not None
    assert summary.tokens == streamed == expected
    assert summary.stats.reconnects >= 1


# ---------------------------------------------------------------- msgpack round traces


def test_round_trace_written_per_generation_reads_back(draft, link_20ms, tmp_path):
    from edgespec.edge.trace import read_trace, write_trace

    params = SamplingParams(max_new_tokens=24)

    async def body():
        engine = make_engine(draft, link_20ms.address, trace_dir=str(tmp_path))
        try:
            return await run_one(engine, PROMPTS[0], params, k=3, policy="adaptive", pipelined=True)
        finally:
            await engine.aclose()

    _, _, summary = asyncio.run(body())
    [path] = list(tmp_path.glob("trace-*.msgpack"))
    header, records = read_trace(path)
    assert records == summary.stats.round_records and len(records) >= 1
    assert header["rounds"] == len(records) and header["tokens"] == len(summary.tokens)
    assert header["finish_reason"] == summary.finish_reason
    assert header["params"] == params.to_dict()
    # Not a trace, another version, or cut short: refused with the reason.
    (tmp_path / "junk.msgpack").write_bytes(b"\x01")
    with pytest.raises(ValueError, match="not an edgespec trace"):
        read_trace(tmp_path / "junk.msgpack")
    assert len(records) >= 2  # 24 tokens at k <= 3 take several rounds
    cut = tmp_path / "cut.msgpack"
    cut.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"header says {len(records)} rounds"):
        read_trace(cut)
    assert read_trace(write_trace(tmp_path / "again.msgpack", records, {"rounds": -1}))[0][
        "rounds"
    ] == len(records)
