"""`EmulatedLinks.fault`: what `edgespec bench chaos` does to an edge's verifier links."""

from __future__ import annotations

import asyncio
import socket

import pytest

from edgespec.linkemu import LinkProfile
from edgespec.orchestrator.edge_host import EmulatedLinks


def _roundtrip(address: str) -> bytes:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.settimeout(5)
        s.sendall(b"ping")
        return s.recv(16)


@pytest.fixture
def echo_server():
    """A one-connection-at-a-time TCP echo server on 127.0.0.1 (thread)."""
    import threading

    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    data = conn.recv(16)
                    conn.sendall(data)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    srv.close()


def test_cut_resets_until_restore_and_profile_switches_and_back(echo_server):
    profile = LinkProfile(rtt_ms=1)
    links = EmulatedLinks(profile)
    via = links.via(echo_server)
    try:
        assert _roundtrip(via) == b"ping"
        assert links.fault("cut") == 1
        with pytest.raises(OSError):  # accepted, then reset (or an empty read)
            if _roundtrip(via) == b"":
                raise ConnectionResetError("closed")
        links.fault("restore")
        assert _roundtrip(via) == b"ping"
        slow = LinkProfile(rtt_ms=1, bandwidth_mbps=0.05)
        links.fault("profile", slow)
        assert links.describe()[echo_server]["profile"] == slow.name
        links.fault("profile")  # None: back to the deployment's profile
        assert links.describe()[echo_server]["profile"] == profile.name
        links.fault("blackhole")
        links.fault("restore")
        assert _roundtrip(via) == b"ping"
    finally:
        asyncio.run(links.keep_only(set()))  # stops every emulator


def test_unknown_fault_is_refused_naming_the_actions():
    with pytest.raises(ValueError, match="action must be one of"):
        EmulatedLinks(None).fault("melt")


def test_no_emulated_links_touch_nothing():
    assert EmulatedLinks(None).fault("cut") == 0
