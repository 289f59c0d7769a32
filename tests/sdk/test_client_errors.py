"""The client SDK's errors (`edgespec.errors`): status codes to typed errors, the field named by
an INVALID_ARGUMENT, deadlines, early close, errors mid-stream and protocol violations.

The SDK runs against a scripted `Edge` servicer (tests/support/servers.py) on a real grpc.aio
server on 127.0.0.1, so every conversion and error path goes through real gRPC."""

from __future__ import annotations

import socket

import grpc
import pytest
from support.servers import CALL_TIMEOUT_S

from edgespec import (
    Client,
    DeadlineExceeded,
    EdgespecError,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SamplingParams,
    Unauthenticated,
    Unavailable,
)
from edgespec.errors import error_class, from_rpc_error, parse_field

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
