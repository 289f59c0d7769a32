"""`VerifierActor`: one verifier replica on a ``cloud`` node, a thin shim around the engine.

It loads the target into a `cloud.verifier.VerifierEngine` and serves it with
`cloud.service.serve` (the Verifier gRPC service) on the node; everything a replica decides lives
in the engine. `orchestrator.deploy` turns the class into a Ray actor; see
`orchestrator.endpoint_actor` for start, restart, registration and devices.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import ray

from edgespec.cloud.service import serve
from edgespec.cloud.verifier import VerifierConfig, VerifierEngine
from edgespec.orchestrator.endpoint_actor import (
    BIND_HOST,
    EndpointActor,
    EndpointSpec,
    actor_device,
    register_endpoint,
)
from edgespec.orchestrator.registry import VERIFIER
from edgespec.serving.verifier_metrics import VerifierMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifierSpec(EndpointSpec):
    """What one verifier replica serves and how.

    The replica's limits are `config` (`VerifierConfig`: sessions, largest block, ...); its
    ``device`` is ignored, as the actor runs on the device Ray gave it (CUDA with a GPU, else CPU).
    """

    target_path: str  # target checkpoint folder, readable on the cloud nodes
    config: VerifierConfig = field(default_factory=VerifierConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.target_path, str) or not self.target_path:
            raise ValueError(f"target_path must be a non-empty str, got {self.target_path!r}")
        if not isinstance(self.config, VerifierConfig):
            raise ValueError(f"config must be a VerifierConfig, got {self.config!r}")


class VerifierActor(EndpointActor):
    """A verifier replica: the target model behind the Verifier gRPC service."""

    kind = VERIFIER

    def __init__(self, name: str, spec: VerifierSpec) -> None:
        self.spec = spec
        self.engine: VerifierEngine | None = None
        super().__init__(name)

    async def _start(self) -> None:
        self.device = actor_device()
        spec = self.spec
        config = replace(spec.config, device=self.device)
        # Loading takes seconds: off the loop, so Ray calls (ready, stats) still answer.
        engine = await asyncio.to_thread(
            VerifierEngine.from_pretrained,
            spec.target_path,
            config,
            compute_profile=spec.compute_profile,
        )
        await asyncio.to_thread(engine.calibrate_idle_forward)  # before any session
        self.engine = engine
        metrics = self._serve_metrics(VerifierMetrics, spec.metrics_port)
        server = await serve(
            engine, host=BIND_HOST, port=spec.port, token=spec.token, metrics=metrics
        )
        self._server = server
        self.address = f"{ray.util.get_node_ip_address()}:{server.port}"
        logger.info("verifier %s serving on %s (%s)", self.name, self.address, self.device)
        await register_endpoint(self.name, self.kind, self.address, self.device)

    async def stats(self) -> dict[str, Any]:
        """The engine's counters (sessions, blocks verified, ...)."""
        await self._ready
        assert self.engine is not None  # set by _start, which _ready awaited
        return asdict(self.engine.stats())
