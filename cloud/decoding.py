"""Request intake of the Verifier service: decoding that never raises, the handler table using
it, and the reader that moves a VerifyStream's blocks to the handler as they arrive.

grpc answers a request it cannot decode with UNKNOWN ("Unexpected <class 'DecodeError'>"), and
a stream's next undecodable message breaks its reader. Here each request is decoded by
`decoder(cls)`, which returns an `Undecodable` in place of the message; the handler then answers
INVALID_ARGUMENT naming the message type (`Undecodable.error`), as the error convention in
edgespec.proto says.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from edgespec.cloud.verifier_types import INVALID_ARGUMENT, ServiceError
from edgespec.protos.convert import FieldError
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

M = TypeVar("M", bound=Message)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Verifier"].full_name  # "edgespec.v1.Verifier"


@dataclass(frozen=True)
class Undecodable:
    """A request message that could not be decoded: its type name and the parser's reason."""

    type_name: str
    reason: str

    def error(self, where: str = "") -> ServiceError:
        """The INVALID_ARGUMENT to answer with; `where` locates the message (e.g. in a stream)."""
        return ServiceError(
            INVALID_ARGUMENT, f"{self.type_name}{where} could not be decoded ({self.reason})"
        )


def decoder(cls: type[M]) -> Callable[[bytes], M | Undecodable]:
    """`cls.FromString`, returning an `Undecodable` where it would raise DecodeError."""

    def decode(data: bytes) -> M | Undecodable:
        try:
            return cls.FromString(data)
        except DecodeError as err:
            return Undecodable(cls.DESCRIPTOR.name, str(err))

    return decode


def add_verifier_servicer(servicer: pb_grpc.VerifierServicer, server: Any) -> None:
    """`pb_grpc.add_VerifierServicer_to_server` with `decoder` as every request deserializer:
    the servicer's methods receive a message or an `Undecodable`."""
    handlers = {
        "OpenSession": grpc.unary_unary_rpc_method_handler(
            servicer.OpenSession,
            request_deserializer=decoder(pb.OpenSessionRequest),
            response_serializer=pb.OpenSessionResponse.SerializeToString,
        ),
        "CloseSession": grpc.unary_unary_rpc_method_handler(
            servicer.CloseSession,
            request_deserializer=decoder(pb.CloseSessionRequest),
            response_serializer=pb.CloseSessionResponse.SerializeToString,
        ),
        "VerifyStream": grpc.stream_stream_rpc_method_handler(
            servicer.VerifyStream,
            request_deserializer=decoder(pb.DraftBlock),
            response_serializer=pb.Verdict.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


A = TypeVar("A")


def as_arrived(msg: pb.DraftBlock, arrived: float) -> tuple[pb.DraftBlock, float]:
    """`read_blocks`' plain `admit`: the block with its arrival time (perf_counter)."""
    return msg, arrived


async def read_blocks(
    request_iterator: AsyncIterator[pb.DraftBlock | Undecodable],
    arrivals: asyncio.Queue[A | BaseException | None],
    admit: Callable[[pb.DraftBlock, float], A],
) -> None:
    """Move blocks from the stream to `arrivals` as they come: `admit(block, arrival time)`,
    called in arrival order (`as_arrived`: the block with its perf_counter arrival time).

    None marks the clean end of the stream; a stream that breaks puts its error instead (a
    block that cannot be decoded: a ServiceError INVALID_ARGUMENT naming it), which the handler
    turns into the stream's status. Nothing is read after either.
    """
    n = 0
    try:
        async for msg in request_iterator:
            if isinstance(msg, Undecodable):
                arrivals.put_nowait(msg.error(f" #{n} of this stream (from 0)"))
                return
            arrived = time.perf_counter()
            arrivals.put_nowait(admit(msg, arrived))
            n += 1
    except Exception as err:  # noqa: BLE001 - a broken stream ends the handler, not the server
        arrivals.put_nowait(err)
    else:
        arrivals.put_nowait(None)


def stream_session(session_id: str | None, msg: pb.DraftBlock) -> str:
    """The stream's session id after block `msg`: named by the first block; a later block's
    id must be empty or the same (FieldError naming session_id otherwise)."""
    if session_id is None:
        if not msg.session_id:
            raise FieldError("session_id", "session_id must be set on the first block of a stream")
        return msg.session_id
    if msg.session_id and msg.session_id != session_id:
        raise FieldError(
            "session_id",
            f"session_id must be {session_id!r} (this stream's session) or "
            f"empty, got {msg.session_id!r}",
        )
    return session_id
