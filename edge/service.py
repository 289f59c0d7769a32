"""The Edge gRPC service: a thin shim from `GenerateRequest` to `EdgeEngine.generate`.

`Generate` streams one `GenerateResponse` per batch of committed tokens, then the `Summary`.
Bad input answers INVALID_ARGUMENT with details ``"<field>: <what is wrong>"`` and the field in
the trailing metadata ``edgespec-field`` (empty prompt, bad params, unknown policy, draft_tokens
out of range, prompt ids outside the vocabulary, stop ids outside it); a full edge, or verifiers
that are all full, answer RESOURCE_EXHAUSTED with a back-off hint in the trailing metadata
``edgespec-retry-after-ms``; verifiers that cannot be reached answer UNAVAILABLE; a verifier's
own failure, and any unexpected failure of the edge itself, answer INTERNAL with the cause in the
details (never UNKNOWN). The server also runs the standard
health service (grpc.health.v1) and server reflection, and, given a token, refuses every other
call without ``authorization: Bearer <token>`` metadata (UNAUTHENTICATED).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import _async as health_aio  # health.aio at runtime; the stubs lack it
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgespec.core.params import SamplingParams
from edgespec.edge.channels import MAX_MESSAGE_BYTES
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.records import EdgeStats, SummaryEvent, TokensEvent
from edgespec.edge.recovery import EdgeError
from edgespec.protos.convert import (
    FIELD_METADATA_KEY,
    RETRY_AFTER_METADATA_KEY,
    FieldError,
    params_from_proto,
)
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc
from edgespec.serving.auth import EDGE_EXEMPT, auth_interceptors
from edgespec.serving.edge_metrics import EdgeMetrics
from edgespec.serving.reflection import enable_reflection
from edgespec.serving.tls import TlsConfig, bind

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Edge"].full_name  # "edgespec.v1.Edge"


def stats_to_proto(stats: EdgeStats) -> pb.GenerateStats:
    return pb.GenerateStats(
        rounds=stats.rounds,
        drafted=stats.drafted,
        accepted=stats.accepted,
        drafted_per_position=stats.drafted_per_position,
        accepted_per_position=stats.accepted_per_position,
        draft_lengths=stats.draft_lengths,
        rtt_ms_mean=stats.rtt_ms_mean,
        time_to_first_token_ms=stats.time_to_first_token_ms,
        time_per_output_token_ms=stats.time_per_output_token_ms,
        bytes_sent=stats.bytes_sent,
        bytes_received=stats.bytes_received,
        reconnects=stats.reconnects,
        verifier=stats.verifier,
        pipeline_hits=stats.pipeline_hits,
        pipeline_misses=stats.pipeline_misses,
        cloud_only_tokens=stats.cloud_only_tokens,
    )


def observe_summary(metrics: EdgeMetrics, event: SummaryEvent) -> None:
    """Record a finished generation's rounds and totals (at its summary: a round's numbers are
    final only once the generation is, e.g. the last round's cut at max_new_tokens)."""
    stats = event.stats
    for r in stats.round_records:
        metrics.observe_round(
            drafted=r.drafted,
            accepted=r.accepted,
            rtt_ms=max(r.network_ms, 0.0),
            round_ms=r.cycle_ms,
            committed=r.tokens,
            bytes_sent=r.timing.bytes_sent,
            bytes_received=r.timing.bytes_received,
        )
    for _ in range(stats.reconnects):
        metrics.observe_reconnect()
    n = len(event.tokens)
    metrics.observe_generation(
        finish_reason=event.finish_reason,
        drafted=stats.drafted,
        accepted=stats.accepted,
        time_to_first_token_ms=stats.time_to_first_token_ms,
        time_per_output_token_ms=stats.time_per_output_token_ms if n > 1 else None,
    )


class EdgeServicer(pb_grpc.EdgeServicer):
    """Thin servicer: proto -> `EdgeEngine.generate` -> proto; Prometheus metrics if given."""

    def __init__(self, engine: EdgeEngine, metrics: EdgeMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        with self.metrics.track_session() if self.metrics else contextlib.nullcontext():
            async for response in self._generate(request, context):
                yield response

    async def _generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            which = request.WhichOneof("input")
            if which == "prompt":
                prompt: str | list[int] = request.prompt
            elif which == "prompt_ids":
                prompt = list(request.prompt_ids.ids)
            else:
                raise FieldError("prompt", "prompt (text) or prompt_ids is required, got neither")
            params = (
                params_from_proto(request.params)
                if request.HasField("params")
                else SamplingParams()
            )
            pipelined = request.pipelined if request.HasField("pipelined") else None
            events = self.engine.generate(
                prompt, params, k=request.draft_tokens, policy=request.policy, pipelined=pipelined
            )
            # aclosing: a client that goes away closes the generation (and its verifier session)
            # now, not when the abandoned generator is collected.
            async with contextlib.aclosing(events):
                async for event in events:
                    yield self._response(event)
        except FieldError as err:
            if self.metrics is not None:
                self.metrics.observe_error("INVALID_ARGUMENT")
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                # The .proto's convention: details start with the field path, named once.
                str(err) if str(err).startswith(err.field) else f"{err.field}: {err}",
                trailing_metadata=((FIELD_METADATA_KEY, err.field),),
            )
        except EdgeError as err:
            logger.warning("Generate failed: %s %s", err.code, err)
            if self.metrics is not None:
                self.metrics.observe_error(err.code)
            trailers: tuple[tuple[str, str], ...] = ()
            if err.retry_after_ms is not None:
                trailers = ((RETRY_AFTER_METADATA_KEY, str(err.retry_after_ms)),)
            await context.abort(grpc.StatusCode[err.code], str(err), trailing_metadata=trailers)
        except Exception as err:  # noqa: BLE001 - a bug of the edge's own: say so, never UNKNOWN
            logger.exception("Generate failed unexpectedly")
            if self.metrics is not None:
                self.metrics.observe_error("INTERNAL")
            await context.abort(
                grpc.StatusCode.INTERNAL, f"edge internal error: {type(err).__name__}: {err}"
            )

    def _response(self, event: TokensEvent | SummaryEvent) -> pb.GenerateResponse:
        """One generation event as a GenerateResponse (a summary is recorded in the metrics)."""
        if isinstance(event, TokensEvent):
            return pb.GenerateResponse(tokens=pb.TokenIds(ids=event.tokens), text=event.text)
        if self.metrics is not None:
            observe_summary(self.metrics, event)
            self.metrics.observe_links(self.engine.link_estimates())
        return pb.GenerateResponse(
            summary=pb.Summary(
                finish_reason=event.finish_reason,
                token_ids=event.tokens,
                text=event.text,
                stats=stats_to_proto(event.stats),
                seed=event.seed,
            )
        )


@dataclass
class RunningEdgeServer:
    """A started Edge server; `await stop()` ends it (and closes the engine)."""

    server: grpc.aio.Server
    port: int
    engine: EdgeEngine
    health: health_aio.HealthServicer

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, let running sessions finish for `grace` s, close the engine."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.engine.aclose()


async def serve(
    engine: EdgeEngine,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    tls: TlsConfig | None = None,
    metrics: EdgeMetrics | None = None,
) -> RunningEdgeServer:
    """Start an Edge server on host:port (0 = a free port) and return it running.

    `token`: require ``authorization: Bearer <token>`` on every call but health and reflection.
    `tls`: serve TLS with its cert + key (and require client certificates signed by its
    ca_cert, if set), else plaintext. `metrics`: an `EdgeMetrics` on the caller's registry that
    records every generation. OSError if host:port cannot be bound.
    """
    server = grpc.aio.server(
        interceptors=auth_interceptors(token, EDGE_EXEMPT),
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    pb_grpc.add_EdgeServicer_to_server(EdgeServicer(engine, metrics), server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)
    bound = bind(server, f"{host}:{port}", tls)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("Edge service listening on %s:%d", host, bound)
    return RunningEdgeServer(server=server, port=bound, engine=engine, health=health_servicer)
