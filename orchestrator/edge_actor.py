"""The Ray edge: `EdgeSpec` (what one edge serves and how) and `EdgeActor`, a thin shim.

`EdgeActor` (resource ``edge``) loads the draft into an `edgespec.edge.engine.EdgeEngine`, serves
the Edge gRPC service and the OpenAI-compatible HTTP API (``http_port``; its URL in `info` and
`stats`, hence in ``edgespec up`` / ``edgespec status``) and registers with the orchestrator. Its engine gets each session's
verifier from an `edgespec.orchestrator.edge_host.OrchestratorAssigner` (through emulated links
when the deployment has them); the actor only starts these and answers `stats` / `link_stats`.
Lifecycle (start on the actor's loop, registration, restarts) is `EndpointActor`'s.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import ray

from edgespec.core.validation import check_port
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.linkemu import LinkProfile
from edgespec.orchestrator.edge_host import EmulatedLinks, OrchestratorAssigner
from edgespec.orchestrator.endpoint_actor import (
    BIND_HOST,
    EndpointActor,
    EndpointSpec,
    actor_device,
    register_endpoint,
)
from edgespec.orchestrator.names import NAMESPACE, ORCHESTRATOR_NAME
from edgespec.orchestrator.registry import EDGE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeSpec(EndpointSpec):
    """What one edge serves and how it reaches the verifiers.

    Engine and link settings are the edge's own config classes (their defaults are the
    deployment's: one default per setting).
    """

    draft_path: str  # draft checkpoint folder (with its tokenizer), readable on the edge nodes
    # draft lengths, policy, sessions, retries, pipelining (`EngineConfig`)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # how it reaches the verifiers: bearer token, deadlines (`LinkConfig`)
    link_config: LinkConfig = field(default_factory=LinkConfig)
    # Emulated WAN link between this edge and every verifier: an `edgespec.linkemu.LinkProfile`
    # as a dict (`LinkProfile.to_dict()`); None = direct connections.
    link: dict[str, Any] | None = None
    # OpenAI-compatible HTTP API on the node: 0 = a free port, None = off; requests name
    # `served_model_name` as their model
    http_port: int | None = 0
    served_model_name: str = "edgespec"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.http_port is not None:
            check_port("http_port", self.http_port)
        if not isinstance(self.served_model_name, str) or not self.served_model_name:
            raise ValueError(
                f"served_model_name must be a non-empty str, got {self.served_model_name!r}"
            )
        if not isinstance(self.draft_path, str) or not self.draft_path:
            raise ValueError(f"draft_path must be a non-empty str, got {self.draft_path!r}")
        if not isinstance(self.engine, EngineConfig):
            raise ValueError(f"engine must be an EngineConfig, got {type(self.engine).__name__}")
        if not isinstance(self.link_config, LinkConfig):
            raise ValueError(
                f"link_config must be a LinkConfig, got {type(self.link_config).__name__}"
            )
        self.link_profile()  # validates

    def link_profile(self) -> LinkProfile | None:
        """The emulated link, None for direct connections."""
        return LinkProfile.from_dict(self.link) if self.link is not None else None


def _orchestrator_handle() -> Any:
    return ray.get_actor(ORCHESTRATOR_NAME, namespace=NAMESPACE)


class EdgeActor(EndpointActor):
    """An edge: the draft model behind the Edge gRPC service; verifiers come from the orchestrator."""

    kind = EDGE
    _server: Any  # the running Edge servers (`edgespec.edge.server.RunningEdge`) once started

    def __init__(self, name: str, spec: EdgeSpec) -> None:
        self.spec = spec
        self.engine: Any = None
        self.assigner = OrchestratorAssigner(
            name, _orchestrator_handle, EmulatedLinks(spec.link_profile())
        )
        self._refresher: asyncio.Task | None = None
        super().__init__(name)

    async def _start(self) -> None:
        from edgespec.edge.engine import EdgeEngine  # torch: loaded on the actor only
        from edgespec.edge.http_server import serve_http
        from edgespec.edge.server import RunningEdge
        from edgespec.edge.service import serve
        from edgespec.serving.edge_metrics import EdgeMetrics

        self.device = actor_device()
        spec = self.spec
        # Loading takes seconds: off the loop, so Ray calls (ready, stats) still answer.
        self.engine = await asyncio.to_thread(
            EdgeEngine.from_pretrained,
            spec.draft_path,
            self.assigner,
            link_config=spec.link_config,
            config=spec.engine,
            device=self.device,
            compute_profile=spec.compute_profile,
        )
        metrics = self._serve_metrics(EdgeMetrics, spec.metrics_port)
        grpc_server = await serve(
            self.engine, host=BIND_HOST, port=spec.port, token=spec.token, metrics=metrics
        )
        http = None
        if spec.http_port is not None:
            http = await serve_http(
                self.engine, spec.served_model_name, BIND_HOST, spec.http_port, token=spec.token
            )
            self.http_url = f"http://{ray.util.get_node_ip_address()}:{http.port}"
        self._server = RunningEdge(grpc_server, http)
        self.address = f"{ray.util.get_node_ip_address()}:{grpc_server.port}"
        logger.info("edge %s serving on %s (%s)", self.name, self.address, self.device)
        await register_endpoint(self.name, self.kind, self.address, self.device)
        self._refresher = asyncio.get_running_loop().create_task(self.assigner.refresh_forever())

    async def stats(self) -> dict[str, Any]:
        """Active sessions, assignments asked of the orchestrator, emulated links."""
        await self._ready
        await self.assigner.refresh()
        return {
            "http_url": self.http_url,
            "active_sessions": self.engine.active_sessions,
            "assignments": self.assigner.assignments,
            "fallbacks": self.assigner.fallbacks,
            "links": self.assigner.links.describe(),
            # what the engine has learnt of each verifier link (RTT, acceptance, mode, k)
            "link_estimates": self.engine.link_estimates(),
        }

    async def link_stats(self) -> dict[str, Any]:
        """Achieved link figures per verifier address (`LinkStats.to_dict()`)."""
        await self._ready
        return self.assigner.links.stats()

    async def link_fault(self, action: str, profile: dict[str, Any] | None = None) -> int:
        """Fault every emulated link of this edge (`EmulatedLinks.fault`; `profile` as a
        `LinkProfile` dict, for ``profile``): chaos tests. Returns the links touched."""
        await self._ready
        new = LinkProfile.from_dict(profile) if profile is not None else None
        # The emulator's controls block until its own loop applied them: off this loop.
        return await asyncio.to_thread(self.assigner.links.fault, action, new)
