"""What a bare grpc.aio stream round trip costs on this host: the floor under the link overhead.

One echo server process per variant (a grpc.aio stream-stream handler, raw bytes in and out, no
protobuf, no edgespec code) and a client in the caller's event loop that writes a message and
reads its answer. Each message asks for `work_ms` of sleep before the answer (standing in for
the verifier's forward; the server measures the sleep and the client subtracts it), slept
either on a worker thread (``thread``: one hand-off to a thread and back, as the verifier's
model thread) or on the server's event loop (``inline``). With 0 ms the processes never go idle
("hot"); with a forward's time they idle between messages as in a real round, and every thread
wake-up then costs more.

`edgespec bench link` runs this beside its RTT-0 rounds, interleaved, with the verifier's own
median forward as the work, so the round overhead it reports can be read against the floor of
the same moment (`FloorServers`, `floor_rounds`). ``python -m edgespec.bench.grpc_floor --json
FILE`` measures it alone, the variants interleaved round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc

from edgespec.bench.processes import stop_process

MODES = ("thread", "inline")
_SERVICE = "floor.Echo"
_METHOD = f"/{_SERVICE}/Stream"


def _work(request: bytes) -> bytes:
    """Sleep the ms the request names; the answer is the sleep's own duration in ms (the client
    subtracts it, so the sleep's overshoot is not counted as transport)."""
    work_ms = float(request)
    t0 = time.perf_counter()
    if work_ms > 0:
        time.sleep(work_ms / 1e3)
    return b"%.9f" % ((time.perf_counter() - t0) * 1e3)


async def _serve(mode: str) -> None:
    executor = ThreadPoolExecutor(max_workers=1)
    loop = asyncio.get_running_loop()

    async def echo(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
        async for request in requests:
            if mode == "thread":
                yield await loop.run_in_executor(executor, _work, request)
            else:
                yield _work(request)

    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_SERVICE, {"Stream": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


@contextmanager
def floor_servers() -> Iterator[dict[str, int]]:
    """One echo server process per mode on 127.0.0.1; yields {mode: port}; stops them on exit."""
    with ExitStack() as stack:
        ports = {}
        for mode in MODES:
            cmd = [sys.executable, "-m", "edgespec.bench.grpc_floor", "--serve", mode]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            stack.callback(stop_process, proc)
            assert proc.stdout is not None
            ports[mode] = int(proc.stdout.readline())
        yield ports


class FloorClient:
    """Streams to the echo servers (from one event loop); `rounds` adds samples to `samples`."""

    def __init__(self, ports: dict[str, int]) -> None:
        self._channels = {m: grpc.aio.insecure_channel(f"127.0.0.1:{p}") for m, p in ports.items()}
        # raw bytes both ways; no request iterator: the calls are written to
        self._calls = {
            m: ch.stream_stream(_METHOD, None, None)()  # type: ignore[call-arg]
            for m, ch in self._channels.items()
        }
        self.samples: dict[str, list[float]] = {mode: [] for mode in ports}

    async def rounds(self, n: int, work_ms: float, record: bool = True) -> None:
        """n round trips per mode, the modes alternating; each sample is the round trip minus
        the server's measured work, in ms (`record` False: a warm-up)."""
        request = b"%.6f" % work_ms
        for _ in range(n):
            for mode, call in self._calls.items():
                t0 = time.perf_counter()
                await call.write(request)
                answer = await call.read()
                rtt = (time.perf_counter() - t0) * 1e3 - float(answer)  # type: ignore[arg-type]
                if record:
                    self.samples[mode].append(rtt)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per mode: p50 and p90 of the round trip minus the work (ms), and the sample count."""
        return {
            mode: {"p50": statistics.median(v), "p90": quantile(v, 0.9), "rounds": len(v)}
            for mode, v in self.samples.items()
            if v
        }

    async def aclose(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(rounds: int, work_ms: float, warmup: int = 50) -> dict:
    """Measure every mode alone (see the module docstring); returns the JSON-able result."""
    load_start = os.getloadavg()

    async def measure(ports: dict[str, int]) -> dict[str, dict[str, float]]:
        client = FloorClient(ports)
        try:
            await client.rounds(warmup, work_ms, record=False)
            await client.rounds(rounds, work_ms)
            return client.summary()
        finally:
            await client.aclose()

    with floor_servers() as ports:
        floor = asyncio.run(measure(ports))
    return {
        "bench": "grpc_floor",
        "rounds": rounds,
        "work_ms": work_ms,
        "load_avg_1_5_15_min": {"start": list(load_start), "end": list(os.getloadavg())},
        "rtt_minus_work_ms": floor,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="result file")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--work-ms", type=float, default=10.0)
    p.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)  # a server process
    args = p.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    if args.json is None:
        p.error("--json is required")
    result = run(args.rounds, args.work_ms)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    load = result["load_avg_1_5_15_min"]
    print(
        f"host load average (1 min): {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end"
    )
    for mode, q in result["rtt_minus_work_ms"].items():
        print(
            f"{mode:>6}: round trip minus {args.work_ms:g} ms of work: p50 {q['p50']:.3f} ms, "
            f"p90 {q['p90']:.3f} ms"
        )


if __name__ == "__main__":
    main()
