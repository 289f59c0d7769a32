"""`EdgeActor` and its `EdgeSpec` (on ``edge`` nodes), pending their own module.

`EdgeActor` loads the draft into an `edge.engine.EdgeEngine` and serves the Edge gRPC service; its
engine gets each session's verifier from the orchestrator. The other actors have their own
modules: `orchestrator.verifier_actor`, `orchestrator.orchestrator_actor`, and the base both model
actors share, `orchestrator.endpoint_actor`. The `_check_*` helpers below serve `EdgeSpec` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import ray

from edgespec.orchestrator.endpoint_actor import BIND_HOST
from edgespec.orchestrator.endpoint_actor import EndpointActor as _EndpointActor
from edgespec.orchestrator.endpoint_actor import actor_device as _device
from edgespec.orchestrator.endpoint_actor import register_endpoint as _register
from edgespec.orchestrator.names import NAMESPACE, ORCHESTRATOR_NAME
from edgespec.orchestrator.registry import EDGE, UNREACHABLE, VERIFIER

logger = logging.getLogger(__name__)

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
