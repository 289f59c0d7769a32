"""What a Ray edge does besides serving: verifier assignment, emulated links, the verifier view.

`OrchestratorAssigner` is the edge engine's `edgespec.edge.addresses.VerifierAssigner`: each
session that opens (or reopens: its verifier failed it) asks the orchestrator for a verifier
(least loaded; a repeated request moves the session), and its end releases the assignment. When
the orchestrator does not answer in time, the session falls back to the last view of live
verifiers (`refresh`, every few seconds), round robin. `EmulatedLinks` puts a link emulator
(`edgespec.linkemu`) in front of every verifier the edge dials, when the deployment emulates a
WAN link. Both are plain classes: the orchestrator is reached through a handle getter, and every
call on it is awaited, never blocking the event loop the gRPC server shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from edgespec.linkemu import LinkEmulator, LinkProfile
from edgespec.orchestrator.registry import UNREACHABLE, VERIFIER

logger = logging.getLogger(__name__)

# Deadline of the edge's call to the orchestrator for a session's verifier.
ASSIGN_TIMEOUT_S = 2.0
REFRESH_INTERVAL_S = 5.0
# What `EmulatedLinks.fault` can do to the links.
FAULT_ACTIONS = ("cut", "blackhole", "restore", "profile")


class EmulatedLinks:
    """One `LinkEmulator` per verifier address, all with `profile`; None = direct connections."""

    def __init__(self, profile: LinkProfile | None) -> None:
        self.profile = profile
        self._emulators: dict[str, LinkEmulator] = {}  # verifier address -> its emulator

    def via(self, address: str) -> str:
        """The address to dial for `address`: itself, or the link emulator in front of it."""
        if self.profile is None:
            return address
        emu = self._emulators.get(address)
        if emu is None:
            host, _, port = address.rpartition(":")
            emu = LinkEmulator(host, int(port), self.profile).start()
            self._emulators[address] = emu
        return emu.address

    async def keep_only(self, addresses: set[str]) -> None:
        """Stop the emulators of verifiers not in `addresses` (restarted elsewhere or gone: their
        sessions have reconnected already)."""
        for address in [a for a in self._emulators if a not in addresses]:
            await asyncio.to_thread(self._emulators.pop(address).stop)

    def fault(self, action: str, profile: LinkProfile | None = None) -> int:
        """Apply a link fault to every emulator (chaos tests); returns how many it touched.

        `action`: ``cut`` (reset every connection until ``restore``), ``blackhole`` (hold every
        byte until ``restore``), ``restore``, or ``profile`` (switch to `profile`; None = back to
        the deployment's). Raises ValueError for another action, or ``cut``/``blackhole`` without
        emulated links.
        """
        if action not in FAULT_ACTIONS:
            raise ValueError(f"action must be one of {FAULT_ACTIONS}, got {action!r}")
        for emu in list(self._emulators.values()):
            if action == "cut":
                emu.cut()
            elif action == "blackhole":
                emu.blackhole()
            elif action == "restore":
                emu.restore()
            else:
                new = profile if profile is not None else self.profile
                assert new is not None  # there are emulators only with a profile
                emu.set_profile(new)
        return len(self._emulators)

    def describe(self) -> dict[str, dict[str, str]]:
        """Verifier address -> the emulator's address and profile name."""
        return {
            addr: {"via": emu.address, "profile": emu.profile.name}
            for addr, emu in self._emulators.items()
        }

    def stats(self) -> dict[str, dict[str, Any]]:
        """Verifier address -> the achieved link figures (`LinkStats.to_dict()`)."""
        return {addr: emu.stats().to_dict() for addr, emu in self._emulators.items()}


class OrchestratorAssigner:
    """Sessions' verifiers from the orchestrator (a `VerifierAssigner`; see the module docstring).

    `orchestrator()` returns the orchestrator actor's handle (raises when there is none); its
    `assign_verifier(key, edge_id)`, `release_session(key)` and `endpoints(kind)` are used.
    Session keys are prefixed with `edge_id`, so they are unique across edges.
    """

    def __init__(
        self,
        edge_id: str,
        orchestrator: Callable[[], Any],
        links: EmulatedLinks,
        assign_timeout_s: float = ASSIGN_TIMEOUT_S,
    ) -> None:
        self.edge_id = edge_id
        self.links = links
        self.assign_timeout_s = assign_timeout_s
        self._get_orchestrator = orchestrator
        self._orch: Any = None
        self._assigned: set[str] = set()  # sessions the orchestrator was asked about
        self.verifiers: list[str] = []  # fallback when the orchestrator does not answer
        self._fallback_turn = 0
        self.assignments = 0
        self.fallbacks = 0

    async def assign(self, session_key: str) -> str:
        key = f"{self.edge_id}/{session_key}"
        self._assigned.add(key)
        try:
            call = self._orchestrator().assign_verifier.remote(key, self.edge_id)
            address: str = await asyncio.wait_for(call, self.assign_timeout_s)
            self.assignments += 1
        except Exception as err:  # orchestrator down or no verifier: fall back to the last view
            self._orch = None
            if not self.verifiers:
                raise
            self.fallbacks += 1
            self._fallback_turn += 1
            address = self.verifiers[self._fallback_turn % len(self.verifiers)]
            logger.warning("orchestrator did not assign %s (%s); trying %s", key, err, address)
        return self.links.via(address)

    def release(self, session_key: str) -> None:
        key = f"{self.edge_id}/{session_key}"
        if key not in self._assigned:
            return
        self._assigned.discard(key)
        with contextlib.suppress(Exception):
            self._orchestrator().release_session.remote(key)  # fire and forget

    async def refresh(self) -> None:
        """Refresh the fallback list of verifiers; stop link emulators of departed ones."""
        try:
            verifiers = await self._orchestrator().endpoints.remote(VERIFIER)
        except Exception as err:  # the orchestrator may be restarting: keep the last view
            logger.debug("verifier list not refreshed: %s", err)
            return
        self.verifiers = [v["address"] for v in verifiers if v["health"] != UNREACHABLE]
        await self.links.keep_only({v["address"] for v in verifiers})

    async def refresh_forever(self, interval_s: float = REFRESH_INTERVAL_S) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(interval_s)

    def _orchestrator(self) -> Any:
        if self._orch is None:
            self._orch = self._get_orchestrator()
        return self._orch
