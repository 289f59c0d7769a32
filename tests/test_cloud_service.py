"""The Verifier service over real gRPC on 127.0.0.1, with a tiny random Llama target.

Servers run in-process (a background event loop per server); clients are synchronous gRPC stubs
and every call carries a deadline. One test starts `python -m edgespec.cloud.server` as a subprocess.
"""

from __future__ import annotations

import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from conftest import VerifierServerThread, self_signed_cert
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import (
    INVALID_ARGUMENT,
    NOT_FOUND,
    Outcome,
    ServiceError,
    VerifierConfig,
)
from edgespec.core.drafter import Drafter
from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.rejection import DraftProbs
from edgespec.core.runner import ModelRunner
from edgespec.core.session import DraftBlock
from edgespec.core.verifier import Verifier
from edgespec.protos.convert import block_to_proto, params_to_proto
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc
from edgespec.serving.tls import TlsConfig

DEADLINE_S = 20.0  # every client call carries this deadline
TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
PROMPT = [5, 17, 42, 99, 3, 250]
VOCAB = 300  # tests/conftest.py TINY_VOCAB_SIZE
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=32)


# ---------------------------------------------------------------- servers and clients


class VerifyStream:
    """One VerifyStream call driven block by block: `send` waits for that block's verdict."""

    def __init__(self, stub: pb_grpc.VerifierStub, metadata=AUTH) -> None:
        self._requests: queue.Queue[pb.DraftBlock | None] = queue.Queue()

        def requests() -> Iterator[pb.DraftBlock]:
            while (msg := self._requests.get()) is not None:
                yield msg

        self._call = stub.VerifyStream(requests(), timeout=DEADLINE_S, metadata=metadata)

    def send(self, msg: pb.DraftBlock) -> pb.Verdict:
        self._requests.put(msg)
        return next(self._call)

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()

    def __enter__(self) -> VerifyStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def send_one(stub, msg: pb.DraftBlock, metadata=AUTH) -> pb.Verdict:
    """Send one block on a fresh stream; returns its verdict."""
    with VerifyStream(stub, metadata=metadata) as stream:
        return stream.send(msg)


def open_session(stub, prefix=PROMPT, params=GREEDY, metadata=AUTH, **fields):
    request = pb.OpenSessionRequest(prefix_ids=prefix, params=params_to_proto(params), **fields)
    return stub.OpenSession(request, timeout=DEADLINE_S, metadata=metadata)


def block(session_id: str, seq: int, base_len: int, tokens, draft_probs=None) -> pb.DraftBlock:
    return block_to_proto(DraftBlock(seq, base_len, tuple(tokens), draft_probs), session_id)


@pytest.fixture(scope="module")
def target_model(tiny_pair):
    return ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model


@pytest.fixture(scope="module")
def start_server(target_model) -> Iterator[Callable[..., VerifierServerThread]]:
    """Factory: start_server(config=None, **serve_kwargs); every server stops at module end."""
    started: list[VerifierServerThread] = []

    def start(config: VerifierConfig | None = None, **serve_kwargs) -> VerifierServerThread:
        config = config or VerifierConfig(model_id="tiny-target", max_block_tokens=8)
        server = VerifierServerThread(VerifierEngine(target_model, config), **serve_kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(start_server) -> VerifierServerThread:
    """The shared server: bearer token required, max_block_tokens 8."""
    return start_server(token=TOKEN)


@pytest.fixture
def stub(server) -> Iterator[pb_grpc.VerifierStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.VerifierStub(channel)


def target_continuation(model, prompt, params) -> list[int]:
    return generate_autoregressive(ModelRunner(model), prompt, params).tokens


# ---------------------------------------------------------------- happy paths


def test_greedy_target_continuation_is_fully_accepted(server, stub, target_model) -> None:
    cont = target_continuation(target_model, PROMPT, GREEDY)  # 32 tokens
    opened = open_session(stub, model_id="tiny-target")
    assert (opened.committed_len, opened.vocab_size) == (len(PROMPT), VOCAB)
    assert opened.max_block_tokens == 8 and opened.model_id == "tiny-target"
    k, pos, seq = 4, 0, 0
    with VerifyStream(stub) as stream:
        while pos + k + 1 <= len(cont):
            verdict = stream.send(
                block(opened.session_id, seq, len(PROMPT) + pos, cont[pos : pos + k])
            )
            assert verdict.outcome == pb.Verdict.APPLIED
            assert (verdict.seq, verdict.accepted, verdict.is_bonus) == (seq, k, True)
            assert verdict.token == cont[pos + k]
            pos, seq = pos + k + 1, seq + 1
            assert verdict.committed_len == len(PROMPT) + pos
            assert verdict.verify_ms > 0 and verdict.queue_ms >= 0
    assert server.engine.committed(opened.session_id) == PROMPT + cont[:pos]


def test_wrong_greedy_draft_gets_the_target_token(stub, target_model) -> None:
    cont = target_continuation(target_model, PROMPT, GREEDY)
    wrong = (cont[1] + 1) % VOCAB
    opened = open_session(stub)
    with VerifyStream(stub) as stream:
        verdict = stream.send(block(opened.session_id, 0, len(PROMPT), [cont[0], wrong, cont[2]]))
    assert (verdict.accepted, verdict.token, verdict.is_bonus) == (1, cont[1], False)
    assert verdict.committed_len == len(PROMPT) + 2


@pytest.mark.parametrize("top_k", [0, 20], ids=["dense_q", "sparse_q"])
def test_sampling_verdicts_over_grpc_equal_in_process_ones(
    stub, target_model, tiny_pair, top_k
) -> None:
    """Same seed, same blocks: the service answers exactly what an in-process Verifier does,
    so the q conversion (dense and sparse) loses nothing on the wire."""
    params = SamplingParams(temperature=0.9, top_k=top_k, max_new_tokens=20, seed=7)
    draft = ModelRunner.from_pretrained(tiny_pair.draft_dir, device="cpu")
    drafter = Drafter(draft, PROMPT, params)
    local = Verifier(ModelRunner(target_model), PROMPT, params)
    opened = open_session(stub, params=params)
    with VerifyStream(stub) as stream:
        while not drafter.finished:
            draft_block = drafter.propose(4)
            if draft_block.tokens:
                assert draft_block.draft_probs is not None
                assert draft_block.draft_probs.is_sparse == (top_k > 0)
            remote = stream.send(block_to_proto(draft_block, opened.session_id))
            expected = local.verify(draft_block)
            assert (remote.accepted, remote.token, remote.is_bonus, remote.committed_len) == (
                expected.accepted,
                expected.token,
                expected.is_bonus,
                expected.committed_len,
            )
            drafter.apply(expected)
    assert len(drafter.generated) == params.max_new_tokens


def test_health_and_reflection_answer(server) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "edgespec.v1.Verifier"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # reflection is behind the token like every RPC but health
    with grpc.insecure_channel(server.address) as channel:
        intercepted = grpc.intercept_channel(channel, _MetadataInterceptor(AUTH))
        services = ProtoReflectionDescriptorDatabase(intercepted).get_services()
    assert "edgespec.v1.Verifier" in services


class _MetadataInterceptor(grpc.StreamStreamClientInterceptor):
    """Adds metadata and a deadline to stream-stream calls (the reflection client sets neither)."""

    def __init__(self, metadata) -> None:
        self._metadata = metadata

    def intercept_stream_stream(self, continuation, details, request_iterator):
        details = details._replace(metadata=self._metadata, timeout=DEADLINE_S)
        return continuation(details, request_iterator)


# ---------------------------------------------------------------- bad input, keep serving


def _open(**fields) -> Callable[[pb_grpc.VerifierStub], object]:
    base = {"prefix_ids": PROMPT, "params": params_to_proto(GREEDY)}
    base.update(fields)
    return lambda stub: stub.OpenSession(
        pb.OpenSessionRequest(**base), timeout=DEADLINE_S, metadata=AUTH
    )


def _params(**fields) -> pb.SamplingParams:
    msg = params_to_proto(GREEDY)
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


def _verify(
    make_block: Callable[[str], pb.DraftBlock], params: SamplingParams = GREEDY, **open_fields
) -> Callable[[pb_grpc.VerifierStub], object]:
    """Open a fresh session, then send the one block make_block(session_id) builds."""

    def run(stub):
        opened = open_session(stub, params=params, **open_fields)
        return send_one(stub, make_block(opened.session_id))

    return run


SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=32, seed=3)
UNIFORM_Q = DraftProbs.dense(torch.full((2, VOCAB), 1.0 / VOCAB))


def _dense(sid: str, values: list[float]) -> pb.DraftBlock:
    msg = pb.DraftBlock(session_id=sid, seq=0, base_len=len(PROMPT), tokens=[1, 2])
    msg.probs.dense.probs.extend(values)
    return msg


def _sparse(sid: str, row_lengths, ids, probs) -> pb.DraftBlock:
    msg = pb.DraftBlock(session_id=sid, seq=0, base_len=len(PROMPT), tokens=[1, 2])
    msg.probs.sparse.row_lengths.extend(row_lengths)
    msg.probs.sparse.ids.extend(ids)
    msg.probs.sparse.probs.extend(probs)
    return msg


BAD_INPUTS = {
    # OpenSession
    "empty prefix": (_open(prefix_ids=[]), INVALID_ARGUMENT, "prefix_ids"),
    "prefix id >= vocab": (_open(prefix_ids=[1, 2, 3, 300]), INVALID_ARGUMENT, "prefix_ids[3]"),
    "negative prefix id": (_open(prefix_ids=[1, -4]), INVALID_ARGUMENT, "prefix_ids[1]"),
    "prefix too long": (_open(prefix_ids=[1] * 600), INVALID_ARGUMENT, "prefix_ids"),
    "params unset": (_open(params=None), INVALID_ARGUMENT, "params"),
    "temperature nan": (
        _open(params=_params(temperature=math.nan)),
        INVALID_ARGUMENT,
        "params.temperature",
    ),
    "top_p > 1": (_open(params=_params(top_p=1.5)), INVALID_ARGUMENT, "params.top_p"),
    "top_k < 0": (_open(params=_params(top_k=-1)), INVALID_ARGUMENT, "params.top_k"),
    "max_new_tokens 0": (
        _open(params=_params(max_new_tokens=0)),
        INVALID_ARGUMENT,
        "params.max_new_tokens",
    ),
    "max_new_tokens past positions": (
        _open(params=_params(max_new_tokens=600)),
        INVALID_ARGUMENT,
        "params.max_new_tokens",
    ),
    "generated >= prefix": (_open(generated=len(PROMPT)), INVALID_ARGUMENT, "generated"),
    "unknown model": (_open(model_id="llama-70b"), "NOT_FOUND", "model_id"),
    # VerifyStream
    "unknown session": (
        lambda stub: send_one(stub, pb.DraftBlock(session_id="nope", seq=0, base_len=6)),
        "NOT_FOUND",
        "session_id",
    ),
    "first block without session": (
        lambda stub: send_one(stub, pb.DraftBlock(seq=0, base_len=6)),
        INVALID_ARGUMENT,
        "session_id",
    ),
    "k > max_block_tokens": (
        _verify(lambda s: block(s, 0, 6, [1] * 9)),
        INVALID_ARGUMENT,
        "tokens",
    ),
    "draft token >= vocab": (
        _verify(lambda s: block(s, 0, 6, [1, 300])),
        INVALID_ARGUMENT,
        "tokens[1]",
    ),
    "negative draft token": (
        _verify(lambda s: pb.DraftBlock(session_id=s, seq=0, base_len=6, tokens=[-1])),
        INVALID_ARGUMENT,
        "tokens[0]",
    ),
    "base_len 0": (
        _verify(lambda s: pb.DraftBlock(session_id=s, seq=0, base_len=0, tokens=[1])),
        INVALID_ARGUMENT,
        "base_len",
    ),
    "more tokens than max_new_tokens allows": (
        _verify(lambda s: block(s, 0, 6, [1, 2, 3]), params=SamplingParams(max_new_tokens=3)),
        INVALID_ARGUMENT,
        "tokens",
    ),
    "sampling block without probs": (
        _verify(lambda s: block(s, 0, 6, [1, 2]), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs",
    ),
    "dense probs of the wrong size": (
        _verify(lambda s: _dense(s, [0.5] * 3), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs.dense.probs",
    ),
    "dense probs of the wrong vocab": (
        _verify(lambda s: _dense(s, [0.5] * 4), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs",
    ),
    "negative probs": (
        _verify(lambda s: _dense(s, [-0.5, 1.5] + [0.0] * (2 * VOCAB - 2)), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs",
    ),
    "probs not summing to 1": (
        _verify(lambda s: _dense(s, [0.9 / VOCAB] * (2 * VOCAB)), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs",
    ),
    "probs for an empty block": (
        _verify(
            lambda s: pb.DraftBlock(
                session_id=s,
                seq=0,
                base_len=6,
                probs=pb.DraftProbs(dense=pb.DenseProbs(probs=[1.0])),
            )
        ),
        INVALID_ARGUMENT,
        "probs",
    ),
    "sparse row_lengths of the wrong count": (
        _verify(lambda s: _sparse(s, [1], [1], [1.0]), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs.sparse.row_lengths",
    ),
    "sparse lengths not matching ids": (
        _verify(lambda s: _sparse(s, [1, 2], [1, 2], [1.0, 1.0]), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs.sparse",
    ),
    "sparse id >= vocab": (
        _verify(lambda s: _sparse(s, [1, 1], [1, 300], [1.0, 1.0]), params=SAMPLING),
        INVALID_ARGUMENT,
        "probs",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_field_and_service_keeps_serving(server, stub, case) -> None:
    request, code, field = BAD_INPUTS[case]
    with pytest.raises(grpc.RpcError) as info:
        request(stub)
    assert info.value.code() == grpc.StatusCode[code]
    assert field in info.value.details()
    # the next valid request is served
    _assert_serves(stub)


def _assert_serves(stub) -> None:
    opened = open_session(stub, params=SAMPLING)
    with VerifyStream(stub) as stream:
        verdict = stream.send(block(opened.session_id, 0, len(PROMPT), [1, 2], UNIFORM_Q))
    assert verdict.outcome == pb.Verdict.APPLIED
    assert verdict.committed_len == len(PROMPT) + verdict.accepted + 1


def test_error_details_state_the_allowed_range(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _open(prefix_ids=[1, 2, 3, 300])(stub)
    assert "prefix_ids[3] must be a token id in [0, 300), got 300" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        _verify(lambda s: block(s, 0, 6, [1] * 9))(stub)
    assert "max_block_tokens=8" in info.value.details() and "got 9" in info.value.details()


# ---------------------------------------------------------------- resends and stale blocks


def test_resent_block_gets_the_same_verdict_applied_once(server, stub, target_model) -> None:
    cont = target_continuation(target_model, PROMPT, GREEDY)
    opened = open_session(stub)
    sid = opened.session_id
    first = block(sid, 0, len(PROMPT), [cont[0], (cont[1] + 1) % VOCAB])
    with VerifyStream(stub) as stream:
        applied = stream.send(first)
        replayed = stream.send(first)
        assert applied.outcome == pb.Verdict.APPLIED and replayed.outcome == pb.Verdict.REPLAYED
        for name in ("seq", "accepted", "token", "is_bonus", "committed_len"):
            assert getattr(replayed, name) == getattr(applied, name), name
        assert server.engine.committed(sid) == PROMPT + cont[:2]  # applied once
        nxt = stream.send(block(sid, 1, applied.committed_len, cont[2:4]))
        assert nxt.outcome == pb.Verdict.APPLIED
    # a resend on a NEW stream (the edge reconnected to the same verifier) is a replay too
    with VerifyStream(stub) as stream:
        again = stream.send(block(sid, 1, applied.committed_len, cont[2:4]))
    assert again.outcome == pb.Verdict.REPLAYED and again.committed_len == nxt.committed_len


def test_stale_block_is_answered_stale_and_changes_nothing(server, stub, target_model) -> None:
    cont = target_continuation(target_model, PROMPT, GREEDY)
    sid = open_session(stub).session_id
    with VerifyStream(stub) as stream:
        v0 = stream.send(block(sid, 0, len(PROMPT), cont[:2]))
        # drafted on a prefix the verifier has moved past (pipelined drafting)
        stale = stream.send(block(sid, 1, len(PROMPT) + 1, cont[1:3]))
        assert stale.outcome == pb.Verdict.STALE
        assert (stale.seq, stale.committed_len) == (1, v0.committed_len)
        assert server.engine.committed(sid) == PROMPT + cont[:3]
        ok = stream.send(block(sid, 1, v0.committed_len, cont[3:5]))
        assert ok.outcome == pb.Verdict.APPLIED and ok.accepted == 2
        # a seq older than the last verdict's is stale as well
        old = stream.send(block(sid, 0, ok.committed_len, cont[6:8]))
        assert old.outcome == pb.Verdict.STALE and old.committed_len == ok.committed_len
    # the last seq reused for a different block is a client bug, not a resend
    with pytest.raises(grpc.RpcError) as info:
        send_one(stub, block(sid, 1, v0.committed_len, cont[4:6]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "seq" in info.value.details()
    assert server.engine.committed(sid) == PROMPT + cont[:6]


def test_reopen_continues_from_the_committed_prefix(stub, target_model) -> None:
    """A reopen (after a verifier failure) sends the committed history: verification continues
    exactly; blocks numbered below next_seq are stale."""
    cont = target_continuation(target_model, PROMPT, GREEDY)
    prefix = PROMPT + cont[:10]
    opened = open_session(stub, prefix=prefix, generated=10, next_seq=5)
    assert opened.committed_len == len(prefix)
    with VerifyStream(stub) as stream:
        assert stream.send(block(opened.session_id, 4, len(prefix), cont[10:12])).outcome == (
            pb.Verdict.STALE
        )
        verdict = stream.send(block(opened.session_id, 5, len(prefix), cont[10:14]))
    assert (verdict.accepted, verdict.token) == (4, cont[14])


def test_max_new_tokens_bounds_the_session(stub, target_model) -> None:
    params = SamplingParams(max_new_tokens=5)
    cont = target_continuation(target_model, PROMPT, params)
    sid = open_session(stub, params=params).session_id
    with VerifyStream(stub) as stream:
        verdict = stream.send(block(sid, 0, len(PROMPT), cont[:4]))
        assert verdict.committed_len == len(PROMPT) + 5
        with pytest.raises(grpc.RpcError) as info:
            stream.send(block(sid, 1, verdict.committed_len, []))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "max_new_tokens" in info.value.details()


def test_close_session(stub) -> None:
    sid = open_session(stub).session_id
    close = pb.CloseSessionRequest(session_id=sid)
    assert stub.CloseSession(close, timeout=DEADLINE_S, metadata=AUTH).existed
    assert not stub.CloseSession(close, timeout=DEADLINE_S, metadata=AUTH).existed
    with pytest.raises(grpc.RpcError) as info, VerifyStream(stub) as stream:
        stream.send(block(sid, 0, len(PROMPT), [1]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- auth, limits, expiry


@pytest.mark.parametrize(
    "metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]
)
def test_missing_or_wrong_token_is_unauthenticated_but_health_answers(server, metadata) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            open_session(stub, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            send_one(stub, block("x", 0, 6, [1]), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        open_session(stub)  # the right token still works


def test_session_limit_is_resource_exhausted(start_server) -> None:
    server = start_server(VerifierConfig(max_sessions=2))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        first = open_session(stub, metadata=())
        open_session(stub, metadata=())
        with pytest.raises(grpc.RpcError) as info:
            open_session(stub, metadata=())
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions=2" in info.value.details()
        close = pb.CloseSessionRequest(session_id=first.session_id)
        assert stub.CloseSession(close, timeout=DEADLINE_S).existed
        open_session(stub, metadata=())  # a slot is free again


def test_idle_session_is_reaped(start_server) -> None:
    server = start_server(VerifierConfig(session_idle_ttl_s=300.0))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        idle = open_session(stub, metadata=()).session_id
        assert server.engine.reap_idle(now=time.monotonic() + 299.0) == []
        assert server.engine.reap_idle(now=time.monotonic() + 301.0) == [idle]
        with pytest.raises(grpc.RpcError) as info, VerifyStream(stub, metadata=()) as stream:
            stream.send(block(idle, 0, len(PROMPT), [1]))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "session_id" in info.value.details()


def test_reaper_task_closes_idle_sessions(start_server) -> None:
    server = start_server(VerifierConfig(session_idle_ttl_s=0.2), reap_interval_s=0.05)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        open_session(stub, metadata=())
        deadline = time.monotonic() + DEADLINE_S
        while server.engine.stats().sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.engine.stats().sessions == 0 and server.engine.stats().reaped == 1


# ---------------------------------------------------------------- TLS and the CLI


def test_tls_with_token(start_server, tmp_path) -> None:
    cert, key = self_signed_cert(tmp_path)
    server = start_server(token=TOKEN, tls=TlsConfig(cert, key))
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    options = (("grpc.ssl_target_name_override", "localhost"),)
    with grpc.secure_channel(server.address, credentials, options=options) as channel:
        stub = pb_grpc.VerifierStub(channel)
        with VerifyStream(stub) as stream:
            verdict = stream.send(block(open_session(stub).session_id, 0, len(PROMPT), [1]))
        assert verdict.outcome == pb.Verdict.APPLIED


def test_cli_prints_listening_serves_and_stops_on_sigterm(tiny_pair) -> None:
    env = dict(os.environ)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgespec.cloud.server",
            "--target",
            str(tiny_pair.target_dir),
            "--port",
            "0",
            "--token",
            TOKEN,
            "--max-sessions",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        line = _readline(proc, timeout=120.0)
        assert line.startswith("LISTENING 127.0.0.1:"), line
        address = line.split()[1]
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.VerifierStub(channel)
            opened = open_session(stub, model_id="target")  # the folder name is the model id
            with VerifyStream(stub) as stream:
                assert stream.send(block(opened.session_id, 0, len(PROMPT), [1])).outcome == (
                    pb.Verdict.APPLIED
                )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read() == ""  # exactly one line on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout).strip()
    except queue.Empty:
        raise AssertionError(f"no LISTENING line within {timeout} s") from None


# ---------------------------------------------------------------- the engine, directly


def test_engine_errors_carry_code_and_field(target_model) -> None:
    engine = VerifierEngine(target_model, VerifierConfig(max_block_tokens=4))
    with pytest.raises(ServiceError) as info:
        engine.open_session([1, 2, 999], GREEDY)
    assert (info.value.code, info.value.field) == (INVALID_ARGUMENT, "prefix_ids[2]")
    with pytest.raises(ServiceError) as info:
        engine.verify("missing", DraftBlock(0, 1, (1,)))
    assert (info.value.code, info.value.field) == (NOT_FOUND, "session_id")
    opened = engine.open_session(PROMPT, GREEDY)
    result = engine.verify(opened.session_id, DraftBlock(0, len(PROMPT), (1, 2)))
    assert result.outcome is Outcome.APPLIED and result.verdict is not None
    stale = engine.verify(opened.session_id, DraftBlock(1, len(PROMPT), (1, 2)))
    assert stale.outcome is Outcome.STALE and stale.verdict is None
    stats = engine.stats()
    assert (stats.sessions, stats.applied, stats.stale, stats.drafted) == (1, 1, 1, 2)


def test_greedy_block_with_probs_is_validated_then_ignored(target_model) -> None:
    engine = VerifierEngine(target_model)
    cont = target_continuation(target_model, PROMPT, GREEDY)
    sid = engine.open_session(PROMPT, GREEDY).session_id
    q = DraftProbs.dense(torch.full((3, VOCAB), 1.0 / VOCAB))
    result = engine.verify(sid, DraftBlock(0, len(PROMPT), tuple(cont[:3]), q))
    assert result.verdict is not None and result.verdict.accepted == 3
    bad = DraftProbs.dense(torch.full((2, VOCAB), 2.0 / VOCAB))
    with pytest.raises(ServiceError) as info:
        engine.verify(sid, DraftBlock(1, len(PROMPT) + 4, tuple(cont[4:6]), bad))
    assert info.value.field == "probs"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"max_sessions": 0}, "max_sessions"),
        ({"max_block_tokens": True}, "max_block_tokens"),
        ({"session_idle_ttl_s": math.nan}, "session_idle_ttl_s"),
        ({"max_prefix_tokens": 0}, "max_prefix_tokens"),
    ],
)
def test_config_validation(fields, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        VerifierConfig(**fields)


def test_max_prefix_tokens_must_fit_the_model(target_model) -> None:
    with pytest.raises(ValueError, match="max_prefix_tokens must be <= 511"):
        VerifierEngine(target_model, VerifierConfig(max_prefix_tokens=512))
