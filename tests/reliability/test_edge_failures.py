"""Failures the edge must neither hide nor leak (issue 11, defects 2(b) and 3), over real gRPC:
a Verifier server whose real target model fails deterministically, an Edge server in front of
it, the SDK client.

- A deterministic verifier error (INTERNAL on every block) is not retried: one generation opens
  one session, the client gets INTERNAL carrying the verifier's own message, and afterwards the
  verifier holds no session (the edge closes every session it stops using).
- A verifier at max_sessions surfaces as RESOURCE_EXHAUSTED with a retry hint, not UNAVAILABLE.
- An unexpected exception in the edge's own code reaches the client as INTERNAL with a message,
  never UNKNOWN.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from support.reliability_stack import DEADLINE_S, Stack, inject_forward_fault, wait_until

from edgespec import Client, EdgespecError, ResourceExhausted
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.models import load_tokenizer
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.edge.config import EngineConfig
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

PROMPT = [250, 17, 5, 88, 7, 200, 13, 42, 99, 150, 3, 60, 21, 8]  # prefill > the fault's cut
RETRIES = EngineConfig(max_retries=6, backoff_initial_s=0.01, backoff_max_s=0.05)


@pytest.fixture(scope="module")
def models(tiny_pair):
    target = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    draft = ModelRunner.from_pretrained(tiny_pair.draft_dir, device="cpu").model
    return target, draft, load_tokenizer(tiny_pair.draft_dir)


def _start(models, **kwargs) -> Stack:
    target, draft, tokenizer = models
    target = kwargs.pop("target", target)
    draft = kwargs.pop("draft", draft)
    return Stack(target, draft, tokenizer, engine_config=RETRIES, **kwargs)


@pytest.fixture(params=["raise", "nan"])
def faulty_stack(request, models) -> Iterator[Stack]:
    """The target's forward raises (the verifier closes the session itself) or returns NaN
    logits, which fail a sampling session's acceptance (the session stays open on the verifier
    unless the edge closes it). `stack.params`: what the generation asks for."""
    stack = _start(models, target=inject_forward_fault(models[0], request.param))
    stack.params = SamplingParams(
        max_new_tokens=8, temperature=0.0 if request.param == "raise" else 0.8, seed=5
    )
    yield stack
    stack.stop()


@pytest.mark.parametrize("pipelined", [False, True])
def test_deterministic_verifier_error_is_not_retried_and_leaks_no_session(faulty_stack, pipelined):
    client = Client(faulty_stack.edge.address, timeout=DEADLINE_S)
    with client, pytest.raises(EdgespecError) as info:
        client.generate(PROMPT, faulty_stack.params, policy="fixed", pipelined=pipelined)
    err = info.value
    assert err.code == grpc.StatusCode.INTERNAL, err
    assert "no verifier answered" not in err.details
    # the verifier's own message, passed on (a failed forward: "target forward failed"; a
    # failed acceptance step: "verification failed")
    assert any(
        text in err.details
        for text in ("target forward failed", "verification failed", "internal error")
    ), err
    # No retry of a deterministic error. Pipelined, the block written ahead may race the
    # verifier's status (the write then fails locally, cause unknown): one retry, not pipelined.
    assert faulty_stack.opened <= (2 if pipelined else 1)
    assert wait_until(lambda: faulty_stack.sessions == 0, 10.0), faulty_stack.sessions


def test_cloud_only_stream_error_is_not_retried_and_leaks_no_session(faulty_stack):
    client = Client(faulty_stack.edge.address, timeout=DEADLINE_S)
    with client, pytest.raises(EdgespecError) as info:
        client.generate(PROMPT, faulty_stack.params, policy="cloud_only")
    assert info.value.code == grpc.StatusCode.INTERNAL, info.value
    assert faulty_stack.opened == 1
    assert wait_until(lambda: faulty_stack.sessions == 0, 10.0), faulty_stack.sessions


def test_full_verifier_is_resource_exhausted_with_a_retry_hint(models):
    stack = _start(models, verifier_config=VerifierConfig(max_sessions=1))
    try:
        held = stack.verifier_engine.open_session(PROMPT, SamplingParams(max_new_tokens=4))
        with Client(stack.edge.address, timeout=DEADLINE_S) as client:
            with pytest.raises(ResourceExhausted) as info:
                client.generate(PROMPT, SamplingParams(max_new_tokens=4))
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_sessions" in info.value.details  # the verifier's own message
            assert "retry" in info.value.details
            assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
            # the hint in the trailing metadata, read on a raw call
            stub = pb_grpc.EdgeStub(grpc.insecure_channel(stack.edge.address))
            request = pb.GenerateRequest(
                prompt_ids=pb.TokenIds(ids=PROMPT), params=pb.SamplingParams(max_new_tokens=4)
            )
            with pytest.raises(grpc.RpcError) as raw:
                list(stub.Generate(request, timeout=DEADLINE_S))
            trailers = dict(raw.value.trailing_metadata() or ())
            assert int(trailers["edgespec-retry-after-ms"]) > 0
            stack.verifier_engine.close_session(held.session_id)
            # room again: served
            assert len(client.generate(PROMPT, SamplingParams(max_new_tokens=4)).token_ids) == 4
        assert stack.drained()
    finally:
        stack.stop()


def test_unexpected_edge_error_is_internal_with_a_message(models):
    draft = inject_forward_fault(models[1], "raise", min_len=6)  # the edge's own draft fails
    stack = _start(models, draft=draft)
    try:
        client = Client(stack.edge.address, timeout=DEADLINE_S)
        with client, pytest.raises(EdgespecError) as info:
            client.generate(PROMPT, SamplingParams(max_new_tokens=8), policy="fixed")
        assert info.value.code == grpc.StatusCode.INTERNAL, info.value
        assert "RuntimeError" in info.value.details and "injected" in info.value.details
        assert "Unexpected <class" not in info.value.details
        assert stack.drained()
    finally:
        stack.stop()
