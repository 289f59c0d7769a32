"""Servers for the tests: a Verifier server on a background event loop, a server subprocess
(`python -m ...` printing LISTENING), and a scripted `Edge` servicer on a grpc.aio server.

The scripted servicer's behaviour is picked by the request's ``policy`` (the client passes it
through unchecked); it records every request and its metadata.
"""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import grpc

from edgespec.cloud.service import serve
from edgespec.errors import FIELD_METADATA_KEY
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.protos.edgespec.v1 import edgespec_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_DEADLINE_S = 30.0
START_TIMEOUT_S = 180.0  # a server subprocess must print LISTENING within this (loaded CI box)
CALL_TIMEOUT_S = 10.0  # deadline of every call to the scripted edge that is expected to succeed
VERIFIER_TOKEN = "verifier-secret"  # of the verifier subprocesses (`servers` in tests/edge)
EDGE_TOKEN = "edge-secret"  # of the Edge server subprocess
STALL_S = 30.0  # how long the "stall" script sleeps: a broken deadline fails the test, not hangs


class VerifierServerThread:
    """A Verifier server on its own event loop in a background thread."""

    def __init__(self, engine, **serve_kwargs) -> None:  # engine: cloud.verifier.VerifierEngine
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(serve(engine, **serve_kwargs), self.loop)
        self.running = future.result(timeout=SERVER_DEADLINE_S)
        self.address = self.running.address

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(0), self.loop).result(SERVER_DEADLINE_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(SERVER_DEADLINE_S)
        self.loop.close()


class ServerProcess:
    """A server subprocess started with its LISTENING line parsed (address = 'host:port')."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            # One intra-op thread per process: several processes share this host's few cores,
            # and a parallel region waiting on a descheduled thread costs a scheduler tick.
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.address: str | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_listening(self) -> str:
        try:
            line = self._lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            line = None
        if line is None or not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}; see {self.log.name}")
        self.address = line.split()[1]
        return self.address

    def next_line(self, timeout: float = START_TIMEOUT_S) -> str | None:
        """The next stdout line after LISTENING (None at the end of the output)."""
        return self._lines.get(timeout=timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=SERVER_DEADLINE_S)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


# The stats of every scripted generation's summary (the client tests check their conversion).
STATS = pb.GenerateStats(
    rounds=3,
    drafted=8,
    accepted=6,
    drafted_per_position=[3, 3, 2],
    accepted_per_position=[3, 2, 1],
    draft_lengths=[3, 3, 2],
    rtt_ms_mean=12.5,
    time_to_first_token_ms=30.0,
    time_per_output_token_ms=4.5,
    bytes_sent=512,
    bytes_received=128,
    reconnects=1,
    verifier="127.0.0.1:7000",
)


def continuation(request: pb.GenerateRequest) -> list[int]:
    """The scripted 'generation': prompt ids + 1 (or the bytes of a text prompt), capped."""
    if request.WhichOneof("input") == "prompt":
        ids = list(request.prompt.encode())
    else:
        ids = [t + 1 for t in request.prompt_ids.ids]
    return ids[: request.params.max_new_tokens]


class ScriptedEdge(pb_grpc.EdgeServicer):
    """An `Edge` servicer whose behaviour is picked by ``request.policy``.

    Records every request and its metadata; `cancelled` is set when a call it was stalling is
    cancelled (by the client's deadline or close), `stall_finished` if a stall ran to its end.
    """

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.requests: list[tuple[pb.GenerateRequest, dict[str, str]]] = []
        self.cancelled = threading.Event()
        self.stall_finished = threading.Event()

    async def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.requests.append((request, metadata))
        if self.token is not None and metadata.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        script = request.policy
        ids = continuation(request)
        if script.startswith("code:"):
            await context.abort(grpc.StatusCode[script[5:]], f"scripted {script[5:]}")
        if script == "invalid":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "params.temperature must be a finite number >= 0, got -1.0",
            )
        if script == "invalid_metadata":
            context.set_trailing_metadata(((FIELD_METADATA_KEY, "draft_tokens"),))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "too many draft tokens")
        if script == "stall":
            yield pb.GenerateResponse(tokens=pb.TokenIds(ids=ids[:1]), text="x")
            try:
                await asyncio.sleep(STALL_S)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            self.stall_finished.set()
            return
        for i in range(0, len(ids), 2):
            part = ids[i : i + 2]
            yield pb.GenerateResponse(tokens=pb.TokenIds(ids=part), text=f"<{len(part)}>")
            if script == "drop" and i == 0:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "verifier link lost")
        if script == "no_summary":
            return
        summary_ids = ids[:-1] if script == "mismatch" else ids
        summary = pb.Summary(
            finish_reason="length", token_ids=summary_ids, text="decoded", stats=STATS
        )
        yield pb.GenerateResponse(summary=summary)
        if script == "after_summary":
            yield pb.GenerateResponse(tokens=pb.TokenIds(ids=[1]))


class ScriptedEdgeServer:
    """A grpc.aio server on 127.0.0.1 running its own event loop in a daemon thread."""

    def __init__(
        self,
        servicer: ScriptedEdge,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.servicer = servicer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self._run(self._start(credentials))

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_TIMEOUT_S)

    async def _start(self, credentials):
        server = grpc.aio.server()
        pb_grpc.add_EdgeServicer_to_server(self.servicer, server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        return server, port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(CALL_TIMEOUT_S)
        self.loop.close()
