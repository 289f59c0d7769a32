"""Deployment: the edgespec actors on a running Ray cluster (local or not), and their teardown.

`deploy` starts the named, detached `OrchestratorActor` (softly on the head node), N
`VerifierActor` replicas on ``cloud`` nodes and M `EdgeActor`s on ``edge`` nodes, with restart
policies; GPUs are requested where every node of a role has them, and the role's nodes must have
room for the replicas (`check_capacity`). `teardown` kills them; `status` is the orchestrator's
view. All need `orchestrator.connection.connect` first; the nodes come from
`orchestrator.nodes` (a local cluster) or from ``ray up`` / KubeRay (``deploy/``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from edgespec.cloud.verifier_types import VerifierConfig
from edgespec.core.validation import check_float, check_int
from edgespec.edge.config import EngineConfig
from edgespec.orchestrator.connection import get_orchestrator
from edgespec.orchestrator.edge_actor import EdgeActor, EdgeSpec
from edgespec.orchestrator.names import (
    CLOUD_RESOURCE,
    EDGE_RESOURCE,
    NAMESPACE,
    ORCHESTRATOR_NAME,
    edge_name,
    verifier_name,
)
from edgespec.orchestrator.orchestrator_actor import OrchestratorActor, OrchestratorConfig
from edgespec.orchestrator.verifier_actor import VerifierActor, VerifierSpec

logger = logging.getLogger(__name__)

# Each actor asks for this share of its role's resource: the resource marks the node's role
# (a node declares ``edge: 1``), and a small share lets several replicas share a node.
ROLE_SHARE = 0.01

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    """A `Progress` that says nothing."""


@dataclass(frozen=True)
class DeploySpec:
    """What `deploy` starts."""

    verifier: VerifierSpec
    edge: EdgeSpec
    verifiers: int = 2  # verifier replicas (on `cloud` nodes)
    edges: int = 2  # edges (on `edge` nodes)
    max_restarts: int = 3  # per actor; Ray restarts a dead actor up to this many times
    max_task_retries: int = 3  # actor method calls retried across a restart
    actor_num_cpus: float = 1.0  # logical CPUs each model actor holds
    # GPUs per actor; None = auto: a GPU share where every node of the role has GPUs, else 0.
    verifier_num_gpus: float | None = None
    edge_num_gpus: float | None = None
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)

    def __post_init__(self) -> None:
        check_int("verifiers", self.verifiers, 1, 64)
        check_int("edges", self.edges, 1, 64)
        # -1 = unlimited, as for Ray's own options
        check_int("max_restarts", self.max_restarts, -1)
        check_int("max_task_retries", self.max_task_retries, -1)
        check_float("actor_num_cpus", self.actor_num_cpus, 0.0)
        for name in ("verifier_num_gpus", "edge_num_gpus"):
            if getattr(self, name) is not None:
                check_float(name, getattr(self, name), 0.0)

    @classmethod
    def simple(
        cls,
        target_path: str | Path,
        draft_path: str | Path,
        *,
        verifiers: int = 2,
        edges: int = 2,
        link: dict[str, Any] | None = None,
        default_k: int | None = None,
        default_policy: str | None = None,
        compute_profile: str = "real",
        verifier_config: VerifierConfig | None = None,
        **kwargs: Any,
    ) -> DeploySpec:
        """A spec from the two checkpoint folders and the usual knobs (`compute_profile`: the
        `edgespec.core.profiles` name both roles run under; `default_k` / `default_policy`
        None: the edge engine's defaults; `verifier_config` None: the verifier's defaults)."""
        engine = EngineConfig()
        engine = replace(
            engine,
            default_k=default_k if default_k is not None else engine.default_k,
            default_policy=default_policy if default_policy is not None else engine.default_policy,
        )
        return cls(
            verifier=VerifierSpec(
                target_path=str(target_path),
                config=verifier_config if verifier_config is not None else VerifierConfig(),
                compute_profile=compute_profile,
            ),
            edge=EdgeSpec(
                draft_path=str(draft_path),
                link=link,
                engine=engine,
                compute_profile=compute_profile,
            ),
            verifiers=verifiers,
            edges=edges,
            **kwargs,
        )

    def actor_names(self) -> tuple[str, ...]:
        """Every model actor's name: the verifiers', then the edges'."""
        return tuple(verifier_name(i) for i in range(self.verifiers)) + tuple(
            edge_name(i) for i in range(self.edges)
        )


def gpus_per_actor(nodes: list[dict[str, Any]], resource: str, replicas: int) -> float:
    """GPUs each of `replicas` actors of a role asks for, from `ray.nodes()`-style records.

    Every alive node carrying the role's `resource` has a GPU: one GPU per actor, or an equal
    share when there are more actors than GPUs. Any node of the role without one: 0 (the actors
    run on CPU, and can be placed on any node of the role).
    """
    role_nodes = [n for n in nodes if n["Alive"] and n["Resources"].get(resource, 0) > 0]
    gpus = [n["Resources"].get("GPU", 0.0) for n in role_nodes]
    if not role_nodes or min(gpus) <= 0:
        return 0.0
    return min(1.0, sum(gpus) / replicas)


def check_capacity(
    nodes: list[dict[str, Any]], resource: str, replicas: int, num_cpus: float, field: str
) -> None:
    """Raise ValueError naming `field` when the role's alive nodes cannot hold `replicas` actors
    of `num_cpus` CPUs each (Ray would leave the extra actors pending forever)."""
    role_nodes = [n for n in nodes if n["Alive"] and n["Resources"].get(resource, 0) > 0]
    if not role_nodes:
        raise RuntimeError(
            f"the cluster has no alive node with the custom resource {resource!r}; start one "
            f"with `ray start --address=... --resources='{{\"{resource}\": 1}}'`"
        )
    if num_cpus <= 0:
        return
    fits = sum(int(n["Resources"].get("CPU", 0) // num_cpus) for n in role_nodes)
    if replicas > fits:
        raise ValueError(
            f"{field} must be <= {fits} on this cluster ({len(role_nodes)} '{resource}' nodes, "
            f"{num_cpus:g} CPU per actor), got {replicas}"
        )


def _role_gpus(resource: str, replicas: int) -> float:
    return gpus_per_actor(ray.nodes(), resource, replicas)


def _head_affinity() -> NodeAffinitySchedulingStrategy | str:
    """Soft placement on the head node (the orchestrator belongs with the control plane)."""
    for n in ray.nodes():
        if n["Alive"] and "node:__internal_head__" in n["Resources"]:
            return NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=True)
    return "DEFAULT"


@dataclass
class Deployment:
    """Handles of what `deploy` started."""

    spec: DeploySpec
    orchestrator: Any
    verifiers: list[Any]
    edges: list[Any]
    infos: dict[str, dict[str, Any]]  # actor name -> ready() info (address, node, device)

    def edge_addresses(self) -> list[str]:
        """The edges' gRPC addresses (what clients dial), in actor order."""
        return [self.infos[edge_name(i)]["address"] for i in range(self.spec.edges)]

    def verifier_addresses(self) -> list[str]:
        """The verifiers' gRPC addresses, in actor order."""
        return [self.infos[verifier_name(i)]["address"] for i in range(self.spec.verifiers)]


def deploy(spec: DeploySpec, progress: Progress = _quiet, timeout_s: float = 600.0) -> Deployment:
    """Start the orchestrator, the verifiers and the edges; return once every endpoint serves.

    Needs `connection.connect` first. Raises RuntimeError when a role has no node, ValueError
    when its nodes cannot hold the replicas, TimeoutError when the actors are not ready within
    `timeout_s` (model loading included).
    """
    nodes = ray.nodes()
    check_capacity(nodes, CLOUD_RESOURCE, spec.verifiers, spec.actor_num_cpus, "verifiers")
    check_capacity(nodes, EDGE_RESOURCE, spec.edges, spec.actor_num_cpus, "edges")
    common = {
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "max_restarts": spec.max_restarts,
        "max_task_retries": spec.max_task_retries,
    }
    orch_config = replace(spec.orchestrator, actor_names=spec.actor_names())
    progress("starting the orchestrator")
    orchestrator = (
        ray.remote(OrchestratorActor)
        .options(
            name=ORCHESTRATOR_NAME,
            num_cpus=0,
            scheduling_strategy=_head_affinity(),
            max_concurrency=1000,
            **common,
        )
        .remote(orch_config)
    )
    ray.get(orchestrator.endpoints.remote(), timeout=timeout_s)

    v_gpus = (
        spec.verifier_num_gpus
        if spec.verifier_num_gpus is not None
        else _role_gpus(CLOUD_RESOURCE, spec.verifiers)
    )
    e_gpus = (
        spec.edge_num_gpus
        if spec.edge_num_gpus is not None
        else _role_gpus(EDGE_RESOURCE, spec.edges)
    )
    progress(
        f"starting {spec.verifiers} verifier(s) on '{CLOUD_RESOURCE}' nodes "
        f"({'GPU ' + format(v_gpus, 'g') if v_gpus else 'CPU'}) and {spec.edges} edge(s) on "
        f"'{EDGE_RESOURCE}' nodes ({'GPU ' + format(e_gpus, 'g') if e_gpus else 'CPU'})"
    )

    def start(actor_cls: type, name: str, resource: str, gpus: float, actor_spec: Any) -> Any:
        """One model actor, spread over the nodes that declare `resource`."""
        return (
            ray.remote(actor_cls)
            .options(
                name=name,
                resources={resource: ROLE_SHARE},
                num_cpus=spec.actor_num_cpus,
                num_gpus=gpus,
                scheduling_strategy="SPREAD",
                **common,
            )
            .remote(name, actor_spec)
        )

    verifiers = [
        start(VerifierActor, verifier_name(i), CLOUD_RESOURCE, v_gpus, spec.verifier)
        for i in range(spec.verifiers)
    ]
    edges = [
        start(EdgeActor, edge_name(i), EDGE_RESOURCE, e_gpus, spec.edge) for i in range(spec.edges)
    ]
    names = spec.actor_names()
    refs = {a.ready.remote(): name for a, name in zip(verifiers + edges, names, strict=True)}
    infos: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            waiting = sorted(refs[r] for r in pending)
            raise TimeoutError(f"actors not ready within {timeout_s:g} s: {waiting}")
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        for ref in done:
            info = ray.get(ref)
            infos[refs[ref]] = info
            progress(
                f"  {refs[ref]} serving on {info['address']} "
                f"({info['device']}, node {info['node_id'][:8]})  [{len(infos)}/{len(names)}]"
            )
    # The orchestrator has every registration; one health round marks them SERVING.
    ray.get(orchestrator.check_now.remote(), timeout=timeout_s)
    return Deployment(spec, orchestrator, verifiers, edges, infos)


def teardown(names: tuple[str, ...] | None = None) -> list[str]:
    """Kill the edgespec actors (the orchestrator's and the given names); returns those killed.

    Needs `connection.connect` first. Actors that do not exist are skipped.
    """
    killed = []
    todo = list(names or ())
    with contextlib.suppress(Exception):
        orch = get_orchestrator()
        for ep in ray.get(orch.endpoints.remote(), timeout=10):
            if ep["endpoint_id"] not in todo:
                todo.append(ep["endpoint_id"])
    todo.append(ORCHESTRATOR_NAME)
    for name in todo:
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            continue
        ray.kill(actor, no_restart=True)
        killed.append(name)
    return killed


def status() -> dict[str, Any]:
    """The orchestrator's status view (nodes, endpoints, sessions, load).

    Needs `connection.connect` first."""
    return ray.get(get_orchestrator().status.remote(), timeout=30)


def pick_edge() -> str:
    """The least-loaded healthy edge's address, asked of the orchestrator.

    Needs `connection.connect` first."""
    return ray.get(get_orchestrator().pick_edge.remote(), timeout=30)
