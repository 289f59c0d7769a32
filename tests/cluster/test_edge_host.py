"""The Ray edge's plain parts without Ray: session assignment through an orchestrator handle
(awaited, with a fallback to the last verifier view), emulated links, and `EdgeSpec`'s defaults
being the edge engine's own."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from edgespec.edge.addresses import VerifierAssigner
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.linkemu import LinkProfile
from edgespec.orchestrator.edge_actor import EdgeSpec
from edgespec.orchestrator.edge_host import EmulatedLinks, OrchestratorAssigner
from edgespec.orchestrator.registry import SERVING, UNREACHABLE


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> asyncio.Future:
        return asyncio.ensure_future(self.fn(*args))


class FakeOrchestrator:
    """The three orchestrator methods the edge calls, as awaitable `.remote` calls."""

    def __init__(self, verifiers: list[dict[str, str]], down: bool = False) -> None:
        self.verifiers = verifiers
        self.down = down
        self.assigned: list[tuple[str, str]] = []
        self.released: list[str] = []
        self.assign_verifier = _Method(self._assign)
        self.release_session = _Method(self._release)
        self.endpoints = _Method(self._endpoints)

    async def _assign(self, key: str, edge_id: str) -> str:
        if self.down:
            raise ConnectionError("orchestrator restarting")
        self.assigned.append((key, edge_id))
        return self.verifiers[0]["address"]

    async def _release(self, key: str) -> bool:
        self.released.append(key)
        return True

    async def _endpoints(self, kind: str) -> list[dict[str, str]]:
        return self.verifiers


VERIFIERS = [
    {"address": "10.0.0.1:1", "health": SERVING},
    {"address": "10.0.0.2:2", "health": SERVING},
    {"address": "10.0.0.3:3", "health": UNREACHABLE},
]


def test_sessions_are_assigned_by_the_orchestrator_and_released_once() -> None:
    orch = FakeOrchestrator(VERIFIERS)
    assigner = OrchestratorAssigner("edge-0", lambda: orch, EmulatedLinks(None))
    assert isinstance(assigner, VerifierAssigner)

    async def body() -> str:
        address = await assigner.assign("s1")
        await assigner.assign("s1")  # a reopen: the same key, the orchestrator moves it
        assigner.release("s1")
        assigner.release("s1")
        assigner.release("never-assigned")
        await asyncio.sleep(0)  # let the fire-and-forget release run
        return address

    assert asyncio.run(body()) == "10.0.0.1:1"
    assert orch.assigned == [("edge-0/s1", "edge-0")] * 2
    assert orch.released == ["edge-0/s1"]
    assert (assigner.assignments, assigner.fallbacks) == (2, 0)


def test_without_an_orchestrator_sessions_fall_back_to_the_last_live_view() -> None:
    orch = FakeOrchestrator(VERIFIERS)
    assigner = OrchestratorAssigner("edge-0", lambda: orch, EmulatedLinks(None))

    async def body() -> list[str]:
        await assigner.refresh()
        orch.down = True
        return [await assigner.assign(f"s{i}") for i in range(3)]

    addresses = asyncio.run(body())
    assert assigner.verifiers == ["10.0.0.1:1", "10.0.0.2:2"]  # the unreachable one left out
    assert set(addresses) == {"10.0.0.1:1", "10.0.0.2:2"} and assigner.fallbacks == 3


def test_without_orchestrator_or_view_the_assignment_fails() -> None:
    orch = FakeOrchestrator(VERIFIERS, down=True)
    assigner = OrchestratorAssigner("edge-0", lambda: orch, EmulatedLinks(None))
    with pytest.raises(ConnectionError):
        asyncio.run(assigner.assign("s1"))


def test_emulated_links_sit_in_front_of_each_verifier_until_it_leaves() -> None:
    links = EmulatedLinks(LinkProfile(rtt_ms=1))

    async def body() -> tuple[str, str, dict]:
        via = links.via("127.0.0.1:9")
        again = links.via("127.0.0.1:9")
        described = links.describe()
        await links.keep_only(set())  # the verifier left: its emulator stops
        return via, again, described

    via, again, described = asyncio.run(body())
    assert via == again != "127.0.0.1:9" and described["127.0.0.1:9"]["via"] == via
    assert links.describe() == {}
    assert EmulatedLinks(None).via("127.0.0.1:9") == "127.0.0.1:9"


def test_edge_spec_defaults_are_the_engines() -> None:
    spec = EdgeSpec(draft_path="/models/draft")
    assert spec.engine == EngineConfig() and spec.link_config == LinkConfig()
    assert spec.engine.default_policy == "adaptive"
    with pytest.raises(ValueError, match="engine must be an EngineConfig"):
        EdgeSpec(draft_path="/models/draft", engine={"default_k": 4})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="port"):
        EdgeSpec(draft_path="/models/draft", port=70000)
    assert spec.http_port == 0 and spec.served_model_name == "edgespec"  # HTTP on a free port
    with pytest.raises(ValueError, match="http_port"):
        EdgeSpec(draft_path="/models/draft", http_port=-1)
    with pytest.raises(ValueError, match="served_model_name"):
        EdgeSpec(draft_path="/models/draft", served_model_name="")
