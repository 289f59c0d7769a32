"""The Verifier gRPC server: `serve()` wires the servicer (`edgespec.cloud.servicer`) for one
`VerifierEngine`: Verifier + standard health (grpc.health.v1, SERVING) + reflection, an optional
bearer-token interceptor (health exempt), optional TLS, the idle-session reaper, and (with
``VerifierConfig.batching``, the default) the batching verifier's step scheduler. Model work runs
on ONE executor thread either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import _async as health_aio  # health.aio at runtime; the stubs lack it
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgespec.cloud.batch_step import StepStats
from edgespec.cloud.decoding import SERVICE_NAME, add_verifier_servicer
from edgespec.cloud.servicer import MAX_MESSAGE_BYTES, VerifierServicer
from edgespec.cloud.step_scheduler import StepScheduler
from edgespec.cloud.verifier import VerifierEngine
from edgespec.serving.auth import VERIFIER_EXEMPT, auth_interceptors
from edgespec.serving.reflection import enable_reflection
from edgespec.serving.tls import TlsConfig, bind
from edgespec.serving.verifier_metrics import VerifierMetrics

logger = logging.getLogger(__name__)


@dataclass
class RunningServer:
    """A started Verifier server. `await stop()` shuts it down (idempotent)."""

    server: grpc.aio.Server
    host: str
    port: int
    engine: VerifierEngine
    health: health_aio.HealthServicer
    _executor: ThreadPoolExecutor
    _tasks: list[asyncio.Task]  # the idle-session reaper, the step scheduler
    scheduler: StepScheduler | None = None  # the batching verifier's (None: batching off)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def stop(self, grace: float | None = 1.0) -> None:
        """Report NOT_SERVING, finish in-flight RPCs within `grace` seconds, stop the reaper
        and the step scheduler."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def serve(
    engine: VerifierEngine,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    tls: TlsConfig | None = None,
    reap_interval_s: float | None = None,
    metrics: VerifierMetrics | None = None,
) -> RunningServer:
    """Start a Verifier server for `engine` on host:port (port 0 = any free port).

    `token`: require ``authorization: Bearer <token>`` on every RPC but health checks.
    `tls`: serve TLS with its cert + key (and require client certificates signed by its
    ca_cert, if set), else plaintext. `reap_interval_s`: how often idle
    sessions are closed (default: a quarter of the engine's idle TTL, at most 30 s).
    `metrics`: a `VerifierMetrics` (on the caller's registry) that records every RPC.
    """
    server = grpc.aio.server(
        interceptors=auth_interceptors(token, VERIFIER_EXEMPT),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    # One thread: the target runs one forward at a time, and sessions are touched from one thread.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verifier")
    scheduler = None
    if engine.config.batching:
        scheduler = StepScheduler(engine, executor, _step_observer(engine, metrics))
    add_verifier_servicer(VerifierServicer(engine, executor, metrics, scheduler), server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server
    )
    bound = bind(server, f"{host}:{port}", tls)
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    ttl = engine.config.session_idle_ttl_s
    interval = reap_interval_s if reap_interval_s is not None else min(ttl / 4, 30.0)
    tasks = [asyncio.create_task(_reap_forever(engine, executor, interval, metrics))]
    if scheduler is not None:
        tasks.append(asyncio.create_task(scheduler.run()))
    logger.info("Verifier serving on %s (model %r)", f"{host}:{bound}", engine.model_id)
    return RunningServer(server, host, bound, engine, health_servicer, executor, tasks, scheduler)


def _step_observer(
    engine: VerifierEngine, metrics: VerifierMetrics | None
) -> Callable[[StepStats, int], None] | None:
    """The scheduler's per-step callback that feeds `metrics` (None without metrics)."""
    if metrics is None:
        return None
    metrics.kv_budget_tokens.set(engine.config.kv_budget_tokens or 0)

    def observe(stats: StepStats, queue_depth: int) -> None:
        metrics.observe_step(
            sessions=stats.sessions,
            fed_tokens=stats.fed_tokens,
            queue_depth=queue_depth,
            kv_tokens=engine.kv_tokens(),
            step_ms=stats.step_ms,
            modelled_ms=stats.modelled_ms,
        )
        counts = engine.stats()  # a step may have evicted sessions
        metrics.sync_sessions(counts.sessions, counts.evicted, counts.resumed)

    return observe


async def _reap_forever(
    engine: VerifierEngine,
    executor: ThreadPoolExecutor,
    interval: float,
    metrics: VerifierMetrics | None = None,
):
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        try:
            reaped = await loop.run_in_executor(executor, engine.reap_idle)
            if metrics is not None and reaped:
                for _ in reaped:
                    metrics.observe_session_closed("idle")
                metrics.set_active_sessions(engine.stats().sessions)
        except Exception:  # noqa: BLE001 - the reaper must outlive one bad pass
            logger.exception("idle-session reaper failed")
