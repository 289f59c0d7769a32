"""Ray actors: thin shims that put the plain engines on Ray nodes and serve their gRPC endpoints.

- `VerifierActor` (placed on a node with the custom resource ``cloud``): loads the target into a
  `cloud.verifier.VerifierEngine` and serves the Verifier gRPC service.
- `EdgeActor` (resource ``edge``, in `orchestrator.edge_actor`): loads the draft into an
  `edge.engine.EdgeEngine` and serves the Edge gRPC service. Its engine gets each session's
  verifier from the orchestrator.
- `OrchestratorActor` (named, detached): wraps an `orchestrator.registry.Registry`, checks every
  endpoint's gRPC health, assigns sessions to verifiers (least loaded) and answers `status`.

The classes are plain Python classes; `orchestrator.cluster.deploy` turns them into Ray actors
with ``ray.remote(cls).options(...)`` (resources, ``num_gpus``, ``max_restarts``,
``max_task_retries``, names). All three are *async* actors: Ray runs their methods on one event
loop, which also runs their gRPC server (grpc.aio) and background tasks.

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
from dataclasses import asdict, dataclass
from typing import Any

import ray

from edgespec.orchestrator.registry import (
    NOT_SERVING,
    SERVING,
    UNREACHABLE,
    VERIFIER,
    Move,
    Registry,
)

logger = logging.getLogger(__name__)

NAMESPACE = "edgespec"  # Ray namespace of every edgespec actor
ORCHESTRATOR_NAME = "edgespec-orchestrator"
BIND_HOST = "0.0.0.0"

# How long an actor keeps trying to reach the orchestrator when it (re)starts: the orchestrator
# may itself be restarting.
_REGISTER_ATTEMPTS = 20
_REGISTER_BACKOFF_S = 0.5


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def _check_profile(name: object) -> None:
    from edgespec.core.profiles import get_profile  # torch: not at import time

    get_profile(name)  # ValueError naming the known profiles


def _check_port(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"{name} must be an int in [0, 65535] (0 = a free port), got {value!r}")


@dataclass(frozen=True)
class VerifierSpec:
    """What one verifier replica serves and how."""

    target_path: str  # target checkpoint folder, readable on the cloud nodes
    max_sessions: int = 64  # concurrent sessions per replica
    max_block_tokens: int = 32  # largest draft block (k) a replica verifies
    token: str | None = None  # bearer token the edges must send; None = no auth
    port: int = 0  # gRPC port on the node; 0 = a free one
    metrics_port: int | None = 0  # Prometheus /metrics port on the node; 0 = free, None = off
    # edgespec.core.profiles name: "real", or an emulated device that pads each target forward
    compute_profile: str = "real"

    def __post_init__(self) -> None:
        _check_profile(self.compute_profile)
        if self.metrics_port is not None:
            _check_port("metrics_port", self.metrics_port)
        if not isinstance(self.target_path, str) or not self.target_path:
            raise ValueError(f"target_path must be a non-empty str, got {self.target_path!r}")
        for name in ("max_sessions", "max_block_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        _check_port("port", self.port)


@dataclass(frozen=True)
class OrchestratorConfig:
    """How the orchestrator watches its endpoints."""

    health_interval_s: float = 1.0  # time between two health-check rounds
    health_timeout_s: float = 1.0  # deadline of one gRPC health check
    # Names of the actors to ask to re-register when the orchestrator (re)starts.
    actor_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_positive("health_interval_s", self.health_interval_s)
        _check_positive("health_timeout_s", self.health_timeout_s)
        object.__setattr__(self, "actor_names", tuple(self.actor_names))


# ---------------------------------------------------------------- helpers shared by the shims


def _device() -> str:
    """'cuda' when Ray assigned this actor a GPU, else 'cpu'."""
    return "cuda" if ray.get_gpu_ids() else "cpu"


def _node_info() -> dict[str, Any]:
    ctx = ray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
    }


async def _register(endpoint_id: str, kind: str, address: str, device: str) -> None:
    """Register with the orchestrator, waiting (bounded) for it to exist."""
    info = _node_info()
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


class _EndpointActor:
    """What both model actors share: start on the loop, register, report."""

    kind = ""

    def __init__(self, name: str) -> None:
        self.name = name
        self.address = ""
        self.device = "cpu"
        self.started_at = time.time()
        self._server = None
        self.metrics_url = ""  # this endpoint's Prometheus /metrics, when served
        self._ready = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        raise NotImplementedError

    def _serve_metrics(self, metrics_cls: type, port: int | None):
        """Start this actor's /metrics endpoint (None: metrics off) and return its metrics."""
        if port is None:
            return None
        from edgespec.serving.metrics import serve_metrics

        metrics, server = serve_metrics(metrics_cls, port, host=BIND_HOST)
        self.metrics_url = f"http://{ray.util.get_node_ip_address()}:{server.port}/metrics"
        logger.info("%s: metrics on %s", self.name, self.metrics_url)
        return metrics

    async def ready(self) -> dict[str, Any]:
        """Wait until the endpoint serves (raises what the start raised); returns `info()`."""
        await self._ready
        return self.info()

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "address": self.address,
            "device": self.device,
            "metrics_url": self.metrics_url,
            "started_at": self.started_at,
            **_node_info(),
        }

    async def announce(self) -> dict[str, Any]:
        """Register again with the orchestrator (it restarted); returns `info()`."""
        await self._ready
        await _register(self.name, self.kind, self.address, self.device)
        return self.info()

    async def stop_serving(self, grace_s: float = 5.0) -> None:
        """Stop the gRPC server: health turns NOT_SERVING, calls get `grace_s` to finish."""
        await self._ready
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace_s)


# ---------------------------------------------------------------- verifier


class VerifierActor(_EndpointActor):
    """A verifier replica: the target model behind the Verifier gRPC service."""

    kind = VERIFIER

    def __init__(self, name: str, spec: VerifierSpec) -> None:
        self.spec = spec
        self.engine = None
        super().__init__(name)

    async def _start(self) -> None:
        from edgespec.cloud.service import serve
        from edgespec.cloud.verifier import VerifierConfig, VerifierEngine

        self.device = _device()
        spec = self.spec
        config = VerifierConfig(
            max_sessions=spec.max_sessions,
            max_block_tokens=spec.max_block_tokens,
            device=self.device,
        )
        # Loading takes seconds: off the loop, so Ray calls (ready, stats) still answer.
        self.engine = await asyncio.to_thread(
            VerifierEngine.from_pretrained,
            spec.target_path,
            config,
            compute_profile=spec.compute_profile,
        )
        from edgespec.serving.metrics import VerifierMetrics

        metrics = self._serve_metrics(VerifierMetrics, spec.metrics_port)
        self._server = await serve(
            self.engine, host=BIND_HOST, port=spec.port, token=spec.token, metrics=metrics
        )
        self.address = f"{ray.util.get_node_ip_address()}:{self._server.port}"
        logger.info("verifier %s serving on %s (%s)", self.name, self.address, self.device)
        await _register(self.name, self.kind, self.address, self.device)

    async def stats(self) -> dict[str, Any]:
        """The engine's counters (sessions, blocks verified, ...)."""
        await self._ready
        return asdict(self.engine.stats())


# ---------------------------------------------------------------- orchestrator


@dataclass
class _Probe:
    """A cached gRPC channel to one endpoint address for health checks."""

    address: str
    channel: Any = None
    stub: Any = None
    last_error: str = ""
    checks: int = 0


class OrchestratorActor:
    """The named orchestrator: registry, health checks, session assignment, status view."""

    def __init__(self, config: OrchestratorConfig | None = None) -> None:
        self.config = config if config is not None else OrchestratorConfig()
        self.registry = Registry()
        self.started_at = time.time()
        self._probes: dict[str, _Probe] = {}
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._health_loop()),
            loop.create_task(self._reannounce()),
        ]

    # ---- endpoints

    async def register(
        self,
        endpoint_id: str,
        kind: str,
        address: str,
        *,
        node_id: str = "",
        node_ip: str = "",
        device: str = "cpu",
        pid: int = 0,
    ) -> None:
        self.registry.register(
            endpoint_id, kind, address, node_id=node_id, node_ip=node_ip, device=device, pid=pid
        )
        logger.info("registered %s %s at %s (%s)", kind, endpoint_id, address, device)

    async def unregister(self, endpoint_id: str) -> list[dict[str, Any]]:
        return [vars(m) for m in self.registry.unregister(endpoint_id)]

    async def endpoints(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.registry.endpoints(kind)]

    # ---- sessions

    async def assign_verifier(self, session_key: str, edge_id: str) -> str:
        """Address of the verifier session `session_key` should (re)connect to (see Registry)."""
        return self.registry.assign(session_key, edge_id).address

    async def release_session(self, session_key: str) -> bool:
        return self.registry.release(session_key)

    async def pick_edge(self) -> str:
        """Address of the healthy edge with the fewest sessions."""
        return self.registry.pick_edge().address

    async def drain(self, endpoint_id: str, stop: bool = False, grace_s: float = 5.0) -> list:
        """Take a verifier out of rotation; its sessions are reassigned. With `stop`, its server
        also stops (after `grace_s`), so the sessions' edges reconnect to their new verifiers."""
        moves = self.registry.drain(endpoint_id)
        if stop:
            actor = ray.get_actor(endpoint_id, namespace=NAMESPACE)
            await actor.stop_serving.remote(grace_s)
        return [vars(m) for m in moves]

    async def undrain(self, endpoint_id: str) -> None:
        self.registry.undrain(endpoint_id)

    # ---- health

    async def check_now(self) -> dict[str, str]:
        """Run one health-check round now; returns endpoint id -> health."""
        await self._check_all()
        return {e.endpoint_id: e.health for e in self.registry.endpoints()}

    async def _health_loop(self) -> None:
        while True:
            try:
                await self._check_all()
            except Exception:  # never let the loop die
                logger.exception("health-check round failed")
            await asyncio.sleep(self.config.health_interval_s)

    async def _check_all(self) -> None:
        checked = [(e.endpoint_id, e.address) for e in self.registry.endpoints()]
        results = await asyncio.gather(*(self._check(address) for _, address in checked))
        for (endpoint_id, address), health in zip(checked, results, strict=True):
            try:
                if self.registry.endpoint(endpoint_id).address != address:
                    continue  # re-registered elsewhere during the check: the result is stale
                moves = self.registry.set_health(endpoint_id, health)
            except KeyError:  # unregistered meanwhile
                continue
            self._log_moves(moves)
        # Channels to addresses no endpoint uses any more (an actor restarted elsewhere).
        live = {e.address for e in self.registry.endpoints()}
        for address in [a for a in self._probes if a not in live]:
            await self._probes.pop(address).channel.close()

    async def _check(self, address: str) -> str:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        probe = self._probes.get(address)
        if probe is None:
            channel = grpc.aio.insecure_channel(address)
            probe = _Probe(address, channel, health_pb2_grpc.HealthStub(channel))
            self._probes[address] = probe
        probe.checks += 1
        try:
            reply = await probe.stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self.config.health_timeout_s
            )
        except grpc.aio.AioRpcError as err:
            probe.last_error = f"{err.code().name}: {err.details()}"
            return UNREACHABLE
        probe.last_error = ""
        return SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING

    def _log_moves(self, moves: list[Move]) -> None:
        for m in moves:
            logger.info("session %s: %s -> %s (%s)", m.session_key, m.from_id, m.to_id, m.reason)

    async def _reannounce(self) -> None:
        """Ask every known actor to register again: this orchestrator may be a restarted one."""
        for name in self.config.actor_names:
            try:
                actor = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                continue
            actor.announce.remote()  # fire and forget: it registers itself when ready

    # ---- status

    async def status(self, with_actor_stats: bool = True) -> dict[str, Any]:
        """What `edgespec status` prints: nodes, endpoints (actors), sessions and load."""
        snap = self.registry.snapshot()
        nodes = await asyncio.to_thread(ray.nodes)
        snap["nodes"] = [
            {
                "node_id": n["NodeID"],
                "address": n["NodeManagerAddress"],
                "alive": n["Alive"],
                "resources": {
                    k: v
                    for k, v in n.get("Resources", {}).items()
                    if not k.startswith("node:") and k not in ("memory", "object_store_memory")
                },
                "is_head": "node:__internal_head__" in n.get("Resources", {}),
            }
            for n in nodes
        ]
        snap["orchestrator"] = {"started_at": self.started_at, **_node_info()}
        if with_actor_stats:
            for entry in snap["verifiers"] + snap["edges"]:
                entry["actor_stats"] = await self._actor_stats(entry["endpoint_id"])
        for entry in snap["verifiers"] + snap["edges"]:
            probe = self._probes.get(entry["address"])
            entry["last_error"] = probe.last_error if probe else ""
        return snap

    async def _actor_stats(self, name: str) -> dict[str, Any]:
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
            return await asyncio.wait_for(actor.stats.remote(), timeout=2.0)
        except Exception as err:
            return {"error": f"{type(err).__name__}: {err}"[:200]}
