"""A VerifyStream's blocks queued for a step on arrival (`edgespec.cloud.eager_blocks`), over
real gRPC on 127.0.0.1: blocks sent back to back are verified in order, a block after a decode
block waits for its tokens, a bad block fails in its place, and a stream that goes away leaves
nothing queued behind."""

from __future__ import annotations

import time

import grpc
import pytest
from support.reliability_stack import wait_until
from support.servers import VerifierServerThread
from support.verifier_client import (
    GREEDY,
    PROMPT,
    VerifyStream,
    block,
    open_session,
    target_continuation,
)

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.params import SamplingParams
from edgespec.core.profiles import BatchRoofline, ComputeProfile
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc


@pytest.fixture
def served(start_server):
    server = start_server()
    with grpc.insecure_channel(server.address) as channel:
        yield server, pb_grpc.VerifierStub(channel)


def test_blocks_sent_back_to_back_are_verified_in_order(served, target_model) -> None:
    server, stub = served
    cont = target_continuation(target_model, PROMPT, GREEDY)
    opened = open_session(stub)
    sid = opened.session_id
    stream = VerifyStream(stub)
    try:
        # four blocks of 3 in one go, each assuming the ones before it accepted whole
        stream.write(
            *(
                block(sid if i == 0 else "", i, len(PROMPT) + 4 * i, cont[4 * i : 4 * i + 3])
                for i in range(4)
            )
        )
        verdicts = [stream.read() for _ in range(4)]
    finally:
        stream.close()
    assert [(v.seq, v.outcome, v.accepted) for v in verdicts] == [
        (i, pb.Verdict.APPLIED, 3) for i in range(4)
    ]
    assert server.engine.committed(sid) == PROMPT + cont[:16]
    assert server.running.scheduler.overlapped >= 1  # queued ahead, started before answered


def test_a_block_after_a_decode_block_waits_for_its_tokens(served, target_model) -> None:
    server, stub = served
    cont = target_continuation(target_model, PROMPT, GREEDY)
    sid = open_session(stub).session_id
    stream = VerifyStream(stub)
    try:
        stream.write(
            pb.DraftBlock(session_id=sid, seq=0, base_len=len(PROMPT), decode_tokens=3),
            block("", 1, len(PROMPT) + 3, cont[3:5]),  # valid only after the three tokens
        )
        verdicts = [stream.read() for _ in range(4)]
    finally:
        stream.close()
    assert [(v.seq, v.outcome) for v in verdicts] == [(0, pb.Verdict.APPLIED)] * 3 + [
        (1, pb.Verdict.APPLIED)
    ]
    assert [v.token for v in verdicts[:3]] == cont[:3] and verdicts[3].accepted == 2
    assert server.engine.committed(sid) == PROMPT + cont[:6]


def test_a_bad_block_fails_in_its_place_after_the_ones_before_it(served, target_model) -> None:
    _, stub = served
    cont = target_continuation(target_model, PROMPT, GREEDY)
    sid = open_session(stub).session_id
    other = open_session(stub).session_id
    stream = VerifyStream(stub)
    try:
        stream.write(
            block(sid, 0, len(PROMPT), cont[:3]),
            block(other, 1, len(PROMPT) + 4, cont[4:6]),  # another session on this stream
            block("", 2, len(PROMPT) + 7, cont[7:9]),
        )
        first = stream.read()
        with pytest.raises(grpc.RpcError) as err:
            stream.read()
    finally:
        stream.close()
    assert (first.seq, first.accepted) == (0, 3)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "session_id" in err.value.details()


def test_a_stream_that_goes_away_leaves_nothing_queued(target_model) -> None:
    """Blocks queued on arrival and never answered are dropped when their stream is cancelled
    (one whose step has begun runs and is discarded); a new stream continues the session from
    what it committed. Steps take 300 ms (emulated), so the cancel lands while the first block
    runs and the five after it wait."""
    profile = ComputeProfile("slow-steps", emulated=True, target_batch=BatchRoofline(300.0))
    engine = VerifierEngine(target_model, VerifierConfig(), compute_profile=profile)
    server = VerifierServerThread(engine)
    try:
        cont = target_continuation(target_model, PROMPT, GREEDY)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.VerifierStub(channel)
            sid = open_session(stub, params=SamplingParams(max_new_tokens=40)).session_id
            stream = VerifyStream(stub)
            stream.write(
                *(
                    block(sid if i == 0 else "", i, len(PROMPT) + 3 * i, cont[3 * i : 3 * i + 2])
                    for i in range(6)
                )
            )
            time.sleep(0.1)
            stream.close()
            scheduler = server.running.scheduler
            assert wait_until(
                lambda: scheduler.queue_depth == 0 and not scheduler.running, timeout_s=5.0
            )
            assert engine.committed(sid) == PROMPT + cont[:3]  # the first block only
            stream = VerifyStream(stub)
            try:
                stream.write(block(sid, 1, len(PROMPT) + 3, cont[3:5]))
                verdict = stream.read()
            finally:
                stream.close()
        assert (verdict.outcome, verdict.accepted) == (pb.Verdict.APPLIED, 2)
    finally:
        server.stop()
