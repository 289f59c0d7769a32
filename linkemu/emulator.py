"""`LinkEmulator`: the TCP proxy that carries connections through an emulated link, on an
asyncio loop of its own in a daemon thread, with thread-safe controls (profile, upstream, faults)
and stats. The link model and faults are described in `edgespec.linkemu`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import select
import selectors
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from edgespec.core.validation import check_port
from edgespec.linkemu.connection import CLIENT, Connection, LinkState, Side
from edgespec.linkemu.profile import LinkProfile, LinkStats, direction_stats

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# How long a control call from another thread waits for the emulator's loop to run it.
_CONTROL_TIMEOUT_S = 10.0

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
        check_port("upstream_port", upstream_port, allow_zero=False)
        check_port("listen_port", listen_port)
        if profile is not None and not isinstance(profile, LinkProfile):
            raise ValueError(f"profile must be a LinkProfile or None, got {profile!r}")
        self._listen = (listen_host, listen_port)
        self._state = LinkState(
            profile if profile is not None else LinkProfile(), (upstream_host, upstream_port)
        )
        # set while the loop thread serves (control calls then run on it)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
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
                target=self._run,
                args=(ready,),
                name=f"linkemu-{self._state.profile.name}",
                daemon=True,
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
            *self._state.upstream,
            self._state.profile,
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
        """The link in force."""
        return self._state.profile

    @property
    def upstream(self) -> tuple[str, int]:
        """(host, port) new connections are forwarded to."""
        return self._state.upstream

    # ---- control ---------------------------------------------------------------------------

    def set_profile(self, profile: LinkProfile) -> None:
        """Use `profile` for chunks read from now on; chunks already queued keep their times.

        Lowering the delay mid-connection never reorders: a new chunk still waits for the one before.
        Re-seeds the jitter generator from ``profile.seed``.
        """
        if not isinstance(profile, LinkProfile):
            raise ValueError(f"profile must be a LinkProfile, got {profile!r}")

        self._call(lambda: self._state.set_profile(profile))
        logger.info("linkemu: profile -> %s", profile)

    def set_upstream(self, host: str, port: int) -> None:
        """Forward new connections to `host:port`; existing connections keep their upstream."""
        check_port("port", port, allow_zero=False)

        def apply() -> None:
            self._state.upstream = (host, port)

        self._call(apply)
        logger.info("linkemu: upstream -> %s:%d", host, port)

    def cut(self) -> None:
        """Reset every connection (RST both sides); accept-and-reset new ones until restore()."""

        def apply() -> None:
            self._state.cut = True
            for conn in list(self._state.connections):
                conn.close(reset=True)

        self._call(apply)
        logger.info("linkemu: link cut")

    def blackhole(self) -> None:
        """Hold every byte in both directions (connections stay open) until restore()."""

        def apply() -> None:
            self._state.blackholed = True
            if self._loop is not None:
                self._state.passing.clear()
            for conn in self._state.connections:
                conn.hold()

        self._call(apply)
        logger.info("linkemu: link blackholed")

    def restore(self) -> None:
        """End a cut or blackhole: deliver everything held (in order) and accept new connections."""

        def apply() -> None:
            self._state.cut = False
            self._state.blackholed = False
            if self._loop is not None:
                self._state.passing.set()
            for conn in list(self._state.connections):
                conn.release()

        self._call(apply)
        logger.info("linkemu: link restored")

    # ---- measurement -----------------------------------------------------------------------

    def stats(self) -> LinkStats:
        """Chunks, bytes and achieved added one-way delay per direction since the last reset."""

        def snap() -> tuple[Any, ...]:
            state = self._state
            return (
                state.profile,
                state.uplink.snapshot(),
                state.downlink.snapshot(),
                state.connections_accepted,
                state.connections_refused,
                len(state.connections),
            )

        profile, up, down, accepted, refused, active = self._call(snap)
        uplink = direction_stats(*up)
        downlink = direction_stats(*down)
        rtt = None
        if uplink.delay_ms_p50 is not None and downlink.delay_ms_p50 is not None:
            rtt = uplink.delay_ms_p50 + downlink.delay_ms_p50
        return LinkStats(profile, uplink, downlink, rtt, accepted, refused, active)

    def reset_stats(self) -> None:
        """Forget recorded chunks and delays (connection counters too), e.g. after a warm-up."""

        def apply() -> None:
            self._state.uplink.reset()
            self._state.downlink.reset()
            self._state.connections_accepted = 0
            self._state.connections_refused = 0

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
        self._state.attach_loop(loop)
        self._server = await loop.create_server(
            lambda: Side(Connection(self._state), CLIENT),
            host=self._listen[0],
            port=self._listen[1],
        )
        self._port = self._server.sockets[0].getsockname()[1]

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._state.connections):
            conn.close(reset=True)
        # Let the aborts' connection_lost callbacks run before the loop stops.
        loop = self._state.loop
        loop.call_soon(loop.stop)
