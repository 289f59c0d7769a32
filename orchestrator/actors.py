"""Ray actors: thin shims that put the plain engines on Ray nodes and serve their gRPC endpoints.

- `VerifierActor` (placed on a node with the custom resource ``cloud``): loads the target into a
  `cloud.verifier.VerifierEngine` and serves the Verifier gRPC service.
- `EdgeActor` (resource ``edge``): loads the draft into an `edge.engine.EdgeEngine` and serves the
  Edge gRPC service. Its engine gets each session's verifier from the orchestrator.
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
import contextlib
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import ray

from edgespec.orchestrator.registry import (
    EDGE,
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
# Deadline of the edge's blocking call to the orchestrator for a session's verifier.
_ASSIGN_TIMEOUT_S = 2.0


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
class EdgeSpec:
    """What one edge serves and how it reaches the verifiers."""

    draft_path: str  # draft checkpoint folder (with its tokenizer), readable on the edge nodes
    default_k: int = 4  # draft length when a request names none
    default_policy: str = "fixed"  # draft-length policy when a request names none
    max_sessions: int = 64
    round_timeout_s: float = 10.0  # one verification round's deadline
    max_retries: int = 6  # reconnects per round before the session fails
    token: str | None = None  # bearer token clients must send to the edge
    verifier_token: str | None = None  # bearer token sent to the verifiers
    # Emulated WAN link between this edge and every verifier: an `edgespec.linkemu.LinkProfile`
    # as a dict (`LinkProfile.to_dict()`); None = direct connections.
    link: dict[str, Any] | None = None
    port: int = 0
    metrics_port: int | None = 0  # Prometheus /metrics port on the node; 0 = free, None = off
    # edgespec.core.profiles name: "real", or an emulated device that pads each draft forward
    compute_profile: str = "real"
    pipelined: bool = True  # draft ahead while verdicts travel (requests may say otherwise)

    def __post_init__(self) -> None:
        _check_profile(self.compute_profile)
        if self.metrics_port is not None:
            _check_port("metrics_port", self.metrics_port)
        if not isinstance(self.draft_path, str) or not self.draft_path:
            raise ValueError(f"draft_path must be a non-empty str, got {self.draft_path!r}")
        _check_positive("round_timeout_s", self.round_timeout_s)
        _check_port("port", self.port)
        if self.link is not None:
            from edgespec.linkemu import LinkProfile

            LinkProfile.from_dict(self.link)  # validates


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
        from edgespec.cloud.verifier import VerifierEngine
        from edgespec.cloud.verifier_types import VerifierConfig

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
        from edgespec.serving.verifier_metrics import VerifierMetrics

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


# ---------------------------------------------------------------- edge


class EdgeActor(_EndpointActor):
    """An edge: the draft model behind the Edge gRPC service; verifiers come from the orchestrator.

    The engine asks its address provider (`_next_verifier`) for a verifier whenever a session
    opens or reopens. The provider asks the orchestrator to assign the session (least-loaded
    verifier); a second request from the same session means its verifier failed it, and the
    orchestrator moves it. Sessions are told apart by `orchestrator.edge_shim`: each generation
    carries a key in its context, and its end releases the assignment.
    """

    kind = EDGE

    def __init__(self, name: str, spec: EdgeSpec) -> None:
        self.spec = spec
        self.engine = None
        self._orch = None
        self._links: dict[str, Any] = {}  # verifier address -> LinkEmulator in front of it
        self._verifier_cache: list[str] = []  # fallback when the orchestrator does not answer
        self._fallback_turn = 0
        self.assignments = 0
        self.fallbacks = 0
        super().__init__(name)

    async def _start(self) -> None:
        from edgespec.edge.engine import EngineConfig
        from edgespec.edge.link import LinkConfig
        from edgespec.edge.service import serve
        from edgespec.orchestrator.edge_shim import SessionScopedEngine

        self.device = _device()
        spec = self.spec
        link_config = LinkConfig(token=spec.verifier_token, round_timeout_s=spec.round_timeout_s)
        config = EngineConfig(
            default_k=spec.default_k,
            max_k=max(32, spec.default_k),
            default_policy=spec.default_policy,
            max_sessions=spec.max_sessions,
            max_retries=spec.max_retries,
            pipelined=spec.pipelined,
        )
        self.engine = await asyncio.to_thread(
            SessionScopedEngine.from_pretrained,
            spec.draft_path,
            self._next_verifier,
            link_config=link_config,
            config=config,
            device=self.device,
            compute_profile=spec.compute_profile,
        )
        self.engine.key_prefix = self.name
        self.engine.on_session_end = self._release
        from edgespec.serving.edge_metrics import EdgeMetrics

        metrics = self._serve_metrics(EdgeMetrics, spec.metrics_port)
        self._server = await serve(
            self.engine, host=BIND_HOST, port=spec.port, token=spec.token, metrics=metrics
        )
        self.address = f"{ray.util.get_node_ip_address()}:{self._server.port}"
        logger.info("edge %s serving on %s (%s)", self.name, self.address, self.device)
        await _register(self.name, self.kind, self.address, self.device)
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    # -- the engine's address provider (called on this actor's loop, in the session's context)

    def _next_verifier(self) -> str:
        from edgespec.orchestrator.edge_shim import current_session

        slot = current_session()
        if slot is None:  # not inside a generation: a one-off assignment
            key = f"{self.name}/{uuid.uuid4().hex[:12]}"
            address = self._assign(key)
            self._release(key)
        else:
            address = self._assign(slot.key)
            slot.assigned = True
        return self._through_link(address)

    def _assign(self, key: str) -> str:
        try:
            orch = self._orchestrator()
            # Blocking on purpose: the engine's provider is synchronous. The call is one local
            # actor round trip (~1 ms) per session open, and the draft work runs on its own thread.
            address = ray.get(
                orch.assign_verifier.remote(key, self.name), timeout=_ASSIGN_TIMEOUT_S
            )
            self.assignments += 1
            return address
        except Exception as err:  # orchestrator down or no verifier: fall back to the last view
            self._orch = None
            if not self._verifier_cache:
                raise
            self.fallbacks += 1
            self._fallback_turn += 1
            address = self._verifier_cache[self._fallback_turn % len(self._verifier_cache)]
            logger.warning("orchestrator did not assign %s (%s); trying %s", key, err, address)
            return address

    def _release(self, key: str) -> None:
        with contextlib.suppress(Exception):
            self._orchestrator().release_session.remote(key)  # fire and forget

    def _orchestrator(self):
        if self._orch is None:
            self._orch = ray.get_actor(ORCHESTRATOR_NAME, namespace=NAMESPACE)
        return self._orch

    def _through_link(self, address: str) -> str:
        """The address to dial for `address`: itself, or the link emulator in front of it."""
        if self.spec.link is None:
            return address
        emu = self._links.get(address)
        if emu is None:
            from edgespec.linkemu import LinkEmulator, LinkProfile

            host, _, port = address.rpartition(":")
            emu = LinkEmulator(host, int(port), LinkProfile.from_dict(self.spec.link)).start()
            self._links[address] = emu
        return emu.address

    async def _refresh_cache(self) -> None:
        """Refresh the fallback list of verifiers; stop link emulators of departed ones."""
        try:
            verifiers = await self._orchestrator().endpoints.remote(VERIFIER)
        except Exception as err:  # the orchestrator may be restarting: keep the last view
            logger.debug("verifier list not refreshed: %s", err)
            return
        self._verifier_cache = [v["address"] for v in verifiers if v["health"] != UNREACHABLE]
        registered = {v["address"] for v in verifiers}
        for address in [a for a in self._links if a not in registered]:
            # The verifier restarted elsewhere or left: its sessions have reconnected already.
            await asyncio.to_thread(self._links.pop(address).stop)

    async def _refresh_forever(self, interval_s: float = 5.0) -> None:
        while True:
            await self._refresh_cache()
            await asyncio.sleep(interval_s)

    async def stats(self) -> dict[str, Any]:
        """Active sessions, assignments asked of the orchestrator, emulated links."""
        await self._ready
        await self._refresh_cache()
        return {
            "active_sessions": self.engine.active_sessions,
            "assignments": self.assignments,
            "fallbacks": self.fallbacks,
            "links": {
                addr: {"via": emu.address, "profile": emu.profile.name}
                for addr, emu in self._links.items()
            },
            # what the engine has learnt of each verifier link (RTT, acceptance, mode, k)
            "link_estimates": self.engine.link_estimates(),
        }

    async def link_stats(self) -> dict[str, Any]:
        """Achieved link figures per verifier address (`LinkStats.to_dict()`)."""
        await self._ready
        return {addr: emu.stats().to_dict() for addr, emu in self._links.items()}


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
