"""Tests for the user-space link emulator: real sockets on 127.0.0.1 through a threaded echo server.

Wall-clock assertions are lower bounds only (the machine is shared); the emulator's own recorded
delays are checked against the profile with a few ms of slack, since it measures them itself.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgespec.linkemu import LinkEmulator, LinkProfile, LinkStats, parse_hostport

REPO_ROOT = Path(__file__).resolve().parents[2]
RECV_TIMEOUT_S = 10.0
# The emulator's own delay record never falls below the profile; above it, it is a few ms on a quiet
# machine but on a saturated one the loop thread's wake-ups are honestly late by up to ~10 ms.
# The slack still catches a doubled or per-hop-duplicated delay.
DELAY_SLACK_MS = 15.0


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self.server.tag:  # type: ignore[attr-defined]
                sock.sendall(self.server.tag)  # type: ignore[attr-defined]
            while data := sock.recv(65536):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the emulator reset us: that is what some tests do
            pass


class EchoServer(socketserver.ThreadingTCPServer):
    """Echoes every byte back; sends `tag` first on each connection (to tell servers apart)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, tag: bytes = b"") -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.tag = tag
        self.port = self.server_address[1]
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def _connect(emu: LinkEmulator) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", emu.port), timeout=RECV_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(65536, n - len(buf)))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _recv_all(sock: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := sock.recv(65536):
        buf += chunk
    return bytes(buf)


def _echo_through(emu: LinkEmulator, pieces: list[bytes]) -> bytes:
    """Send `pieces` as separate writes, half-close, and return everything echoed until EOF."""
    with _connect(emu) as sock:
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append(_recv_all(sock)))
        reader.start()
        for piece in pieces:
            sock.sendall(piece)
        sock.shutdown(socket.SHUT_WR)
        reader.join(timeout=30)
        assert not reader.is_alive(), "echo did not finish"
    return received[0]


def _ping(sock: socket.socket, payload: bytes = b"ping") -> float:
    """One request-response over `sock`; returns the round-trip time in seconds."""
    start = time.perf_counter()
    sock.sendall(payload)
    assert _recv_exactly(sock, len(payload)) == payload
    return time.perf_counter() - start


def _is_closed(sock: socket.socket) -> bool:
    """True if the peer reset or closed the connection (recv sees RST or EOF)."""
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def _new_connection_is_reset(emu: LinkEmulator) -> bool:
    """True if a new connection through `emu` is reset (the RST may even beat connect() back)."""
    try:
        sock = _connect(emu)
    except ConnectionError:
        return True
    with sock:
        return _is_closed(sock)


# ---- LinkProfile -----------------------------------------------------------------------------


def test_profile_defaults_name_and_round_trip() -> None:
    profile = LinkProfile(rtt_ms=50, jitter_ms=5, bandwidth_mbps=10, seed=3)
    assert profile.name == "rtt50ms_jit5ms_bw10mbps"
    assert LinkProfile().name == "rtt0ms"
    assert LinkProfile(rtt_ms=20, name="wan").name == "wan"
    data = profile.to_dict()
    assert data == {
        "rtt_ms": 50,
        "jitter_ms": 5,
        "bandwidth_mbps": 10,
        "seed": 3,
        "name": "rtt50ms_jit5ms_bw10mbps",
    }
    assert LinkProfile.from_dict(data) == profile


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rtt_ms": -1}, "rtt_ms"),
        ({"rtt_ms": float("nan")}, "rtt_ms"),
        ({"jitter_ms": -0.5}, "jitter_ms"),
        ({"bandwidth_mbps": 0}, "bandwidth_mbps"),
        ({"bandwidth_mbps": float("inf")}, "bandwidth_mbps"),
        ({"seed": 1.5}, "seed"),
        ({"rtt_ms": "10"}, "rtt_ms"),
    ],
)
def test_profile_rejects_bad_values_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LinkProfile(**kwargs)


def test_bad_ports_and_addresses_name_the_field() -> None:
    with pytest.raises(ValueError, match="upstream_port"):
        LinkEmulator("127.0.0.1", 0)
    with pytest.raises(ValueError, match="listen_port"):
        LinkEmulator("127.0.0.1", 1, listen_port=70000)
    with pytest.raises(ValueError, match="--upstream"):
        parse_hostport("localhost", field="--upstream")
    assert parse_hostport("127.0.0.1:50051") == ("127.0.0.1", 50051)


# ---- data integrity --------------------------------------------------------------------------


def test_large_payload_passes_intact_both_ways(echo: EchoServer) -> None:
    payload = random.Random(0).randbytes(3 * 1024 * 1024)
    with LinkEmulator("127.0.0.1", echo.port) as emu:
        assert _echo_through(emu, [payload]) == payload
        stats = emu.stats()
    assert stats.uplink.bytes == len(payload)
    assert stats.downlink.bytes == len(payload)
    assert stats.connections_accepted == 1


def test_many_small_writes_pass_intact_with_delay(echo: EchoServer) -> None:
    rng = random.Random(1)
    pieces = [rng.randbytes(rng.randint(1, 64)) for _ in range(1500)]
    with LinkEmulator("127.0.0.1", echo.port, LinkProfile(rtt_ms=4)) as emu:
        assert _echo_through(emu, pieces) == b"".join(pieces)


def test_zero_rtt_adds_well_under_a_tenth_of_a_millisecond(echo: EchoServer) -> None:
    """At rtt 0 chunks go straight through (no timer, no task): the emulator's own record of
    the delay it added is the cost of one socket write."""
    with LinkEmulator("127.0.0.1", echo.port) as emu, _connect(emu) as sock:
        for _ in range(200):
            _ping(sock)
        stats = emu.stats()
    assert stats.uplink.chunks >= 200
    assert stats.uplink.delay_ms_p50 < 0.1
    assert stats.downlink.delay_ms_p50 < 0.1


# ---- delay, jitter, bandwidth ----------------------------------------------------------------


def test_rtt_is_produced_and_measured(echo: EchoServer) -> None:
    with LinkEmulator("127.0.0.1", echo.port, LinkProfile(rtt_ms=40)) as emu, _connect(emu) as sock:
        rtts = [_ping(sock) for _ in range(10)]
        stats = emu.stats()
    assert min(rtts) >= 0.040
    assert isinstance(stats, LinkStats)
    assert stats.uplink.chunks == 10 and stats.downlink.chunks == 10
    assert stats.uplink.delay_ms_p50 >= 20.0 and stats.downlink.delay_ms_p50 >= 20.0
    assert 40.0 <= stats.rtt_ms_measured < 40.0 + DELAY_SLACK_MS
    assert stats.to_dict()["profile"]["rtt_ms"] == 40


def test_jitter_delays_but_never_reorders(echo: EchoServer) -> None:
    # Numbered records written one by one: any reordering would break the sequence.
    records = [f"{i:06d};".encode() for i in range(600)]
    profile = LinkProfile(rtt_ms=2, jitter_ms=20, seed=7)
    with LinkEmulator("127.0.0.1", echo.port, profile) as emu:
        with _connect(emu) as sock:
            received: list[bytes] = []
            reader = threading.Thread(target=lambda: received.append(_recv_all(sock)))
            reader.start()
            for record in records:
                sock.sendall(record)
                time.sleep(0.0005)  # separate chunks, each with its own jitter draw
            sock.shutdown(socket.SHUT_WR)
            reader.join(timeout=30)
        stats = emu.stats()
    assert received[0] == b"".join(records)
    assert stats.uplink.chunks > 50  # jitter really was drawn for many separate chunks
    assert stats.uplink.delay_ms_p95 - stats.uplink.delay_ms_p50 > 2.0  # and it varied
    assert stats.uplink.delay_ms_p50 >= 1.0


def test_bandwidth_limit_paces_transfer(echo: EchoServer) -> None:
    payload = bytes(1_000_000)  # 8 Mbit: 1 s each way at 8 Mbit/s, the directions overlap
    profile = LinkProfile(bandwidth_mbps=8)
    with LinkEmulator("127.0.0.1", echo.port, profile) as emu:
        start = time.perf_counter()
        assert _echo_through(emu, [payload]) == payload
        elapsed = time.perf_counter() - start
        stats = emu.stats()
    assert elapsed >= 0.95
    assert stats.uplink.delay_ms_max >= 900.0  # the last segment waited for the whole megabyte


def test_set_profile_changes_delay_mid_connection(echo: EchoServer) -> None:
    with LinkEmulator("127.0.0.1", echo.port) as emu, _connect(emu) as sock:
        _ping(sock)
        emu.set_profile(LinkProfile(rtt_ms=60))
        emu.reset_stats()
        slow = [_ping(sock) for _ in range(8)]
        slowed = emu.stats()
        emu.set_profile(LinkProfile(rtt_ms=0))
        emu.reset_stats()
        for _ in range(5):
            _ping(sock)
        fast = emu.stats()
    assert min(slow) >= 0.060
    assert 60.0 <= slowed.rtt_ms_measured < 60.0 + DELAY_SLACK_MS
    assert slowed.profile.rtt_ms == 60
    assert fast.rtt_ms_measured < 1.0


# ---- faults and failover ---------------------------------------------------------------------


def test_cut_resets_connections_and_restore_allows_new_ones(echo: EchoServer) -> None:
    with LinkEmulator("127.0.0.1", echo.port) as emu:
        sock = _connect(emu)
        _ping(sock)
        emu.cut()
        assert _is_closed(sock)
        sock.close()

        # While cut: the TCP accept succeeds but the connection is reset at once.
        assert _new_connection_is_reset(emu)

        emu.restore()
        with _connect(emu) as sock2:
            _ping(sock2)
        stats = emu.stats()
    assert stats.connections_refused == 1
    assert stats.connections_accepted == 2


def test_blackhole_holds_bytes_and_restore_delivers_them_in_order(echo: EchoServer) -> None:
    with LinkEmulator("127.0.0.1", echo.port) as emu:
        held = _connect(emu)
        _ping(held)
        emu.blackhole()
        held.sendall(b"first;")
        held.sendall(b"second;")
        # A connection opened during the blackhole is accepted and waits too.
        late = _connect(emu)
        late.sendall(b"late")
        for sock in (held, late):
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(1)  # nothing crosses the link
            sock.settimeout(RECV_TIMEOUT_S)
        emu.restore()
        assert _recv_exactly(held, len(b"first;second;")) == b"first;second;"
        assert _recv_exactly(late, 4) == b"late"
        _ping(held)  # and the connection is healthy afterwards
        held.close()
        late.close()
        stats = emu.stats()
    assert stats.uplink.delay_ms_max >= 300.0  # held time counts as delay the link added


def test_set_upstream_redirects_new_connections_only() -> None:
    server_a, server_b = EchoServer(tag=b"A"), EchoServer(tag=b"B")
    try:
        with LinkEmulator("127.0.0.1", server_a.port) as emu:
            old = _connect(emu)
            assert _recv_exactly(old, 1) == b"A"
            emu.set_upstream("127.0.0.1", server_b.port)
            assert emu.upstream == ("127.0.0.1", server_b.port)
            with _connect(emu) as new:
                assert _recv_exactly(new, 1) == b"B"
                _ping(new)
            _ping(old)  # the existing connection still reaches A
            old.close()
    finally:
        server_a.close()
        server_b.close()


def test_unreachable_upstream_resets_client() -> None:
    with socket.socket() as placeholder:  # a port with nothing listening
        placeholder.bind(("127.0.0.1", 0))
        dead_port = placeholder.getsockname()[1]
    with LinkEmulator("127.0.0.1", dead_port) as emu:
        assert _new_connection_is_reset(emu)
        assert emu.stats().connections_refused == 1


def test_start_stop_lifecycle(echo: EchoServer) -> None:
    emu = LinkEmulator("127.0.0.1", echo.port, LinkProfile(rtt_ms=2))
    with pytest.raises(RuntimeError):
        _ = emu.port
    emu.start()
    with pytest.raises(RuntimeError):
        emu.start()
    sock = _connect(emu)
    _ping(sock)
    emu.stop()
    assert _is_closed(sock)  # stop resets open connections
    sock.close()
    emu.stop()  # idempotent
    assert emu.stats().uplink.chunks == 1  # stats survive stop


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_forwards_and_stops_on_sigint(echo: EchoServer) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "edgespec.linkemu", "--upstream", f"127.0.0.1:{echo.port}"]
        + ["--rtt-ms", "10", "--jitter-ms", "1", "--bandwidth-mbps", "100"],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            assert match, line
            with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=10) as sock:
                assert _ping(sock) >= 0.010
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
            assert "linkemu stats" in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()


# ---- a real gRPC client through the link -----------------------------------------------------


def test_grpc_calls_cross_the_link_and_survive_a_cut() -> None:
    grpc = pytest.importorskip("grpc")
    from concurrent.futures import ThreadPoolExecutor

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    # Fast reconnects, so the channel comes back soon after restore().
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 200)]
    try:
        with (
            LinkEmulator("127.0.0.1", port, LinkProfile(rtt_ms=30)) as emu,
            grpc.insecure_channel(emu.address, options=options) as channel,
        ):
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest()
            assert stub.Check(request, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            start = time.perf_counter()
            stub.Check(request, timeout=10)
            assert time.perf_counter() - start >= 0.030  # one round trip on a warm channel

            emu.cut()
            with pytest.raises(grpc.RpcError) as failure:
                stub.Check(request, timeout=2)
            assert failure.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            emu.restore()
            assert stub.Check(request, timeout=10, wait_for_ready=True).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
            assert emu.stats().rtt_ms_measured >= 30.0
    finally:
        server.stop(grace=None)
