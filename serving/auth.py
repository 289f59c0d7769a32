"""Bearer-token authentication for the edgespec gRPC servers (edge and verifier).

`BearerTokenInterceptor` refuses every call whose metadata lacks ``authorization: Bearer
<token>`` (compared in constant time) with UNAUTHENTICATED, except the methods the server
exempts by prefix. Each service names its own exemptions: the verifier exempts health checks
only (`VERIFIER_EXEMPT`), the edge health checks and server reflection (`EDGE_EXEMPT`).

Example::

    interceptors = [BearerTokenInterceptor("s3cret", exempt=EDGE_EXEMPT)]
    server = grpc.aio.server(interceptors=interceptors)
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

HEALTH_METHODS = "/grpc.health.v1.Health/"  # grpc.health.v1: load balancers probe without a token
REFLECTION_METHODS = "/grpc.reflection."  # server reflection (grpcurl and friends)
VERIFIER_EXEMPT = (HEALTH_METHODS,)
EDGE_EXEMPT = (HEALTH_METHODS, REFLECTION_METHODS)

UNAUTHENTICATED_DETAILS = "authorization metadata must be 'Bearer <token>' with this server's token"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but those whose method starts with one of `exempt` unless its
    metadata holds ``authorization: Bearer <token>``: UNAUTHENTICATED (`UNAUTHENTICATED_DETAILS`).

    Only the first ``authorization`` entry counts. An unknown method is left to gRPC
    (UNIMPLEMENTED), token or not. Raises ValueError for an empty token.
    """

    def __init__(self, token: str, exempt: tuple[str, ...]) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError(f"token must be a non-empty str, got {token!r}")
        self._expected = f"Bearer {token}".encode()
        self._exempt = tuple(exempt)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(self._exempt):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        return _denying_handler(handler)

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False


def _denying_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that answers UNAUTHENTICATED."""

    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)

    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return kind(
        deny,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def auth_interceptors(
    token: str | None, exempt: tuple[str, ...]
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a server gets for `token`: none without one (no authentication)."""
    return [BearerTokenInterceptor(token, exempt)] if token else []
