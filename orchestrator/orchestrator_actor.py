"""`OrchestratorActor`: the named, detached control-plane actor, a thin shim over plain classes.

It holds a `Registry` (endpoints, load, session assignment: ``orchestrator/registry.py``) and a
`HealthChecker` that feeds it gRPC health results (``orchestrator/health.py``), and forwards the
model actors' registrations and the edges' assignment requests to them. What is Ray's stays
here: draining a verifier stops its actor's server, a (re)started orchestrator asks every actor
it knows by name to register again, and `status` adds Ray's node list and each actor's stats.

An *async* actor: its methods, its health loop and its re-announce task share one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import ray

from edgespec.core.validation import check_positive
from edgespec.orchestrator.endpoint_actor import node_info
from edgespec.orchestrator.health import HealthChecker
from edgespec.orchestrator.names import NAMESPACE
from edgespec.orchestrator.registry import Registry

logger = logging.getLogger(__name__)

# Resources `status` leaves out of a node's record: Ray's per-node markers and memory sizes.
_HIDDEN_RESOURCES = ("memory", "object_store_memory")


@dataclass(frozen=True)
class OrchestratorConfig:
    """How the orchestrator watches its endpoints."""

    health_interval_s: float = 1.0  # time between two health-check rounds
    health_timeout_s: float = 1.0  # deadline of one gRPC health check
    # Names of the actors to ask to re-register when the orchestrator (re)starts.
    actor_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_positive("health_interval_s", self.health_interval_s)
        check_positive("health_timeout_s", self.health_timeout_s)
        object.__setattr__(self, "actor_names", tuple(self.actor_names))


def node_view(node: dict[str, Any]) -> dict[str, Any]:
    """One `ray.nodes()` record as `status` shows it (role resources, not Ray's markers)."""
    resources = node.get("Resources", {})
    return {
        "node_id": node["NodeID"],
        "address": node["NodeManagerAddress"],
        "alive": node["Alive"],
        "resources": {
            k: v
            for k, v in resources.items()
            if not k.startswith("node:") and k not in _HIDDEN_RESOURCES
        },
        "is_head": "node:__internal_head__" in resources,
    }


class OrchestratorActor:
    """The named orchestrator: registry, health checks, session assignment, status view."""

    def __init__(self, config: OrchestratorConfig | None = None) -> None:
        self.config = config if config is not None else OrchestratorConfig()
        self.registry = Registry()
        self.health = HealthChecker(
            self.registry,
            interval_s=self.config.health_interval_s,
            timeout_s=self.config.health_timeout_s,
        )
        self.started_at = time.time()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.health.run()), loop.create_task(self._reannounce())]

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

    async def drain(
        self, endpoint_id: str, stop: bool = False, grace_s: float = 5.0
    ) -> list[dict[str, Any]]:
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
        await self.health.check_all()
        return {e.endpoint_id: e.health for e in self.registry.endpoints()}

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
        snap["nodes"] = [node_view(n) for n in await asyncio.to_thread(ray.nodes)]
        snap["orchestrator"] = {"started_at": self.started_at, **node_info()}
        if with_actor_stats:
            for entry in snap["verifiers"] + snap["edges"]:
                entry["actor_stats"] = await self._actor_stats(entry["endpoint_id"])
        for entry in snap["verifiers"] + snap["edges"]:
            entry["last_error"] = self.health.last_error(entry["address"])
        return snap

    async def _actor_stats(self, name: str) -> dict[str, Any]:
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
            return await asyncio.wait_for(actor.stats.remote(), timeout=2.0)
        except Exception as err:
            return {"error": f"{type(err).__name__}: {err}"[:200]}
