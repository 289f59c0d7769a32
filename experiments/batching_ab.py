"""One session through a batching verifier and through a one-at-a-time verifier, same run:
``python -m experiments.batching_ab --json FILE``.

Two verifier subprocesses on the demo target (compute profile h100-70b, emulated), one with
``--no-batching``; an edge engine for each behind its own link emulator at 20 ms RTT. For each of
`reps` passes over the first 4 bench prompts (64 tokens), both verifiers serve, interleaved, an
adaptive pipelined generation and a cloud-only one. Prints and writes the mean tokens/s of each.
It answers one question: does batching cost a lone session anything?
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from edgespec.bench.processes import torch_threads, verifier_process
from edgespec.core.demo_pair import BENCH_PROMPTS, resolve_pair
from edgespec.core.params import SamplingParams
from edgespec.edge.config import EngineConfig, LinkConfig
from edgespec.edge.engine import EdgeEngine
from edgespec.linkemu import LinkEmulator, LinkProfile

PROFILE = "h100-70b"


async def _measure(addresses: dict[str, str], draft: Path, reps: int) -> dict[str, float]:
    emus, engines = {}, {}
    for name, address in addresses.items():
        host, port = address.rsplit(":", 1)
        emus[name] = LinkEmulator(host, int(port), LinkProfile(rtt_ms=20)).start()
        engines[name] = EdgeEngine.from_pretrained(
            draft,
            [emus[name].address],
            link_config=LinkConfig(round_timeout_s=60),
            config=EngineConfig(link_memory=False),
            compute_profile=PROFILE,
        )
    rates: dict[str, list[float]] = {}
    params = SamplingParams(max_new_tokens=64)
    try:
        for engine in engines.values():  # warm: channels connected, kernels run once
            await engine.collect(BENCH_PROMPTS[0], SamplingParams(max_new_tokens=8))
        for _ in range(reps):
            for prompt in BENCH_PROMPTS[:4]:
                for name, engine in engines.items():
                    for policy in ("adaptive", "cloud_only"):
                        t0 = time.perf_counter()
                        out = await engine.collect(prompt, params, policy=policy, pipelined=True)
                        rate = len(out.tokens) / (time.perf_counter() - t0)
                        rates.setdefault(f"{name}_{policy}", []).append(rate)
    finally:
        for engine in engines.values():
            await engine.aclose()
        for emu in emus.values():
            emu.stop()
    return {key: sum(v) / len(v) for key, v in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    target, draft = resolve_pair(None, None)
    args_profile = ["--compute-profile", PROFILE]
    with (
        torch_threads(1),
        verifier_process(target, 1, 180, args_profile) as batched,
        verifier_process(target, 1, 180, [*args_profile, "--no-batching"]) as serial,
    ):
        rates = asyncio.run(_measure({"batched": batched, "serial": serial}, draft, args.reps))
    for key, value in rates.items():
        print(f"{key:22} {value:6.1f} tokens/s")
    result = {"compute_profile": f"{PROFILE} (emulated)", "rtt_ms": 20, "reps": args.reps, **rates}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
