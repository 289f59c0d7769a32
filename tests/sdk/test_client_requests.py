"""The client SDK's requests and results: `build_request` (what goes on the wire, what it refuses),
the Client constructor's checks, and results, stats and streamed chunks back from a server.

The SDK runs against a scripted `Edge` servicer (tests/support/servers.py) on a real grpc.aio
server on 127.0.0.1, so every conversion and error path goes through real gRPC."""

from __future__ import annotations

import grpc
import pytest
from support.servers import CALL_TIMEOUT_S

from edgespec import (
    Client,
    GenerationStats,
    InvalidArgument,
    Result,
    SamplingParams,
    TlsConfig,
    TokenChunk,
    Unauthenticated,
)
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.request import build_request

SECRET = "s3cret-token"


# ----------------------------------------------------------------------------- requests


def test_build_request_token_ids_params_and_policy():
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, max_new_tokens=7, seed=3)
    request = build_request([4, 5, 6], params, policy="fixed", draft_tokens=4)
    assert request.WhichOneof("input") == "prompt_ids"
    assert list(request.prompt_ids.ids) == [4, 5, 6]
    assert request.policy == "fixed" and request.draft_tokens == 4
    assert request.params.temperature == 0.8 and request.params.top_k == 5
    assert request.params.top_p == 0.9 and request.params.max_new_tokens == 7
    assert request.params.HasField("seed") and request.params.seed == 3


def test_build_request_pipelined_is_sent_only_when_chosen():
    assert not build_request("x").HasField("pipelined")
    assert build_request("x", pipelined=True).pipelined is True
    request = build_request("x", pipelined=False)
    assert request.HasField("pipelined") and request.pipelined is False


def test_build_request_text_prompt_and_defaults():
    request = build_request("hello")
    assert request.WhichOneof("input") == "prompt" and request.prompt == "hello"
    assert request.policy == "adaptive" and request.draft_tokens == 0
    defaults = SamplingParams()
    assert request.params.max_new_tokens == defaults.max_new_tokens
    assert request.params.temperature == 0.0 and not request.params.HasField("seed")


def test_build_request_empty_id_list_still_names_the_input():
    # The server must see "prompt_ids" (and reject it by name), not a request with no prompt.
    assert build_request([]).WhichOneof("input") == "prompt_ids"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": [1, True]}, "prompt[1]"),
        ({"prompt": [1, -2]}, "prompt[1]"),
        ({"prompt": [2**31]}, "prompt[0]"),
        ({"prompt": [1.0]}, "prompt[0]"),
        ({"prompt": b"bytes"}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": "x", "draft_tokens": -1}, "draft_tokens"),
        ({"prompt": "x", "draft_tokens": 2**31}, "draft_tokens"),
        ({"prompt": "x", "draft_tokens": 2.0}, "draft_tokens"),
        ({"prompt": "x", "policy": None}, "policy"),
        ({"prompt": "x", "pipelined": 1}, "pipelined"),
        ({"prompt": "x", "params": {"temperature": 0.5}}, "params"),
    ],
)
def test_build_request_rejects_what_the_wire_cannot_carry(kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        build_request(**kwargs)
    assert info.value.field == field
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details
    assert isinstance(info.value, ValueError)


def test_client_constructor_validates_its_arguments():
    for kwargs in ({"timeout": 0}, {"timeout": float("inf")}, {"timeout": -1.0}):
        with pytest.raises(ValueError, match="timeout"):
            Client("127.0.0.1:1", **kwargs)
    with pytest.raises(ValueError, match="address"):
        Client("")
    with pytest.raises(ValueError, match="token"):
        Client("127.0.0.1:1", token="")
    with pytest.raises(ValueError, match="cert and key must be given together"):
        TlsConfig(cert="cert.pem")


# ----------------------------------------------------------------------------- results


def test_generate_returns_result_with_converted_stats(edge, client):
    params = SamplingParams(max_new_tokens=5)
    result = client.generate([10, 20, 30, 40, 50, 60], params, policy="fixed", draft_tokens=3)
    assert result == Result(
        text="decoded",
        token_ids=[11, 21, 31, 41, 51],
        finish_reason="length",
        stats=GenerationStats(
            rounds=3,
            drafted=8,
            accepted=6,
            acceptance_rate=6 / 8,
            acceptance_rate_per_position=[1.0, 2 / 3, 0.5],
            drafted_per_position=[3, 3, 2],
            accepted_per_position=[3, 2, 1],
            draft_lengths=[3, 3, 2],
            rtt_ms=12.5,
            time_to_first_token_ms=30.0,
            time_per_output_token_ms=4.5,
            bytes_sent=512,
            bytes_received=128,
            reconnects=1,
            verifier="127.0.0.1:7000",
        ),
    )
    request, _ = edge.servicer.requests[-1]
    assert request.policy == "fixed" and request.draft_tokens == 3
    assert request.params.max_new_tokens == 5


def test_stats_acceptance_rate_is_zero_when_nothing_was_drafted():
    stats = GenerationStats.from_proto(pb.GenerateStats(rounds=4, draft_lengths=[0, 0, 0, 0]))
    assert stats.acceptance_rate == 0.0 and stats.acceptance_rate_per_position == []


def test_stream_yields_chunks_then_result(client):
    with client.stream([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=5)) as stream:
        assert not stream.done
        with pytest.raises(RuntimeError, match="not finished"):
            _ = stream.result
        chunks = list(stream)
    assert chunks == [
        TokenChunk(ids=[2, 3], text="<2>"),
        TokenChunk(ids=[4, 5], text="<2>"),
        TokenChunk(ids=[6], text="<1>"),
    ]
    assert stream.done
    assert stream.result.token_ids == [2, 3, 4, 5, 6]
    assert list(stream) == []  # exhausted for good


def test_text_prompt_and_bearer_token(edge):
    edge.servicer.token = SECRET
    with Client(edge.address, timeout=CALL_TIMEOUT_S, token=SECRET) as client:
        result = client.generate("hi", SamplingParams(max_new_tokens=8))
    assert result.token_ids == list(b"hi")
    request, metadata = edge.servicer.requests[-1]
    assert request.prompt == "hi"
    assert metadata["authorization"] == f"Bearer {SECRET}"
    with (
        Client(edge.address, timeout=CALL_TIMEOUT_S, token="wrong") as client,
        pytest.raises(Unauthenticated) as info,
    ):
        client.generate("hi")
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
