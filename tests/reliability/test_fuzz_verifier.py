"""Fuzzing (hypothesis) of the Verifier service over real gRPC and of the proto conversions.

Random OpenSession / DraftBlock streams / CloseSession requests (extreme and negative ints, NaN
and infinite floats, empty and huge token lists, unknown and real session ids, undecodable
bytes) go to a running verifier on 127.0.0.1. Every answer must be OK or a documented status
(ALLOWED), never UNKNOWN or INTERNAL; an INVALID_ARGUMENT or NOT_FOUND names the field at fault
in the `edgespec-field` trailer and starts its details with it. Afterwards the service still
serves a normal request and holds no session (the gauge agrees).

The conversions in `edgespec.protos.convert` get random messages: they return a value or raise
`FieldError` naming the field, nothing else.

Examples per test: EDGESPEC_FUZZ_EXAMPLES (default 50; CI runs 4 tests, ~200 in all). A long
run: ``EDGESPEC_FUZZ_EXAMPLES=1000 pytest -s tests/test_fuzz_verifier.py`` (the counts of
answers by status are printed at the end of the module).
"""

from __future__ import annotations

import collections
import math
import os
import re
import sys

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from support.servers import VerifierServerThread

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.runner import ModelRunner
from edgespec.protos.convert import (
    FIELD_METADATA_KEY,
    FieldError,
    block_from_proto,
    block_to_proto,
    params_from_proto,
    params_to_proto,
    verdict_from_proto,
)
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc
from edgespec.serving.verifier_metrics import VerifierMetrics

EXAMPLES = int(os.environ.get("EDGESPEC_FUZZ_EXAMPLES", "50"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
DEADLINE_S = 20.0
VOCAB = 300  # support.tiny_models TINY_VOCAB_SIZE
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
NAMED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}  # must name the field
ANSWERS: collections.Counter[str] = collections.Counter()  # "<rpc> <status>" -> count

INT32 = st.integers(-(2**31), 2**31 - 1)
UINT64 = st.integers(0, 2**64 - 1)
SMALL = st.integers(0, 40)
# Temperature / top_p in (0, float32's smallest normal) are issue 11 item 4 (core sampling, not
# the verifier's): left to test_tiny_sampling_parameters_are_not_internal below.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
DOUBLES = st.floats(allow_nan=True, allow_infinity=True).filter(
    lambda x: not 0.0 < x < FLOAT32_TINY
)
TOKEN = st.one_of(st.integers(0, VOCAB - 1), INT32)
TOKENS = st.one_of(
    st.lists(st.integers(0, VOCAB - 1), max_size=12),
    st.lists(TOKEN, max_size=12),
    st.lists(st.integers(0, VOCAB - 1), min_size=500, max_size=2000),  # past the positions
)
FLOATS32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def valid_params(draw) -> pb.SamplingParams:
    """Params a verifier accepts (so that the fuzzing reaches verification)."""
    msg = pb.SamplingParams(
        temperature=draw(st.sampled_from([0.0, 0.0, 0.7, 1.0, 1e-6, 1e6])),
        top_k=draw(st.sampled_from([0, 1, 5, 10**6])),
        top_p=draw(st.sampled_from([0.0, 0.5, 1.0, 1e-9])),
        max_new_tokens=draw(st.integers(1, 40)),
        stop_token_ids=draw(st.lists(st.integers(0, VOCAB - 1), max_size=3)),
        sampler=draw(st.sampled_from([0, 1, 2])),
    )
    seed = draw(st.one_of(st.none(), st.integers(0, 2**63 - 1)))
    if seed is not None:
        msg.seed = seed
    return msg


@st.composite
def wild_params(draw) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        temperature=draw(st.one_of(st.sampled_from([0.0, 0.7, 1.0]), DOUBLES)),
        top_k=draw(st.one_of(st.sampled_from([0, 5]), INT32)),
        top_p=draw(st.one_of(st.sampled_from([0.0, 0.9, 1.0]), DOUBLES)),
        max_new_tokens=draw(st.one_of(st.integers(1, 40), INT32)),
        stop_token_ids=draw(st.lists(TOKEN, max_size=4)),
        sampler=draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(-(2**31), 2**31 - 1))),
    )
    seed = draw(st.one_of(st.none(), st.integers(0, 10), UINT64))
    if seed is not None:
        msg.seed = seed
    return msg


sampling_params = st.one_of(valid_params(), wild_params())


@st.composite
def valid_open_requests(draw) -> pb.OpenSessionRequest:
    """An OpenSession a verifier accepts (unless it is full)."""
    return pb.OpenSessionRequest(
        prefix_ids=draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20)),
        params=draw(valid_params()),
        next_seq=draw(st.integers(0, 3)),
    )


@st.composite
def open_requests(draw) -> pb.OpenSessionRequest:
    msg = pb.OpenSessionRequest(
        prefix_ids=draw(
            st.one_of(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20), TOKENS)
        ),
        model_id=draw(st.one_of(st.just(""), st.just(""), st.text(max_size=12))),
        generated=draw(st.one_of(st.just(0), st.integers(0, 3), INT32)),
        next_seq=draw(st.one_of(st.just(0), st.integers(0, 3), UINT64)),
    )
    params = draw(st.one_of(sampling_params, sampling_params, st.none()))
    if params is not None:
        msg.params.CopyFrom(params)
    return msg


@st.composite
def draft_blocks(draw, session_id: str) -> pb.DraftBlock:
    tokens = draw(TOKENS)
    msg = pb.DraftBlock(
        session_id=session_id,
        seq=draw(st.one_of(st.integers(0, 4), UINT64)),
        base_len=draw(st.one_of(st.integers(0, 30), INT32)),
        tokens=tokens,
        decode_tokens=draw(st.one_of(st.just(0), st.integers(0, 8), INT32)),
    )
    anchor = draw(st.one_of(st.none(), TOKEN))
    if anchor is not None:
        msg.anchor_token = anchor
    msg.anchor_prefix.extend(draw(st.lists(TOKEN, max_size=3)))
    form = draw(st.sampled_from(["none", "dense", "uniform", "sparse"]))
    k = len(tokens)
    if form == "dense":
        msg.probs.dense.probs.extend(draw(st.lists(FLOATS32, max_size=2 * VOCAB + 1)))
    elif form == "uniform" and k:
        msg.probs.dense.probs.extend([1.0 / VOCAB] * (k * VOCAB))
    elif form == "sparse":
        sparse = msg.probs.sparse
        sparse.row_lengths.extend(draw(st.lists(st.one_of(st.integers(0, 3), INT32), max_size=4)))
        sparse.ids.extend(draw(st.lists(TOKEN, max_size=8)))
        sparse.probs.extend(draw(st.lists(FLOATS32, max_size=8)))
    return msg


@st.composite
def valid_blocks(draw) -> pb.DraftBlock:
    """A block a session may accept once aimed: k valid tokens with uniform or no probs, or a
    decode block."""
    tokens = draw(st.lists(st.integers(0, VOCAB - 1), max_size=8))
    msg = pb.DraftBlock(tokens=tokens)
    if not tokens:
        msg.decode_tokens = draw(st.integers(0, 6))
    elif draw(st.booleans()):
        msg.probs.dense.probs.extend([1.0 / VOCAB] * (len(tokens) * VOCAB))
    return msg


# One action of a client: open a session, stream blocks (to an opened session, an unknown one,
# or none; maybe with undecodable bytes), close a session. A stream item is raw bytes, or a
# block and whether to aim it (seq and base_len set to what the session expects next).
SESSION_REF = st.one_of(st.integers(0, 2), st.integers(0, 2), st.text(max_size=10))
STREAM_ITEM = st.one_of(
    st.tuples(valid_blocks(), st.just(True)),
    st.tuples(draft_blocks(""), st.booleans()),
    st.binary(min_size=1, max_size=24),
)
ACTIONS = st.one_of(
    st.tuples(st.just("open"), open_requests()),
    st.tuples(st.just("stream"), SESSION_REF, st.lists(STREAM_ITEM, min_size=1, max_size=4)),
    st.tuples(
        st.just("stream"),
        st.integers(0, 2),
        st.lists(st.tuples(valid_blocks(), st.just(True)), min_size=1, max_size=4),
    ),
    st.tuples(st.just("close"), SESSION_REF),
)


def _identity(data: bytes) -> bytes:
    return data


def _check(rpc: str, err: grpc.RpcError | None) -> None:
    """Record the answer; assert it is OK or documented, and names the field where it must."""
    if err is None:
        ANSWERS[f"{rpc} OK"] += 1
        return
    code, details = err.code(), err.details() or ""
    field = dict(err.trailing_metadata() or ()).get(FIELD_METADATA_KEY)
    ANSWERS[f"{rpc} {code.name} {re.sub(r'[0-9]+', '', field or '-')}"] += 1
    assert code in ALLOWED, f"{rpc}: {code.name}: {details}"
    if code in NAMED and "could not be decoded" not in details:
        assert field, f"{rpc}: {code.name} without a field trailer: {details}"
        assert details.startswith(field), f"{rpc}: {details!r} does not start with {field!r}"


@pytest.fixture(scope="module")
def fuzz_server(tiny_pair):
    model = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    config = VerifierConfig(max_sessions=3, max_block_tokens=8)  # 3: some opens find it full
    registry = CollectorRegistry()
    server = VerifierServerThread(VerifierEngine(model, config), metrics=VerifierMetrics(registry))
    server.registry = registry  # type: ignore[attr-defined]
    yield server
    server.stop()
    if ANSWERS:
        print(  # the counts are the point of a long run (pytest -s)
            f"\nfuzz answers ({EXAMPLES} examples per test): {dict(sorted(ANSWERS.items()))}",
            file=sys.stderr,
        )


@pytest.fixture(scope="module")
def channel(fuzz_server):
    with grpc.insecure_channel(fuzz_server.address) as channel:
        yield channel


class _Session:
    """What the fuzzing client knows of a session it opened: where the next block goes."""

    def __init__(self, session_id: str, committed_len: int, next_seq: int) -> None:
        self.id, self.committed_len, self.next_seq = session_id, committed_len, next_seq

    def payload(self, item: tuple[pb.DraftBlock, bool] | bytes) -> bytes:
        """Raw bytes as drawn; a block with this session's id (and aimed, if drawn so)."""
        if isinstance(item, bytes):
            return item
        drawn, aim = item
        block = pb.DraftBlock()
        block.CopyFrom(drawn)
        block.session_id = self.id
        if aim:
            block.seq, block.base_len = self.next_seq, self.committed_len
        return block.SerializeToString()

    def saw(self, verdict: pb.Verdict) -> None:
        ANSWERS[f"verdict {pb.Verdict.Outcome.Name(verdict.outcome)}"] += 1
        self.committed_len = verdict.committed_len
        self.next_seq = max(self.next_seq, verdict.seq + 1)


def _undecodable(payload: bytes) -> bool:
    try:
        pb.DraftBlock.FromString(payload)
    except DecodeError:
        return True
    return False


def _run(channel, actions) -> None:
    stub = pb_grpc.VerifierStub(channel)
    raw_stream = channel.stream_stream(
        "/edgespec.v1.Verifier/VerifyStream",
        request_serializer=_identity,
        response_deserializer=pb.Verdict.FromString,
    )
    opened: list[_Session] = []

    def session(ref) -> _Session:
        if isinstance(ref, int):
            return opened[ref % len(opened)] if opened else _Session("", 1, 0)
        return _Session(ref, 1, 0)

    try:
        for action in actions:
            err: grpc.RpcError | None = None
            try:
                if action[0] == "open":
                    request = action[1]
                    reply = stub.OpenSession(request, timeout=DEADLINE_S)
                    opened.append(_Session(reply.session_id, reply.committed_len, request.next_seq))
                elif action[0] == "close":
                    request = pb.CloseSessionRequest(session_id=session(action[1]).id)
                    stub.CloseSession(request, timeout=DEADLINE_S)
                else:
                    target = session(action[1])
                    payloads = [target.payload(item) for item in action[2]]
                    for verdict in raw_stream(iter(payloads), timeout=DEADLINE_S):
                        target.saw(verdict)
                    # a stream holding bytes that are no DraftBlock must not end OK
                    assert not any(map(_undecodable, payloads)), "corrupt stream ended OK"
            except grpc.RpcError as rpc_err:
                err = rpc_err
            _check(action[0], err)
    finally:
        for opened_session in opened:
            request = pb.CloseSessionRequest(session_id=opened_session.id)
            stub.CloseSession(request, timeout=DEADLINE_S)


@FUZZ
@given(
    opens=st.lists(st.tuples(st.just("open"), valid_open_requests()), max_size=2),
    actions=st.lists(ACTIONS, min_size=1, max_size=4),
)
def test_fuzzed_requests_get_documented_statuses(fuzz_server, channel, opens, actions) -> None:
    _run(channel, opens + actions)


def test_service_serves_and_holds_nothing_after_the_fuzzing(fuzz_server, channel) -> None:
    stub = pb_grpc.VerifierStub(channel)
    opened = stub.OpenSession(
        pb.OpenSessionRequest(prefix_ids=[5, 17, 42], params=pb.SamplingParams(max_new_tokens=4)),
        timeout=DEADLINE_S,
    )
    block = pb.DraftBlock(session_id=opened.session_id, seq=0, base_len=3, tokens=[1, 2])
    (verdict,) = stub.VerifyStream(iter([block]), timeout=DEADLINE_S)
    assert verdict.outcome == pb.Verdict.APPLIED
    stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id), timeout=DEADLINE_S)
    stats = fuzz_server.engine.stats()
    assert stats.sessions == 0
    gauge = fuzz_server.registry.get_sample_value("edgespec_verifier_active_sessions")
    opened_total = fuzz_server.registry.get_sample_value("edgespec_verifier_sessions_opened_total")
    assert (gauge, opened_total) == (0, stats.opened)


# ---------------------------------------------------------------- the conversions


def _assert_names_field(err: FieldError, root: str = "") -> None:
    assert err.field and err.field.startswith(root), err.field
    assert str(err).startswith(err.field), (err.field, str(err))


@FUZZ
@given(msg=sampling_params)
def test_params_from_proto_returns_params_or_a_field_error(msg) -> None:
    try:
        params = params_from_proto(msg)
    except FieldError as err:
        _assert_names_field(err, "params")
        return
    again = params_from_proto(params_to_proto(params))
    assert again == params


@FUZZ
@given(msg=draft_blocks("sid"))
def test_block_from_proto_returns_a_block_or_a_field_error(msg) -> None:
    try:
        block = block_from_proto(msg)
    except FieldError as err:
        _assert_names_field(err)
        return
    again = block_from_proto(block_to_proto(block, "sid"))
    assert (again.seq, again.base_len, again.tokens) == (block.seq, block.base_len, block.tokens)
    assert (again.decode_tokens, again.anchor) == (block.decode_tokens, block.anchor)


@FUZZ
@given(
    seq=UINT64,
    outcome=st.one_of(st.integers(0, 3), st.integers(-5, 100)),
    accepted=INT32,
    token=INT32,
    committed_len=INT32,
    verify_ms=DOUBLES,
)
def test_verdict_from_proto_returns_a_verdict_or_a_field_error(
    seq, outcome, accepted, token, committed_len, verify_ms
) -> None:
    msg = pb.Verdict(
        seq=seq,
        outcome=outcome,
        accepted=accepted,
        token=token,
        committed_len=committed_len,
        verify_ms=verify_ms,
    )
    try:
        verdict = verdict_from_proto(msg)
    except FieldError as err:
        _assert_names_field(err)
        return
    assert verdict.seq == seq and math.isfinite(verdict.verify_ms)


# ---------------------------------------------------------------- issue 11 item 4 (core)


@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_tiny_sampling_parameters_are_not_internal(fuzz_server, channel, field) -> None:
    params = pb.SamplingParams(temperature=1.0, max_new_tokens=4, seed=1)
    setattr(params, field, 5e-324)
    request = pb.OpenSessionRequest(prefix_ids=[5, 17, 42], params=params)
    stub = pb_grpc.VerifierStub(channel)
    err = None
    try:
        opened = stub.OpenSession(request, timeout=DEADLINE_S)
        block = pb.DraftBlock(session_id=opened.session_id, seq=0, base_len=3, decode_tokens=2)
        list(stub.VerifyStream(iter([block]), timeout=DEADLINE_S))
        stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id), timeout=5)
    except grpc.RpcError as rpc_err:
        err = rpc_err
    _check(f"tiny-{field}", err)
