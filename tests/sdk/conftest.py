"""Fixtures of the client SDK tests: a scripted `Edge` server on 127.0.0.1 and a client of it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.servers import CALL_TIMEOUT_S, ScriptedEdge, ScriptedEdgeServer

from edgespec import Client


@pytest.fixture
def edge() -> Iterator[ScriptedEdgeServer]:
    server = ScriptedEdgeServer(ScriptedEdge())
    yield server
    server.stop()


@pytest.fixture
def client(edge: ScriptedEdgeServer) -> Iterator[Client]:
    with Client(edge.address, timeout=CALL_TIMEOUT_S) as c:
        yield c
