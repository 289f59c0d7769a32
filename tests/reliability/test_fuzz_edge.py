"""Fuzzing the Edge service with hypothesis (issue 11, reliability suite): random
`GenerateRequest`s (extreme, NaN, negative and huge numbers, bad policies, long and empty prompts,
text prompts) into a running Edge server over real gRPC on 127.0.0.1, a real Verifier behind it.

Every answer is OK, or one of the documented statuses naming what is wrong: INVALID_ARGUMENT with
the field in the ``edgespec-field`` trailer. Never UNKNOWN or INTERNAL; no verifier session is
left behind; the service still serves afterwards. Examples: EDGESPEC_FUZZ_EXAMPLES (default 150).
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.reliability_stack import Stack, wait_until

from edgespec.core.models import load_tokenizer
from edgespec.core.runner import ModelRunner
from edgespec.edge.config import EngineConfig
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

EXAMPLES = int(os.environ.get("EDGESPEC_FUZZ_EXAMPLES", "150"))
CALL_DEADLINE_S = 60.0  # generous: a loaded CI box runs a 64-token generation slowly
VOCAB = 300
INT32 = (-(2**31), 2**31 - 1)
# Statuses a request may get besides OK; INVALID_ARGUMENT must name the field.
DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT}
FIELDS = (
    "prompt",
    "prompt_ids",
    "params",
    "draft_tokens",
    "policy",
    "pipelined",
)

OUTCOMES: collections.Counter[str] = collections.Counter()
FIELD_COUNTS: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module")
def stack(tiny_pair) -> Iterator[Stack]:
    target = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    draft = ModelRunner.from_pretrained(tiny_pair.draft_dir, device="cpu").model
    stack = Stack(
        target,
        draft,
        load_tokenizer(tiny_pair.draft_dir),
        engine_config=EngineConfig(max_k=16, backoff_initial_s=0.01, backoff_max_s=0.05),
    )
    yield stack
    stack.stop()


def _floats() -> st.SearchStrategy[float]:
    special = st.sampled_from(
        [
            0.0,
            -0.0,
            1.0,
            1e-300,
            5e-324,
            1e-45,
            2.0**-149,
            1e30,
            -1.0,
            math.inf,
            -math.inf,
            math.nan,
        ]
    )
    return st.one_of(special, st.floats(allow_nan=True, allow_infinity=True, width=32))


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([lo, -1, 0, 1, 2, VOCAB - 1, VOCAB, hi]), st.integers(lo, hi))


def _mostly(valid: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """Valid values 11 times in 12, so that about half the requests reach the verifier."""
    return st.integers(0, 11).flatmap(lambda i: bad if i == 11 else valid)


@st.composite
def requests(draw) -> pb.GenerateRequest:
    msg = pb.GenerateRequest()
    which = draw(st.sampled_from(["ids"] * 6 + ["text", "none", "empty_ids", "long_ids"]))
    if which == "ids":
        token = _mostly(st.integers(0, VOCAB - 1), _ints(*INT32))
        msg.prompt_ids.ids.extend(draw(st.lists(token, min_size=1, max_size=12)))
    elif which == "text":
        msg.prompt = draw(st.text(max_size=40))
    elif which == "empty_ids":
        msg.prompt_ids.SetInParent()
    elif which == "long_ids":
        n = draw(st.sampled_from([200, 511, 512, 600, 5000]))
        msg.prompt_ids.ids.extend([7] * n)
    if draw(st.integers(0, 7)) != 7:  # unset params (64 new tokens) now and then
        p = msg.params
        p.temperature = draw(_mostly(st.floats(0.0, 2.0), _floats()))
        p.top_k = draw(_mostly(st.integers(0, 400), _ints(*INT32)))
        p.top_p = draw(_mostly(st.floats(0.0, 1.0), _floats()))
        p.max_new_tokens = draw(_mostly(st.integers(1, 6), _ints(*INT32)))
        p.sampler = draw(_mostly(st.sampled_from([0, 1, 2]), _ints(*INT32)))
        if draw(st.booleans()):
            p.seed = draw(st.integers(0, 2**64 - 1))
        stop = _mostly(st.integers(0, VOCAB - 1), _ints(*INT32))
        p.stop_token_ids.extend(draw(st.lists(stop, max_size=3)))
    msg.draft_tokens = draw(_mostly(st.integers(0, 16), _ints(*INT32)))
    msg.policy = draw(
        _mostly(
            st.sampled_from(["", "fixed", "adaptive", "heuristic", "cloud_only"]),
            st.one_of(st.sampled_from(["FIXED", "nope", "fixed "]), st.text(max_size=10)),
        )
    )
    if draw(st.booleans()):
        msg.pipelined = draw(st.booleans())
    return msg


def _call(stub: pb_grpc.EdgeStub, msg: pb.GenerateRequest) -> tuple[grpc.StatusCode, str, str]:
    """(status, details, field trailer) of one Generate."""
    call = stub.Generate(msg, timeout=CALL_DEADLINE_S)
    try:
        responses = list(call)
    except grpc.RpcError as err:
        trailers = dict(err.trailing_metadata() or ())
        return err.code(), err.details() or "", trailers.get("edgespec-field", "")
    assert responses and responses[-1].HasField("summary"), msg
    return grpc.StatusCode.OK, "", ""


def test_fuzz_generate_requests(stack):
    channel = grpc.insecure_channel(stack.edge.address)
    stub = pb_grpc.EdgeStub(channel)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(requests())
    def check(msg: pb.GenerateRequest) -> None:
        code, details, field = _call(stub, msg)
        OUTCOMES[code.name] += 1
        if field:
            FIELD_COUNTS[field.split("[")[0]] += 1
        assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (code, details, msg)
        if code != grpc.StatusCode.OK:
            assert code in DOCUMENTED, (code, details, msg)
            assert field and field.split(".")[0].split("[")[0] in FIELDS, (field, details, msg)
            assert details.startswith(field), (field, details)

    try:
        check()
    finally:
        print(f"fuzzed {sum(OUTCOMES.values())} Generate requests: {dict(OUTCOMES)}")
        print(f"fields refused: {dict(FIELD_COUNTS)}")
    assert wait_until(lambda: stack.sessions == 0, 10.0), stack.sessions
    ok = pb.GenerateRequest(
        prompt_ids=pb.TokenIds(ids=[5, 6, 7]), params=pb.SamplingParams(max_new_tokens=3)
    )
    assert _call(stub, ok)[0] == grpc.StatusCode.OK  # still serving
    channel.close()
