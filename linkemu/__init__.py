"""User-space TCP link emulator: delay, jitter, bandwidth and faults on 127.0.0.1.

This kernel has no netem, so the edge-cloud WAN link is emulated by a TCP proxy. The edge connects
to the emulator instead of the verifier; every chunk of bytes read from one side is held for the
link's one-way delay (and serialisation time, when the bandwidth is limited) before it is written to
the other side.

Vocabulary used throughout:

- **uplink**: client -> upstream (edge -> cloud); **downlink**: upstream -> client.
- **chunk**: one read from a socket (split into segments of at most 16 KiB when the bandwidth is
  limited, so that pacing is smooth); each chunk is one delay sample in the stats.
- **added one-way delay** of a chunk: the time it was written to the far side minus the time it was
  read from the near side. This is what the emulator *achieved*, not what it aimed for; the stats
  report it so that every experiment can record the link it really had.

The link model, per direction:

- one-way delay = ``rtt_ms / 2`` + a uniform draw from ``[0, jitter_ms]`` per chunk;
- bandwidth: each direction is one shared queue for all connections; a chunk occupies the link for
  ``bytes * 8 / bandwidth`` seconds after the previous chunk has left it, then travels for the
  one-way delay;
- order: TCP is ordered, so within a connection and direction a chunk is never delivered before the
  one read before it (deliver time = max(previous deliver time, own arrival + delay)). Jitter
  therefore delays bytes but never reorders them.

Not modelled: the connect handshake (a new connection is one RTT cheaper than over a real link, so
measure long-lived channels after warm-up), packet loss, and TCP's congestion control.

Faults:

- :meth:`LinkEmulator.cut`: every current connection is reset (RST) on both sides, and new ones are
  accepted and reset at once, until :meth:`LinkEmulator.restore`.
- :meth:`LinkEmulator.blackhole`: a partition that TCP outlives. Connections stay open and reads
  continue (until the queue limit back-pressures the sender), but nothing is delivered; new
  connections are accepted and their upstream connect waits. On :meth:`LinkEmulator.restore`
  everything held is delivered in order, as TCP's retransmissions would after the link heals. Held
  time counts in the achieved delay.

Run standalone::

    python -m edgespec.linkemu --listen 127.0.0.1:0 --upstream 127.0.0.1:50051 \\
        --rtt-ms 50 --jitter-ms 5 --bandwidth-mbps 10
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import random
import select
import selectors
import signal
import socket
import struct
import threading
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Bandwidth pacing granularity: a 256 KiB read at 8 Mbit/s would otherwise arrive as one 0.26 s burst.
_SEGMENT_BYTES = 16 * 1024
# Per connection and direction: stop reading from the sender above HIGH queued bytes (TCP flow
# control would do the same on a slow link), resume below LOW.
_QUEUE_HIGH_BYTES = 4 * 1024 * 1024
_QUEUE_LOW_BYTES = 1024 * 1024
# How long a control call from another thread waits for the emulator's loop to run it.
_CONTROL_TIMEOUT_S = 10.0

_CLIENT = 0
_UPSTREAM = 1


def _check_number(field: str, value: Any, *, allow_zero: bool = True) -> None:
    """Raise ValueError naming `field` unless `value` is a finite number >= 0 (> 0 if not allow_zero)."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a finite number {bound}, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{field} must be a finite number {bound}, got {value!r}")


def _check_port(field: str, value: Any, *, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise ValueError(f"{field} must be an integer in [{low}, 65535], got {value!r}")


@dataclasses.dataclass(frozen=True)
class LinkProfile:
    """What the emulated link does to every chunk, per direction. Immutable; swap whole profiles.

    Each direction adds ``rtt_ms / 2`` plus a per-chunk uniform draw from ``[0, jitter_ms]``, so the
    mean added round trip is ``rtt_ms + jitter_ms``. Jitter never reorders bytes (see module doc).
    """

    rtt_ms: float = 0.0  # added round-trip delay; each direction gets half
    jitter_ms: float = 0.0  # per-chunk extra one-way delay ~ U[0, jitter_ms]
    bandwidth_mbps: float | None = None  # per-direction capacity, 10^6 bit/s; None = unlimited
    seed: int | None = None  # seeds the jitter draws; None = fresh entropy
    name: str = ""  # label for result files; "" = derived from the numbers, e.g. "rtt50ms_jit5ms"

    def __post_init__(self) -> None:
        _check_number("rtt_ms", self.rtt_ms)
        _check_number("jitter_ms", self.jitter_ms)
        if self.bandwidth_mbps is not None:
            _check_number("bandwidth_mbps", self.bandwidth_mbps, allow_zero=False)
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a str, got {self.name!r}")
        if not self.name:
            object.__setattr__(self, "name", self._default_name())

    def _default_name(self) -> str:
        parts = [f"rtt{self.rtt_ms:g}ms"]
        if self.jitter_ms:
            parts.append(f"jit{self.jitter_ms:g}ms")
        if self.bandwidth_mbps is not None:
            parts.append(f"bw{self.bandwidth_mbps:g}mbps")
        return "_".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field (for result files)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinkProfile:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LinkProfile fields {unknown}; allowed: {sorted(known)}")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class DirectionStats:
    """Chunks one direction carried and the one-way delay it actually added to them.

    Delay fields are None when no chunk has been carried.
    """

    chunks: int
    bytes: int
    delay_ms_mean: float | None
    delay_ms_p50: float | None
    delay_ms_p95: float | None
    delay_ms_max: float | None


@dataclasses.dataclass(frozen=True)
class LinkStats:
    """What the link really did since start (or the last :meth:`LinkEmulator.reset_stats`)."""

    profile: LinkProfile  # the profile in force when the stats were taken
    uplink: DirectionStats  # client -> upstream
    downlink: DirectionStats  # upstream -> client
    rtt_ms_measured: float | None  # uplink p50 + downlink p50; None until both carried a chunk
    connections_accepted: int  # connections forwarded upstream
    connections_refused: int  # reset because the link was cut or the upstream refused
    connections_active: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (nested dataclasses become dicts)."""
        return dataclasses.asdict(self)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty sorted sequence."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# select() cannot watch descriptors numbered at or above FD_SETSIZE (1024 on Linux).
_FD_SETSIZE = 1024


if hasattr(selectors, "EpollSelector"):

    class _PreciseEpollSelector(selectors.EpollSelector):
        """epoll whose timed waits are precise to microseconds rather than whole milliseconds.

        epoll rounds every timeout up to a whole millisecond, so each delayed chunk would be late by
        up to 1 ms per direction (25% of a 5 ms RTT). A timed wait instead blocks in select() on the
        epoll descriptor itself (readable when any registered socket is ready), whose timeout has
        microsecond resolution, then collects the events with a zero-timeout epoll poll.
        """

        def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            if timeout is not None and timeout > 0 and self.fileno() < _FD_SETSIZE:
                select.select([self.fileno()], [], [], timeout)
                timeout = 0
            return super().select(timeout)

    def _make_selector() -> selectors.BaseSelector:
        return _PreciseEpollSelector()

else:  # not Linux: the platform default, with its own timer resolution

    def _make_selector() -> selectors.BaseSelector:
        return selectors.DefaultSelector()


class _LinkDirection:
    """One direction of the emulated link, shared by all connections: bandwidth queue and stats."""

    def __init__(self) -> None:
        self.busy_until = 0.0  # loop time at which the last queued chunk finishes serialising
        self.chunks = 0
        self.bytes = 0
        self.delays = array("d")  # achieved added one-way delay per chunk, seconds

    def record(self, nbytes: int, delay_s: float) -> None:
        self.chunks += 1
        self.bytes += nbytes
        self.delays.append(delay_s)

    def reset(self) -> None:
        self.chunks = 0
        self.bytes = 0
        self.delays = array("d")

    def snapshot(self) -> tuple[int, int, array]:
        return self.chunks, self.bytes, array("d", self.delays)


def _direction_stats(chunks: int, nbytes: int, delays: array) -> DirectionStats:
    if not delays:
        return DirectionStats(chunks, nbytes, None, None, None, None)
    ms = sorted(d * 1000.0 for d in delays)
    return DirectionStats(
        chunks=chunks,
        bytes=nbytes,
        delay_ms_mean=sum(ms) / len(ms),
        delay_ms_p50=_percentile(ms, 50),
        delay_ms_p95=_percentile(ms, 95),
        delay_ms_max=ms[-1],
    )


class _Marker:
    """A non-data event travelling through a pipe behind the bytes queued before it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_EOF = _Marker("EOF")  # the sender half-closed: write_eof on the far side
_RST = _Marker("RST")  # the sender's socket died: reset the far side


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # OSError: already closed by the peer; the protocol will see it.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _reset(transport: asyncio.BaseTransport) -> None:
    """Close with an RST (SO_LINGER 0), so the peer sees ECONNRESET rather than a clean EOF."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Pipe:
    """One direction of one proxied connection: a deque of (deliver_at, data, read_at) and a timer.

    A single loop.call_at timer per pipe, armed for the head of the queue, writes every chunk that
    is due; chunks that are due on arrival with an empty queue are written at once (the zero-delay
    fast path: no timer, no task switch).
    """

    def __init__(self, emu: LinkEmulator, conn: _Connection, link: _LinkDirection) -> None:
        self.emu = emu
        self.conn = conn
        self.link = link
        self.src: asyncio.Transport | None = None  # set once both sockets are up
        self.dst: asyncio.Transport | None = None
        self.queue: deque[tuple[float, bytes | _Marker, float]] = deque()
        self.queued_bytes = 0
        self.prev_deliver = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.dst_full = False  # dst's write buffer is above its high-water mark
        self.src_paused = False
        self.eof_delivered = False
        self.dead = False

    def _one_way_s(self) -> float:
        profile = self.emu._profile
        delay = profile.rtt_ms / 2000.0
        if profile.jitter_ms:
            delay += self.emu._rng.uniform(0.0, profile.jitter_ms) / 1000.0
        return delay

    def push(self, data: bytes) -> None:
        """Schedule `data` (just read from src) for delivery to dst."""
        if self.dead:
            return
        emu = self.emu
        loop = emu._loop
        now = loop.time()
        bandwidth = emu._profile.bandwidth_mbps
        if bandwidth is None:
            deliver = max(now + self._one_way_s(), self.prev_deliver)
            self.prev_deliver = deliver
            if deliver <= now and not self.queue and self.dst is not None and not emu._blackholed:
                self.dst.write(data)
                self.link.record(len(data), loop.time() - now)
                return
            self.queue.append((deliver, data, now))
            self.queued_bytes += len(data)
        else:
            bits_per_s = bandwidth * 1e6
            link = self.link
            for start in range(0, len(data), _SEGMENT_BYTES):
                segment = data[start : start + _SEGMENT_BYTES]
                link.busy_until = max(link.busy_until, now) + len(segment) * 8 / bits_per_s
                deliver = max(link.busy_until + self._one_way_s(), self.prev_deliver)
                self.prev_deliver = deliver
                self.queue.append((deliver, segment, now))
                self.queued_bytes += len(segment)
        self._arm()
        self.update_src_reading()

    def push_marker(self, marker: _Marker) -> None:
        """Queue a half-close or reset behind the bytes already queued (TCP orders FIN/RST too)."""
        if self.dead:
            return
        now = self.emu._loop.time()
        deliver = max(now + self.emu._profile.rtt_ms / 2000.0, self.prev_deliver)
        self.prev_deliver = deliver
        self.queue.append((deliver, marker, now))
        self._arm()

    def _arm(self) -> None:
        if self.timer is None and self.queue and self.dst is not None and not self.emu._blackholed:
            self.timer = self.emu._loop.call_at(self.queue[0][0], self.flush)

    def flush(self) -> None:
        """Write every queued chunk that is due; re-arm the timer for the next one."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.dead or self.dst is None or self.emu._blackholed:
            return
        loop = self.emu._loop
        queue = self.queue
        while queue:
            deliver, data, read_at = queue[0]
            if deliver > loop.time():
                break
            queue.popleft()
            if isinstance(data, _Marker):
                self.conn.deliver_marker(self, data)
                if self.dead:
                    return
                continue
            self.queued_bytes -= len(data)
            self.dst.write(data)
            self.link.record(len(data), loop.time() - read_at)
        self._arm()
        self.update_src_reading()

    def update_src_reading(self) -> None:
        """Back-pressure: pause src while dst is full or too much is queued (with hysteresis)."""
        src = self.src
        if src is None or self.dead:
            return
        if self.dst_full or self.queued_bytes > _QUEUE_HIGH_BYTES:
            if not self.src_paused:
                self.src_paused = True
                src.pause_reading()
        elif self.src_paused and self.queued_bytes <= _QUEUE_LOW_BYTES:
            self.src_paused = False
            src.resume_reading()

    def kill(self) -> None:
        """Drop everything queued; nothing more goes through this pipe."""
        self.dead = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.queued_bytes = 0


class _Side(asyncio.Protocol):
    """Protocol for one socket of a proxied connection; forwards every event to the connection."""

    def __init__(self, conn: _Connection, side: int) -> None:
        self.conn = conn
        self.side = side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.conn.attach(self.side, transport)

    def data_received(self, data: bytes) -> None:
        self.conn.pipe_from(self.side).push(data)

    def eof_received(self) -> bool:
        self.conn.pipe_from(self.side).push_marker(_EOF)
        return True  # keep the other half open: the far side may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lost(self.side, exc)

    def pause_writing(self) -> None:
        pipe = self.conn.pipe_to(self.side)
        pipe.dst_full = True
        pipe.update_src_reading()

    def resume_writing(self) -> None:
        pipe = self.conn.pipe_to(self.side)
        pipe.dst_full = False
        pipe.update_src_reading()


class _Connection:
    """One client connection and its upstream connection, joined by an uplink and a downlink pipe."""

    def __init__(self, emu: LinkEmulator) -> None:
        self.emu = emu
        self.transports: list[asyncio.Transport | None] = [None, None]  # [client, upstream]
        self.alive = [False, False]
        self.up = _Pipe(emu, self, emu._uplink)  # client -> upstream
        self.down = _Pipe(emu, self, emu._downlink)  # upstream -> client
        self.connect_task: asyncio.Task[None] | None = None
        self.closing = False

    def pipe_from(self, side: int) -> _Pipe:
        return self.up if side == _CLIENT else self.down

    def pipe_to(self, side: int) -> _Pipe:
        return self.down if side == _CLIENT else self.up

    def attach(self, side: int, transport: asyncio.Transport) -> None:
        self.transports[side] = transport
        self.alive[side] = True
        _set_nodelay(transport)
        if side == _CLIENT:
            self.emu._on_client(self)
            return
        if self.closing:  # client left or link cut while we were connecting
            _reset(transport)
            return
        client = self.transports[_CLIENT]
        assert client is not None
        self.up.src, self.up.dst = client, transport
        self.down.src, self.down.dst = transport, client
        self.emu._connections_accepted += 1
        client.resume_reading()  # paused in _on_client until the upstream was up
        self.up.flush()  # anything read before the upstream was up (EOF, say)
        self.down.update_src_reading()

    def deliver_marker(self, pipe: _Pipe, marker: _Marker) -> None:
        if marker is _RST:
            self.close(reset=True)
            return
        assert pipe.dst is not None
        if pipe.dst.can_write_eof():
            pipe.dst.write_eof()
        pipe.eof_delivered = True
        if self.up.eof_delivered and self.down.eof_delivered:
            self.close(reset=False)

    def lost(self, side: int, exc: Exception | None) -> None:
        self.alive[side] = False
        if not self.closing:
            if exc is not None:
                logger.debug(
                    "linkemu: %s side lost: %r", "client" if side == _CLIENT else "upstream", exc
                )
            if self.transports[_UPSTREAM] is None:  # still connecting: nothing to tell upstream
                self.close(reset=False)
            else:
                # Nothing can reach this side any more; the far side learns of it after the bytes
                # already on the way, as it would over a real link.
                self.pipe_to(side).kill()
                self.pipe_from(side).push_marker(_RST)
        if not any(self.alive):
            self.emu._forget(self)

    def close(self, *, reset: bool) -> None:
        """End both sides now: RST if `reset`, else a graceful close after buffered bytes."""
        self.closing = True
        self.up.kill()
        self.down.kill()
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        for side in (_CLIENT, _UPSTREAM):
            transport = self.transports[side]
            if transport is not None and self.alive[side]:
                if reset:
                    _reset(transport)
                else:
                    transport.close()
        if not any(self.alive):
            self.emu._forget(self)

    async def connect_upstream(self) -> None:
        """Open the upstream connection (after a blackhole lifts); reset the client on failure."""
        emu = self.emu
        try:
            await emu._passing.wait()
            if self.closing:
                return
            host, port = emu._upstream
            await emu._loop.create_connection(lambda: _Side(self, _UPSTREAM), host, port)
        except OSError as exc:
            logger.warning("linkemu: upstream %s:%d unreachable: %r", *emu._upstream, exc)
            emu._connections_refused += 1
            self.close(reset=True)


class LinkEmulator:
    """TCP proxy on `listen_host:listen_port` that forwards to an upstream through an emulated link.

    Runs its own asyncio loop in a daemon thread so that synchronous code (pytest, gRPC clients)
    can use it: :meth:`start` / :meth:`stop`, or ``with LinkEmulator(...) as emu:``. Every public
    method is thread-safe and, while running, returns only after the loop has applied it.

    Args:
        upstream_host, upstream_port: where connections are forwarded (changeable with
            :meth:`set_upstream`; existing connections keep their upstream).
        profile: the link; default is a transparent link (rtt 0, unlimited bandwidth).
        listen_host, listen_port: where to listen; port 0 picks a free port (see :attr:`port`).
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        profile: LinkProfile | None = None,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        _check_port("upstream_port", upstream_port, allow_zero=False)
        _check_port("listen_port", listen_port, allow_zero=True)
        if profile is not None and not isinstance(profile, LinkProfile):
            raise ValueError(f"profile must be a LinkProfile or None, got {profile!r}")
        self._upstream = (upstream_host, upstream_port)
        self._listen = (listen_host, listen_port)
        self._profile = profile if profile is not None else LinkProfile()
        self._rng = random.Random(self._profile.seed)
        self._cut = False
        self._blackholed = False
        self._uplink = _LinkDirection()
        self._downlink = _LinkDirection()
        self._connections: set[_Connection] = set()
        self._connections_accepted = 0
        self._connections_refused = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._passing: asyncio.Event  # set while not blackholed; created on the loop
        self._port: int | None = None
        self._lock = threading.Lock()  # serialises start() and stop()

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> LinkEmulator:
        """Bind and start serving in a background thread; returns self. Raises OSError on bind failure."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("LinkEmulator already started")
            ready: concurrent.futures.Future[None] = concurrent.futures.Future()
            thread = threading.Thread(
                target=self._run, args=(ready,), name=f"linkemu-{self._profile.name}", daemon=True
            )
            thread.start()
            try:
                ready.result(timeout=_CONTROL_TIMEOUT_S)
            except BaseException:
                thread.join(timeout=_CONTROL_TIMEOUT_S)
                raise
            self._thread = thread
        logger.info(
            "linkemu listening on %s -> upstream %s:%d, profile %s",
            self.address,
            *self._upstream,
            self._profile,
        )
        return self

    def stop(self) -> None:
        """Reset every connection, stop listening and join the thread. Idempotent."""
        with self._lock:
            thread, loop = self._thread, self._loop
            if thread is None or loop is None:
                return
            loop.call_soon_threadsafe(self._shutdown)
            thread.join(timeout=_CONTROL_TIMEOUT_S)
            if thread.is_alive():
                logger.warning(
                    "linkemu: loop thread did not stop within %.0f s", _CONTROL_TIMEOUT_S
                )
            self._thread = None
            self._loop = None

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port actually bound (useful with listen_port 0). Only after :meth:`start`."""
        if self._port is None:
            raise RuntimeError("LinkEmulator is not started; call start() first")
        return self._port

    @property
    def address(self) -> str:
        """``"host:port"`` to connect to (e.g. a gRPC target). Only after :meth:`start`."""
        return f"{self._listen[0]}:{self.port}"

    @property
    def profile(self) -> LinkProfile:
        return self._profile

    @property
    def upstream(self) -> tuple[str, int]:
        return self._upstream

    # ---- control ---------------------------------------------------------------------------

    def set_profile(self, profile: LinkProfile) -> None:
        """Use `profile` for chunks read from now on; chunks already queued keep their times.

        Lowering the delay mid-connection never reorders: a new chunk still waits for the one before.
        Re-seeds the jitter generator from ``profile.seed``.
        """
        if not isinstance(profile, LinkProfile):
            raise ValueError(f"profile must be a LinkProfile, got {profile!r}")

        def apply() -> None:
            self._profile = profile
            self._rng = random.Random(profile.seed)

        self._call(apply)
        logger.info("linkemu: profile -> %s", profile)

    def set_upstream(self, host: str, port: int) -> None:
        """Forward new connections to `host:port`; existing connections keep their upstream."""
        _check_port("port", port, allow_zero=False)

        def apply() -> None:
            self._upstream = (host, port)

        self._call(apply)
        logger.info("linkemu: upstream -> %s:%d", host, port)

    def cut(self) -> None:
        """Reset every connection (RST both sides); accept-and-reset new ones until restore()."""

        def apply() -> None:
            self._cut = True
            for conn in list(self._connections):
                conn.close(reset=True)

        self._call(apply)
        logger.info("linkemu: link cut")

    def blackhole(self) -> None:
        """Hold every byte in both directions (connections stay open) until restore()."""

        def apply() -> None:
            self._blackholed = True
            if self._loop is not None:
                self._passing.clear()
            for conn in self._connections:
                for pipe in (conn.up, conn.down):
                    if pipe.timer is not None:
                        pipe.timer.cancel()
                        pipe.timer = None

        self._call(apply)
        logger.info("linkemu: link blackholed")

    def restore(self) -> None:
        """End a cut or blackhole: deliver everything held (in order) and accept new connections."""

        def apply() -> None:
            self._cut = False
            self._blackholed = False
            if self._loop is not None:
                self._passing.set()
            for conn in list(self._connections):
                conn.up.flush()
                conn.down.flush()

        self._call(apply)
        logger.info("linkemu: link restored")

    # ---- measurement -----------------------------------------------------------------------

    def stats(self) -> LinkStats:
        """Chunks, bytes and achieved added one-way delay per direction since the last reset."""

        def snap() -> tuple[Any, ...]:
            return (
                self._profile,
                self._uplink.snapshot(),
                self._downlink.snapshot(),
                self._connections_accepted,
                self._connections_refused,
                len(self._connections),
            )

        profile, up, down, accepted, refused, active = self._call(snap)
        uplink = _direction_stats(*up)
        downlink = _direction_stats(*down)
        rtt = None
        if uplink.delay_ms_p50 is not None and downlink.delay_ms_p50 is not None:
            rtt = uplink.delay_ms_p50 + downlink.delay_ms_p50
        return LinkStats(profile, uplink, downlink, rtt, accepted, refused, active)

    def reset_stats(self) -> None:
        """Forget recorded chunks and delays (connection counters too), e.g. after a warm-up."""

        def apply() -> None:
            self._uplink.reset()
            self._downlink.reset()
            self._connections_accepted = 0
            self._connections_refused = 0

        self._call(apply)

    # ---- internals (loop thread) -----------------------------------------------------------

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the loop thread and return its result; directly if not running."""
        loop = self._loop
        if loop is None or self._thread is None or threading.current_thread() is self._thread:
            return fn()
        done: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the caller's thread
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return done.result(timeout=_CONTROL_TIMEOUT_S)

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = asyncio.SelectorEventLoop(_make_selector())
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            loop.close()
            ready.set_exception(exc)
            return
        self._loop = loop
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._passing = asyncio.Event()
        if not self._blackholed:
            self._passing.set()
        self._server = await loop.create_server(
            lambda: _Side(_Connection(self), _CLIENT),
            host=self._listen[0],
            port=self._listen[1],
        )
        self._port = self._server.sockets[0].getsockname()[1]

    def _on_client(self, conn: _Connection) -> None:
        client = conn.transports[_CLIENT]
        assert client is not None
        self._connections.add(conn)
        if self._cut:
            self._connections_refused += 1
            conn.close(reset=True)
            return
        client.pause_reading()  # until the upstream connection is up
        conn.connect_task = self._loop.create_task(conn.connect_upstream())

    def _forget(self, conn: _Connection) -> None:
        self._connections.discard(conn)

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.close(reset=True)
        # Let the aborts' connection_lost callbacks run before the loop stops.
        self._loop.call_soon(self._loop.stop)


def parse_hostport(text: str, *, field: str = "address") -> tuple[str, int]:
    """``"host:port"`` -> (host, port); raises ValueError naming `field`."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{field} must be HOST:PORT with PORT in [0, 65535], got {text!r}")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run an emulator until SIGINT/SIGTERM, then log its stats."""
    parser = argparse.ArgumentParser(
        prog="python -m edgespec.linkemu", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 = any)")
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--bandwidth-mbps", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--name", default="")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        listen_host, listen_port = parse_hostport(args.listen, field="--listen")
        upstream_host, upstream_port = parse_hostport(args.upstream, field="--upstream")
        profile = LinkProfile(
            rtt_ms=args.rtt_ms,
            jitter_ms=args.jitter_ms,
            bandwidth_mbps=args.bandwidth_mbps,
            seed=args.seed,
            name=args.name,
        )
        emu = LinkEmulator(
            upstream_host, upstream_port, profile, listen_host=listen_host, listen_port=listen_port
        )
    except ValueError as exc:
        parser.error(str(exc))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with emu:
        while not stop.wait(0.5):
            pass
        logger.info("linkemu stats: %s", emu.stats().to_dict())
    return 0
