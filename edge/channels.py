"""gRPC channels to verifiers: one per address, shared by the sessions of an edge.

`ChannelPool` hands out channels; `LoopPool` keeps one pool per event loop (what
`edgespec.edge.grpc_link.GrpcLinks` shares among its links).
"""

from __future__ import annotations

import asyncio

import grpc

from edgespec.edge.config import LinkConfig

# Dense draft probs are k * V float32: k=32 drafts over a 150k vocabulary is ~19 MB, beyond gRPC's
# 4 MiB default. The verifier must accept as much (its own server option).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ChannelPool:
    """One gRPC channel (one HTTP/2 connection) per verifier address, shared by sessions.

    A channel that failed at the connection level is `discard`ed: new sessions get a fresh one,
    and the old one is closed in the background after a grace period for its other streams.
    Must be used from one event loop.
    """

    def __init__(self, config: LinkConfig | None = None) -> None:
        self.config = config if config is not None else LinkConfig()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task] = set()
        self._options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if self.config.tls is not None:
            self._options += self.config.tls.channel_options()

    def has(self, address: str) -> bool:
        """A channel to `address` exists (and has most likely connected already)."""
        return address in self._channels

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            if self.config.tls is not None:
                creds = self.config.tls.channel_credentials()
                channel = grpc.aio.secure_channel(address, creds, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
        return channel

    def discard(self, address: str, channel: grpc.aio.Channel) -> None:
        """Stop handing out `channel`; close it once its other calls had a chance to finish."""
        if self._channels.get(address) is channel:
            del self._channels[address]
        grace = self.config.round_timeout_s
        task = asyncio.get_running_loop().create_task(channel.close(grace=grace))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every channel now (cancels their calls)."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(None)
        for task in list(self._closing):
            task.cancel()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class LoopPool:
    """A `ChannelPool` for the running event loop: a new loop (e.g. a second `asyncio.run`) gets
    a new pool, as grpc.aio channels belong to the loop that made them."""

    def __init__(self, config: LinkConfig) -> None:
        self.config = config
        self._pool: ChannelPool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> ChannelPool:
        loop = asyncio.get_running_loop()
        if self._pool is None or self._loop is not loop:
            self._pool = ChannelPool(self.config)
            self._loop = loop
        return self._pool

    async def close(self) -> None:
        """Close the pool, if it belongs to the running loop (another loop's is gone already)."""
        if self._pool is not None and self._loop is asyncio.get_running_loop():
            await self._pool.close()
        self._pool = None
