"""A client that vanishes at any point of a generation leaves no verifier session behind (issue 11,
"cancellation everywhere"), over real gRPC: Edge server -> Verifier server (real tiny models,
one of them slowed at the point under test).

Points: during OpenSession (the verifier's prefill is slow; the client's deadline expires), during
a block (the verifier's block forward is slow; the client cancels), during a cloud-only stream,
and between blocks (the edge's draft is slow; the client cancels after the first tokens).
Afterwards the verifier holds no session (bounded wait) and its active-sessions gauge equals the
engine's count; and the stack still serves.
"""

from __future__ import annotations

import grpc
import pytest
from support.reliability_stack import DEADLINE_S, Stack, inject_forward_fault, wait_until
from support.verifier_client import block, open_session

from edgespec import Client
from edgespec.core.models import load_tokenizer
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

PROMPT = [250, 17, 5, 88, 7, 200, 13, 42, 99, 150, 3, 60, 21, 8]
DRAIN_S = 10.0  # bounded wait for the verifier to drop a session


@pytest.fixture(scope="module")
def models(tiny_pair):
    target = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    draft = ModelRunner.from_pretrained(tiny_pair.draft_dir, device="cpu").model
    return target, draft, load_tokenizer(tiny_pair.draft_dir)


def _stack(models, *, target=None, draft=None) -> Stack:
    t, d, tokenizer = models
    return Stack(target if target is not None else t, draft if draft is not None else d, tokenizer)


def _request(policy: str = "fixed", max_new: int = 40) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt_ids=pb.TokenIds(ids=PROMPT),
        params=pb.SamplingParams(max_new_tokens=max_new),
        policy=policy,
        draft_tokens=3,
        pipelined=False,
    )


def _assert_clean(stack: Stack) -> None:
    """No session left on the verifier, the gauge agrees, and a new generation is served."""
    assert wait_until(lambda: stack.sessions == 0, DRAIN_S), f"{stack.sessions} sessions left"
    assert wait_until(lambda: stack.gauge == stack.sessions, DRAIN_S), (stack.gauge, stack.sessions)
    with Client(stack.edge.address, timeout=DEADLINE_S) as client:
        result = client.generate(PROMPT, SamplingParams(max_new_tokens=3), policy="fixed")
    assert len(result.token_ids) == 3
    assert wait_until(lambda: stack.sessions == 0 and stack.gauge == 0, DRAIN_S)


def test_deadline_during_open_session(models):
    """The verifier's prefill takes 1 s; the client gives up after 0.3 s, while OpenSession is
    in flight: the session it opens afterwards is closed."""
    target = inject_forward_fault(models[0], "slow", prefill=True, delay_s=1.0)
    stack = _stack(models, target=target)
    try:
        stub = pb_grpc.EdgeStub(grpc.insecure_channel(stack.edge.address))
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(_request(), timeout=0.3))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert target.started.is_set()  # the prefill had started: OpenSession was in flight
        _assert_clean(stack)
        assert stack.opened >= 1
    finally:
        stack.stop()


@pytest.mark.parametrize("policy", ["fixed", "cloud_only"])
def test_cancel_during_a_block_or_a_cloud_only_stream(models, policy):
    """The verifier's block forwards take 0.5 s; the client cancels while one is running."""
    target = inject_forward_fault(models[0], "slow", delay_s=0.5)
    stack = _stack(models, target=target)
    try:
        stub = pb_grpc.EdgeStub(grpc.insecure_channel(stack.edge.address))
        call = stub.Generate(_request(policy), timeout=DEADLINE_S)
        if policy == "cloud_only":
            next(call)  # the stream has begun: tokens arrive one by one
            target.started.clear()
        assert target.started.wait(DEADLINE_S)  # a block's forward is running
        assert stack.sessions == 1
        call.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        _assert_clean(stack)
    finally:
        stack.stop()


def test_deadline_during_a_block(models):
    target = inject_forward_fault(models[0], "slow", delay_s=0.5)
    stack = _stack(models, target=target)
    try:
        client = Client(stack.edge.address, timeout=1.0)
        with client, pytest.raises(TimeoutError):
            client.generate(PROMPT, SamplingParams(max_new_tokens=40), policy="fixed")
        _assert_clean(stack)
    finally:
        stack.stop()


def test_cancel_between_blocks(models):
    """The edge's draft forwards take 0.3 s: after the first tokens the edge is drafting, not
    waiting on the verifier, when the client cancels."""
    draft = inject_forward_fault(models[1], "slow", delay_s=0.3)
    stack = _stack(models, draft=draft)
    try:
        stub = pb_grpc.EdgeStub(grpc.insecure_channel(stack.edge.address))
        call = stub.Generate(_request("fixed"), timeout=DEADLINE_S)
        first = next(call)
        assert first.tokens.ids
        draft.started.clear()
        assert draft.started.wait(DEADLINE_S)  # drafting the next block
        assert stack.sessions == 1
        call.cancel()
        with pytest.raises(grpc.RpcError):
            list(call)
        _assert_clean(stack)
    finally:
        stack.stop()


def test_close_session_while_the_model_thread_is_busy(models):
    """CloseSession must not wait behind model work: with 64 busy sessions (the soak) the close
    queued behind forwards, missed its deadline and the session stayed until the idle TTL. Here
    one session's block forward takes 2 s; closing another answers within 0.5 s."""
    target = inject_forward_fault(models[0], "slow", delay_s=2.0)
    stack = _stack(models, target=target)
    try:
        stub = pb_grpc.VerifierStub(grpc.insecure_channel(stack.verifier.address))
        busy = open_session(stub, prefix=PROMPT, metadata=())
        idle = open_session(stub, prefix=PROMPT, metadata=())
        verdicts = stub.VerifyStream(
            iter([block(busy.session_id, 0, len(PROMPT), [1, 2])]), timeout=DEADLINE_S
        )
        assert target.started.wait(DEADLINE_S)  # the block's forward is running
        reply = stub.CloseSession(pb.CloseSessionRequest(session_id=idle.session_id), timeout=0.5)
        assert reply.existed and stack.sessions == 1
        assert len(list(verdicts)) == 1  # the busy session is served as before
        stub.CloseSession(pb.CloseSessionRequest(session_id=busy.session_id), timeout=DEADLINE_S)
        _assert_clean(stack)
    finally:
        stack.stop()
