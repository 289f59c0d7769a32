"""Pipelined blocks and the pieces under the policies: a pipelined block with a wrong anchor is
STALE and changes nothing (engine level), the pipelined core loop's hits and misses, decode
(cloud-only) blocks streamed over gRPC and ended by a stop token; a round record becomes the
controller's observation, the pipelined cost model hides round trips; compute profiles (padding
is a lower bound on a forward's time).
"""

from __future__ import annotations

import queue
import time
from dataclasses import replace

import grpc
import pytest
import torch

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import Outcome
from edgespec.core.cost_model import CostModel, best_k
from edgespec.core.drafter import Drafter
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.policies import CLOUD_ONLY
from edgespec.core.profiles import (
    ComputeProfile,
    ForwardCost,
    PaddedRunner,
    get_profile,
    make_runner,
)
from edgespec.core.runner import ModelRunner
from edgespec.core.session import DraftBlock
from edgespec.core.verifier import Verifier
from edgespec.edge.records import RoundRecord, observation_from_record
from edgespec.edge.round_timing import RoundTiming
from edgespec.protos.convert import block_to_proto, params_to_proto
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

DEADLINE_S = 30.0
PROMPTS = ([7, 200, 13, 42, 99, 150, 3], [1, 2, 3], [250, 17, 5, 88])


def reference(target: ModelRunner, prompt: list[int], params: SamplingParams) -> list[int]:
    return generate_autoregressive(target, prompt, params).tokens


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
    # after a tree: the anchor holds, the guessed path before it does not
    path = (prompt[-3], (prompt[-2] + 1) % 300)
    wrong = DraftBlock(
        seq=1, base_len=len(prompt), tokens=(5, 6), anchor_token=last, anchor_prefix=path
    )
    assert engine.verify(opened.session_id, wrong).outcome is Outcome.STALE
    assert engine.stats().stale == 2 and engine.committed(opened.session_id) == prompt
    right = DraftBlock(
        seq=2, base_len=len(prompt), tokens=(5, 6), anchor_token=last, anchor_prefix=prompt[-3:-1]
    )
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


def test_decode_block_streams_target_tokens_over_grpc(target, grpc_verifier):
    prompt = PROMPTS[1]
    expected = reference(target, prompt, SamplingParams(max_new_tokens=12))
    with grpc.insecure_channel(grpc_verifier.address) as channel:
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


def _fresh_round() -> RoundRecord:
    """A fresh round: drafted (6 ms), sent and verified (10 ms) in turn within its 19 ms."""
    timing = RoundTiming(
        wall_ms=12.0, verify_ms=10.0, queue_ms=0.5, network_ms=1.5, bytes_sent=1, bytes_received=1
    )
    return RoundRecord(
        seq=1, k=4, drafted=4, accepted=4, draft_ms=6.0, round_ms=19.0, apply_ms=0.2,
        timing=timing, attempts=1, tokens=5,
    )  # fmt: skip


def test_round_overhead_counts_only_the_drafting_on_the_rounds_own_time():
    fresh = _fresh_round()
    timing = fresh.timing
    assert fresh.on_path_draft_ms == 6.0
    assert fresh.overhead_ms == pytest.approx(19.0 + 0.2 - 6.0 - 10.0)  # apply_ms stands in
    # measured: verdict read -> recorded (parse, apply, bookkeeping) is the round's too
    assert replace(fresh, commit_ms=0.5).cycle_ms == 19.5
    assert replace(fresh, commit_ms=0.5).overhead_ms == pytest.approx(19.5 - 6.0 - 10.0)
    # drafted ahead during the round before: its 8 ms of drafting is not on this round's 11 ms
    ahead = replace(fresh, pipelined=True, draft_ms=8.0, round_ms=11.0)
    assert ahead.on_path_draft_ms == 0.0
    assert ahead.overhead_ms == pytest.approx(11.0 + 0.2 - 10.0)
    # the old definition subtracted it anyway: negative, which no framework time can be
    assert ahead.round_ms + ahead.apply_ms - ahead.draft_ms - timing.verify_ms < 0


def test_round_overhead_takes_the_longer_of_the_forward_and_the_drafting_ahead_beside_it():
    fresh = replace(_fresh_round(), commit_ms=0.5)
    timing = fresh.timing
    # drafting ahead shorter than the forward: the forward is the path, as without pipelining
    short = replace(fresh, ahead_draft_ms=7.0)
    assert short.overhead_ms == pytest.approx(fresh.overhead_ms) == pytest.approx(19.5 - 6 - 10)
    # drafting ahead that outlasts the forward: the verdict waited for it (read after it)
    long = replace(fresh, ahead_draft_ms=12.5, round_ms=21.0)
    assert long.overhead_ms == pytest.approx(21.5 - 6.0 - 12.5)
    # control: subtracting the forward alone would call 2.5 ms of drafting the link's
    assert long.cycle_ms - long.on_path_draft_ms - timing.verify_ms == pytest.approx(5.5)
    # a round whose own block was drafted ahead (nothing on its own time) drafts the next too
    piped = replace(long, pipelined=True, round_ms=13.0)
    assert piped.overhead_ms == pytest.approx(13.5 - 12.5)


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
    # ... and a miss waits for the block drafted ahead: 4 forwards (200 ms) against the verdict's
    # 2 ms return, 198 ms on top of the serial round
    assert slow_draft.expected_round_ms(3, 0.0) == pytest.approx(slow_draft.round_ms(3) + 198.0)
    # a tree of 3 levels and 20 nodes: 21 positions verified, the same drafting
    assert slow_draft.expected_round_ms(3, 0.0, 21) == pytest.approx(152.0 + 198.0)
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
