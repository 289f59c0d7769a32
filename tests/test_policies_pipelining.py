"""Issue 6 on the real stack: draft-length policies wired into the edge, cloud-only streaming,
pipelined drafting and compute profiles.

Over real gRPC (a Verifier server on a background event loop, the edge engine in the test's
loop, the TCP link emulator between them at 20 ms RTT): greedy output equals the target alone
under every policy, with and without pipelining, and under a scripted policy that mixes
speculative rounds and cloud-only chunks; cloud-only streams one verdict per token; a pipelined
block with a wrong anchor is STALE and changes nothing (engine level and over gRPC); sampled
tokens 1-3 (token 3 comes from a pipelined block whenever the guess held) follow the target's
distribution (chi-square). Compute profiles: padding is a lower bound on a forward's time.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from conftest import VerifierServerThread, chi_square_p

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import Outcome, VerifierConfig
from edgespec.core.cost_model import CostModel, best_k
from edgespec.core.drafter import Drafter
from edgespec.core.generate import generate_autoregressive
from edgespec.core.models import load_tokenizer
from edgespec.core.params import SamplingParams
from edgespec.core.policies import (
    CLOUD_ONLY,
    SPECULATIVE,
    CloudOnlyPolicy,
    Decision,
    RoundObservation,
)
from edgespec.core.profiles import (
    ComputeProfile,
    ForwardCost,
    PaddedRunner,
    get_profile,
    make_runner,
)
from edgespec.core.runner import ModelRunner
from edgespec.core.sampling import logits_to_probs
from edgespec.core.session import DraftBlock
from edgespec.core.verifier import Verifier
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.grpc_link import GrpcVerifierLink
from edgespec.edge.records import RoundRecord, SummaryEvent, TokensEvent, observation_from_record
from edgespec.edge.round_timing import RoundTiming
from edgespec.linkemu import LinkEmulator, LinkProfile
from edgespec.protos.convert import block_to_proto, params_to_proto
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

DEADLINE_S = 30.0
RTT_MS = 20.0
PROMPTS = ([7, 200, 13, 42, 99, 150, 3], [1, 2, 3], [250, 17, 5, 88])


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def target(tiny_pair) -> ModelRunner:
    return ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu")


@pytest.fixture(scope="module")
def draft(tiny_pair):
    model = ModelRunner.from_pretrained(tiny_pair.draft_dir, device="cpu").model
    return model, load_tokenizer(tiny_pair.draft_dir)


@pytest.fixture(scope="module")
def verifier(target) -> Iterator[VerifierServerThread]:
    server = VerifierServerThread(VerifierEngine(target.model, VerifierConfig(max_block_tokens=16)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def emulator(verifier) -> Iterator[LinkEmulator]:
    host, port = verifier.address.rsplit(":", 1)
    emu = LinkEmulator(host, int(port), LinkProfile(rtt_ms=RTT_MS)).start()
    yield emu
    emu.stop()


def make_engine(
    draft,
    address: str,
    max_retries: int = 2,
    trace_dir: str | None = None,
    link_memory: bool = True,
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


class ScriptedPolicy:
    """Cycles through fixed decisions: mixes speculative rounds and cloud-only chunks."""

    def __init__(self, decisions: list[Decision]) -> None:
        self.decisions = decisions
        self.i = 0
        self.observed: list[RoundObservation] = []

    def choose(self) -> Decision:
        decision = self.decisions[self.i % len(self.decisions)]
        self.i += 1
        return decision

    def observe(self, obs: RoundObservation) -> None:
        self.observed.append(obs)


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
def test_greedy_equals_target_alone_under_each_policy(policy, pipelined, draft, target, emulator):
    params = SamplingParams(max_new_tokens=24)

    async def body() -> None:
        engine = make_engine(draft, emulator.address)
        hits = 0
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
                assert hits > 0
        finally:
            await engine.aclose()

    asyncio.run(body())


def test_link_memory_across_sessions(draft, target, emulator):
    """Every session teaches the engine its link (a fixed-k one through a shadow learner); an
    adaptive session on the same verifier and sampling regime starts from it, another regime or
    a forgotten link starts cold, and the output stays the target's either way."""
    greedy = SamplingParams(max_new_tokens=16)
    sampled = SamplingParams(temperature=1.0, top_k=8, max_new_tokens=16, seed=5)

    async def body() -> None:
        engine = make_engine(draft, emulator.address)
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
                "t=1.0,top_k=8,top_p=1.0",
            }

            engine.forget_links()
            cold = await engine.collect(PROMPTS[1], greedy, policy="adaptive")
            assert not cold.stats.warm_start and cold.tokens == warm.tokens
        finally:
            await engine.aclose()

    asyncio.run(body())


def test_open_session_measures_the_rtt_on_a_connected_channel(emulator):
    """OpenSession's wall time less the verifier's prefill is an RTT sample, except on a fresh
    channel (whose connection setup costs extra round trips)."""

    async def body() -> tuple:
        link = GrpcVerifierLink([emulator.address], LinkConfig(round_timeout_s=DEADLINE_S))
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


def test_cloud_only_streams_keep_the_link_estimates_current(draft, emulator):
    """While the cloud decodes alone the edge still learns: greedy streams give shadow acceptance
    (what the draft would have proposed), a ping per chunk gives RTT samples."""
    params = SamplingParams(max_new_tokens=40)

    async def body():
        engine = make_engine(draft, emulator.address)
        try:
            chunks = CloudOnlyPolicy(stream_tokens=8)  # as adaptive streams: chunk by chunk
            summary = await engine.collect(PROMPTS[0], params, policy=chunks)
            assert summary.stats.drafted == 0 and summary.stats.cloud_only_tokens == 40
            memory = engine._link_memory[(summary.stats.verifier, "greedy")]
            link = GrpcVerifierLink([emulator.address], LinkConfig(round_timeout_s=DEADLINE_S))
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


def test_mixed_speculative_and_cloud_only_rounds_with_pipelining(draft, target, emulator):
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
        engine = make_engine(draft, emulator.address)
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


# ---------------------------------------------------------------- sampling with pipelining


def test_sampling_with_adaptive_and_pipelining_follows_target_distribution(draft, target, verifier):
    """Tokens 1, 2 and 3 of 360 seeded runs (k = 1 to start: block 0 yields tokens 1-2, and the
    block drafted ahead yields token 3 whenever its guess of token 2 held) against the exact
    marginals of the target alone (top_k = 8 keeps them cheap to compute). Without link memory,
    so that every run starts at k = 1 (a warm start would begin at the k learnt so far)."""
    prompt = [1, 2, 3]
    sp = SamplingParams(temperature=1.0, top_k=8, max_new_tokens=4)
    runs = 360

    async def body():
        engine = make_engine(draft, verifier.address, link_memory=False)
        gate = asyncio.Semaphore(8)

        async def one(seed: int):
            async with gate:
                p = SamplingParams(temperature=1.0, top_k=8, max_new_tokens=4, seed=seed)
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


# ---------------------------------------------------------------- stale anchors, decode streams


def test_wrong_anchor_is_stale_at_the_engine_and_nothing_changes(target):
    engine = VerifierEngine(target.model)
    prompt = PROMPTS[0]
    opened = engine.open_session(prompt, SamplingParams(max_new_tokens=16))
    last = prompt[-1]
    wrong = DraftBlock(seq=0, base_len=len(prompt), tokens=(5, 6), anchor_token=(last + 1) % 300)
    result = engine.verify(opened.session_id, wrong)
    assert result.outcome is Outcome.STALE and result.verdict is None
    assert engine.committed(opened.session_id) == prompt
    assert engine.stats().stale == 1 and engine.stats().forwards == 1  # the prefill only
    right = DraftBlock(seq=1, base_len=len(prompt), tokens=(5, 6), anchor_token=last)
    assert engine.verify(opened.session_id, right).outcome is Outcome.APPLIED


def test_pipelined_core_loop_hits_and_misses_and_matches_target(draft, target):
    """Drafter + Verifier without transport: a block drafted ahead is applied on a hit and is
    STALE at the verifier on a miss; greedy output equals the target alone."""
    params = SamplingParams(max_new_tokens=30)
    prompt = PROMPTS[2]
    drafter = Drafter(ModelRunner(draft[0]), prompt, params)
    verifier = Verifier(ModelRunner(target.model), prompt, params)
    hits = misses = 0
    drafter.propose(3)
    while not drafter.finished:
        pending = drafter.pending
        ahead = drafter.propose_ahead(3)
        verdict = verifier.verify(pending)
        drafter.apply(verdict)
        if ahead is None:
            if not drafter.finished:
                drafter.propose(3)
            continue
        if drafter.last_ahead_hit:
            hits += 1
            assert drafter.pending is ahead
        else:
            misses += 1
            from edgespec.core.session import StaleBlockError

            with pytest.raises(StaleBlockError):
                verifier.verify(ahead)
            if not drafter.finished:
                drafter.propose(3)
    assert drafter.generated == reference(target, prompt, params)
    assert hits > 0


def test_decode_block_streams_target_tokens_over_grpc(target, verifier):
    prompt = PROMPTS[1]
    expected = reference(target, prompt, SamplingParams(max_new_tokens=12))
    with grpc.insecure_channel(verifier.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        opened = stub.OpenSession(
            pb.OpenSessionRequest(
                prefix_ids=prompt, params=params_to_proto(SamplingParams(max_new_tokens=12))
            ),
            timeout=DEADLINE_S,
        )
        assert opened.compute_profile == "real"
        requests: queue.Queue[pb.DraftBlock | None] = queue.Queue()

        def gen():
            while (msg := requests.get()) is not None:
                yield msg

        call = stub.VerifyStream(gen(), timeout=DEADLINE_S)
        try:
            # A pipelined block with a wrong anchor: STALE, nothing applied.
            bad = DraftBlock(seq=0, base_len=len(prompt), tokens=(), anchor_token=prompt[-1] + 1)
            requests.put(block_to_proto(bad, opened.session_id))
            stale = next(call)
            assert stale.outcome == pb.Verdict.STALE
            assert stale.committed_len == len(prompt)
            # Decode 10 tokens: 10 verdicts, `more` on all but the last.
            decode = DraftBlock(seq=1, base_len=len(prompt), tokens=(), decode_tokens=10)
            requests.put(block_to_proto(decode))
            verdicts = [next(call) for _ in range(10)]
            assert [v.token for v in verdicts] == expected[:10]
            assert [v.more for v in verdicts] == [True] * 9 + [False]
            assert all(v.seq == 1 and v.accepted == 0 and v.verify_ms > 0 for v in verdicts)
            assert [v.committed_len for v in verdicts] == list(
                range(len(prompt) + 1, len(prompt) + 11)
            )
            # More than max_new_tokens still allows is refused, naming the field.
            too_many = DraftBlock(seq=2, base_len=len(prompt) + 10, tokens=(), decode_tokens=3)
            requests.put(block_to_proto(too_many))
            with pytest.raises(grpc.RpcError) as info:
                next(call)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "decode_tokens" in info.value.details()
        finally:
            requests.put(None)
            call.cancel()


def test_decode_stream_ends_at_a_stop_token(target):
    prompt = PROMPTS[0]
    full = reference(target, prompt, SamplingParams(max_new_tokens=12))
    stop = full[4]
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(stop,))
    engine = VerifierEngine(target.model)
    sid = engine.open_session(prompt, params).session_id
    block = DraftBlock(seq=0, base_len=len(prompt), tokens=(), decode_tokens=12)
    results = list(engine.verify_stream(sid, block))
    tokens = [r.verdict.token for r in results]
    assert tokens == full[: full.index(stop) + 1]
    assert [r.more for r in results] == [True] * (len(tokens) - 1) + [False]


# ---------------------------------------------------------------- controller wiring


def test_round_record_becomes_the_controllers_observation():
    timing = RoundTiming(
        wall_ms=60.0, verify_ms=10.0, queue_ms=2.0, network_ms=48.0, bytes_sent=1, bytes_received=1
    )
    spec = RoundRecord(
        seq=3, k=4, drafted=4, accepted=2, draft_ms=10.0, round_ms=70.0, apply_ms=0.1,
        timing=timing, attempts=1, tokens=3, draft_forwards=5,
    )  # fmt: skip
    obs = observation_from_record(spec)
    assert (obs.k, obs.accepted, obs.tokens, obs.cloud_only) == (4, 2, 3, False)
    assert obs.draft_ms == pytest.approx(8.0)  # 2 ms per forward, 4 draft tokens
    assert (obs.verify_ms, obs.queue_ms, obs.network_ms) == (10.0, 2.0, 48.0)
    cloud = RoundRecord(
        seq=4, k=0, drafted=0, accepted=0, draft_ms=0.0, round_ms=50.0, apply_ms=0.1,
        timing=timing, attempts=1, mode=CLOUD_ONLY, tokens=6,
    )  # fmt: skip
    obs = observation_from_record(cloud)
    assert obs.cloud_only and obs.tokens == 6 and obs.k == 0
    empty = RoundRecord(
        seq=5, k=2, drafted=0, accepted=0, draft_ms=0.0, round_ms=50.0, apply_ms=0.1,
        timing=timing, attempts=1, tokens=1,
    )  # fmt: skip
    assert observation_from_record(empty) is None


def test_pipelined_cost_model_hides_round_trips():
    serial = CostModel(draft_ms=5.0, rtt_ms=100.0, verify_base_ms=30.0, verify_per_token_ms=0.2)
    piped = CostModel(
        draft_ms=5.0, rtt_ms=100.0, verify_base_ms=30.0, verify_per_token_ms=0.2, pipelined=True
    )
    assert piped.expected_round_ms(4, 0.0) == serial.round_ms(4)
    assert piped.expected_round_ms(4, 1.0) == pytest.approx((5 * 5.0 + 100.0 + 30.0 + 0.2 * 5) / 2)
    assert piped.speculative_rate(0.8, 4) > serial.speculative_rate(0.8, 4)
    assert piped.speculative_rate(0.0, 4) == pytest.approx(serial.speculative_rate(0.0, 4))
    # The edge cannot draft faster than t_d per token, however long the RTT hides.
    slow_draft = CostModel(draft_ms=50.0, rtt_ms=1.0, verify_base_ms=1.0, verify_per_token_ms=0,
                           pipelined=True)  # fmt: skip
    assert slow_draft.pipelined_hit_ms(3) == pytest.approx(200.0)
    # with perfect acceptance the hidden round trips favour at least as long a block
    assert best_k(piped, [0.9] * 17, 1, 16) >= 1
    with pytest.raises(ValueError, match="pipelined"):
        CostModel(1.0, 1.0, 1.0, 1.0, pipelined="yes")


# ---------------------------------------------------------------- compute profiles


def test_profiles_registry_and_padding_is_a_lower_bound(target):
    real = get_profile("real")
    assert not real.emulated and type(make_runner(target.model, real, "target")) is ModelRunner
    h100 = get_profile("h100-70b")
    assert h100.emulated and "H100" in h100.sources and h100.to_dict()["emulated"] is True
    assert h100.target.ms(5) == pytest.approx(31.0)
    with pytest.raises(ValueError, match="compute profile"):
        get_profile("tpu-9000")
    with pytest.raises(ValueError, match="base_ms"):
        ForwardCost(base_ms=-1.0)
    profile = ComputeProfile(
        name="test", emulated=True, target=ForwardCost(25.0, 1.0), target_prefill=ForwardCost(30.0)
    )
    runner = make_runner(target.model, profile, "target")
    assert isinstance(runner, PaddedRunner)
    t0 = time.perf_counter()
    runner.prefill([1, 2, 3])
    assert (time.perf_counter() - t0) * 1e3 >= 30.0
    t0 = time.perf_counter()
    logits = runner.extend([4, 5, 6, 7])
    assert (time.perf_counter() - t0) * 1e3 >= 29.0  # 25 + 1 * 4 tokens
    plain = ModelRunner(target.model)
    plain.prefill([1, 2, 3])
    assert torch.equal(logits, plain.extend([4, 5, 6, 7]))  # padding never changes outputs
    # The verifier engine pads its forwards too, and says which profile it runs.
    engine = VerifierEngine(target.model, compute_profile=profile)
    opened = engine.open_session([1, 2, 3], SamplingParams(max_new_tokens=4))
    assert opened.compute_profile == "test" and opened.prefill_ms >= 30.0
    result = engine.verify(opened.session_id, DraftBlock(seq=0, base_len=3, tokens=(9, 9)))
    assert result.verdict.verify_ms >= 28.0  # 25 + 1 * 3 positions fed


def test_cut_link_during_pipelined_and_cloud_only_rounds_reconnects(draft, target, emulator):
    """A link cut while blocks are in flight ahead (and while a cloud-only chunk streams): the
    session reopens with the committed prefix, drops what was drafted ahead, output unchanged."""
    params = SamplingParams(max_new_tokens=40)
    prompt = PROMPTS[1]
    expected = reference(target, prompt, params)
    script = [Decision(SPECULATIVE, 3), Decision(SPECULATIVE, 2), Decision(CLOUD_ONLY, 0, 4)]

    async def body():
        engine = make_engine(draft, emulator.address, max_retries=6)  # outlasts the 0.3 s cut
        streamed: list[int] = []
        summary = None
        try:
            gen = engine.generate(prompt, params, policy=ScriptedPolicy(script), pipelined=True)
            async for event in gen:
                if isinstance(event, TokensEvent):
                    if not streamed:
                        emulator.cut()
                        asyncio.get_running_loop().call_later(0.3, emulator.restore)
                    streamed.extend(event.tokens)
                else:
                    summary = event
        finally:
            emulator.restore()
            await engine.aclose()
        return streamed, summary

    streamed, summary = asyncio.run(body())
    assert summary is not None
    assert summary.tokens == streamed == expected
    assert summary.stats.reconnects >= 1


# ---------------------------------------------------------------- msgpack round traces


def test_round_trace_written_per_generation_reads_back(draft, emulator, tmp_path):
    from edgespec.edge.trace import read_trace, write_trace

    params = SamplingParams(max_new_tokens=24)

    async def body():
        engine = make_engine(draft, emulator.address, trace_dir=str(tmp_path))
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
