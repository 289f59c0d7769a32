"""The Verifier service over real gRPC on 127.0.0.1 with a tiny random Llama target: verdicts,
health and reflection, resends and stale blocks, auth, session limits and expiry, TLS, and the
`python -m edgespec.cloud.server` CLI (a subprocess)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.certs import self_signed_cert
from support.verifier_client import (
    AUTH,
    DEADLINE_S,
    GREEDY,
    PROMPT,
    TOKEN,
    VOCAB,
    VerifyStream,
    block,
    open_session,
    send_one,
    target_continuation,
)

from edgespec.cloud.verifier_types import (
    VerifierConfig,
)
from edgespec.core.drafter import Drafter
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.core.verifier import Verifier
from edgespec.protos.convert import block_to_proto
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc
from edgespec.serving.tls import TlsConfig

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
    params = SamplingParams(
        temperature=0.9, top_k=top_k, max_new_tokens=20, seed=7, sampler="rejection"
    )
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


def test_a_finished_sessions_slot_goes_to_the_next_open(start_server) -> None:
    """An edge closes a session after its last verdict in the background, so its next
    session's open can come first: the finished session's slot is reclaimed for it (an
    unfinished one's is not, as above), and the late close finds nothing."""
    server = start_server(VerifierConfig(max_sessions=1))
    params = SamplingParams(temperature=0.0, max_new_tokens=2)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        done = open_session(stub, params=params, metadata=()).session_id
        with VerifyStream(stub, metadata=()) as stream:
            committed = len(PROMPT)
            for seq in range(2):  # a block commits 1 or 2 tokens
                if (left := len(PROMPT) + 2 - committed) > 0:
                    draft = [1] * (left - 1)
                    committed = stream.send(block(done, seq, committed, draft)).committed_len
        assert server.engine.session(done).finished
        nxt = open_session(stub, params=params, metadata=()).session_id
        assert server.engine.stats().reclaimed == 1
        close = pb.CloseSessionRequest(session_id=done)
        assert not stub.CloseSession(close, timeout=DEADLINE_S).existed
        with pytest.raises(grpc.RpcError) as info:  # the next one is running: no slot
            open_session(stub, params=params, metadata=())
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert server.engine.stats().reclaimed == 1 and nxt != done


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


@pytest.mark.slow  # a server subprocess: ~15 s on 2 cores
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
