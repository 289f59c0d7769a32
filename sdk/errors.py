"""Typed errors of the edgespec SDK: one exception class per gRPC status the services answer.

Every failed call raises an `EdgespecError` subclass carrying the status `code`
(a `grpc.StatusCode`), the server's `details` text and, when the server named the offending
request field, that `field`.

Where `field` comes from (the servers' side of the contract, in this order):

1. trailing metadata ``edgespec-field: <path>``, when the server sets it;
2. otherwise the start of the details text, which the services write as
   ``"<path> <what is wrong, the bad value and the allowed range>"`` (the `FieldError` /
   `SamplingParams` message style; a colon after the path is accepted too), e.g.
   ``"params.temperature must be a finite number >= 0, got -1.0"`` or
   ``"prompt_ids[3]: token id 900 out of range [0, 300)"``.

A path is dotted names with optional ``[index]`` suffixes whose first name is a field of a
request message of the ``edgespec.v1`` wire contract (``prompt``, ``params``, ``draft_tokens``,
``prefix_ids``, ``tokens``, ``probs``, ...): free text such as ``"no session 'abc'"`` names no
field.

Classes also derive from the matching builtin where one exists, so generic code can catch them:
`InvalidArgument` is a `ValueError`, `DeadlineExceeded` a `TimeoutError`, `Unavailable` a
`ConnectionError`.

Example::

    from edgespec import Client, InvalidArgument, SamplingParams

    with Client("127.0.0.1:50051") as client:
        try:
            client.generate("hello", draft_tokens=10_000)
        except InvalidArgument as err:
            print(err.field, err.details)  # "draft_tokens", "draft_tokens must be ..."
"""

from __future__ import annotations

import re

import grpc

from edgespec.protos.convert import FIELD_METADATA_KEY, RETRY_AFTER_METADATA_KEY
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb

# "params.temperature", "prompt_ids[3]", "probs.sparse.row_lengths[0]", then ":", a space or the end.
_FIELD_PREFIX = re.compile(
    r"^\s*(?P<field>(?P<head>[A-Za-z_][A-Za-z0-9_]*)(?:\[\d+\])*"
    r"(?:\.[A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])*)*)(?::|\s|$)"
)
_REQUEST_MESSAGES = ("GenerateRequest", "OpenSessionRequest", "CloseSessionRequest", "DraftBlock")


def _request_field_names() -> frozenset[str]:
    """Names of every field of the edgespec.v1 request messages and the messages they hold."""
    names: set[str] = set()
    seen: set[str] = set()
    todo = [pb.DESCRIPTOR.message_types_by_name[name] for name in _REQUEST_MESSAGES]
    while todo:
        message = todo.pop()
        if message.full_name in seen:
            continue
        seen.add(message.full_name)
        for fd in message.fields:
            names.add(fd.name)
            if fd.message_type is not None:
                todo.append(fd.message_type)
    return frozenset(names)


_REQUEST_FIELDS = _request_field_names()


def parse_field(details: str | None) -> str | None:
    """The request field named at the start of a status details text, or None.

    Example::

        >>> parse_field("params.top_p must be a finite number in (0, 1], got 2.0")
        'params.top_p'
        >>> parse_field("tokens[1]: token id 900 out of range [0, 300)")
        'tokens[1]'
        >>> parse_field("no session 'abc'") is None
        True
    """
    if not details:
        return None
    match = _FIELD_PREFIX.match(details)
    if match is None or match.group("head") not in _REQUEST_FIELDS:
        return None
    return match.group("field")


class EdgespecError(Exception):
    """A failed edgespec call. Base class of every error the SDK raises for an RPC.

    Attributes:
        code: the gRPC status code (`grpc.StatusCode`).
        details: the server's (or the SDK's) explanation.
        field: the request field at fault, when the server named one; else None.
        retry_after_s: with RESOURCE_EXHAUSTED, how long the server asks the client to back off
            (its ``edgespec-retry-after-ms`` trailer), in seconds; else None.

    Example::

        try:
            client.generate("hi")
        except EdgespecError as err:
            log.warning("edgespec failed: %s (%s)", err.details, err.code.name)
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str,
        code: grpc.StatusCode | None = None,
        field: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(details)
        self.details = details
        self.code = code if code is not None else self.default_code
        self.field = field
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgument(EdgespecError, ValueError):
    """The request was malformed (`INVALID_ARGUMENT`); `field` names the culprit when known."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(EdgespecError):
    """Something named by the request does not exist (`NOT_FOUND`), e.g. an unknown model."""

    default_code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(EdgespecError):
    """The server is at capacity (`RESOURCE_EXHAUSTED`); retrying later may succeed."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(EdgespecError):
    """The bearer token was missing or wrong (`UNAUTHENTICATED`)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(EdgespecError, ConnectionError):
    """The server could not be reached or dropped the call (`UNAVAILABLE`); safe to retry."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(EdgespecError, TimeoutError):
    """The call's deadline (the client `timeout`) passed before it finished."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(EdgespecError):
    """The server failed (`INTERNAL`, `UNKNOWN`, `DATA_LOSS`) or broke the protocol."""

    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[EdgespecError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNKNOWN: Internal,
    grpc.StatusCode.DATA_LOSS: Internal,
}


def error_class(code: grpc.StatusCode) -> type[EdgespecError]:
    """The exception class for a status code (`EdgespecError` itself for unmapped codes)."""
    return _BY_CODE.get(code, EdgespecError)


def _trailer(err: grpc.RpcError, name: str) -> str | None:
    trailing = getattr(err, "trailing_metadata", None)
    if trailing is None:
        return None
    try:
        metadata = trailing() or ()
    except Exception:  # a call that never started has no metadata; the details still help
        return None
    for key, value in metadata:
        if key == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _retry_after_s(err: grpc.RpcError) -> float | None:
    value = _trailer(err, RETRY_AFTER_METADATA_KEY)
    if value is None or not value.isdigit():
        return None  # absent, or not the integer the contract promises: no hint
    return int(value) / 1e3


def from_rpc_error(err: grpc.RpcError) -> EdgespecError:
    """Convert a `grpc.RpcError` (sync or `grpc.aio.AioRpcError`) to the typed SDK error.

    The result's `code` and `details` are the call's; `field` is read as the module docstring
    describes. Raise it ``from err`` to keep the gRPC error as the cause.

    Example::

        try:
            stub.Generate(request, timeout=5.0)
        except grpc.RpcError as rpc_err:
            raise from_rpc_error(rpc_err) from rpc_err
    """
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    details = (details_fn() if callable(details_fn) else None) or str(err) or code.name
    field = _trailer(err, FIELD_METADATA_KEY) or parse_field(details)
    return error_class(code)(details, code=code, field=field, retry_after_s=_retry_after_s(err))
