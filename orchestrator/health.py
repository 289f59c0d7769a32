"""The orchestrator's health checks: one gRPC health probe per endpoint, results into a `Registry`.

`HealthChecker` is a plain asyncio class (no Ray): `check_all` runs one round over every
registered endpoint (in parallel, each with a deadline) and feeds the results to the registry,
which moves the sessions of a verifier that stopped serving; `run` repeats rounds forever.
Channels are cached per address and closed once no endpoint uses the address any more (an
actor restarted elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgespec.core.validation import check_positive
from edgespec.orchestrator.registry import NOT_SERVING, SERVING, UNREACHABLE, Move, Registry

logger = logging.getLogger(__name__)


@dataclass
class Probe:
    """A cached gRPC channel to one endpoint address for health checks."""

    address: str
    channel: grpc.aio.Channel
    stub: health_pb2_grpc.HealthStub = field(init=False)
    last_error: str = ""  # "CODE: details" of the last failed check; "" after a success
    checks: int = 0

    def __post_init__(self) -> None:
        self.stub = health_pb2_grpc.HealthStub(self.channel)


class HealthChecker:
    """Checks every endpoint of `registry` with the standard gRPC health service.

    `timeout_s` is one check's deadline, `interval_s` the pause between two rounds of `run`.
    An answer of SERVING marks the endpoint SERVING, any other answer NOT_SERVING, no answer
    (refused, deadline) UNREACHABLE.
    """

    def __init__(self, registry: Registry, *, interval_s: float, timeout_s: float) -> None:
        self.registry = registry
        self.interval_s = check_positive("interval_s", interval_s)
        self.timeout_s = check_positive("timeout_s", timeout_s)
        self._probes: dict[str, Probe] = {}

    def last_error(self, address: str) -> str:
        """The last failed check's error for `address` ("": it answered, or was never checked)."""
        probe = self._probes.get(address)
        return probe.last_error if probe else ""

    async def run(self) -> None:
        """Check rounds forever, `interval_s` apart; a failed round is logged, never fatal."""
        while True:
            try:
                await self.check_all()
            except Exception:  # never let the loop die
                logger.exception("health-check round failed")
            await asyncio.sleep(self.interval_s)

    async def check_all(self) -> None:
        """One round: check every registered endpoint and record the results."""
        checked = [(e.endpoint_id, e.address) for e in self.registry.endpoints()]
        results = await asyncio.gather(*(self.check(address) for _, address in checked))
        for (endpoint_id, address), health in zip(checked, results, strict=True):
            try:
                if self.registry.endpoint(endpoint_id).address != address:
                    continue  # re-registered elsewhere during the check: the result is stale
                moves = self.registry.set_health(endpoint_id, health)
            except KeyError:  # unregistered meanwhile
                continue
            _log_moves(moves)
        # Channels to addresses no endpoint uses any more (an actor restarted elsewhere).
        live = {e.address for e in self.registry.endpoints()}
        for address in [a for a in self._probes if a not in live]:
            await self._probes.pop(address).channel.close(None)  # None: cancel any RPC now

    async def check(self, address: str) -> str:
        """The health of the server at `address`: SERVING, NOT_SERVING or UNREACHABLE."""
        probe = self._probes.get(address)
        if probe is None:
            probe = Probe(address, grpc.aio.insecure_channel(address))
            self._probes[address] = probe
        probe.checks += 1
        try:
            reply = await probe.stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as err:
            probe.last_error = f"{err.code().name}: {err.details()}"
            return UNREACHABLE
        probe.last_error = ""
        return SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else NOT_SERVING


def _log_moves(moves: list[Move]) -> None:
    for m in moves:
        logger.info("session %s: %s -> %s (%s)", m.session_key, m.from_id, m.to_id, m.reason)
