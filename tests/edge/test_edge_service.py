"""The Edge service (`python -m edgespec.edge.server` over a verifier subprocess, the `servers`
fixture): it streams the target's own output, answers INVALID_ARGUMENT naming the field and keeps
serving, checks its bearer token and answers health; and the edge's pure helpers (address
provider, text stream). Every gRPC call carries a deadline.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.servers import EDGE_TOKEN

from edgespec.core.generate import generate_autoregressive
from edgespec.core.params import SamplingParams
from edgespec.core.runner import ModelRunner
from edgespec.edge.addresses import make_address_provider
from edgespec.edge.detokenize import TextStream
from edgespec.protos.convert import params_to_proto
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

DEADLINE_S = 30.0  # every client call in these tests carries this deadline
EDGE_AUTH = (("authorization", f"Bearer {EDGE_TOKEN}"),)
PROMPTS = (
    "The edge drafts a few tokens",
    "def verify(block):\n",
    [7, 200, 13, 42, 99, 150, 3],
)


def reference(target: ModelRunner, tokenizer, prompt, params: SamplingParams) -> list[int]:
    ids = (
        tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if isinstance(prompt, str)
        else prompt
    )
    return generate_autoregressive(target, ids, params).tokens


# ---------------------------------------------------------------- the Edge service


@pytest.fixture(scope="module")
def edge_stub(servers) -> Iterator[pb_grpc.EdgeStub]:
    with grpc.insecure_channel(servers["edge"].address) as channel:
        yield pb_grpc.EdgeStub(channel)


def generate_rpc(
    stub, request: pb.GenerateRequest, metadata=EDGE_AUTH
) -> list[pb.GenerateResponse]:
    return list(stub.Generate(request, timeout=DEADLINE_S, metadata=metadata))


@pytest.mark.slow
def test_edge_service_streams_target_alone_output(edge_stub, draft, target):
    params = SamplingParams(max_new_tokens=20)
    prompt = PROMPTS[0]
    expected = reference(target, draft[1], prompt, params)
    request = pb.GenerateRequest(
        prompt=prompt, params=params_to_proto(params), policy="fixed", draft_tokens=3
    )
    responses = generate_rpc(edge_stub, request)
    *token_msgs, last = responses
    assert last.WhichOneof("event") == "summary"
    streamed = [t for m in token_msgs for t in m.tokens.ids]
    assert streamed == list(last.summary.token_ids) == expected
    assert "".join(m.text for m in token_msgs) == last.summary.text == draft[1].decode(expected)
    stats = last.summary.stats
    assert stats.rounds == len(stats.draft_lengths) > 0 and max(stats.draft_lengths) <= 3
    assert stats.bytes_sent > 0 and stats.reconnects == 0
    assert last.summary.finish_reason == "length"


BAD_REQUESTS = [
    ("empty prompt", pb.GenerateRequest(prompt=""), "prompt"),
    ("no prompt", pb.GenerateRequest(), "prompt"),
    ("empty ids", pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=[])), "prompt_ids"),
    ("id range", pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=[5, 300])), "prompt_ids[1]"),
    ("negative id", pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=[-1])), "prompt_ids[0]"),
    (
        "temperature",
        pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(temperature=-1, max_new_tokens=4)),
        "params.temperature",
    ),
    (
        "max_new_tokens",
        pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_new_tokens=0)),
        "params.max_new_tokens",
    ),
    (
        "too long",
        pb.GenerateRequest(prompt="hi", params=pb.SamplingParams(max_new_tokens=100_000)),
        "params.max_new_tokens",
    ),
    ("policy", pb.GenerateRequest(prompt="hi", policy="telepathy"), "policy"),
    ("draft_tokens", pb.GenerateRequest(prompt="hi", draft_tokens=1000), "draft_tokens"),
    ("negative k", pb.GenerateRequest(prompt="hi", draft_tokens=-2), "draft_tokens"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "request_msg", "field"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_edge_service_bad_input_names_field_and_keeps_serving(edge_stub, name, request_msg, field):
    with pytest.raises(grpc.RpcError) as info:
        generate_rpc(edge_stub, request_msg)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    # The .proto's convention: the details start with the field path, named once.
    assert err.details().startswith(field), err.details()
    assert not err.details().startswith(f"{field}: {field}"), err.details()
    assert ("edgespec-field", field) in tuple(err.trailing_metadata())
    ok = pb.GenerateRequest(
        prompt_ids=pb.TokenIds(ids=[1, 2, 3]), params=pb.SamplingParams(max_new_tokens=2)
    )
    assert generate_rpc(edge_stub, ok)[-1].summary.finish_reason == "length"


@pytest.mark.slow
def test_edge_service_auth_and_health(servers, edge_stub):
    with pytest.raises(grpc.RpcError) as info:
        generate_rpc(edge_stub, pb.GenerateRequest(prompt="hi"), metadata=())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(servers["edge"].address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "edgespec.v1.Edge"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---------------------------------------------------------------- pure helpers


def test_address_provider_cycles_and_validates():
    nxt = make_address_provider(["a:1", "b:2"])
    assert [nxt() for _ in range(3)] == ["a:1", "b:2", "a:1"]
    for bad in ([], "a:1", ["nohostport"]):
        with pytest.raises(ValueError, match="addresses"):
            make_address_provider(bad)


def test_text_stream_holds_back_split_characters(draft):
    tokenizer = draft[1]
    text = "naïve café ✓ done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    pieces = [stream.push([t]) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
