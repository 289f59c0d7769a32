"""A real edge on 127.0.0.1 for the HTTP API tests: an `EdgeEngine` over the tiny draft, its gRPC
server and its OpenAI-compatible HTTP API, all on one event loop in a background thread (as in
`python -m edgespec.edge.server`), dialing a real Verifier server over gRPC."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from edgespec.edge.config import EngineConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.edge.http_server import serve_http
from edgespec.edge.service import serve

MODEL = "tiny-edge"
START_S = 30.0


class EdgeStack:
    """Edge gRPC (`grpc_address`) + HTTP (`url`, `base_url` = url + /v1) on a background loop."""

    def __init__(
        self,
        draft: tuple[Any, Any],
        verifiers: list[str],
        token: str | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        model, tokenizer = draft
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            engine = EdgeEngine(model, tokenizer, verifiers, config=config)
            grpc_server = await serve(engine, token=token)
            http = await serve_http(engine, MODEL, token=token)
            return engine, grpc_server, http

        self.engine, self.grpc, self.http = self.run(start())
        self.grpc_address = f"127.0.0.1:{self.grpc.port}"
        self.url = self.http.url
        self.base_url = self.url + "/v1"

    def run(self, coro, timeout: float = START_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def stop():
            await self.http.stop()
            await self.grpc.stop(0)

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(START_S)
        self.loop.close()


def wait_sessions_freed(edge: EdgeStack, verifier: Any, within_s: float = 10.0) -> None:
    """Wait until neither the edge nor the verifier (a `VerifierServerThread`) holds a session;
    AssertionError naming what is left after `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if edge.engine.active_sessions == 0 and verifier.engine.stats().sessions == 0:
            return
        time.sleep(0.02)
    raise AssertionError(
        f"sessions left: edge {edge.engine.active_sessions}, "
        f"verifier {verifier.engine.stats().sessions}"
    )
