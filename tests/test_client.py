"""Tests for the client SDK (`edgespec.Client`, `edgespec.AsyncClient`, `edgespec.errors`).

Unit tests run the SDK against a scripted `Edge` servicer on a real grpc.aio server on
127.0.0.1 (in a thread with its own event loop), so every conversion and error path goes through
real gRPC: the request on the wire, streamed chunks, the summary, status codes, deadlines,
metadata and TLS. The script is chosen by the request's ``policy`` (the client passes it
through unchecked). One end-to-end test runs the real edge and cloud servers.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import self_signed_cert

from edgespec import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    EdgespecError,
    GenerationStats,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Result,
    SamplingParams,
    TlsConfig,
    TokenChunk,
    Unauthenticated,
    Unavailable,
)
from edgespec.errors import FIELD_METADATA_KEY, error_class, from_rpc_error, parse_field
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc
from edgespec.request import build_request

REPO_ROOT = Path(__file__).resolve().parents[1]
CALL_TIMEOUT_S = 10.0  # deadline of every call that is expected to succeed
STALL_S = 30.0  # how long the "stall" script sleeps: a broken deadline fails the test, not hangs
SECRET = "s3cret-token"

STATS = pb.GenerateStats(
    rounds=3,
    drafted=8,
    accepted=6,
    drafted_per_position=[3, 3, 2],
    accepted_per_position=[3, 2, 1],
    draft_lengths=[3, 3, 2],
    rtt_ms_mean=12.5,
    time_to_first_token_ms=30.0,
    time_per_output_token_ms=4.5,
    bytes_sent=512,
    bytes_received=128,
    reconnects=1,
    verifier="127.0.0.1:7000",
)


def _continuation(request: pb.GenerateRequest) -> list[int]:
    """The scripted 'generation': prompt ids + 1 (or the bytes of a text prompt), capped."""
    if request.WhichOneof("input") == "prompt":
        ids = list(request.prompt.encode())
    else:
        ids = [t + 1 for t in request.prompt_ids.ids]
    return ids[: request.params.max_new_tokens]


class ScriptedEdge(pb_grpc.EdgeServicer):
    """An `Edge` servicer whose behaviour is picked by ``request.policy``.

    Records every request and its metadata; `cancelled` is set when a call it was stalling is
    cancelled (by the client's deadline or close), `stall_finished` if a stall ran to its end.
    """

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.requests: list[tuple[pb.GenerateRequest, dict[str, str]]] = []
        self.cancelled = threading.Event()
        self.stall_finished = threading.Event()

    async def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.requests.append((request, metadata))
        if self.token is not None and metadata.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        script = request.policy
        ids = _continuation(request)
        if script.startswith("code:"):
            await context.abort(grpc.StatusCode[script[5:]], f"scripted {script[5:]}")
        if script == "invalid":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "params.temperature must be a finite number >= 0, got -1.0",
            )
        if script == "invalid_metadata":
            context.set_trailing_metadata(((FIELD_METADATA_KEY, "draft_tokens"),))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too many draft tokens")
        if script == "stall":
            yield pb.GenerateResponse(tokens=pb.TokenIds(ids=ids[:1]), text="x")
            try:
                await asyncio.sleep(STALL_S)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            self.stall_finished.set()
            return
        for i in range(0, len(ids), 2):
            part = ids[i : i + 2]
            yield pb.GenerateResponse(tokens=pb.TokenIds(ids=part), text=f"<{len(part)}>")
            if script == "drop" and i == 0:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "verifier link lost")
        if script == "no_summary":
            return
        summary_ids = ids[:-1] if script == "mismatch" else ids
        summary = pb.Summary(
            finish_reason="length", token_ids=summary_ids, text="decoded", stats=STATS
        )
        yield pb.GenerateResponse(summary=summary)
        if script == "after_summary":
            yield pb.GenerateResponse(tokens=pb.TokenIds(ids=[1]))


class ServerThread:
    """A grpc.aio server on 127.0.0.1 running its own event loop in a daemon thread."""

    def __init__(
        self,
        servicer: ScriptedEdge,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.servicer = servicer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self._run(self._start(credentials))

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_TIMEOUT_S)

    async def _start(self, credentials):
        server = grpc.aio.server()
        pb_grpc.add_EdgeServicer_to_server(self.servicer, server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        return server, port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(CALL_TIMEOUT_S)
        self.loop.close()


@pytest.fixture
def edge() -> Iterator[ServerThread]:
    server = ServerThread(ScriptedEdge())
    yield server
    server.stop()


@pytest.fixture
def client(edge: ServerThread) -> Iterator[Client]:
    with Client(edge.address, timeout=CALL_TIMEOUT_S) as c:
        yield c


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


# ----------------------------------------------------------------------------- errors


def test_invalid_argument_names_the_field_from_details(client):
    with pytest.raises(InvalidArgument) as info:
        client.generate("x", policy="invalid")
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.field == "params.temperature"
    assert err.details == "params.temperature must be a finite number >= 0, got -1.0"
    assert isinstance(err.__cause__, grpc.RpcError)
    # The server keeps serving after a bad request.
    assert client.generate([1], SamplingParams(max_new_tokens=1)).token_ids == [2]


def test_invalid_argument_field_from_trailing_metadata(client):
    with pytest.raises(InvalidArgument) as info:
        client.generate("x", policy="invalid_metadata")
    assert info.value.field == "draft_tokens"
    assert info.value.details == "too many draft tokens"


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("INVALID_ARGUMENT", InvalidArgument),
        ("NOT_FOUND", NotFound),
        ("RESOURCE_EXHAUSTED", ResourceExhausted),
        ("UNAUTHENTICATED", Unauthenticated),
        ("UNAVAILABLE", Unavailable),
        ("DEADLINE_EXCEEDED", DeadlineExceeded),
        ("INTERNAL", Internal),
        ("UNKNOWN", Internal),
        ("FAILED_PRECONDITION", EdgespecError),
    ],
)
def test_status_codes_map_to_typed_errors(client, code, cls):
    with pytest.raises(EdgespecError) as info:
        client.generate("x", policy=f"code:{code}")
    assert type(info.value) is cls
    assert info.value.code == grpc.StatusCode[code]
    assert info.value.details == f"scripted {code}"
    assert info.value.field is None
    assert error_class(grpc.StatusCode[code]) is cls


def test_builtin_bases_of_errors():
    assert issubclass(InvalidArgument, ValueError)
    assert issubclass(DeadlineExceeded, TimeoutError)
    assert issubclass(Unavailable, ConnectionError)
    err = DeadlineExceeded("too slow")
    assert (
        err.code == grpc.StatusCode.DEADLINE_EXCEEDED and str(err) == "DEADLINE_EXCEEDED: too slow"
    )


@pytest.mark.parametrize(
    ("details", "field"),
    [
        ("params.temperature must be a finite number >= 0, got nan", "params.temperature"),
        ("tokens[1]: token id 900 out of range [0, 300)", "tokens[1]"),
        (
            "probs.sparse.row_lengths must hold one length per draft token (4), got 3",
            "probs.sparse.row_lengths",
        ),
        ("prompt is empty", "prompt"),
        ("draft_tokens must be in [0, 32], got 99", "draft_tokens"),
        ("no session 'abc'", None),
        ("session abc not found", None),
        ("Exception calling application: boom", None),
        ("", None),
    ],
)
def test_parse_field(details, field):
    assert parse_field(details) == field


def test_deadline_exceeded_while_server_stalls(edge, client):
    with pytest.raises(DeadlineExceeded) as info:
        client.generate([1, 2], timeout=0.5, policy="stall")
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The deadline ended the call, not the server: its stall was cancelled, never finished.
    assert edge.servicer.cancelled.wait(CALL_TIMEOUT_S)
    assert not edge.servicer.stall_finished.is_set()


def test_stream_deadline_covers_the_whole_stream(edge, client):
    stream = client.stream([1, 2], timeout=0.5, policy="stall")
    assert next(stream).ids == [2]  # the first chunk arrives; the deadline still runs
    with pytest.raises(DeadlineExceeded):
        next(stream)
    with pytest.raises(DeadlineExceeded):
        _ = stream.result
    assert not edge.servicer.stall_finished.is_set()


def test_closing_a_stream_early_cancels_the_call(edge, client):
    with client.stream([1, 2], policy="stall") as stream:
        first = next(stream)
    assert first.ids == [2]
    assert edge.servicer.cancelled.wait(CALL_TIMEOUT_S)
    assert stream.done
    with pytest.raises(RuntimeError, match="closed before it finished"):
        _ = stream.result


def test_error_mid_stream_after_chunks(client):
    stream = client.stream([1, 2, 3, 4], policy="drop")
    assert next(stream).ids == [2, 3]
    with pytest.raises(Unavailable) as info:
        next(stream)
    assert info.value.details == "verifier link lost"
    with pytest.raises(Unavailable):
        _ = stream.result


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("no_summary", "without a summary"),
        ("mismatch", "differ from"),
        ("after_summary", "after the summary"),
    ],
)
def test_protocol_violations_raise_internal(client, script, message):
    with pytest.raises(Internal, match=message):
        client.generate([1, 2, 3], policy=script)


def test_unreachable_server_is_unavailable():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Client(f"127.0.0.1:{port}", timeout=CALL_TIMEOUT_S) as client, pytest.raises(Unavailable):
        client.generate("x")


def test_from_rpc_error_without_status():
    err = from_rpc_error(grpc.RpcError("opaque"))
    assert type(err) is Internal and err.code == grpc.StatusCode.UNKNOWN


# ----------------------------------------------------------------------------- asyncio


def test_async_client_generate_stream_and_errors(edge):
    async def main() -> None:
        async with AsyncClient(edge.address, timeout=CALL_TIMEOUT_S) as client:
            result = await client.generate([1, 2, 3], SamplingParams(max_new_tokens=3))
            assert result.token_ids == [2, 3, 4] and result.finish_reason == "length"
            assert result.stats.acceptance_rate == 6 / 8

            async with client.stream([5, 6, 7]) as stream:
                chunks = [chunk async for chunk in stream]
            assert [t for c in chunks for t in c.ids] == stream.result.token_ids == [6, 7, 8]

            with pytest.raises(InvalidArgument) as info:
                await client.generate("x", policy="invalid")
            assert info.value.field == "params.temperature"

            with pytest.raises(DeadlineExceeded):
                await client.generate([1], timeout=0.5, policy="stall")

            stream = client.stream([1, 2, 3, 4], policy="drop")
            assert (await stream.__anext__()).ids == [2, 3]
            with pytest.raises(Unavailable):
                await stream.__anext__()

            with pytest.raises(Internal, match="without a summary"):
                await client.generate([1], policy="no_summary")

    asyncio.run(main())
    assert edge.servicer.cancelled.is_set() and not edge.servicer.stall_finished.is_set()


def test_async_concurrent_calls_share_one_client(edge):
    async def main() -> list[Result]:
        async with AsyncClient(edge.address, timeout=CALL_TIMEOUT_S) as client:
            return await asyncio.gather(
                *(client.generate([i, i + 1], SamplingParams(max_new_tokens=2)) for i in range(4))
            )

    results = asyncio.run(main())
    assert [r.token_ids for r in results] == [[i + 1, i + 2] for i in range(4)]


# ----------------------------------------------------------------------------- TLS


def test_tls_channel(tmp_path):
    pytest.importorskip("cryptography", reason="building a test certificate needs cryptography")
    cert_path, key_path = self_signed_cert(tmp_path)
    credentials = grpc.ssl_server_credentials([(key_path.read_bytes(), cert_path.read_bytes())])
    server = ServerThread(ScriptedEdge(token=SECRET), credentials)
    try:
        tls = TlsConfig(ca_cert=cert_path, server_name="localhost")
        with Client(server.address, timeout=CALL_TIMEOUT_S, token=SECRET, tls=tls) as client:
            assert client.generate([1], SamplingParams(max_new_tokens=1)).token_ids == [2]
        # A plaintext client cannot talk to the TLS server.
        with (
            Client(server.address, timeout=CALL_TIMEOUT_S, token=SECRET) as client,
            pytest.raises(Unavailable),
        ):
            client.generate([1])
    finally:
        server.stop()


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
