"""The proxied connections of a link emulator: per connection two pipes (uplink, downlink) that
hold each chunk for its delay, and the link state every connection shares (profile, fault flags,
bandwidth queues, counters). Everything here runs on the emulator's loop thread only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from array import array
from collections import deque

from edgespec.linkemu.profile import LinkProfile

logger = logging.getLogger(__name__)

# Bandwidth pacing granularity: a 256 KiB read at 8 Mbit/s would otherwise arrive as one 0.26 s burst.
_SEGMENT_BYTES = 16 * 1024
# Per connection and direction: stop reading from the sender above HIGH queued bytes (TCP flow
# control would do the same on a slow link), resume below LOW.
_QUEUE_HIGH_BYTES = 4 * 1024 * 1024
_QUEUE_LOW_BYTES = 1024 * 1024

CLIENT = 0  # the side a connection was accepted from (the edge)
UPSTREAM = 1  # the side the emulator connected to (the verifier)


class LinkDirection:
    """One direction of the emulated link, shared by all connections: bandwidth queue and stats."""

    def __init__(self) -> None:
        self.busy_until = 0.0  # loop time at which the last queued chunk finishes serialising
        self.chunks = 0
        self.bytes = 0
        self.delays = array("d")  # achieved added one-way delay per chunk, seconds

    def record(self, nbytes: int, delay_s: float) -> None:
        """Count one chunk of `nbytes` delivered `delay_s` seconds after it was read."""
        self.chunks += 1
        self.bytes += nbytes
        self.delays.append(delay_s)

    def reset(self) -> None:
        """Forget the counted chunks (the bandwidth queue stays)."""
        self.chunks = 0
        self.bytes = 0
        self.delays = array("d")

    def snapshot(self) -> tuple[int, int, array]:
        """(chunks, bytes, per-chunk delays in seconds): a copy, for `direction_stats`."""
        return self.chunks, self.bytes, array("d", self.delays)


class LinkState:
    """The link as every connection sees it: written by `LinkEmulator`'s control calls and read
    by the pipes, on the emulator's loop thread (on the caller's while the emulator is stopped)."""

    def __init__(self, profile: LinkProfile, upstream: tuple[str, int]) -> None:
        self.profile = profile
        self.rng = random.Random(profile.seed)  # jitter draws
        self.upstream = upstream  # where new connections are forwarded
        self.cut = False
        self.blackholed = False
        self.uplink = LinkDirection()  # client -> upstream
        self.downlink = LinkDirection()  # upstream -> client
        self.connections: set[Connection] = set()
        self.connections_accepted = 0
        self.connections_refused = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.passing = asyncio.Event()  # set while not blackholed; replaced by `attach_loop`

    def set_profile(self, profile: LinkProfile) -> None:
        """Use `profile` for chunks read from now on; re-seeds the jitter draws."""
        self.profile = profile
        self.rng = random.Random(profile.seed)

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve on `loop` (called on it, before the first connection)."""
        self._loop = loop
        self.passing = asyncio.Event()
        if not self.blackholed:
            self.passing.set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the connections run on; RuntimeError before `attach_loop`."""
        if self._loop is None:
            raise RuntimeError("the link has no event loop yet (LinkEmulator not started)")
        return self._loop


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


def _reset(transport: asyncio.Transport) -> None:
    """Close with an RST (SO_LINGER 0), so the peer sees ECONNRESET rather than a clean EOF."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Pipe:
    """One direction of one proxied connection: a deque of (deliver_at, data, read_at) and a timer.

    A single loop.call_at timer per pipe, armed for the head of the queue, writes every chunk that
    is due; chunks that are due on arrival with an empty queue are written at once (the zero-delay
    fast path: no timer, no task switch).
    """

    def __init__(self, state: LinkState, conn: Connection, link: LinkDirection) -> None:
        self.state = state
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
        profile = self.state.profile
        delay = profile.rtt_ms / 2000.0
        if profile.jitter_ms:
            delay += self.state.rng.uniform(0.0, profile.jitter_ms) / 1000.0
        return delay

    def push(self, data: bytes) -> None:
        """Schedule `data` (just read from src) for delivery to dst."""
        if self.dead:
            return
        state = self.state
        loop = state.loop
        now = loop.time()
        bandwidth = state.profile.bandwidth_mbps
        if bandwidth is None:
            deliver = max(now + self._one_way_s(), self.prev_deliver)
            self.prev_deliver = deliver
            if deliver <= now and not self.queue and self.dst is not None and not state.blackholed:
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
        now = self.state.loop.time()
        deliver = max(now + self.state.profile.rtt_ms / 2000.0, self.prev_deliver)
        self.prev_deliver = deliver
        self.queue.append((deliver, marker, now))
        self._arm()

    def _arm(self) -> None:
        if self.timer is None and self.queue and self.dst is not None and not self.state.blackholed:
            self.timer = self.state.loop.call_at(self.queue[0][0], self.flush)

    def flush(self) -> None:
        """Write every queued chunk that is due; re-arm the timer for the next one."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.dead or self.dst is None or self.state.blackholed:
            return
        loop = self.state.loop
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


class Side(asyncio.Protocol):
    """Protocol for one socket of a proxied connection; forwards every event to the connection."""

    def __init__(self, conn: Connection, side: int) -> None:
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


class Connection:
    """One client connection and its upstream connection, joined by an uplink and a downlink pipe."""

    def __init__(self, state: LinkState) -> None:
        self.state = state
        self.transports: list[asyncio.Transport | None] = [None, None]  # [client, upstream]
        self.alive = [False, False]
        self.up = Pipe(state, self, state.uplink)  # client -> upstream
        self.down = Pipe(state, self, state.downlink)  # upstream -> client
        self.connect_task: asyncio.Task[None] | None = None
        self.closing = False

    def pipe_from(self, side: int) -> Pipe:
        """The pipe carrying what `side` sends."""
        return self.up if side == CLIENT else self.down

    def pipe_to(self, side: int) -> Pipe:
        """The pipe delivering to `side`."""
        return self.down if side == CLIENT else self.up

    def hold(self) -> None:
        """Blackhole: stop both pipes' timers (nothing is delivered until `release`)."""
        for pipe in (self.up, self.down):
            if pipe.timer is not None:
                pipe.timer.cancel()
                pipe.timer = None

    def release(self) -> None:
        """After a blackhole or cut: deliver everything due in both directions, in order."""
        self.up.flush()
        self.down.flush()

    def _accepted(self, client: asyncio.Transport) -> None:
        """A client connected: reset it if the link is cut, else connect upstream (reading from
        the client paused until then)."""
        state = self.state
        state.connections.add(self)
        if state.cut:
            state.connections_refused += 1
            self.close(reset=True)
            return
        client.pause_reading()  # until the upstream connection is up
        self.connect_task = state.loop.create_task(self.connect_upstream())

    def attach(self, side: int, transport: asyncio.Transport) -> None:
        """`side`'s socket is up: a client is accepted (or reset), an upstream joins the pipes."""
        self.transports[side] = transport
        self.alive[side] = True
        _set_nodelay(transport)
        if side == CLIENT:
            self._accepted(transport)
            return
        if self.closing:  # client left or link cut while we were connecting
            _reset(transport)
            return
        client = self.transports[CLIENT]
        assert client is not None
        self.up.src, self.up.dst = client, transport
        self.down.src, self.down.dst = transport, client
        self.state.connections_accepted += 1
        client.resume_reading()  # paused in _accepted until the upstream was up
        self.up.flush()  # anything read before the upstream was up (EOF, say)
        self.down.update_src_reading()

    def deliver_marker(self, pipe: Pipe, marker: _Marker) -> None:
        """A marker reached the head of `pipe`: reset both sides, or half-close its far side."""
        if marker is _RST:
            self.close(reset=True)
            return
        assert pipe.dst is not None
        if pipe.dst.can_write_eof():
            try:
                pipe.dst.write_eof()
            except OSError:  # the far side is gone already (its own close follows): nothing to do
                logger.debug("half-close of a disconnected socket", exc_info=True)
        pipe.eof_delivered = True
        if self.up.eof_delivered and self.down.eof_delivered:
            self.close(reset=False)

    def lost(self, side: int, exc: Exception | None) -> None:
        """`side`'s socket closed: the far side is reset after the bytes already on the way."""
        self.alive[side] = False
        if not self.closing:
            if exc is not None:
                logger.debug(
                    "linkemu: %s side lost: %r", "client" if side == CLIENT else "upstream", exc
                )
            if self.transports[UPSTREAM] is None:  # still connecting: nothing to tell upstream
                self.close(reset=False)
            else:
                # Nothing can reach this side any more; the far side learns of it after the bytes
                # already on the way, as it would over a real link.
                self.pipe_to(side).kill()
                self.pipe_from(side).push_marker(_RST)
        if not any(self.alive):
            self.state.connections.discard(self)

    def close(self, *, reset: bool) -> None:
        """End both sides now: RST if `reset`, else a graceful close after buffered bytes."""
        self.closing = True
        self.up.kill()
        self.down.kill()
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        for side in (CLIENT, UPSTREAM):
            transport = self.transports[side]
            if transport is not None and self.alive[side]:
                if reset:
                    _reset(transport)
                else:
                    transport.close()
        if not any(self.alive):
            self.state.connections.discard(self)

    async def connect_upstream(self) -> None:
        """Open the upstream connection (after a blackhole lifts); reset the client on failure."""
        state = self.state
        try:
            await state.passing.wait()
            if self.closing:
                return
            host, port = state.upstream
            await state.loop.create_connection(lambda: Side(self, UPSTREAM), host, port)
        except OSError as exc:
            logger.warning("linkemu: upstream %s:%d unreachable: %r", *state.upstream, exc)
            state.connections_refused += 1
            self.close(reset=True)
