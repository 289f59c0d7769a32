"""Serve the OpenAI-compatible HTTP API (`edgespec.edge.http_app`) with uvicorn, on the
caller's running event loop: the loop the edge's gRPC server and its engine already use, so the
HTTP handlers call the engine directly, as the gRPC servicer does.

uvicorn's own signal handling is off (the process that embeds it, `python -m
edgespec.edge.server` or a Ray actor, owns SIGTERM/SIGINT) and so is its access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from edgespec.edge.engine import EdgeEngine
from edgespec.edge.http_app import OpenAiApi

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the embedding process handles signals
        yield


@dataclass
class RunningHttpServer:
    """A started HTTP API; `url` is ``http://host:port`` (``/v1`` is the OpenAI base URL)."""

    server: uvicorn.Server
    task: asyncio.Task
    host: str
    port: int
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, let running requests end (streams are cut at uvicorn's shutdown)."""
        self.server.should_exit = True
        await self.task


async def serve_http(
    engine: EdgeEngine,
    model: str,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    tls_files: tuple[str, str] | None = None,
) -> RunningHttpServer:
    """Start the HTTP API for `engine` on host:port (0 = a free port) and return it running.

    `model`: the name /v1/models reports and requests must give; `token`: required as
    ``Authorization: Bearer <token>`` on /v1/* (None = open); `tls_files`: (certificate chain,
    private key) PEM files to serve HTTPS with (None = plain HTTP). OSError if host:port
    cannot be bound."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        OpenAiApi(engine, model, token).app(),
        http="h11",
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=1,
        ssl_certfile=tls_files[0] if tls_files else None,
        ssl_keyfile=tls_files[1] if tls_files else None,
    )
    server = _EmbeddedServer(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    while not server.started:
        if task.done():
            task.result()  # raises the server's start-up error
            raise OSError(f"HTTP server on {host}:{bound} stopped while starting")
        if loop.time() > deadline:
            task.cancel()
            raise OSError(f"HTTP server on {host}:{bound} did not start in {START_TIMEOUT_S} s")
        await asyncio.sleep(0.01)
    logger.info(
        "OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if tls_files else "http", host, bound
    )
    scheme = "https" if tls_files else "http"
    return RunningHttpServer(server=server, task=task, host=host, port=bound, scheme=scheme)
