"""What every model actor shares: start on the actor's loop, serve, register, report.

A model actor (`VerifierActor`, `EdgeActor`) is a Ray *async* actor: Ray runs its methods on one
event loop, which also runs its gRPC server (grpc.aio) and background tasks.

Start and restart: Ray runs ``__init__`` on every (re)start of an actor. ``__init__`` only
schedules `_start` on the actor's loop (it cannot await); `_start` loads the model, starts the
gRPC server on a free port, and registers the endpoint with the orchestrator under the actor's
name, so a restarted actor re-registers its new address by itself. Every public method awaits
`_start` first, so ``ready()`` returns once the endpoint is serving. An orchestrator that
restarts asks every actor it knows by name to `announce` itself again.

Devices: an actor that Ray gave a GPU (``num_gpus``) runs its model on CUDA; otherwise on CPU.
Addresses: servers bind 0.0.0.0 and advertise the node address Ray reports for the actor's node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import ray

from edgespec.core.profiles import get_profile
from edgespec.core.validation import check_port
from edgespec.orchestrator.names import NAMESPACE, ORCHESTRATOR_NAME
from edgespec.serving.edge_metrics import EdgeMetrics
from edgespec.serving.metrics import serve_metrics
from edgespec.serving.verifier_metrics import VerifierMetrics

logger = logging.getLogger(__name__)

BIND_HOST = "0.0.0.0"


@dataclass(frozen=True, kw_only=True)
class EndpointSpec:
    """What every model actor's spec holds: how clients reach it and what it emulates.

    Keyword-only, so that each role's spec keeps its own required fields first.
    """

    token: str | None = None  # bearer token its clients must send; None = no auth
    port: int = 0  # gRPC port on the node; 0 = a free one
    metrics_port: int | None = 0  # Prometheus /metrics port on the node; 0 = free, None = off
    # edgespec.core.profiles name: "real", or an emulated device that pads each forward
    compute_profile: str = "real"

    def __post_init__(self) -> None:
        get_profile(self.compute_profile)  # ValueError naming the known profiles
        check_port("port", self.port)
        if self.metrics_port is not None:
            check_port("metrics_port", self.metrics_port)


# How long an actor keeps trying to reach the orchestrator when it (re)starts: the orchestrator
# may itself be restarting.
_REGISTER_ATTEMPTS = 20
_REGISTER_BACKOFF_S = 0.5

MetricsT = TypeVar("MetricsT", EdgeMetrics, VerifierMetrics)


class RunningServer(Protocol):
    """What an actor needs of a started gRPC server (`cloud.service` and `edge.service` both)."""

    port: int

    async def stop(self, grace: float | None = ...) -> None: ...


def actor_device() -> str:
    """'cuda' when Ray assigned this actor a GPU, else 'cpu'."""
    return "cuda" if ray.get_gpu_ids() else "cpu"


def node_info() -> dict[str, Any]:
    """The Ray node and process this actor runs in."""
    ctx = ray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
    }


async def register_endpoint(endpoint_id: str, kind: str, address: str, device: str) -> None:
    """Register with the orchestrator, waiting (bounded) for it to exist; logs if it never does."""
    info = node_info()
    last: Exception | None = None
    for _ in range(_REGISTER_ATTEMPTS):
        try:
            orch = ray.get_actor(ORCHESTRATOR_NAME, namespace=NAMESPACE)
            await orch.register.remote(
                endpoint_id,
                kind,
                address,
                node_id=info["node_id"],
                node_ip=info["node_ip"],
                device=device,
                pid=info["pid"],
            )
            return
        except (ValueError, ray.exceptions.RayActorError) as err:  # not found / restarting
            last = err
            await asyncio.sleep(_REGISTER_BACKOFF_S)
    logger.error("%s %s could not register with the orchestrator: %s", kind, endpoint_id, last)


class EndpointActor:
    """Base of the model actors: subclasses set `kind` and implement `_start` (load, serve,
    register). Must be constructed on a running event loop (a Ray async actor's)."""

    kind = ""

    def __init__(self, name: str) -> None:
        self.name = name
        self.address = ""
        self.device = "cpu"
        self.started_at = time.time()
        self._server: RunningServer | None = None
        self.metrics_url = ""  # this endpoint's Prometheus /metrics, when served
        self.http_url = ""  # an edge's OpenAI-compatible HTTP API (base URL + /v1), when served
        self._ready = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        raise NotImplementedError

    def _serve_metrics(self, metrics_cls: type[MetricsT], port: int | None) -> MetricsT | None:
        """Start this actor's /metrics endpoint (None: metrics off) and return its metrics."""
        if port is None:
            return None
        metrics, server = serve_metrics(metrics_cls, port, host=BIND_HOST)
        self.metrics_url = f"http://{ray.util.get_node_ip_address()}:{server.port}/metrics"
        logger.info("%s: metrics on %s", self.name, self.metrics_url)
        return metrics

    async def ready(self) -> dict[str, Any]:
        """Wait until the endpoint serves (raises what the start raised); returns `info()`."""
        await self._ready
        return self.info()

    def info(self) -> dict[str, Any]:
        """Name, kind, address, device, metrics and HTTP URLs, start time, node and process."""
        return {
            "name": self.name,
            "kind": self.kind,
            "address": self.address,
            "device": self.device,
            "metrics_url": self.metrics_url,
            "http_url": self.http_url,
            "started_at": self.started_at,
            **node_info(),
        }

    async def announce(self) -> dict[str, Any]:
        """Register again with the orchestrator (it restarted); returns `info()`."""
        await self._ready
        await register_endpoint(self.name, self.kind, self.address, self.device)
        return self.info()

    async def stop_serving(self, grace_s: float = 5.0) -> None:
        """Stop the gRPC server: health turns NOT_SERVING, calls get `grace_s` to finish."""
        await self._ready
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace_s)
