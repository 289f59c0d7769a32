"""The edge's OpenAI-compatible HTTP API with the official `openai` client, against a real edge
and verifier on 127.0.0.1 (tiny random-weight Llama pair): completions and chat, streamed and
not, equal to what the gRPC ``Generate`` path gives for the same request (greedy and seeded
sampling), stop strings cut and end the generation."""

from __future__ import annotations

import grpc
import openai
import pytest
from support.edge_stack import MODEL, wait_sessions_freed

from edgespec.edge.chat_template import render_fallback
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

PROMPT = "def verify(block):"
MESSAGES = [
    {"role": "system", "content": "You complete Python code."},
    {"role": "user", "content": "def fib(n):"},
]
TIMEOUT_S = 60.0
# With sampling, which random draws a seed gives depends on the rounds (draft lengths, pipelined
# guesses): one fixed schedule on both paths makes the seeded outputs comparable token for token.
FIXED = {"policy": "fixed", "draft_tokens": 4, "pipelined": False}


@pytest.fixture(scope="module")
def client(edge) -> openai.OpenAI:
    return openai.OpenAI(base_url=edge.base_url, api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def grpc_generate(edge, prompt: str, **params) -> pb.Summary:
    """The same request through the edge's gRPC service (the tokenizer's eos as a stop id, as
    the HTTP API adds it)."""
    eos = edge.engine.tokenizer.eos_token_id
    request = pb.GenerateRequest(
        prompt=prompt, params=pb.SamplingParams(stop_token_ids=[eos], **params), **FIXED
    )
    with grpc.insecure_channel(edge.grpc_address) as channel:
        responses = list(pb_grpc.EdgeStub(channel).Generate(request, timeout=TIMEOUT_S))
    return responses[-1].summary


def expected_text(edge, summary: pb.Summary) -> str:
    """The summary's text as the HTTP API returns it: without the stop token that ended it."""
    ids = list(summary.token_ids)
    if ids and ids[-1] == edge.engine.tokenizer.eos_token_id:
        ids = ids[:-1]
    return edge.engine.tokenizer.decode(ids)


@pytest.mark.parametrize(
    "sampling", [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.95, "seed": 1234}]
)
def test_completion_equals_the_grpc_path(edge, client, sampling) -> None:
    summary = grpc_generate(edge, PROMPT, max_new_tokens=24, **sampling)
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, extra_body={"edgespec": FIXED}, **sampling
    )
    choice = reply.choices[0]
    assert choice.text == expected_text(edge, summary)
    assert choice.finish_reason == summary.finish_reason
    assert reply.usage.completion_tokens == len(summary.token_ids)
    assert reply.usage.prompt_tokens == len(edge.engine.encode_prompt(PROMPT))
    figures = reply.model_extra["edgespec"]
    assert figures["rounds"] >= 1 and figures["bytes_sent"] > 0
    assert figures["accepted"] <= figures["drafted"]

    streamed = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=24,
        stream=True,
        extra_body={"edgespec": FIXED},
        **sampling,
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.8, "seed": 99}])
def test_chat_completion_equals_the_grpc_path(edge, client, sampling) -> None:
    summary = grpc_generate(edge, render_fallback(MESSAGES), max_new_tokens=20, **sampling)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_completion_tokens=20,
        extra_body={"edgespec": FIXED},
        **sampling,
    )
    message = reply.choices[0].message
    assert message.role == "assistant"
    assert message.content == expected_text(edge, summary)
    assert reply.choices[0].finish_reason == summary.finish_reason

    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"edgespec": FIXED},
        **sampling,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert chunks[-1].choices == []  # the usage chunk
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_cuts_the_text_and_ends_the_generation(edge, verifier, client, stream):
    free = (
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=40,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    # A stop string from the middle of the greedy reply: the reply must end right before it.
    at = next(i for i in range(4, len(free) - 2) if free.find(free[i : i + 2]) == i)
    stop = free[at : at + 2]
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "\x00zz"])
    kwargs["extra_body"] = {"ignore_eos": True}
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        reply = client.completions.create(**kwargs)
        text, finish = reply.choices[0].text, reply.choices[0].finish_reason
        assert reply.usage.completion_tokens < 40  # the generation ended at the stop string
    assert text == free[:at]
    assert finish == "stop"
    wait_sessions_freed(edge, verifier)


def test_models_and_health(edge, client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    import httpx

    health = httpx.get(edge.url + "/health", timeout=TIMEOUT_S)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_an_unseeded_sample_reports_the_seed_that_reproduces_it(edge, client) -> None:
    """Coupled sampling (the default): the seed the edge drew comes back as edgespec.seed, and
    the same request with that seed gives the same text under the adaptive policy too."""
    first = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0)
    seed = first.model_extra["edgespec"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**64
    again = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=16,
        temperature=1.0,
        seed=seed,
        extra_body={"edgespec": {"policy": "adaptive"}},
    )
    assert again.choices[0].text == first.choices[0].text
    assert again.model_extra["edgespec"]["seed"] == seed
