"""A throwaway local deployment for the reliability benchmarks (chaos, soak), on this machine.

`LocalDeployment` starts an in-process Ray cluster (`ray.cluster_utils.Cluster`: a head, edge
and cloud worker nodes, all processes of this machine; the benchmark's clients dial the edges on
127.0.0.1, and the edges reach the verifiers through link emulators listening on 127.0.0.1; Ray
itself and the emulators' upstream use the node address Ray picks, an address of this machine.
Binding the nodes to 127.0.0.1 (``node_ip_address``) leaves the driver unable to reach the GCS
with Ray 2.x's Cluster utility, so it is not forced), deploys
the orchestrator, verifiers and edges on it with unlimited actor restarts (a chaos run kills
actors many times), and tears everything down on exit. Its probes ask the actors themselves:
each verifier engine's open-session count, each actor's process id (for RSS), who is serving.
Every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import ray
from ray.cluster_utils import Cluster

from edgespec.linkemu import LinkProfile
from edgespec.orchestrator import connection, deploy
from edgespec.orchestrator.names import (
    CLOUD_RESOURCE,
    EDGE_RESOURCE,
    NAMESPACE,
    edge_name,
    verifier_name,
)
from edgespec.orchestrator.orchestrator_actor import OrchestratorConfig
from edgespec.orchestrator.registry import EDGE, SERVING, VERIFIER

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
OBJECT_STORE_BYTES = 80 * 1024 * 1024  # per node; Ray's minimum is 75 MiB
RAY_CALL_TIMEOUT_S = 30.0
# A Ray node that did not come up within Ray's own 30 s (seen in CI on the loaded 2-core host:
# its raylet did not register, or its GCS did not write its port file) is started once more;
# any other failure is not retried.
STARTUP_ATTEMPTS = 2
_STARTUP_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")
T = TypeVar("T")


def start_with_retry(start: Callable[[], T], what: str, attempts: int = STARTUP_ATTEMPTS) -> T:
    """`start()`, again (up to `attempts` in all) while it fails with one of Ray's node start-up
    timeouts; any other error, or the last timeout, is raised. The node that timed out is left
    to Ray's reaper (it stops with this process)."""
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except Exception as err:  # Ray raises bare Exception / RuntimeError for these
            if not any(t in str(err) for t in _STARTUP_TIMEOUTS) or attempt == attempts:
                raise
            logger.warning(
                "%s timed out starting (attempt %d of %d): %s", what, attempt, attempts, err
            )
    raise AssertionError("unreachable")  # the loop returns or raises


@dataclass(frozen=True)
class LocalDeploymentConfig:
    """What `LocalDeployment` brings up."""

    target: Path
    draft: Path
    verifiers: int = 2
    edges: int = 2
    rtt_ms: float | None = 10.0  # emulated edge<->verifier link; None = direct connections
    health_interval_s: float = 0.5
    health_timeout_s: float = 1.0
    deploy_timeout_s: float = 600.0
    extra: dict[str, Any] = field(default_factory=dict)  # more `DeploySpec.simple` arguments

    def link(self) -> dict[str, Any] | None:
        return LinkProfile(rtt_ms=self.rtt_ms).to_dict() if self.rtt_ms is not None else None


class LocalDeployment:
    """Context manager: a local cluster with edgespec deployed; `orchestrator` is its handle."""

    def __init__(self, config: LocalDeploymentConfig, progress: Callable[[str], None]) -> None:
        self.config = config
        self.progress = progress
        self.cluster: Cluster | None = None
        self.deployment: deploy.Deployment | None = None

    def __enter__(self) -> LocalDeployment:
        cfg = self.config
        node = {"object_store_memory": OBJECT_STORE_BYTES}
        try:
            self.progress("starting a local Ray cluster")
            self.cluster = cluster = start_with_retry(
                lambda: Cluster(
                    initialize_head=True,
                    head_node_args={"num_cpus": 1, "include_dashboard": False, **node},
                ),
                "the Ray head node",
            )
            roles = [EDGE_RESOURCE] * cfg.edges + [CLOUD_RESOURCE] * cfg.verifiers
            for role in roles:
                start_with_retry(
                    partial(cluster.add_node, num_cpus=2, resources={role: 1}, **node),
                    f"a Ray {role} node",
                )
            self.cluster.wait_for_nodes()
            connection.connect(self.cluster.address)
            spec = deploy.DeploySpec.simple(
                cfg.target,
                cfg.draft,
                verifiers=cfg.verifiers,
                edges=cfg.edges,
                link=cfg.link(),
                max_restarts=-1,  # chaos kills the same actor many times
                max_task_retries=-1,
                orchestrator=OrchestratorConfig(
                    health_interval_s=cfg.health_interval_s, health_timeout_s=cfg.health_timeout_s
                ),
                **cfg.extra,
            )
            self.progress(f"deploying {cfg.verifiers} verifiers and {cfg.edges} edges")
            self.deployment = deploy.deploy(
                spec, progress=self.progress, timeout_s=cfg.deploy_timeout_s
            )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill the actors, disconnect and stop the cluster's processes (idempotent)."""
        try:
            if ray.is_initialized() and self.deployment is not None:
                with contextlib.suppress(Exception):
                    deploy.teardown()
        finally:
            self.deployment = None
            connection.disconnect()
            if self.cluster is not None:
                self.cluster.shutdown()
                self.cluster = None

    # ---------------------------------------------------------------- names and handles

    @property
    def orchestrator(self) -> Any:
        assert self.deployment is not None, "not deployed"
        return self.deployment.orchestrator

    def verifier_names(self) -> list[str]:
        return [verifier_name(i) for i in range(self.config.verifiers)]

    def edge_names(self) -> list[str]:
        return [edge_name(i) for i in range(self.config.edges)]

    @staticmethod
    def actor(name: str) -> Any:
        """The named actor's handle (the same across its restarts)."""
        return ray.get_actor(name, namespace=NAMESPACE)

    # ---------------------------------------------------------------- probes (asyncio)

    async def endpoints(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The orchestrator's endpoint records (address, health, pid, restarts, load)."""
        ref = self.orchestrator.endpoints.remote(kind)
        return list(await asyncio.wait_for(ref, RAY_CALL_TIMEOUT_S))

    async def serving_edges(self) -> list[str]:
        """Addresses of the edges the orchestrator sees SERVING, on 127.0.0.1 (every node runs
        on this machine and the edges listen on every interface)."""
        eps = await self.endpoints(EDGE)
        return [
            f"{LOCALHOST}:{e['address'].rpartition(':')[2]}" for e in eps if e["health"] == SERVING
        ]

    async def all_serving(self) -> bool:
        """Every verifier and edge registered and SERVING."""
        eps = await self.endpoints()
        want = self.config.verifiers + self.config.edges
        model_eps = [e for e in eps if e["kind"] in (VERIFIER, EDGE)]
        return len(model_eps) == want and all(e["health"] == SERVING for e in model_eps)

    async def wait_all_serving(self, timeout_s: float) -> bool:
        """Poll (bounded) until `all_serving`; returns whether it got there."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # the orchestrator may be mid-call: poll again
                if await self.all_serving():
                    return True
            await asyncio.sleep(0.5)
        return False

    async def verifier_stats(self, name: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """The verifier engine's own counters (``sessions`` open now, ``replayed``, ...)."""
        ref = self.actor(name).stats.remote()
        return dict(await asyncio.wait_for(ref, timeout_s))

    async def edge_stats(self, name: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """The edge's ``active_sessions``, assignments and links."""
        ref = self.actor(name).stats.remote()
        return dict(await asyncio.wait_for(ref, timeout_s))

    async def sessions_open(self) -> dict[str, int | None]:
        """Actor name -> sessions open on it now, asked of each verifier engine and each edge
        engine (None: the actor did not answer)."""
        out: dict[str, int | None] = {}
        for name in self.verifier_names():
            try:
                out[name] = int((await self.verifier_stats(name))["sessions"])
            except Exception as err:  # restarting or gone: reported as unknown
                logger.warning("%s did not report its sessions: %s", name, err)
                out[name] = None
        for name in self.edge_names():
            try:
                out[name] = int((await self.edge_stats(name))["active_sessions"])
            except Exception as err:
                logger.warning("%s did not report its sessions: %s", name, err)
                out[name] = None
        return out

    async def wait_sessions_zero(self, timeout_s: float) -> tuple[dict[str, int | None], float]:
        """Poll (bounded) until no verifier and no edge holds a session; returns the last
        counts and the seconds it took (`timeout_s` when they never all reached 0)."""
        t0 = time.monotonic()
        counts = await self.sessions_open()
        while any(c != 0 for c in counts.values()) and time.monotonic() - t0 < timeout_s:
            await asyncio.sleep(1.0)
            counts = await self.sessions_open()
        return counts, time.monotonic() - t0

    async def pids(self) -> dict[str, int]:
        """Actor name -> process id, from the actors' own info (current incarnation)."""
        out: dict[str, int] = {}
        for name in self.verifier_names() + self.edge_names():
            with contextlib.suppress(Exception):  # restarting: no pid this time
                info = await asyncio.wait_for(self.actor(name).ready.remote(), 10.0)
                out[name] = int(info["pid"])
        return out


def rss_bytes(pid: int) -> int | None:
    """Resident set size of process `pid` from /proc (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
