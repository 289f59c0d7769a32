"""What a bare grpc.aio stream round trip costs on this host: the floor under the link overhead.

``python -m experiments.grpc_bound --json FILE`` starts one echo server process per variant
(a grpc.aio stream-stream handler: a 40-byte message in, the same answer out, no protobuf, no
framework) and one client (this process) that writes a message and reads the answer, `rounds`
times per variant, the variants interleaved round by round so that a shared host's load hits all
alike. Each answer waits `work_ms` of sleep first (standing in for the verifier's forward; the
sleep's own time is measured by the server and subtracted), either on a worker thread (``thread``:
one hand-off to a thread and back, as the Verifier service does) or on the server's event loop
(``inline``). With ``--work-ms 0`` the processes never go idle ("hot"); with 10 ms they idle
between messages as in a real round, and every thread wake-up then costs more.

Prints and writes, per variant, the round trip minus the work (p50, p90 in ms) and the host's
load average at the start and the end. The bench `edgespec bench link` reports the same kind of
figure for a full round (``link_overhead_ms_p50``) plus the edge's own share.
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
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

MODES = ("thread", "inline")
_SERVICE = "bound.Echo"
_METHOD = f"/{_SERVICE}/Stream"


def _work(work_ms: float) -> bytes:
    """Sleep `work_ms`; the answer is the sleep's own duration in ms (subtracted by the client)."""
    t0 = time.perf_counter()
    if work_ms > 0:
        time.sleep(work_ms / 1e3)
    return b"%.9f" % ((time.perf_counter() - t0) * 1e3)


async def _serve(mode: str, work_ms: float) -> None:
    executor = ThreadPoolExecutor(max_workers=1)
    loop = asyncio.get_running_loop()

    async def echo(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
        async for _ in requests:
            if mode == "thread":
                yield await loop.run_in_executor(executor, _work, work_ms)
            else:
                yield _work(work_ms)

    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_SERVICE, {"Stream": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def _client(ports: dict[str, int], rounds: int, warmup: int) -> dict[str, list[float]]:
    calls = {}
    channels = []
    for mode, port in ports.items():
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        calls[mode] = channel.stream_stream(_METHOD)()
    samples: dict[str, list[float]] = {mode: [] for mode in ports}
    for i in range(warmup + rounds):
        for mode, call in calls.items():
            t0 = time.perf_counter()
            await call.write(b"x" * 40)
            answer = await call.read()
            rtt = (time.perf_counter() - t0) * 1e3 - float(answer)
            if i >= warmup:
                samples[mode].append(rtt)
    for channel in channels:
        await channel.close()
    return samples


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(rounds: int, work_ms: float, warmup: int = 50) -> dict:
    """Measure every mode (see the module docstring); returns the JSON-able result."""
    load_start = os.getloadavg()
    procs, ports = [], {}
    try:
        for mode in MODES:
            cmd = [sys.executable, "-m", "experiments.grpc_bound", "--serve", mode]
            cmd += ["--work-ms", str(work_ms)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            assert proc.stdout is not None
            ports[mode] = int(proc.stdout.readline())
        samples = asyncio.run(_client(ports, rounds, warmup))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
    return {
        "bench": "grpc_bound",
        "rounds": rounds,
        "work_ms": work_ms,
        "load_avg_1_5_15_min": {"start": list(load_start), "end": list(os.getloadavg())},
        "rtt_minus_work_ms": {
            mode: {"p50": statistics.median(v), "p90": _quantile(v, 0.9)}
            for mode, v in samples.items()
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="result file")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--work-ms", type=float, default=10.0)
    p.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)  # a server process
    args = p.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, args.work_ms))
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
