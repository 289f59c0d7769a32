"""The Verifier service on its failure paths (issue 11): nothing leaked, every failure a status.

Over real gRPC on 127.0.0.1 with the tiny random Llama target. After each failure path the
engine holds no session it should not, and the ``active_sessions`` gauge and
``sessions_opened_total`` equal the engine's own counts.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from prometheus_client import CollectorRegistry
from support.servers import VerifierServerThread

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.params import SamplingParams
from edgespec.core.profiles import ComputeProfile, ForwardCost
from edgespec.core.runner import ModelRunner
from edgespec.protos.convert import FIELD_METADATA_KEY, params_to_proto
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc
from edgespec.serving.verifier_metrics import VerifierMetrics

DEADLINE_S = 20.0
SETTLE_S = 10.0  # bound on waiting for a worker-thread job to finish
PROMPT = [5, 17, 42, 99, 3, 250]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=32)
# A prefill that takes 600 ms whatever the machine: a 200 ms deadline expires during it.
SLOW_PREFILL = ComputeProfile(
    name="slow-prefill", emulated=True, target_prefill=ForwardCost(base_ms=600.0)
)


@pytest.fixture(scope="module")
def target_model(tiny_pair):
    return ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model


@pytest.fixture
def start(target_model) -> Iterator[Callable[..., VerifierServerThread]]:
    """start(config=None, profile=None): a server with metrics (`server.registry`)."""
    started: list[VerifierServerThread] = []

    def run(
        config: VerifierConfig | None = None, profile: ComputeProfile | None = None
    ) -> VerifierServerThread:
        engine = VerifierEngine(target_model, config, compute_profile=profile)
        registry = CollectorRegistry()
        server = VerifierServerThread(engine, metrics=VerifierMetrics(registry))
        server.registry = registry  # type: ignore[attr-defined]
        started.append(server)
        return server

    yield run
    for server in started:
        server.stop()


def metric(server, name: str, **labels) -> float:
    value = server.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def assert_metrics_match_engine(server) -> None:
    stats = server.engine.stats()
    assert metric(server, "edgespec_verifier_active_sessions") == stats.sessions
    assert metric(server, "edgespec_verifier_sessions_opened_total") == stats.opened


def wait_sessions(server, n: int) -> None:
    """Wait (bounded) until the engine holds `n` sessions and the gauge says so too."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        if server.engine.stats().sessions == n and (
            metric(server, "edgespec_verifier_active_sessions") == n
        ):
            return
        time.sleep(0.02)


def open_request(prefix=PROMPT, params=GREEDY) -> pb.OpenSessionRequest:
    return pb.OpenSessionRequest(prefix_ids=prefix, params=params_to_proto(params))


def blocks_stream(stub, blocks: list[pb.DraftBlock]) -> list[pb.Verdict]:
    """Send `blocks` on one stream (then half-close); returns every verdict."""
    return list(stub.VerifyStream(iter(blocks), timeout=DEADLINE_S))


# ---------------------------------------------------------------- 2(a): OpenSession cut short


def test_open_session_past_its_deadline_leaves_no_session(start) -> None:
    server = start(profile=SLOW_PREFILL)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.OpenSession(open_request(), timeout=0.2)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.6)  # the prefill (600 ms) finishes on the worker thread
        wait_sessions(server, 0)
        assert server.engine.stats().sessions == 0
        assert_metrics_match_engine(server)
        # the slot is free: a normal open still works
        stub.OpenSession(open_request(), timeout=DEADLINE_S)
        assert server.engine.stats().sessions == 1
        assert_metrics_match_engine(server)


def test_cancelled_open_session_leaves_no_session(start) -> None:
    server = start(VerifierConfig(max_sessions=2), profile=SLOW_PREFILL)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        futures = [stub.OpenSession.future(open_request(), timeout=DEADLINE_S) for _ in range(3)]
        time.sleep(0.1)  # the first is prefilling, the others wait for the worker
        for future in futures:
            future.cancel()
        wait_sessions(server, 0)
        assert server.engine.stats().sessions == 0
        assert_metrics_match_engine(server)
        for _ in range(2):  # both slots are free
            stub.OpenSession(open_request(), timeout=DEADLINE_S)
        assert_metrics_match_engine(server)


# ---------------------------------------------------------------- 2(b), 2(c): a stream that fails


def test_stream_failing_internally_drops_its_session(start, monkeypatch) -> None:
    """An unexpected error after the forward (here: in acceptance) is INTERNAL and the session
    is closed, not left to the idle TTL."""
    server = start()

    def broken(prepared, logits):
        raise RuntimeError("acceptance blew up")

    monkeypatch.setattr(server.engine, "complete", broken)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        sid = stub.OpenSession(open_request(), timeout=DEADLINE_S).session_id
        with pytest.raises(grpc.RpcError) as info:
            blocks_stream(stub, [pb.DraftBlock(session_id=sid, seq=0, base_len=6, tokens=[1])])
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "session closed" in info.value.details()
        assert server.engine.stats().sessions == 0
        assert_metrics_match_engine(server)
        assert metric(server, "edgespec_verifier_sessions_closed_total", reason="error") == 1


@pytest.mark.parametrize("batching", [True, False])
def test_failing_target_forward_keeps_the_gauge_true(start, monkeypatch, batching) -> None:
    server = start(VerifierConfig(batching=batching))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        sid = stub.OpenSession(open_request(), timeout=DEADLINE_S).session_id
        assert_metrics_match_engine(server)

        def broken(*args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access")

        # The model's own forward: what the batched step and a one-session forward both call.
        monkeypatch.setattr(server.engine.model, "forward", broken)
        with pytest.raises(grpc.RpcError) as info:
            blocks_stream(stub, [pb.DraftBlock(session_id=sid, seq=0, base_len=6, tokens=[1])])
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert server.engine.stats().sessions == 0
        assert_metrics_match_engine(server)
        assert metric(server, "edgespec_verifier_sessions_closed_total", reason="error") == 1


@pytest.mark.parametrize("batching", [True, False])
def test_decode_stream_failing_midway_drops_its_session(start, monkeypatch, batching) -> None:
    server = start(VerifierConfig(batching=batching))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        sid = stub.OpenSession(open_request(), timeout=DEADLINE_S).session_id
        real_prepare_decode = server.engine.prepare_decode
        calls = []

        def flaky(session_id, seq):
            calls.append(seq)
            if len(calls) == 2:
                raise RuntimeError("decode blew up")
            return real_prepare_decode(session_id, seq)

        # Each streamed token after the first is prepared here, batched or not.
        monkeypatch.setattr(server.engine, "prepare_decode", flaky)
        call = stub.VerifyStream(
            iter([pb.DraftBlock(session_id=sid, seq=0, base_len=6, decode_tokens=5)]),
            timeout=DEADLINE_S,
        )
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for verdict in call:
                got.append(verdict)
        assert len(got) == 2 and info.value.code() == grpc.StatusCode.INTERNAL
        assert server.engine.stats().sessions == 0
        assert_metrics_match_engine(server)


def test_stream_with_a_bad_block_keeps_its_session(start) -> None:
    """A client error (INVALID_ARGUMENT) is not a reason to drop the session: the edge fixes its
    block and goes on."""
    server = start()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        sid = stub.OpenSession(open_request(), timeout=DEADLINE_S).session_id
        with pytest.raises(grpc.RpcError) as info:
            blocks_stream(stub, [pb.DraftBlock(session_id=sid, seq=0, base_len=6, tokens=[999])])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert server.engine.stats().sessions == 1
        assert_metrics_match_engine(server)


# ---------------------------------------------------------------- 5: a corrupted stream


def _identity(data: bytes) -> bytes:
    return data


def test_undecodable_block_ends_the_stream_with_an_error(start) -> None:
    server = start()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        sid = stub.OpenSession(open_request(), timeout=DEADLINE_S).session_id
        good = pb.DraftBlock(session_id=sid, seq=0, base_len=6, tokens=[1]).SerializeToString()
        raw = channel.stream_stream(
            "/edgespec.v1.Verifier/VerifyStream",
            request_serializer=_identity,
            response_deserializer=pb.Verdict.FromString,
        )
        sent: queue.Queue[bytes | None] = queue.Queue()
        for item in (good, b"\xff\xff\xff\xff garbage", None):
            sent.put(item)
        call = raw(iter(sent.get, None), timeout=DEADLINE_S)
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for verdict in call:
                got.append(verdict)
        assert [v.outcome for v in got] == [pb.Verdict.APPLIED]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "DraftBlock" in info.value.details()


@pytest.mark.parametrize("method", ["OpenSession", "CloseSession"])
def test_undecodable_request_is_invalid_argument(start, method) -> None:
    """grpc's own decoding answers UNKNOWN; the verifier says what could not be decoded."""
    server = start()
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary(
            f"/edgespec.v1.Verifier/{method}",
            request_serializer=_identity,
            response_deserializer=_identity,
        )
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\xff\xff\xff garbage", timeout=DEADLINE_S)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{method}Request could not be decoded" in info.value.details()
        stub = pb_grpc.VerifierStub(channel)
        stub.OpenSession(open_request(), timeout=DEADLINE_S)  # still serving


# ---------------------------------------------------------------- 6: stop ids, field trailer


def _trailer_field(err: grpc.RpcError) -> str | None:
    for key, value in err.trailing_metadata() or ():
        if key == FIELD_METADATA_KEY:
            return value
    return None


def test_stop_token_ids_outside_the_vocabulary_are_refused(start) -> None:
    server = start()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        params = SamplingParams(max_new_tokens=8, stop_token_ids=(3, 300))
        with pytest.raises(grpc.RpcError) as info:
            stub.OpenSession(open_request(params=params), timeout=DEADLINE_S)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == (
            "params.stop_token_ids[1] must be a token id in [0, 300), got 300"
        )
        assert _trailer_field(info.value) == "params.stop_token_ids[1]"
        assert server.engine.stats().sessions == 0
        assert_metrics_match_engine(server)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"params": pb.SamplingParams(temperature=-1.0, max_new_tokens=4)}, "params.temperature"),
        ({"prefix_ids": [1, 999]}, "prefix_ids[1]"),
        ({"model_id": "other"}, "model_id"),
    ],
)
def test_errors_name_the_field_once_and_in_the_trailer(start, request_fields, field) -> None:
    server = start(VerifierConfig(model_id="tiny"))
    base = {"prefix_ids": PROMPT, "params": params_to_proto(GREEDY)}
    base.update(request_fields)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.OpenSession(pb.OpenSessionRequest(**base), timeout=DEADLINE_S)
    details = info.value.details()
    assert _trailer_field(info.value) == field
    # "<field> must be ...", never "<field>: <field> must be ..."
    assert details.startswith(f"{field} ") and not details.startswith(f"{field}: "), details


def test_reused_seq_and_bad_probs_name_their_field_once(start) -> None:
    server = start()
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=1)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        sid = stub.OpenSession(open_request(params=sampling), timeout=DEADLINE_S).session_id
        bad = pb.DraftBlock(session_id=sid, seq=0, base_len=6, tokens=[1])
        bad.probs.dense.probs.extend([2.0 / 300] * 300)
        with pytest.raises(grpc.RpcError) as info:
            blocks_stream(stub, [bad])
        assert _trailer_field(info.value) == "probs"
        assert info.value.details().startswith("probs ")
        assert "draft_probs" not in info.value.details()
        sid = stub.OpenSession(open_request(), timeout=DEADLINE_S).session_id
        first = pb.DraftBlock(session_id=sid, seq=0, base_len=6, tokens=[1])
        other = pb.DraftBlock(session_id=sid, seq=0, base_len=6, tokens=[2])
        with pytest.raises(grpc.RpcError) as info:
            blocks_stream(stub, [first, other])
        assert _trailer_field(info.value) == "seq"
        details = info.value.details()
        assert details.startswith("seq ") and not details.startswith("seq: seq"), details
