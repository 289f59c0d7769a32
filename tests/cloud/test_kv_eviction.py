"""Admission by what sessions hold, and eviction under the KV budget (`kv_admission` "evict").

The victim rules (`cloud.eviction.choose_victims`: the most recently admitted first, never the
oldest); the engine's batched steps evicting the newest session when the caches would pass the
budget, its next block answered ABORTED (evicted) with a retry hint, its reopen with the
committed prefix recognised as a resume that keeps its rank and is admitted before new sessions
(evicted ones in their admission order); a finished session dropped first; over gRPC the ABORTED
status with its trailers and the eviction metrics. "reserve" (the default) is unchanged: see
test_step_scheduler.
"""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest
from prometheus_client import CollectorRegistry
from support.servers import VerifierServerThread
from support.verifier_client import DEADLINE_S, PROMPT, VerifyStream, block, open_session

from edgespec.cloud.batch_step import VerifyWork, run_step
from edgespec.cloud.eviction import EvictionLedger, choose_victims
from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import (
    ABORTED,
    RESOURCE_EXHAUSTED,
    Outcome,
    ServiceError,
    VerifierConfig,
    VerifyResult,
)
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.session import DraftBlock
from edgespec.protos.convert import EVICTED_METADATA_KEY, RETRY_AFTER_METADATA_KEY
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc
from edgespec.serving.verifier_metrics import VerifierMetrics

PARAMS = SamplingParams(max_new_tokens=24)
# Each session's most is 6 + 24 + 4 = 34 <= 40; three sessions of 6 tokens are admitted
# (held + prefix + one block: 10, 16, 22), and outgrow the budget after a few blocks.
EVICT = VerifierConfig(
    max_block_tokens=4, kv_budget_tokens=40, kv_admission="evict", retry_after_ms=100
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_victims_are_the_newest_and_never_the_oldest() -> None:
    held = {"a": (1, 10), "b": (2, 10), "c": (3, 10)}
    assert choose_victims(held, 0) == []
    assert choose_victims(held, 5) == ["c"]
    assert choose_victims(held, 11) == ["c", "b"]
    assert choose_victims(held, 100) == ["c", "b"]  # "a", the oldest, always runs
    assert choose_victims({"a": (1, 50)}, 10) == []
    # a finished session (its edge has only to close it) goes first, even the oldest
    assert choose_victims(held, 5, finished={"a"}) == ["a"]
    assert choose_victims(held, 15, finished={"a"}) == ["a", "c"]


def test_ledger_recognises_a_reopen_by_its_prefix_until_the_hold_ends() -> None:
    ledger = EvictionLedger(hold_s=1.0, capacity=2)
    rank = ledger.new_rank()
    entry = ledger.record("s1", [1, 2, 3], rank, 1, now=0.0)
    assert ledger.by_id("s1") is entry and ledger.match([1, 2, 3]) is entry
    assert ledger.match([1, 2]) is None and ledger.waiting(0.5) == [entry]
    ledger.forget_id("s1")  # its edge closed the old id: the reopen is still recognised
    assert ledger.by_id("s1") is None and ledger.match([1, 2, 3]) is entry
    assert ledger.waiting(1.5) == [] and ledger.match([1, 2, 3]) is entry  # holds no one up
    ledger.expire(before=1.0)  # the idle TTL's reaping drops it
    assert ledger.match([1, 2, 3]) is None
    for i in range(3):  # bounded
        ledger.record(f"x{i}", [i], ledger.new_rank(), 1, now=2.0)
    assert ledger.by_id("x0") is None and ledger.by_id("x2") is not None


def _expected(model) -> list[int]:
    return generate_autoregressive(ModelRunner(model), PROMPT, PARAMS).tokens


def _step(engine: VerifierEngine, sessions: dict[str, list[int]], seq: int) -> dict:
    """One batched step: a block of the target's own next 4 tokens for every session (`sessions`
    maps its id to the target alone's output); returns the outcomes by session."""
    work = []
    for sid, expected in sessions.items():
        prompt_len = engine.session(sid).open_len
        have = len(engine.committed(sid)) - prompt_len
        tokens = tuple(expected[have : have + 4])
        work.append(VerifyWork(sid, DraftBlock(seq, prompt_len + have, tokens)))
    outcomes, _ = run_step(engine, work)
    return dict(zip(sessions, outcomes, strict=True))


def test_the_newest_session_is_evicted_and_resumes_first_with_its_rank(target_model) -> None:
    clock = Clock()
    engine = VerifierEngine(target_model, EVICT, clock=clock)
    expected = _expected(target_model)
    ids = [engine.open_session(PROMPT, PARAMS).session_id for _ in range(3)]
    ranks = {sid: engine.session(sid).rank for sid in ids}
    assert ranks[ids[0]] < ranks[ids[1]] < ranks[ids[2]]
    live = dict.fromkeys(ids, expected)
    evicted: list[str] = []
    for seq in range(3):
        for sid, outcome in _step(engine, live, seq).items():
            if isinstance(outcome, ServiceError):
                assert outcome.code == ABORTED and outcome.evicted
                assert outcome.retry_after_ms == 100 and "evicted" in outcome.message
                evicted.append(sid)
            else:
                assert isinstance(outcome, VerifyResult) and outcome.outcome is Outcome.APPLIED
        live = {sid: expected for sid in live if sid not in evicted}
        assert engine.kv_tokens() <= 40
    assert evicted[0] == ids[2]  # the most recently admitted went first
    assert ids[0] not in evicted  # the oldest is never evicted
    assert engine.stats().evicted == len(evicted)
    with pytest.raises(ServiceError) as info:  # its stream's next block learns it
        engine.session(ids[2])
    assert info.value.code == ABORTED and info.value.evicted
    assert evicted == [ids[2]]  # after its first block (0..2: 30 cached + 15 fed > 40 at 1)
    for sid in live:
        engine.close_session(sid)
    # A new session waits while an evicted one is expected back...
    with pytest.raises(ServiceError) as info:
        engine.open_session(PROMPT, PARAMS)
    assert info.value.code == RESOURCE_EXHAUSTED and "evicted" in info.value.message
    # ...which reopens with its committed prefix: recognised, keeping its rank.
    prefix = PROMPT + expected[:5]  # its one block: 4 accepted + 1
    reopened = engine.open_session(prefix, PARAMS, generated=5)
    assert reopened.resumed and engine.stats().resumed == 1
    assert engine.session(reopened.session_id).rank == ranks[ids[2]]
    clock.now += 1.0  # any other evicted session never came back: the hold (0.4 s) ends
    assert not engine.open_session(PROMPT, PARAMS).resumed


def test_evicted_sessions_resume_in_their_admission_order(target_model) -> None:
    engine = VerifierEngine(target_model, EVICT, clock=Clock())
    prompts = [PROMPT, PROMPT, PROMPT[::-1], [7, *PROMPT[1:]]]  # c and d: prompts of their own
    runner = ModelRunner(target_model)
    outputs = [generate_autoregressive(runner, p, PARAMS).tokens for p in prompts]
    ids = [engine.open_session(p, PARAMS).session_id for p in prompts]
    live = dict(zip(ids, outputs, strict=True))
    _step(engine, live, 0)  # 4 x 5 cached + 4 x 5 fed = 40: fits
    outcomes = _step(engine, live, 1)  # 40 + 20 > 40: the two newest go
    assert [sid for sid, o in outcomes.items() if isinstance(o, ServiceError)] == ids[2:]
    for sid in ids[:2]:
        engine.close_session(sid)
    committed = [prompts[i] + outputs[i][:5] for i in (2, 3)]  # one block: 4 accepted + 1
    with pytest.raises(ServiceError) as info:  # d's turn comes after c's
        engine.open_session(committed[1], PARAMS, generated=5)
    assert info.value.code == RESOURCE_EXHAUSTED and "admission order" in info.value.message
    c = engine.open_session(committed[0], PARAMS, generated=5)
    d = engine.open_session(committed[1], PARAMS, generated=5)
    assert c.resumed and d.resumed
    assert engine.session(c.session_id).rank < engine.session(d.session_id).rank


def test_a_finished_session_is_reclaimed_before_anyone_is_evicted(target_model) -> None:
    """One block per forward (`VerifierEngine.verify`, no batching): the finished session, whose
    edge has only to close it, is dropped first, even though it is the oldest."""
    engine = VerifierEngine(target_model, EVICT)
    expected = _expected(target_model)
    done = engine.open_session(PROMPT, PARAMS).session_id
    seq = 0
    while (have := len(engine.committed(done)) - len(PROMPT)) < PARAMS.max_new_tokens:
        k = min(4, PARAMS.max_new_tokens - have - 1)
        engine.verify(done, DraftBlock(seq, len(PROMPT) + have, tuple(expected[have : have + k])))
        seq += 1
    assert engine.session(done).finished
    other = engine.open_session(PROMPT, PARAMS).session_id  # 30 held + 6 + 4 = 40: admitted
    for seq in range(2):  # the second block: 29 + 10 + 5 > 40
        block = DraftBlock(seq, len(PROMPT) + 5 * seq, tuple(expected[5 * seq : 5 * seq + 4]))
        assert engine.verify(other, block).outcome is Outcome.APPLIED
    stats = engine.stats()
    assert (stats.reclaimed, stats.evicted, stats.sessions) == (1, 0, 1)
    with pytest.raises(ServiceError) as info:  # dropped like a close: no resume is waited for
        engine.session(done)
    assert info.value.code == "NOT_FOUND"


def test_reserve_admission_never_evicts(target_model) -> None:
    config = VerifierConfig(max_block_tokens=4, kv_budget_tokens=80)
    engine = VerifierEngine(target_model, config)
    expected = _expected(target_model)
    ids = [engine.open_session(PROMPT, PARAMS).session_id for _ in range(2)]  # 2 x 34 <= 80
    with pytest.raises(ServiceError):
        engine.open_session(PROMPT, PARAMS)
    for seq in range(4):  # to 20 tokens each
        outcomes = _step(engine, dict.fromkeys(ids, expected), seq)
        assert all(isinstance(o, VerifyResult) for o in outcomes.values())
    assert engine.stats().evicted == 0
    with pytest.raises(ValueError, match="kv_admission"):
        VerifierConfig(kv_admission="lru")


def test_eviction_over_grpc_is_aborted_with_its_trailers_and_counted(target_model) -> None:
    # The old session (most 6 + 32 + 4 = 42) grows until the new one (12 prompt tokens, most
    # 40) must go: at its sixth block, 30 + 5 cached and fed plus the new one's 11 > 44.
    registry = CollectorRegistry()
    config = replace(EVICT, kv_budget_tokens=44)
    server = VerifierServerThread(
        VerifierEngine(target_model, config), metrics=VerifierMetrics(registry)
    )
    long = SamplingParams(max_new_tokens=32)
    expected = generate_autoregressive(ModelRunner(target_model), PROMPT, long).tokens
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.VerifierStub(channel)
            old = open_session(stub, params=long, metadata=())
            new = open_session(stub, prefix=PROMPT * 2, params=PARAMS, metadata=())
            with VerifyStream(stub, metadata=()) as stream:
                for seq in range(6):
                    tokens = expected[5 * seq : 5 * seq + 4]
                    verdict = stream.send(block(old.session_id, seq, len(PROMPT) + 5 * seq, tokens))
                    assert verdict.committed_len == len(PROMPT) + 5 * seq + 5
            assert server.engine.stats().evicted == 1
            with pytest.raises(grpc.RpcError) as info, VerifyStream(stub, metadata=()) as stream:
                stream.send(block(new.session_id, 0, 2 * len(PROMPT), [1, 2]))
            assert info.value.code() == grpc.StatusCode.ABORTED
            trailers = dict(info.value.trailing_metadata() or ())
            assert trailers[EVICTED_METADATA_KEY] == "1"
            assert trailers[RETRY_AFTER_METADATA_KEY] == "100"
            assert "evicted" in info.value.details()
            stub.CloseSession(pb.CloseSessionRequest(session_id=old.session_id), timeout=DEADLINE_S)
        assert registry.get_sample_value("edgespec_verifier_evictions_total") >= 1
        assert registry.get_sample_value("edgespec_verifier_active_sessions") == 0
    finally:
        server.stop()


def test_an_eviction_that_left_its_session_open_fails_that_item_alone(
    target_model, monkeypatch
) -> None:
    """A broken invariant of the engine's (make_room names a session it did not close) costs
    that session's item an INTERNAL answer; the step goes on for the others."""
    engine = VerifierEngine(target_model, EVICT)
    expected = _expected(target_model)
    ids = [engine.open_session(PROMPT, PARAMS).session_id for _ in range(2)]
    monkeypatch.setattr(engine, "make_room", lambda feeds: [ids[1]])  # "evicted", still open
    outcomes = _step(engine, dict.fromkeys(ids, expected), 0)
    assert isinstance(outcomes[ids[0]], VerifyResult)
    assert outcomes[ids[0]].outcome is Outcome.APPLIED
    assert isinstance(outcomes[ids[1]], ServiceError) and outcomes[ids[1]].code == "INTERNAL"
