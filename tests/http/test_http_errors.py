"""The HTTP API over raw HTTP (httpx) against real servers on 127.0.0.1: the server-sent events
framing byte for byte, one test per error status (400, 401, 404, 429 + Retry-After, 503, 504),
and a client that disconnects mid-stream freeing its edge and verifier sessions."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from support.edge_stack import MODEL, EdgeStack, wait_sessions_freed
from support.servers import VerifierServerThread

from edgespec.cloud.verifier import VerifierEngine
from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.runner import ModelRunner
from edgespec.edge.config import EngineConfig
from edgespec.linkemu import LinkEmulator, LinkProfile
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

TIMEOUT_S = 60.0
# Few, short retries: the refusals below come after the edge gave up on its verifiers.
QUICK = EngineConfig(max_retries=1, backoff_initial_s=0.01, backoff_max_s=1.5)
COMPLETION = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 6, "temperature": 0}


def post(url: str, body: dict, path: str = "/v1/completions", **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=TIMEOUT_S, **kw)


def assert_error(reply: httpx.Response, status: int, param: str | None, kind: str) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == kind and error["message"]
    return error


def test_sse_framing_byte_for_byte(edge) -> None:
    body = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", edge.url + "/v1/completions", json=body, timeout=TIMEOUT_S) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw())
    # Every event is exactly b"data: " + one compact JSON object + b"\n\n"; the last is [DONE].
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    payloads = []
    for event in events[:-2]:
        assert event.startswith(b"data: ") and b"\n" not in event
        data = event[len(b"data: ") :]
        parsed = json.loads(data)
        assert data == json.dumps(parsed, separators=(",", ":")).encode()  # compact, ASCII
        payloads.append(parsed)
    *texts, finish, use = payloads
    assert all(p["choices"][0]["finish_reason"] is None for p in texts)
    assert finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert "edgespec" in finish
    assert use["choices"] == [] and use["usage"]["completion_tokens"] >= 1
    assert len({p["id"] for p in payloads}) == 1


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": 2}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"made_up": 1}, "made_up"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 99_999]}, "prompt"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"seed": -1}, "seed"),
        ({"stop_token_ids": [99_999]}, "stop_token_ids"),
        ({"edgespec": {"policy": "psychic"}}, "edgespec.policy"),
        ({"edgespec": {"sampler": "lottery"}}, "edgespec.sampler"),
        ({"edgespec": {"draft_tokens": 1000}}, "edgespec.draft_tokens"),
        ({"edgespec": {"warp": 9}}, "edgespec"),
    ],
)
def test_400_names_the_parameter(edge, change, param) -> None:
    error = assert_error(
        post(edge.url, {**COMPLETION, **change}), 400, param, "invalid_request_error"
    )
    assert error["message"].startswith(param)


def test_400_for_chat_parameters(edge) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    path = "/v1/chat/completions"
    assert_error(
        post(edge.url, {**chat, "tools": [{"type": "function"}]}, path),
        400,
        "tools",
        "invalid_request_error",
    )
    bad_role = {**chat, "messages": [{"role": "robot", "content": "x"}]}
    assert_error(post(edge.url, bad_role, path), 400, "messages[0].role", "invalid_request_error")
    both = {**chat, "max_tokens": 3, "max_completion_tokens": 4}
    assert_error(post(edge.url, both, path), 400, "max_completion_tokens", "invalid_request_error")
    raw = httpx.post(edge.url + path, content=b"{not json", timeout=TIMEOUT_S)
    assert_error(raw, 400, None, "invalid_request_error")


def test_404_for_another_model(edge) -> None:
    assert_error(post(edge.url, {**COMPLETION, "model": "gpt-9"}), 404, "model", "not_found_error")


def test_401_without_the_token(draft, verifier) -> None:
    stack = EdgeStack(draft, [verifier.address], token="s3cret")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert_error(
                post(stack.url, COMPLETION, headers=headers), 401, None, "authentication_error"
            )
            models = httpx.get(stack.url + "/v1/models", headers=headers, timeout=TIMEOUT_S)
            assert models.status_code == 401
        good = post(stack.url, COMPLETION, headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200
        assert httpx.get(stack.url + "/health", timeout=TIMEOUT_S).status_code == 200
    finally:
        stack.stop()


def test_429_with_retry_after_when_every_verifier_is_full(draft, tiny_pair) -> None:
    target = ModelRunner.from_pretrained(tiny_pair.target_dir, device="cpu").model
    full = VerifierServerThread(VerifierEngine(target, VerifierConfig(max_sessions=1)))
    stack = EdgeStack(draft, [full.address], config=QUICK)
    try:
        # Another client holds the verifier's only session.
        with grpc.insecure_channel(full.address) as channel:
            pb_grpc.VerifierStub(channel).OpenSession(
                pb.OpenSessionRequest(
                    prefix_ids=[1, 2], params=pb.SamplingParams(max_new_tokens=4)
                ),
                timeout=TIMEOUT_S,
            )
        for stream in (False, True):
            reply = post(stack.url, {**COMPLETION, "stream": stream})
            assert_error(reply, 429, None, "rate_limit_error")
            assert reply.headers["retry-after"] == "2"  # backoff_max_s 1.5 s, rounded up
    finally:
        stack.stop()
        full.stop()


def test_503_when_no_verifier_can_be_reached(draft) -> None:
    stack = EdgeStack(draft, ["127.0.0.1:1"], config=QUICK)  # nothing listens on port 1
    try:
        for stream in (False, True):
            reply = post(stack.url, {**COMPLETION, "stream": stream})
            error = assert_error(reply, 503, None, "service_unavailable_error")
            assert "no verifier answered" in error["message"]
    finally:
        stack.stop()


def test_504_past_the_deadline(edge, verifier) -> None:
    body = {**COMPLETION, "max_tokens": 200, "edgespec": {"timeout_s": 0.001}}
    error = assert_error(post(edge.url, body), 504, None, "timeout_error")
    assert "timeout_s" in error["message"]
    wait_sessions_freed(edge, verifier)


def test_a_client_that_disconnects_mid_stream_frees_its_sessions(draft, verifier) -> None:
    # A 20 ms link makes the 400 one-token rounds take at least 8 s, so the generation cannot
    # finish (and free its sessions by itself) before the client looks, nor within the 2 s
    # given to free them after it leaves, however starved this test's thread is.
    host, port = verifier.address.rsplit(":", 1)
    with LinkEmulator(host, int(port), LinkProfile(rtt_ms=20)) as link:
        stack = EdgeStack(draft, [link.address])
        try:
            body = {**COMPLETION, "max_tokens": 400, "stream": True}
            body["edgespec"] = {"policy": "fixed", "draft_tokens": 1, "pipelined": False}
            with httpx.stream(
                "POST", stack.url + "/v1/completions", json=body, timeout=TIMEOUT_S
            ) as r:
                assert r.status_code == 200
                first = next(r.iter_raw())
                assert first.startswith(b"data: ")
                assert stack.engine.active_sessions == 1
            # The connection is closed: the generation ends early.
            wait_sessions_freed(stack, verifier, within_s=2.0)
        finally:
            stack.stop()
