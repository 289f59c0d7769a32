"""The client SDK end to end: the real edge and cloud servers (subprocesses) over the tiny pair;
token ids and text prompts give the target's own output, bad input names the field."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from support.servers import CALL_TIMEOUT_S, REPO_ROOT

from edgespec import AsyncClient, Client, DeadlineExceeded, InvalidArgument, SamplingParams

# ----------------------------------------------------------------------------- end to end

EDGE_SERVICE = REPO_ROOT / "edge" / "service.py"
CLOUD_SERVICE = REPO_ROOT / "cloud" / "service.py"


def _start_server(args: list[str]) -> tuple[subprocess.Popen, str]:
    """Start ``python -m <server> ...`` and return it with the address from its LISTENING line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # the server prints exactly one line when ready
    if not line.startswith("LISTENING "):
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start: first line {line!r}, rc {proc.wait()}")
    return proc, line.split()[1]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(CALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def real_edge(tiny_pair) -> Iterator[tuple[str, str]]:
    """(edge address, verifier address): ``python -m edgespec.cloud.server`` and ``python -m edgespec.edge.server``
    on the tiny pair, as separate processes."""
    if not (EDGE_SERVICE.exists() and CLOUD_SERVICE.exists()):
        pytest.skip("needs the real servers: edge/service.py and cloud/service.py are not written")
    target_dir, draft_dir = tiny_pair
    cloud, cloud_addr = _start_server(
        ["edgespec.cloud.server", "--target", str(target_dir), "--port", "0"]
    )
    try:
        edge, edge_addr = _start_server(
            [
                "edgespec.edge.server",
                "--draft",
                str(draft_dir),
                "--verifier",
                cloud_addr,
                "--port",
                "0",
            ]
        )
        try:
            yield edge_addr, cloud_addr
        finally:
            _stop(edge)
    finally:
        _stop(cloud)


@pytest.mark.slow
def test_end_to_end_token_ids_match_target_alone(tiny_pair, real_edge):
    from edgespec.core.generate import generate_autoregressive
    from edgespec.core.runner import ModelRunner

    edge_addr, cloud_addr = real_edge
    params = SamplingParams(max_new_tokens=24)
    prompt = [5, 17, 42, 99, 7, 130]
    expected = generate_autoregressive(
        ModelRunner.from_pretrained(tiny_pair.target_dir), prompt, params
    )

    with Client(edge_addr, timeout=60.0) as client:
        result = client.generate(prompt, params, policy="fixed", draft_tokens=4)
        with client.stream(prompt, params, policy="fixed", draft_tokens=2) as stream:
            streamed = [t for chunk in stream for t in chunk.ids]

    assert result.token_ids == expected.tokens
    assert result.finish_reason == expected.finish_reason
    assert streamed == expected.tokens and stream.result.token_ids == expected.tokens
    stats = result.stats
    assert stats.rounds == len(stats.draft_lengths) >= 1
    assert 0 < stats.drafted == sum(stats.drafted_per_position) == sum(stats.draft_lengths)
    assert stats.accepted == sum(stats.accepted_per_position) <= stats.drafted
    assert stats.acceptance_rate == stats.accepted / stats.drafted
    assert stats.bytes_sent > 0 and stats.bytes_received > 0
    assert stats.verifier == cloud_addr


@pytest.mark.slow
def test_end_to_end_text_prompt_async(tiny_pair, real_edge):
    from transformers import AutoTokenizer

    from edgespec.core.generate import generate_autoregressive
    from edgespec.core.runner import ModelRunner

    edge_addr, _ = real_edge
    params = SamplingParams(max_new_tokens=16)
    text = "the quick brown fox"
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.target_dir)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = generate_autoregressive(
        ModelRunner.from_pretrained(tiny_pair.target_dir), prompt_ids, params
    )

    async def main():
        async with AsyncClient(edge_addr, timeout=60.0) as client:
            async with client.stream(text, params, policy="fixed", draft_tokens=3) as stream:
                chunks = [chunk async for chunk in stream]
            return chunks, stream.result

    chunks, result = asyncio.run(main())
    assert result.token_ids == [t for c in chunks for t in c.ids] == expected.tokens
    assert result.text == tokenizer.decode(expected.tokens)
    # Streamed text is the output's text, less a trailing incomplete character held back.
    streamed_text = "".join(c.text for c in chunks)
    assert result.text.startswith(streamed_text)
    assert result.text[len(streamed_text) :].strip("\ufffd") == ""


@pytest.mark.slow
def test_end_to_end_errors_name_the_field(real_edge):
    edge_addr, _ = real_edge
    with Client(edge_addr, timeout=60.0) as client:
        with pytest.raises(InvalidArgument) as info:
            client.generate([5, 6], policy="no-such-policy")
        assert info.value.field == "policy"
        with pytest.raises(InvalidArgument) as info:
            client.generate([5, 6], policy="fixed", draft_tokens=100_000)
        assert info.value.field == "draft_tokens"
        with pytest.raises(InvalidArgument) as info:
            client.generate([], policy="fixed")
        assert info.value.field is not None and info.value.field.startswith("prompt")
        with pytest.raises(DeadlineExceeded):
            # 400 tokens over two processes and gRPC take far longer than 10 ms.
            client.generate(
                [5, 6], SamplingParams(max_new_tokens=400), policy="fixed", timeout=0.01
            )
        # The edge keeps serving after each failure.
        ok = client.generate([5, 6], SamplingParams(max_new_tokens=2), policy="fixed")
        assert len(ok.token_ids) == 2
